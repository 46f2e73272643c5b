"""Benchmark: the CPU experiment and the platform figures, with median and spread.

Targets (issue 4, 2-core machine under TCG): ``python -m vmlab experiment cpu --quick``
<= 60 s; coefficient of variation <= 10 % for each nanobenchmark natively (over the
repeats of one vmbench run). Printed with where it ran; not asserted (tests check
direction only).

    .venv/bin/python benchmarks/cpu.py            # full experiment (a few minutes)
    .venv/bin/python benchmarks/cpu.py --quick    # the quick one, timed as the CLI runs it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmlab.experiments import balloon, clocks, cpu  # noqa: E402
from vmlab.measure import stats  # noqa: E402

TARGET_QUICK_S = 60.0
TARGET_NATIVE_CV = 0.10


def quick_cli_seconds(times: int) -> list:
    """Wall time of `python -m vmlab experiment cpu --quick --json`, as a learner runs it."""
    out = []
    for _ in range(times):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "vmlab", "experiment", "cpu", "--quick", "--json"], cwd=ROOT,
                       check=True, capture_output=True)
        out.append(time.monotonic() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quick experiment instead of the full one")
    ap.add_argument("--cli-runs", type=int, default=3, help="times to run the quick CLI (0: skip)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    report = {}
    if a.cli_runs:
        q = stats(quick_cli_seconds(a.cli_runs))
        report["quick_cli_s"] = q

    t0 = time.monotonic()
    df = cpu.run(quick=a.quick, progress=None if a.json else (lambda m: print(m, file=sys.stderr)))
    report["experiment_s"] = time.monotonic() - t0
    report["where"] = cpu.source_label(df)
    report["kvm"] = df.attrs["kvm"].get("reason")
    cols = ["benchmark", "platform", "ns_per_op", "ns_min", "ns_max", "ns_cv", "cycles_per_op", "ratio_to_native",
            "skipped", "round"]
    report["rows"] = json.loads(df[cols].to_json(orient="records"))

    clk = clocks.run(quick=a.quick)
    report["clocks"] = json.loads(clk[[c for c in ("clocksource", "available", "ns_per_read", "ns_min",
                                                    "ns_max", "ns_cv", "traps_per_read", "note")
                                       if c in clk]].to_json(orient="records"))
    bal = balloon.run(quick=a.quick)
    report["balloon"] = json.loads(balloon.summary(bal).to_json(orient="records"))

    if a.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"where: {report['where']}\nKVM: {report['kvm']}")
    print(f"experiment ({'quick' if a.quick else 'full'}): {report['experiment_s']:.1f} s")
    if "quick_cli_s" in report:
        q = report["quick_cli_s"]
        verdict = "meets" if q["median"] <= TARGET_QUICK_S else "MISSES"
        print(f"`experiment cpu --quick` wall: median {q['median']:.1f} s (min {q['min']:.1f}, max {q['max']:.1f}, "
              f"n={q['n']})  target <= {TARGET_QUICK_S:g} s  {verdict}")
    print(f"\n{'benchmark':<14} {'platform':<7} {'ns/op':>12} {'min':>12} {'max':>12} {'cv':>7} {'cycles':>10} "
          f"{'x native':>9}  native CV target <= {TARGET_NATIVE_CV:.0%}")
    for r in report["rows"]:
        if r["skipped"]:
            print(f"{r['benchmark']:<14} {r['platform']:<7} skipped: {r['skipped']}")
            continue
        verdict = ""
        if r["platform"] == "native":
            verdict = "meets" if r["ns_cv"] <= TARGET_NATIVE_CV else "MISSES"
        ratio = r["ratio_to_native"]
        print(f"{r['benchmark']:<14} {r['platform']:<7} {r['ns_per_op']:>12.1f} {r['ns_min']:>12.1f} "
              f"{r['ns_max']:>12.1f} {r['ns_cv']:>7.1%} {r['cycles_per_op']:>10.0f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>9}  {verdict}")
    print("\nclocksources (guest, TCG):")
    for r in report["clocks"]:
        if not r["available"]:
            print(f"  {r['clocksource']:<10} not offered: {r['note']}")
        else:
            print(f"  {r['clocksource']:<10} {r['ns_per_read']:>9.1f} ns/read (cv {r['ns_cv']:.1%}), "
                  f"{r.get('traps_per_read', float('nan')):.2f} emulated timer reads per call")
    print("\nballoon (256 MiB guest, TCG):")
    for r in report["balloon"]:
        print(f"  {r['phase']:<24} guest MemTotal {r['guest_total_mb']:7.1f} MiB  "
              f"MemAvailable {r['guest_available_mb']:7.1f} MiB  QEMU RSS {r['qemu_rss_mb']:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
