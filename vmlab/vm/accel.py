"""Which accelerator can run lesson guests here, proven by booting one.

The existence of ``/dev/kvm`` proves nothing: on a PVM host (a paravirtual,
nested KVM) the device opens and VMs are created, yet a stock kernel hangs in
early boot. So ``accel="auto"`` boots the lesson guest under KVM with a short
timeout, remembers the verdict for this host (QEMU version, host kernel and
image), and falls back to TCG with the reason.

The probe boots whatever it is given: :func:`probe_kvm` and
:func:`resolve_accel` take a ``boot`` callable that makes an unstarted VM (the
VM driver passes one that makes an ``AsyncVM``), so this module never imports
the VM class. ``vmlab.vm.kvm_verdict()`` and ``require_kvm()`` are the
synchronous entry points.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, Tuple, TypedDict, cast

from .. import config
from ..errors import AccelUnavailable, VMLabError, VMTimeout
from ..hostinfo import host_virtualization
from ..image import GuestImage, ensure_image
from ..log import get_logger
from ..tools import qemu_version

__all__ = ["PROBE_TIMEOUT", "BootKVM", "KvmVerdict", "ProbeVM", "host_key", "kvm_device_problem", "probe_kvm",
           "resolve_accel"]

log = get_logger(__name__)

PROBE_TIMEOUT = 12.0
SLOW_PROBE_TIMEOUT = 90.0       # VMLAB_SLOW_KVM=1: a guest under KVM nested in TCG boots in 17-40 s


class KvmVerdict(TypedDict):
    """Whether KVM boots guests here, and why (``cached``: from an earlier probe)."""

    accel: str
    usable: bool
    reason: str
    fix: str
    seconds: float
    checked: float
    cached: bool


class ProbeVM(Protocol):
    """What the probe needs of the VM it boots."""

    boot_seconds: Optional[float]

    async def start(self) -> object: ...

    async def run(self, command: str, *, timeout: Optional[float] = ..., check: bool = ...) -> object: ...

    async def shutdown(self, timeout: float = ...) -> None: ...


#: Makes an unstarted VM that boots *image* under KVM within *timeout* seconds.
BootKVM = Callable[[GuestImage, float], ProbeVM]

_cache: Dict[str, KvmVerdict] = {}


def _verdict_file() -> Path:
    return config.cache_dir() / "accel-verdicts.json"


def host_key(image_key: str) -> str:
    """What a remembered verdict is valid for: this host, its kernel, this QEMU, this image."""
    return f"{socket.gethostname()}|{platform.release()}|qemu-{qemu_version()}|{image_key}"


def kvm_device_problem() -> Optional[str]:
    """Why /dev/kvm cannot even be opened, or None if it can."""
    if not os.path.exists("/dev/kvm"):
        return "there is no /dev/kvm (no hardware virtualization exposed, or the kvm module is not loaded)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except PermissionError:
        return "/dev/kvm exists but this user may not open it"
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    return None


def _load() -> Dict[str, KvmVerdict]:
    try:
        return cast(Dict[str, KvmVerdict], json.loads(_verdict_file().read_text()))
    except (OSError, ValueError):
        return {}


def _store(key: str, verdict: KvmVerdict) -> None:
    data = _load()
    data[key] = verdict
    config.atomic_write(_verdict_file(), json.dumps(data, indent=1), mode=0o600)


async def probe_kvm(boot: BootKVM, image: Optional[GuestImage] = None, timeout: float = PROBE_TIMEOUT,
                    use_cache: bool = True) -> KvmVerdict:
    """Prove KVM by booting the lesson guest under it (a VM made by ``boot(image, timeout)``).

    Returns ``{"accel": "kvm", "usable": bool, "reason": str, "fix": str, "seconds": float,
    "checked": time, "cached": bool}``.
    """
    problem = kvm_device_problem()
    if problem:
        fix = ("sudo usermod -aG kvm $USER, then log in again" if "may not open" in problem
               else "enable VT-x/AMD-V in firmware, or use TCG")
        return {"accel": "kvm", "usable": False, "reason": problem, "fix": fix, "seconds": 0.0,
                "checked": time.time(), "cached": False}
    if image is None:
        image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
    key = host_key(image.key)
    if use_cache:
        if key in _cache:
            return {**_cache[key], "cached": True}
        stored = _load().get(key)
        if stored:
            _cache[key] = stored
            return {**stored, "cached": True}
    if config.slow_kvm():       # KVM inside a TCG guest (vmlab.vm.inner) boots at TCG's pace
        timeout = max(timeout, SLOW_PROBE_TIMEOUT)
    t0 = time.monotonic()
    vm = boot(image, timeout)
    usable, reason = False, ""
    try:
        await vm.start()
        await vm.run("true", timeout=10)
        usable, reason = True, f"a guest booted under KVM in {vm.boot_seconds or 0:.2f} s"
    except VMLabError as exc:
        stderr = getattr(exc, "stderr", "") or ""
        hv = host_virtualization()
        if "failed to set MSR" in stderr or "kvm_buf_set_msrs" in stderr:
            reason = "QEMU aborted setting up the vCPU (failed to set an MSR)"
        elif isinstance(exc, VMTimeout):
            reason = f"a guest did not boot under KVM within {timeout:g} s (it hung in early boot)"
        else:
            reason = f"QEMU failed under KVM: {exc.message}"
        if hv.get("pvm_host"):
            reason += ("; the host KVM is PVM (kvm_pvm module), which runs only guests built for PVM, "
                       "and this host is itself a VM")
        elif hv.get("is_vm"):
            reason += "; this host is itself a VM, so KVM here is nested and may lack features"
    finally:
        await vm.shutdown(timeout=5)
    verdict: KvmVerdict = {"accel": "kvm", "usable": usable, "reason": reason,
               "fix": "" if usable else "nothing to fix for the lessons: they run under TCG (slower, same lessons)",
               "seconds": round(time.monotonic() - t0, 3), "checked": time.time(), "cached": False}
    _cache[key] = verdict
    try:
        _store(key, verdict)
    except OSError as exc:     # the verdict is then probed again next time
        log.debug("could not store the KVM verdict: %s", exc)
    return verdict


async def resolve_accel(requested: str, boot: BootKVM) -> Tuple[str, str]:
    """Map ``auto``/``tcg``/``kvm`` to the accelerator to use and why (``boot``: see :func:`probe_kvm`).

    ``kvm`` asked for explicitly and not usable raises AccelUnavailable.
    """
    env = config.accel_override()
    if requested == "auto" and env is not None:
        requested = env
    if requested == "tcg":
        return "tcg", "TCG asked for"
    if requested == "kvm":
        problem = kvm_device_problem()
        if problem:
            raise AccelUnavailable("kvm", problem, fix="use accel='tcg' or accel='auto'")
        cached = await _cached_verdict()
        if cached is not None and not cached["usable"]:
            raise AccelUnavailable("kvm", cached["reason"], fix="use accel='tcg' or accel='auto'")
        return "kvm", "KVM asked for"
    verdict = await probe_kvm(boot)
    if verdict["usable"]:
        return "kvm", "KVM proven by booting a guest"
    return "tcg", "KVM not usable here: " + verdict["reason"]


async def _cached_verdict() -> Optional[KvmVerdict]:
    try:
        image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
    except VMLabError:
        return None
    key = host_key(image.key)
    return _cache.get(key) or _load().get(key)
