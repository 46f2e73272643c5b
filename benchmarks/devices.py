"""Benchmark: the device contrasts (disk, console, net) in full mode, with median and spread.

Targets (issue 3, 2-core machine under TCG), reported, not asserted:
  * quick mode of all three experiments (as the CLI runs them) <= 90 s in total;
  * full mode of all three <= 10 min;
  * coefficient of variation of throughput over the 5 repeats <= 10 % for disk and console.
Per device it prints the median throughput, the CV over repeats, interventions per MB,
and the paravirtual/emulated ratios; the frames are saved as CSV under data/measured/.

    .venv/bin/python benchmarks/devices.py                 # quick timing + full mode (minutes)
    .venv/bin/python benchmarks/devices.py --quick-only    # only the quick timing
    .venv/bin/python benchmarks/devices.py --only disk     # one experiment's full mode
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmlab.experiments import console, contrasts, disk, net  # noqa: E402
from vmlab.measure import save, stats  # noqa: E402
from vmlab.plots import where_label  # noqa: E402

TARGET_QUICK_S = 90.0
TARGET_FULL_S = 600.0
TARGET_CV = 0.10
EXPERIMENTS = {"disk": disk, "console": console, "net": net}
GROUPS = {"disk": ["mode", "pattern", "bs"], "console": ["requested_bytes"], "net": ["direction", "size_bytes"]}


def quick_cli_seconds(names) -> dict:
    out = {}
    for n in names:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "vmlab", "experiment", n, "--quick", "--json"], cwd=ROOT,
                       check=True, capture_output=True)
        out[n] = time.monotonic() - t0
    return out


def summarise(name: str, df) -> None:
    import pandas as pd
    keys = GROUPS[name] + ["device", "kind"]
    rows = []
    for key, g in df.groupby(keys, sort=False):
        s = stats(g["throughput_mb_s"].dropna())
        rows.append({**dict(zip(keys, key, strict=False)), "n": s["n"], "median_mb_s": round(s["median"], 3),
                     "cv": round(s["cv"], 3), "interventions_per_mb": round(float(g["interventions_per_mb"].median()), 1),
                     "lat_us_median": g["lat_us_median"].median() if "lat_us_median" in g else None})
    t = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        print(t.to_string(index=False))
        cvs = t["cv"].dropna()
        if name in ("disk", "console") and len(cvs):
            worst = cvs.max()
            print(f"CV over repeats: median {cvs.median():.3f}, worst {worst:.3f}; target <= {TARGET_CV} "
                  f"{'meets' if worst <= TARGET_CV else 'MISSES'} (worst case), "
                  f"{(cvs <= TARGET_CV).mean() * 100:.0f} % of rows meet it")
        print("\nratios (throughput: paravirtual/emulated; interventions per MB: emulated/paravirtual):")
        print(contrasts.measured_ratios(df, name).to_string(index=False))
    print("measured:", where_label(df))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick-only", action="store_true")
    ap.add_argument("--no-quick", action="store_true")
    ap.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    args = ap.parse_args()
    names = args.only or list(EXPERIMENTS)
    if not args.no_quick:
        q = quick_cli_seconds(names)
        total = sum(q.values())
        print("quick mode via the CLI: " + ", ".join(f"{k} {v:.1f} s" for k, v in q.items()) +
              f"; total {total:.1f} s, target <= {TARGET_QUICK_S:.0f} s "
              f"{'meets' if total <= TARGET_QUICK_S else 'MISSES'}")
    if args.quick_only:
        return 0
    t_all = time.monotonic()
    for n in names:
        t0 = time.monotonic()
        df = EXPERIMENTS[n].run(quick=False, progress=lambda m: print(m, file=sys.stderr))
        dt = time.monotonic() - t0
        path = save(df, f"{n}-full")
        print(f"\n=== {n}: full mode, {len(df)} rows in {dt:.0f} s (saved {path})")
        summarise(n, df)
    full = time.monotonic() - t_all
    print(f"\nfull mode of {', '.join(names)}: {full:.0f} s; target <= {TARGET_FULL_S:.0f} s for all three "
          f"{'meets' if full <= TARGET_FULL_S else 'MISSES'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
