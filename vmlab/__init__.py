"""vmlab: run and measure virtualization from Jupyter.

    from vmlab import VM
    with VM() as vm:
        print(vm.run("uname -r").stdout)

The pieces, one job per module:
    spec      what a VM is (MachineSpec, Disk, NIC), validated before launch
    qemu      the QEMU binary and the command line for a spec
    image     the lesson guest image (kernel, initramfs, agent, vmbench), cached
    machine   AsyncVM / VM: lifecycle, QMP, the guest agent, console, events
    agent     the host side of the guest agent protocol
    accel     which accelerator works here, proven by booting
    reaper    no QEMU outlives its Python process
    errors    the error tree
"""

from .agent import RunResult
from .errors import (AccelUnavailable, ExperimentError, GuestError, ImageError, LaunchError,
                     SetupError, SpecError, StateError, VMDied, VMError, VMLabError, VMTimeout)
from .machine import VM, AsyncVM, RunState
from .spec import NIC, Disk, MachineSpec

__version__ = "0.1.0"

__all__ = ["VM", "AsyncVM", "RunState", "MachineSpec", "Disk", "NIC", "RunResult",
           "VMLabError", "SpecError", "SetupError", "ImageError", "AccelUnavailable", "VMError",
           "LaunchError", "VMTimeout", "VMDied", "StateError", "GuestError", "ExperimentError"]
