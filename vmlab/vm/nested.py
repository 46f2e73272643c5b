"""Nested guests: KVM inside a vmlab guest (``MachineSpec(nested=True)``).

The guest's virtual CPU gets hardware virtualization (:func:`vmlab.vm.qemu.nested_cpu_model`):
under TCG QEMU emulates AMD-V (``-cpu qemu64,+svm,+npt``); under KVM the host's CPU is passed
through (``-cpu host``; nested virtualization, if the host's ``kvm_intel``/``kvm_amd`` allow
it). The kernel command line says ``vmlab.nested=1`` and the guest's ``/init`` loads
``kvm_amd`` or ``kvm_intel``, whichever the virtual CPU offers.

Whether ``/dev/kvm`` works inside is proven, not assumed: once the guest is up (booted or
restored from a warm snapshot), the VM runs ``hv nothing 1`` in it -- ``vmlab/guest/hv.c``
creating a VM and a vCPU and running an empty guest program to its one I/O exit -- and keeps
the verdict in ``vm.nested_kvm``::

    {"works": True, "reason": "hv ran a guest under KVM inside this guest (kvm_amd)",
     "module": "kvm_amd", "seconds": 4.9, "outer_accel": "tcg"}

``seconds`` runs from ``start()`` to that proof. :func:`probe_nested` is the same check for
``doctor``: it boots the nested guest it is handed (a ``boot`` callable, as
:mod:`vmlab.vm.accel` does, so this module never imports the VM class) and remembers the
verdict per host, QEMU and image.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, TypedDict, cast

from .. import config
from ..errors import VMLabError
from ..image import GuestImage, ensure_image
from ..log import get_logger
from .accel import host_key
from .guest import GuestMixin

__all__ = ["PROOF", "BootNested", "NestedKvm", "NestedMixin", "NestedVerdict", "probe_nested"]

log = get_logger(__name__)

PROOF = "hv nothing 1"          # an empty guest program: its only exit is one `out` to hv's done port
PROBE_TIMEOUT = 120.0


class NestedKvm(TypedDict):
    """Whether /dev/kvm works inside a nested guest, and why."""

    works: bool
    reason: str
    module: str             # kvm_amd, kvm_intel, or "" if neither is loaded
    seconds: float          # from start() to the proof (or to the failure)
    outer_accel: str        # the nested guest's own accelerator: tcg or kvm


def hv_result(text: str) -> Optional[Dict[str, Any]]:
    """The JSON line ``hv`` printed (its last line starting with ``{``), or None."""
    for line in reversed(text.strip().splitlines()):
        if line.strip().startswith("{"):
            try:
                return cast(Dict[str, Any], json.loads(line))
            except ValueError:
                return None
    return None


class NestedMixin(GuestMixin):
    """``nested_kvm``: the proof that KVM works inside a nested guest (None for other guests)."""

    nested_kvm: Optional[NestedKvm] = None

    async def _prove_nested(self, t0: float) -> None:
        """Run hv once in the guest and record whether KVM works there. A KVM that does not
        work is a verdict, not an error: only a dead VM raises."""
        outer = self.accel or "tcg"
        module, works, reason = "", False, ""
        try:
            # one round trip: which KVM module is loaded, then the proof
            res = await self.run(f"grep -E '^kvm_(amd|intel) ' /proc/modules; {PROOF}", timeout=60, check=False)
            found = re.findall(r"^(kvm_amd|kvm_intel) ", res.stdout, re.M)
            module = found[0] if found else ""
            result = hv_result(res.stdout)
            if result is not None and result.get("ok"):
                works, reason = True, f"hv ran a guest under KVM inside this guest ({module or 'kvm'})"
            else:
                why = (result or {}).get("error") or (res.stderr or res.stdout).strip()[-200:]
                reason = f"KVM does not work inside the guest: {why}"
                if not module:
                    reason += "; neither kvm_amd nor kvm_intel is loaded (the virtual CPU offers no svm or vmx"
                    reason += ("; the host's kvm_intel/kvm_amd may not allow nested guests: see "
                               "/sys/module/kvm_intel/parameters/nested)" if outer == "kvm" else ")")
        except VMLabError as exc:
            if not self._is_up():
                raise
            reason = f"could not check KVM inside the guest: {exc.message}"
        self.nested_kvm = {"works": works, "reason": reason, "module": module,
                           "seconds": round(time.monotonic() - t0, 3), "outer_accel": outer}
        self._record_event("NESTED_KVM", dict(self.nested_kvm), source="vmlab")

    def _is_up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


# ---------------------------------------------------------------- doctor's probe
class NestedProbeVM(Protocol):
    """What the probe needs of the nested guest it boots."""

    nested_kvm: Optional[NestedKvm]

    async def start(self) -> object: ...

    async def shutdown(self, timeout: float = ...) -> None: ...


#: Makes an unstarted nested guest of *image* under TCG that boots within *timeout* seconds.
BootNested = Callable[[GuestImage, float], NestedProbeVM]


class NestedVerdict(TypedDict):
    """doctor's line "nested KVM inside a TCG guest": does it work here, and how fast."""

    works: bool
    reason: str
    seconds: float          # the probe's wall time (boot + proof)
    checked: float
    cached: bool


def _verdict_file() -> Path:
    return config.cache_dir() / "nested-verdicts.json"


def _load() -> Dict[str, NestedVerdict]:
    try:
        return cast(Dict[str, NestedVerdict], json.loads(_verdict_file().read_text()))
    except (OSError, ValueError):
        return {}


async def probe_nested(boot: BootNested, image: Optional[GuestImage] = None, use_cache: bool = True,
                       timeout: float = PROBE_TIMEOUT) -> NestedVerdict:
    """Boot a nested guest under TCG and say whether KVM works inside it; remembered per host,
    QEMU and image (``use_cache=False`` boots again)."""
    if image is None:
        image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
    key = host_key(image.key)
    if use_cache:
        stored = _load().get(key)
        if stored:
            return {**stored, "cached": True}
    t0 = time.monotonic()
    vm = boot(image, timeout)
    works, reason = False, ""
    try:
        await vm.start()
        state = vm.nested_kvm
        if state is None:
            reason = "the guest did not report on KVM (not a nested guest?)"
        elif state["works"]:
            works, reason = True, f"works, slow (/dev/kvm proven {state['seconds']:.1f} s after start)"
        else:
            reason = state["reason"]
    except VMLabError as exc:
        reason = f"the nested guest did not boot: {exc.message}"
    finally:
        await vm.shutdown(timeout=5)
    verdict: NestedVerdict = {"works": works, "reason": reason, "seconds": round(time.monotonic() - t0, 3),
                              "checked": time.time(), "cached": False}
    data = _load()
    data[key] = verdict
    try:
        config.atomic_write(_verdict_file(), json.dumps(data, indent=1), mode=0o600)
    except OSError as exc:      # probed again next time
        log.debug("could not store the nested KVM verdict: %s", exc)
    return verdict
