"""vmlab's KVM path, checked for real: run INSIDE a nested guest whose /dev/kvm works.

tests/test_kvm_inner.py runs this with vmlab.vm.inner.run_inside (chroot of the host's root,
read-only, VMLAB_ACCEL=kvm). It prints ONE JSON object on its last stdout line; each test
asserts a part of it. Every section records its own error instead of stopping the others.

Sections: probe (probe_kvm without its cache), vm (ONE inner guest under KVM, the disk
experiment's IDE PIO profile, for all the rest), clock (its clocksource), exits (query-stats
counters around port reads, port writes and idle), cpu (the CPU experiment's KVM rows), steal (steal time
when a hog shares the vCPU thread's core: the hosted experiment's measurement), device (the
disk experiment's row under KVM, kvm_exits and device_calls filled), sharing (the sharing
experiment's step measurement on this guest: its KVM row without another inner boot), port_io
(what ``vmbench cpu --bench port_io`` does here: user-mode port I/O traps, see docs/kvm.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

REPORT: Dict[str, Any] = {}
PORT_READS = (2048, 8192)       # bytes read from /dev/port: one inb, so one I/O exit, each
PORT_WRITES = (1024, 4096)      # bytes written to /dev/port: one outb, so one I/O exit, each
PORT_BASE = 8192                # ports 0x2000 up: no device there, so nothing happens but the exits
SPIN_S = 1.5                    # the sharing job's length
DISK_BYTES = 256 << 10          # read from the IDE disk in PIO mode
IDLE_S = 2


SECTIONS: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []


def section(name: str) -> Callable[[Callable[[], Dict[str, Any]]], Callable[[], Dict[str, Any]]]:
    """Register a check; main() runs them in order, each one's failure kept in its own section."""
    def register(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
        SECTIONS.append((name, fn))
        return fn
    return register


def main() -> None:
    for name, fn in SECTIONS:
        t0 = time.monotonic()
        try:
            REPORT[name] = fn()
        except Exception as exc:    # reported, asserted by the tests
            REPORT[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        REPORT[name]["seconds"] = round(time.monotonic() - t0, 2)
    vm = with_vm.get("vm")
    if vm is not None:
        vm.shutdown()
    print(json.dumps(REPORT, default=str))
    sys.stdout.flush()


@section("probe")
def _probe() -> Dict[str, Any]:
    from vmlab.vm.accel import probe_kvm
    from vmlab.vm.machine import kvm_probe_vm
    from vmlab.vm.runner import block_on
    # as doctor and accel="auto" run it, without the cache (run_inside sets VMLAB_SLOW_KVM=1: TCG's pace)
    verdict = block_on(probe_kvm(kvm_probe_vm, use_cache=False))
    return dict(verdict)


with_vm: Dict[str, Any] = {}


@section("vm")
def _boot() -> Dict[str, Any]:
    # ONE inner guest for every check below: the disk experiment's IDE PIO profile (a scratch disk on the
    # legacy IDE controller, DMA off), so the device check needs no second boot
    from vmlab import devices as dv
    prof = dv.get("ide-pio", "disk")
    vm = dv.boot(prof, accel="kvm")
    with_vm.update(vm=vm, profile=prof)
    return {"accel": vm.accel, "boot_seconds": vm.boot_seconds, "kernel": vm.kernel_release}


@section("clock")
def _clock() -> Dict[str, Any]:
    vm = with_vm["vm"]
    base = "/sys/devices/system/clocksource/clocksource0"
    return {"current": vm.run(f"cat {base}/current_clocksource").stdout.strip(),
            "available": vm.run(f"cat {base}/available_clocksource").stdout.split()}


@section("exits")
def _exits() -> Dict[str, Any]:
    from vmlab.devices import kvm_exit_stats
    vm = with_vm["vm"]

    def stats() -> Dict[str, int]:
        s, why = kvm_exit_stats(vm)
        if s is None:
            raise RuntimeError(why)
        return s

    out: Dict[str, Any] = {}
    s0 = stats()
    vm.run(f"sleep {IDLE_S}")
    s1 = stats()
    out["idle"] = {k: s1[k] - s0.get(k, 0) for k in ("exits", "io_exits", "mmio_exits", "halt_exits")}
    for n in PORT_READS:
        a = stats()
        vm.run(f"dd if=/dev/port of=/dev/null bs=1 skip={PORT_BASE} count={n} 2>/dev/null")
        b = stats()
        out[f"reads_{n}"] = {k: b[k] - a.get(k, 0) for k in ("exits", "io_exits", "mmio_exits", "halt_exits")}
    for n in PORT_WRITES:
        a = stats()
        vm.run(f"dd if=/dev/zero of=/dev/port bs=1 seek={PORT_BASE} count={n} 2>/dev/null")
        b = stats()
        out[f"writes_{n}"] = {k: b[k] - a.get(k, 0) for k in ("exits", "io_exits", "mmio_exits", "halt_exits")}
    out["names"] = sorted(s1)
    return out


@section("cpu")
def _cpu() -> Dict[str, Any]:
    from vmlab.experiments import cpu
    from vmlab.guestinfo import where_vm
    from vmlab.measure import Rows
    vm = with_vm["vm"]
    rows = Rows("cpu")
    data = cpu.run_guest(vm, benchmarks=("null_syscall", "rdtsc"), repeats=3, scale=0.02)
    cpu.add_results(rows, data, "kvm", where_vm(vm), rounds=1)
    return {"rows": json.loads(rows.frame().to_json(orient="records"))}


@section("steal")
def _steal() -> Dict[str, Any]:
    from vmlab import hostview
    from vmlab.experiments.hosted import _guest_spin
    vm = with_vm["vm"]
    tid = hostview.vcpu_tid(vm)
    core = sorted(os.sched_getaffinity(0))[0]
    out: Dict[str, Any] = {"core": core}
    with hostview.pinned(tid, {core}):
        out["alone"] = _guest_spin(vm, 1.5, tid)
        hog = hostview.CpuHog(core, max_seconds=60).start()
        try:
            time.sleep(0.05)
            out["hog"] = _guest_spin(vm, 1.5, tid)
        finally:
            hog.stop()
    return out


@section("sharing")
def _sharing() -> Dict[str, Any]:
    # the sharing experiment's step (vmbench spin in every VM at once, what the host saw) on this guest
    from vmlab.experiments import sharing
    df = sharing.run_on([with_vm["vm"]], seconds=SPIN_S)
    return {"rows": json.loads(df.to_json(orient="records"))}


@section("port_io")
def _port_io() -> Dict[str, Any]:
    # vmbench's port_io benchmark: ioperm, then inb from port 0x80 in user mode (docs/kvm.md: why it traps here)
    vm = with_vm["vm"]
    res = vm.run("vmbench cpu --bench port_io --repeats 1 --scale 0.01", check=False)
    traps = [ln for ln in vm.run("dmesg").stdout.splitlines() if "traps: vmbench" in ln]
    return {"status": res.status, "stdout": res.stdout[-500:], "stderr": res.stderr[-500:], "traps": traps[-3:]}


@section("device")
def _device() -> Dict[str, Any]:
    # the disk experiment's own measurement and row, under KVM: 256 KiB read in PIO mode
    from vmlab import devices as dv
    from vmlab.experiments.contrasts import common_row
    from vmlab.experiments.disk import command
    vm, prof = with_vm["vm"], with_vm["profile"]
    probe = dv.Probe(vm, prof)
    probe.calibrate(command(prof, "read", "seq", 65536, 65536))
    cmd = command(prof, "read", "seq", 65536, DISK_BYTES)
    counted = probe.measure(cmd, count=True)
    m = probe.measure(cmd, count=False)
    row = common_row(prof, m, bytes_moved=int(m.result["bytes"]), counted_bytes=int(counted.result["bytes"]),
                     counted=counted)
    return {"rows": [row], "exit_counts": m.kvm_exit_counts}


if __name__ == "__main__":
    main()
