"""Benchmark: cold boot, warm restore and run() round trip of the default lesson guest, and QEMU's RSS,
against the yardstick (benchmarks/plainboot.py: a plain ``qemu-system-x86_64 -M pc -m 256`` PVH boot of
Debian's packaged kernel to a busybox shell, as issue 18 measured it), each plain boot taken right before a vmlab
boot in the same run. vmlab boots the lesson kernel (vmlab.image.lessonkernel) by default, so the same plain boot
of the lesson kernel is measured too (plain_lesson_boot_s, cold_vs_plain_lesson: what vmlab adds to that kernel's
own boot; not a target, shown so the yardstick's kernel is never hidden).

Figures (repeats; the runner reports median and spread): plain_boot_s, cold_boot_s (start() called to the
agent ready), cold_vs_plain (each cold boot over the median plain boot), warm_boot_s, warm_vs_plain,
warm_vs_cold, warm_restored, run_roundtrip_ms (run("true") wall time: a plain command, which the agent execs without
the shell), run_shell_ms (run("true ;"): the same through ``sh -c``, as every command that is not plain),
qemu_rss_mib; where the round trip goes: ping_ms (the agent channel and the host's asyncio, no process in the guest)
and run_guest_ms (the guest's own spawn-to-exit time of ``true``, measured in the guest), run_cpu_ms and ping_cpu_ms (QEMU's CPU time per call:
the work of one call, which a loaded host stretches far less than wall time); qemu_rss_warm_mib (a warm-restored guest: QEMU skips
loading the kernel and initramfs files on an incoming migration); and the same boots in QEMU's
CPU seconds to the moment they are ready (plain_cpu_s, cold_cpu_s, cold_cpu_vs_plain, warm_cpu_vs_plain): the
boot's work, which a loaded host does not stretch. Targets (issue 18): benchmarks/targets.toml. The machine may
be loaded by other work: the load average is recorded with the figures (``_load_avg``), and only ratios measured
within the run are judged for time.

    .venv/bin/python -m benchmarks boot [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plainboot import PlainBoot
from vmlab import VM
from vmlab.hostinfo import where
from vmlab.procfs import process_cpu_seconds


def _ready_cpu(vm: VM) -> float:
    """QEMU's CPU seconds when the guest became ready (the READY event)."""
    for e in vm.events:
        if e["event"] == "READY" and e["data"].get("qemu_cpu_s") is not None:
            return float(e["data"]["qemu_cpu_s"])
    return float("nan")


#: the figures measured directly (lists of repeats); the ratios are computed from them at the end
MEASURED = ("plain_boot_s", "plain_lesson_boot_s", "cold_boot_s", "cold_cpu_s", "warm_boot_s", "warm_cpu_s", "run_roundtrip_ms", "run_guest_ms",
            "run_shell_ms", "ping_ms", "run_cpu_ms", "ping_cpu_ms", "qemu_rss_mib", "qemu_rss_warm_mib")


def measure(quick: bool = False) -> Dict[str, Any]:
    repeats, roundtrips = (3, 30) if quick else (5, 100)
    load_before = os.getloadavg()
    f: Dict[str, List[float]] = {k: [] for k in MEASURED}
    accel, release = "", ""
    yardstick, same_kernel = PlainBoot("debian"), PlainBoot("lesson")
    try:
        for _ in range(repeats):
            f["plain_boot_s"].append(yardstick.boot())
            f["plain_lesson_boot_s"].append(same_kernel.boot())
            t0 = time.monotonic()
            with VM(accel="auto", name="boot-cold") as vm:
                f["cold_boot_s"].append(time.monotonic() - t0)
                f["cold_cpu_s"].append(_ready_cpu(vm))
                release = vm.run("uname -r").stdout.strip()
                accel = vm.accel or ""
                pid = vm.pid or 0
                c0 = process_cpu_seconds(pid)
                runs = [vm.run("true") for _ in range(roundtrips)]
                c1 = process_cpu_seconds(pid)
                f["run_roundtrip_ms"] += [r.wall_s * 1e3 for r in runs]
                f["run_guest_ms"] += [r.guest_s * 1e3 for r in runs]
                f["ping_ms"] += [vm.ping() * 1e3 for _ in range(roundtrips)]
                c2 = process_cpu_seconds(pid)
                f["run_cpu_ms"].append((c1 - c0) / roundtrips * 1e3)
                f["ping_cpu_ms"].append((c2 - c1) / roundtrips * 1e3)
                f["run_shell_ms"] += [vm.run("true ;").wall_s * 1e3 for _ in range(roundtrips)]
                f["qemu_rss_mib"].append(vm.qemu_rss_bytes() / 2**20)
    finally:
        yardstick.close()
        same_kernel.close()
    with VM(accel="auto", name="boot-warm", warm=True) as vm:   # the first warm VM may save the snapshot
        vm.run("true")
    restored = 0
    for _ in range(repeats):
        t0 = time.monotonic()
        with VM(accel="auto", name="boot-warm", warm=True) as vm:
            if vm.warm_restored:
                restored += 1
                f["warm_boot_s"].append(time.monotonic() - t0)
                f["warm_cpu_s"].append(_ready_cpu(vm))
            vm.run("true")
            f["qemu_rss_warm_mib"].append(vm.qemu_rss_bytes() / 2**20)
    plain, cold, warm = f["plain_boot_s"], f["cold_boot_s"], f["warm_boot_s"]
    plain_median, cold_median = statistics.median(plain), statistics.median(cold)
    f["plain_cpu_s"] = yardstick.cpu_seconds
    plain_cpu = statistics.median(yardstick.cpu_seconds)
    warm_cpu = f.pop("warm_cpu_s")
    return {**f, "cold_cpu_vs_plain": [c / plain_cpu for c in f["cold_cpu_s"]],
            "warm_cpu_vs_plain": [w / plain_cpu for w in warm_cpu],
            "cold_vs_plain": [c / plain_median for c in cold], "warm_vs_plain": [w / plain_median for w in warm],
            "cold_vs_plain_lesson": [c / statistics.median(f["plain_lesson_boot_s"]) for c in cold],
            "warm_vs_cold": [w / cold_median for w in warm], "warm_restored": restored / repeats,
            "_where": where(accel, release), "_load_avg": [*load_before, *os.getloadavg()]}

if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["boot", *sys.argv[1:]]))
