"""Where a measurement ran: the host, its CPU, whether it is itself a VM."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from typing import Dict, Optional

from .errors import VMLabError
from .tools import qemu_version


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def host_virtualization() -> Dict[str, object]:
    """Is this host itself a virtual machine? (Nested virtualization.)"""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    hypervisor_flag = " hypervisor" in flags
    detected = container = None
    if shutil.which("systemd-detect-virt"):
        for flag in ("--vm", "--container"):
            try:
                out = subprocess.run(["systemd-detect-virt", flag], capture_output=True, text=True,
                                     timeout=5).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out and out != "none":
                if flag == "--vm":
                    detected = out
                else:
                    container = out
    vendor = _read("/sys/class/dmi/id/sys_vendor")
    product = _read("/sys/class/dmi/id/product_name")
    is_vm = hypervisor_flag or detected is not None
    return {"is_vm": is_vm, "cpuid_hypervisor_flag": hypervisor_flag, "detected": detected,
            "container": container,
            "dmi_vendor": vendor, "dmi_product": product,
            "pvm_host": os.path.exists("/sys/module/kvm_pvm")}


def where(accel: str, kernel_release: Optional[str] = None) -> Dict[str, str]:
    """The columns every measurement carries."""
    try:
        qv = qemu_version()
    except VMLabError:
        qv = "unknown"
    return {"accel": accel, "qemu": qv, "guest_kernel": kernel_release or "",
            "host_kernel": platform.release(), "host_cpu": host_cpu(),
            "host_cpus": str(os.cpu_count() or 0)}
