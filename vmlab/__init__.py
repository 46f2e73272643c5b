"""vmlab: run and measure virtualization from Jupyter.

    from vmlab import VM
    with VM() as vm:
        print(vm.run("uname -r").stdout)

The pieces, one job per module (docs/developers.md has the whole map):
    spec      what a VM is (MachineSpec, Disk, NIC), validated before launch
    image     the lesson guest image (kernel, initramfs, agent, vmbench), cached
    vm        the VM driver: AsyncVM / VM, QEMU's command line, the guest agent,
              console, events, warm starts, the accelerator probe, the reaper
    errors    the error tree
"""

from .errors import (
    AccelUnavailable,
    ExperimentError,
    GuestError,
    ImageError,
    LaunchError,
    SetupError,
    SpecError,
    StateError,
    VMDied,
    VMError,
    VMLabError,
    VMTimeout,
)
from .spec import NIC, Disk, MachineSpec
from .vm import VM, AsyncVM, RunResult, RunState

__version__ = "0.1.0"

__all__ = [
    "NIC", "VM", "AccelUnavailable", "AsyncVM", "Disk", "ExperimentError", "GuestError", "ImageError", "LaunchError",
    "MachineSpec", "RunResult", "RunState", "SetupError", "SpecError", "StateError", "VMDied", "VMError", "VMLabError",
    "VMTimeout",
]
