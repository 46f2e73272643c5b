"""Soak: many warm start/stop cycles and run() calls in one process, watching for leaks.

    .venv/bin/python -m benchmarks soak [--quick]        # 200 cycles + 1000 runs (quick: 20 + 200), judged
    .venv/bin/python benchmarks/soak.py --cycles 20 --runs 200 --json

Figures: warm start/stop and run() round-trip times (repeats: median and spread) and the growth of open fds,
threads, child processes and RSS between the warm-up and the end. The growth limits are targets in
benchmarks/targets.toml ([soak.*_growth]; the same bounds tests/test_reliability.py::test_soak_* enforces).
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

BOUNDS = {"fds": 4, "threads": 2, "children": 0, "rss_mb_short": 40, "rss_mb_long": 80}   # printed; judged: targets.toml


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


def soak(cycles: int, runs: int) -> dict:
    image = ensure_image()
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:    # warm-up (writes the snapshot)
        vm.run("true")
        release = vm.run("uname -r").stdout.strip()
    gc.collect()
    before = sample()
    starts, stops, run_s, growth_curve = [], [], [], []
    for i in range(cycles):
        t = time.perf_counter()
        vm = VM(accel="tcg", image=image, name="relwarm", warm=True).start()
        starts.append(time.perf_counter() - t)
        try:
            vm.run("true")
        finally:
            t = time.perf_counter()
            vm.shutdown()
            stops.append(time.perf_counter() - t)
        if i % max(1, cycles // 10) == 0:
            growth_curve.append({"cycle": i, **{k: v - before[k] for k, v in sample().items()}})
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:
        for i in range(runs):
            run_s.append(vm.run(f"echo {i}").wall_s)
    gc.collect()
    after = sample()
    growth = {k: after[k] - before[k] for k in before}
    return {
        "cycles": cycles, "runs": runs, "samples": {"warm_start_s": starts, "shutdown_s": stops, "run_s": run_s},
        "warm_start_s": stats(starts), "shutdown_s": stats(stops), "run_roundtrip_s": stats(run_s),
        "before": before, "after": after, "growth": growth, "curve": growth_curve,
        "bounds": BOUNDS, "where": where("tcg", release),
    }


def measure(quick: bool = False) -> dict:
    """The runner's entry: figures for benchmarks/targets.toml."""
    r = soak(*((20, 200) if quick else (200, 1000)))
    g = r["growth"]
    return {"warm_start_s": r["samples"]["warm_start_s"], "shutdown_s": r["samples"]["shutdown_s"],
            "run_roundtrip_ms": [x * 1e3 for x in r["samples"]["run_s"]],
            "fds_growth": g["fds"], "threads_growth": g["threads"], "children_growth": g["children"],
            "rss_growth_mib": g["rss"] / 2**20, "_where": r["where"], "_curve": r["curve"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = soak(args.cycles, args.runs)
    growth = result["growth"]
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
    over = [k for k in ("fds", "threads", "children") if growth[k] > BOUNDS[k]]
    for k in over:
        print(f"  MISSED: {k} grew by {growth[k]}, bound +{BOUNDS[k]}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
