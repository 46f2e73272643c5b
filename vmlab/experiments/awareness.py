"""Awareness: what a guest can tell about being virtualized (and what this host can).

    from vmlab.experiments import awareness
    df = awareness.run(quick=True)       # host, default TCG guest, guest with the hypervisor bit hidden
    awareness.guest_awareness(vm); awareness.host_awareness()   # CPUID bit, vendor leaf, dmesg lines, DMI

KVM rows (default and hidden) are added where KVM is proven; ``df.attrs["kvm"]``
says why they are missing.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..guestinfo import where_vm
from ..hostinfo import where
from ..hostview import native_vmbench
from ..measure import Progress, Rows, advance, plan, say
from ..vm import VM
from .cpu import kvm_status

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

AWARE_PATTERNS = (r"Booting paravirtualized kernel on .*", r"Hypervisor detected: .*",
                  r"clocksource: Switched to clocksource .*", r"kvm-clock: .*")


def _dmesg_lines(text: str) -> List[str]:
    out = []
    for line in text.splitlines():
        body = re.sub(r"^\[\s*[\d.]+\]\s*", "", line)
        if any(re.search(p, body) for p in AWARE_PATTERNS):
            out.append(body.strip())
    return out


def _summarise(info: Dict[str, Any], dmesg: Optional[str], cpu_flags: str, dmi: Dict[str, str]) -> Dict[str, Any]:
    lines = _dmesg_lines(dmesg) if dmesg is not None else []
    boot = next((ln for ln in lines if ln.startswith("Booting paravirtualized")), None)
    det = next((ln for ln in lines if ln.startswith("Hypervisor detected")), None)
    return {"hypervisor_bit": info.get("hypervisor_bit"), "hypervisor_vendor": info.get("hypervisor_vendor"),
            "cpu_vendor": info.get("cpu_vendor"), "cpu_brand": info.get("cpu_brand"),
            "cpuinfo_hypervisor_flag": " hypervisor" in f" {cpu_flags} ",
            "kernel_says": boot if dmesg is not None else "dmesg not readable",
            "hypervisor_detected": det or ("" if dmesg is not None else "dmesg not readable"),
            "clocksource": info.get("clocksource_current"),
            "clocksources": " ".join(info.get("clocksources_available") or []),
            "dmi_vendor": dmi.get("sys_vendor", ""), "dmi_product": dmi.get("product_name", ""),
            "dmesg_lines": "\n".join(lines)}


def guest_awareness(vm: VM) -> Dict[str, Any]:
    """What the guest can see of its platform: CPUID hypervisor bit and vendor leaf, dmesg, DMI."""
    info = json.loads(vm.run("vmbench sysinfo").stdout)
    dmesg = vm.run("dmesg", check=False)
    flags = vm.run("grep -m1 '^flags' /proc/cpuinfo", check=False).stdout
    dmi = {}
    for k in ("sys_vendor", "product_name"):
        r = vm.run(f"cat /sys/class/dmi/id/{k}", check=False)
        if r.status == 0:
            dmi[k] = r.stdout.strip()
    return _summarise(info, dmesg.stdout if dmesg.status == 0 else None, flags, dmi)


def host_awareness() -> Dict[str, Any]:
    """The same questions asked on this host (itself a KVM guest on the project's machines)."""
    info = json.loads(subprocess.run([str(native_vmbench()), "sysinfo"], capture_output=True, text=True,
                                     timeout=30).stdout)
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
        dmesg = p.stdout if p.returncode == 0 and p.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        dmesg = None
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    dmi = {}
    for k in ("sys_vendor", "product_name"):
        try:
            with open(f"/sys/class/dmi/id/{k}") as f:
                dmi[k] = f.read().strip()
        except OSError:
            pass
    return _summarise(info, dmesg, flags, dmi)


def run(quick: bool = False, progress: Progress = None, *, image: Optional[GuestImage] = None,
        kvm: Optional[bool] = None) -> pd.DataFrame:
    """Host, default TCG guest, TCG guest with the hypervisor bit hidden (and the KVM pair where
    KVM is proven). ``df.attrs["kvm"]`` says why KVM rows are missing."""
    rows = Rows("awareness")
    configs: List[Tuple[str, Optional[str], str]] = [
        ("tcg", None, "TCG, default CPU model"),
        ("tcg", "qemu64,-hypervisor", "TCG, hypervisor bit hidden (-cpu qemu64,-hypervisor)")]
    verdict = kvm_status(progress, probe=kvm is not False)
    notes = []
    if kvm is not False and verdict.get("usable"):
        configs += [("kvm", None, "KVM, default CPU model"),
                    ("kvm", "qemu64,kvm=off,-hypervisor", "KVM, hidden (kvm=off,-hypervisor)")]
    else:
        notes.append(f"no KVM rows: KVM is not available on this host ({verdict.get('reason')})")
        say(progress, notes[-1])
    plan(progress, len(configs))               # one boot per configuration
    with rows.guard():
        rows.add(**where("none"), system="this host (native)", cpu_model="", **host_awareness())
        for accel, model, label in configs:
            say(progress, f"booting: {label}")
            with VM(accel=accel, name="aware", cpu_model=model, image=image, warm=True) as vm:
                rows.add(**where_vm(vm), system=label, cpu_model=model or "",
                         **guest_awareness(vm))
            advance(progress)
    df = rows.frame()
    df.attrs["kvm"] = verdict
    df.attrs["notes"] = notes
    return df
