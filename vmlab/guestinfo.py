"""What the experiments ask of a started VM, typed: its QEMU process id, the
accelerator it runs under, and the where-it-ran columns of its rows.

A :class:`~vmlab.vm.VM` has ``pid``, ``accel`` and its NICs' host sockets set once
it has started (``None`` before); these helpers return them as plain values, or raise
:class:`~vmlab.errors.StateError` naming the fix when the VM has not started.

    from vmlab.guestinfo import qemu_pid, where_vm
    with VM(accel="tcg") as vm:
        procfs.threads(qemu_pid(vm)); rows.where = where_vm(vm)
"""

from __future__ import annotations

import socket
from typing import Dict, Union

from .errors import StateError
from .hostinfo import where
from .vm import VM, AsyncVM

AnyVM = Union[VM, AsyncVM]


def qemu_pid(vm: AnyVM) -> int:
    """The QEMU process id of a started VM."""
    if vm.pid is None:
        raise StateError(f"{vm.spec.name}: no QEMU process (the VM is {vm.state.value})",
                         fix="start the VM first (vm.start() or `with VM(...) as vm`)")
    return vm.pid


def accel_of(vm: AnyVM) -> str:
    """The accelerator a started VM runs under ("tcg" or "kvm")."""
    if vm.accel is None:
        raise StateError(f"{vm.spec.name}: no accelerator chosen yet (the VM is {vm.state.value})",
                         fix="start the VM first (vm.start() or `with VM(...) as vm`)")
    return vm.accel


def where_vm(vm: VM) -> Dict[str, str]:
    """The where-it-ran columns (:func:`vmlab.hostinfo.where`) of a started VM."""
    return where(accel_of(vm), vm.kernel_release)


def nic_socket(vm: VM, index: int = 0) -> socket.socket:
    """The host end of a started VM's NIC ``index`` (a ``backend="socket"`` NIC)."""
    socks = vm.nic_sockets
    sock = socks[index] if 0 <= index < len(socks) else None
    if sock is None:
        raise StateError(f"{vm.spec.name}: NIC {index} has no host socket (the VM is {vm.state.value})",
                         fix='give the VM a NIC with backend="socket" and start it')
    return sock
