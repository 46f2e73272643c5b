"""Soak: many warm start/stop cycles and run() calls in one process, watching for leaks.

    .venv/bin/python benchmarks/soak.py                 # 200 cycles, 1000 runs (the long numbers)
    .venv/bin/python benchmarks/soak.py --cycles 20 --runs 200 --json

Prints the warm start/stop and run() round-trip times (median and spread, from
vmlab.measure.stats) and the growth of open fds, threads, child processes and
RSS between the warm-up and the end, with where it ran. The bounds the test
(tests/test_reliability.py::test_soak_*) enforces are printed beside them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmlab import VM
from vmlab.hostinfo import where
from vmlab.image import ensure_image
from vmlab.measure import stats

BOUNDS = {"fds": 4, "threads": 2, "children": 0, "rss_mb_short": 40, "rss_mb_long": 80}


def sample() -> dict:
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    me = str(os.getpid())
    children = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text()
                children += st[st.rindex(")") + 2:].split()[1] == me
            except OSError:
                pass
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "tasks": len(os.listdir("/proc/self/task")), "children": children, "rss": rss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    image = ensure_image()
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:    # warm-up (writes the snapshot)
        vm.run("true")
        release = vm.run("uname -r").stdout.strip()
    gc.collect()
    before = sample()
    starts, stops, runs, growth_curve = [], [], [], []
    for i in range(args.cycles):
        t = time.perf_counter()
        vm = VM(accel="tcg", image=image, name="relwarm", warm=True).start()
        starts.append(time.perf_counter() - t)
        try:
            vm.run("true")
        finally:
            t = time.perf_counter()
            vm.shutdown()
            stops.append(time.perf_counter() - t)
        if i % max(1, args.cycles // 10) == 0:
            growth_curve.append({"cycle": i, **{k: v - before[k] for k, v in sample().items()}})
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:
        for i in range(args.runs):
            runs.append(vm.run(f"echo {i}").wall_s)
    gc.collect()
    after = sample()
    growth = {k: after[k] - before[k] for k in before}
    result = {
        "cycles": args.cycles, "runs": args.runs,
        "warm_start_s": stats(starts), "shutdown_s": stats(stops), "run_roundtrip_s": stats(runs),
        "before": before, "after": after, "growth": growth, "curve": growth_curve,
        "bounds": BOUNDS, "where": where("tcg", release),
    }
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    def fmt(s: dict, unit: float = 1e3, u: str = "ms") -> str:
        return f"median {s['median'] * unit:.1f} {u} (min {s['min'] * unit:.1f}, max {s['max'] * unit:.1f}, n={s['n']})"
    print(f"soak: {args.cycles} warm start/stop cycles, {args.runs} run() calls")
    print(f"  warm start      {fmt(result['warm_start_s'])}")
    print(f"  shutdown        {fmt(result['shutdown_s'])}")
    print(f"  run('echo')     {fmt(result['run_roundtrip_s'])}")
    print(f"  growth: fds {growth['fds']:+d} (bound +{BOUNDS['fds']}), threads {growth['threads']:+d} "
          f"(bound +{BOUNDS['threads']}), tasks {growth['tasks']:+d}, children {growth['children']:+d} "
          f"(bound 0), RSS {growth['rss'] / 2**20:+.1f} MB")
    print(f"  where: {result['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
