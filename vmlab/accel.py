"""Which accelerator can run lesson guests here, proven by booting one.

The existence of ``/dev/kvm`` proves nothing: on a PVM host (a paravirtual,
nested KVM) the device opens and VMs are created, yet a stock kernel hangs in
early boot. So ``accel="auto"`` boots the lesson guest under KVM with a short
timeout, remembers the verdict for this host (QEMU version, host kernel and
image), and falls back to TCG with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import time
from typing import Any, Dict, Optional, Tuple

from .errors import AccelUnavailable, VMLabError, VMTimeout
from .hostinfo import host_virtualization

PROBE_TIMEOUT = 12.0
_cache: Dict[str, Dict[str, Any]] = {}


def _verdict_file():
    from .image import cache_dir
    return cache_dir() / "accel-verdicts.json"


def _host_key(image_key: str) -> str:
    from .qemu import qemu_version
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


def _load() -> Dict[str, Dict[str, Any]]:
    try:
        return json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, verdict: Dict[str, Any]) -> None:
    data = _load()
    data[key] = verdict
    path = _verdict_file()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def probe_kvm(image: Any = None, timeout: float = PROBE_TIMEOUT, use_cache: bool = True) -> Dict[str, Any]:
    """Prove KVM by booting the lesson guest under it. Returns
    ``{"accel": "kvm", "usable": bool, "reason": str, "seconds": float, "checked": time}``."""
    from .image import ensure_image
    problem = kvm_device_problem()
    if problem:
        fix = ("sudo usermod -aG kvm $USER, then log in again" if "may not open" in problem
               else "enable VT-x/AMD-V in firmware, or use TCG")
        return {"accel": "kvm", "usable": False, "reason": problem, "fix": fix, "seconds": 0.0,
                "checked": time.time(), "cached": False}
    if image is None:
        image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
    key = _host_key(image.key)
    if use_cache:
        if key in _cache:
            return dict(_cache[key], cached=True)
        stored = _load().get(key)
        if stored:
            _cache[key] = stored
            return dict(stored, cached=True)
    from .machine import AsyncVM
    t0 = time.monotonic()
    vm = AsyncVM(accel="kvm", name="kvm-probe", image=image, boot_timeout=timeout)
    vm.accel = "kvm"
    usable, reason = False, ""
    try:
        await vm.start()
        await vm.run("true", timeout=10)
        usable, reason = True, f"a guest booted under KVM in {vm.boot_seconds:.2f} s"
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
    verdict = {"accel": "kvm", "usable": usable, "reason": reason,
               "fix": "" if usable else "nothing to fix for the lessons: they run under TCG (slower, same lessons)",
               "seconds": round(time.monotonic() - t0, 3), "checked": time.time(), "cached": False}
    _cache[key] = verdict
    try:
        _store(key, verdict)
    except OSError:
        pass
    return verdict


async def resolve_accel(requested: str) -> Tuple[str, str]:
    """Map ``auto``/``tcg``/``kvm`` to the accelerator to use and why.

    ``kvm`` asked for explicitly and not usable raises AccelUnavailable.
    """
    env = os.environ.get("VMLAB_ACCEL")
    if requested == "auto" and env in ("tcg", "kvm"):
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
    verdict = await probe_kvm()
    if verdict["usable"]:
        return "kvm", "KVM proven by booting a guest"
    return "tcg", "KVM not usable here: " + verdict["reason"]


async def _cached_verdict() -> Optional[Dict[str, Any]]:
    from .image import ensure_image
    try:
        image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
    except VMLabError:
        return None
    key = _host_key(image.key)
    return _cache.get(key) or _load().get(key)


def kvm_verdict(use_cache: bool = True) -> Dict[str, Any]:
    """Synchronous probe_kvm for notebooks and the CLI."""
    from . import _loop
    return _loop.run(probe_kvm(use_cache=use_cache))


def require_kvm() -> None:
    """Raise AccelUnavailable (with the reason) unless KVM is proven here.

    Notebooks call this in KVM-only cells and show the TCG picture instead.
    """
    v = kvm_verdict()
    if not v["usable"]:
        raise AccelUnavailable("kvm", v["reason"], fix=v.get("fix") or "use TCG")
