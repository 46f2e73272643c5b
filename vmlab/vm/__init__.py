"""The VM driver: start, control, talk to, measure and stop a QEMU guest.

    from vmlab.vm import VM
    with VM(memory="256M") as vm:
        print(vm.run("uname -r").stdout)

One job per module (each may import the ones above it in this list, never below):

    state     RunState, the one transition function, the @require guard
    runner    vmlab's private event loop on a daemon thread (block_on)
    qemu      the QEMU binary, its version, the command line for a spec
    agent     the host side of the guest agent protocol (RunResult)
    reaper    no QEMU outlives its Python process
    accel     which accelerator works here, proven by booting what it is given
    console   the console buffer and log, expect
    events    the event log and waiting for an event
    core      what every part of a VM shares: attributes, state, QMP, exit watch
    launch    private dir, socketpairs, the QEMU process, teardown
    guest     wait_ready, run, files, ping (through the agent)
    warm      warm snapshots: save a booted guest, restore it
    tracing   QEMU trace events of a VM
    metrics   the QEMU process's CPU time and memory, from /proc
    nested    nested guests: proving KVM works inside one (vm.nested_kvm), doctor's probe
    migrate   live migration between two QEMU processes on this host (source and -incoming)
    machine   AsyncVM: the rooms together; start, lifecycle actions, shutdown
    sync      VM, the synchronous face; kvm_verdict, require_kvm
    profile   where a boot's time goes (python -m vmlab boot --profile, docs/boot.md)
    inner     vmlab run inside a nested guest under real KVM (run_inside; the host root shared read-only)
"""

from .accel import kvm_device_problem
from .agent import RunResult
from .machine import AsyncVM
from .state import RunState
from .sync import VM, kvm_verdict, nested_verdict, require_kvm

__all__ = ["VM", "AsyncVM", "RunResult", "RunState", "kvm_device_problem", "kvm_verdict", "nested_verdict",
           "require_kvm"]
