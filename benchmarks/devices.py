"""Benchmark: the device contrasts (disk, console, net): the learner's quick-mode budget and, measured in the
same run, how far the paravirtual device beats the emulated one.

Figures: ``quick_cli_total_s`` (the three ``python -m vmlab experiment NAME --quick`` commands, as a learner runs
them, summed); from their rows, per pair (emulated -> paravirtual) over every group (mode, pattern, block size,
direction...) of the run: ``<contrast>_<para>_vs_<emu>_throughput`` (paravirtual/emulated, >1 = paravirtual
faster) and ``..._interventions`` (emulated/paravirtual interventions per MB, >1 = paravirtual needs fewer exits).
Full mode (not --quick) also runs each experiment in full mode and reports ``<contrast>_cv_worst``, the largest
coefficient of variation of throughput over the repeats of one group (disk, console), and for the disk's 72 groups
``disk_cv_steady_share``, the share of groups whose repeats vary by at most 10 % (CV <= 0.10): the disk's spread
target is judged per group, because this host's own speed swings land a single repeat now and then in the worst
one (docs/devices.md, "What make bench judges"). Targets: benchmarks/targets.toml.

    .venv/bin/python -m benchmarks devices [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks import Failed, Skipped  # noqa: E402
from vmlab.experiments import console, contrasts, disk, net  # noqa: E402
from vmlab.measure import save, stats  # noqa: E402

EXPERIMENTS = {"disk": disk, "console": console, "net": net}
GROUPS = {"disk": ["mode", "pattern", "bs"], "console": ["requested_bytes"], "net": ["direction", "size_bytes"]}


def quick_cli(name: str) -> tuple:
    """Wall time and rows of `python -m vmlab experiment NAME --quick --json`."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "vmlab", "experiment", name, "--quick", "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"`vmlab experiment {name} --quick` failed: {p.stderr[-800:]}")
    return took, pd.DataFrame(json.loads(p.stdout))


def ratio_figures(name: str, df: pd.DataFrame) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    r = contrasts.measured_ratios(df, name)
    for (emu, para), g in r.groupby(["emulated", "paravirtual"], sort=False):
        out[f"{name}_{para}_vs_{emu}_throughput"] = [float(x) for x in g["throughput_ratio"].dropna()]
        out[f"{name}_{para}_vs_{emu}_interventions"] = [float(x) for x in g["interventions_ratio"].dropna()]
    return out


def group_cvs(name: str, df: pd.DataFrame) -> List[float]:
    """The coefficient of variation of throughput over the repeats, one per group (device and workload)."""
    keys = [k for k in GROUPS[name] if k in df] + ["device"]
    return [stats(g["throughput_mb_s"].dropna())["cv"] for _, g in df.groupby(keys, sort=False)]


def cv_worst(name: str, df: pd.DataFrame) -> float:
    return max(group_cvs(name, df))


STEADY_CV = 0.10     # issue 3: "the coefficient of variation of throughput over 5 repeats <= 10 %"


def cv_steady_share(name: str, df: pd.DataFrame) -> float:
    """Share of the groups whose repeats are within STEADY_CV (a group with a NaN CV counts as not steady)."""
    cvs = group_cvs(name, df)
    return sum(cv <= STEADY_CV for cv in cvs) / len(cvs)


# the full-mode spread figures of each contrast, and how each is computed from its rows
SPREAD = {"disk": {"disk_cv_worst": cv_worst, "disk_cv_steady_share": cv_steady_share},
          "console": {"console_cv_worst": cv_worst}}

# the figures each contrast must deliver (so a failed experiment fails exactly these, and the others still count)
PAIRS = {"disk": [("ide-pio", "virtio-blk")], "console": [("uart", "virtio-console")], "net": [("e1000", "virtio-net")]}


def measure(quick: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    total = 0.0
    for name in EXPERIMENTS:
        try:
            took, df = quick_cli(name)
        except RuntimeError as exc:       # this contrast's figures fail; the others are still measured
            print(f"  {exc}", file=sys.stderr)
            failed = Failed(str(exc))
            total = float("nan")
            out[f"{name}_quick_cli_s"] = failed
            for emu, para in PAIRS[name]:
                out[f"{name}_{para}_vs_{emu}_throughput"] = failed
                out[f"{name}_{para}_vs_{emu}_interventions"] = failed
            continue
        total += took
        out[f"{name}_quick_cli_s"] = took
        out.update(ratio_figures(name, df))
        out.setdefault("_where", {k: str(df[k].iloc[0]) for k in ("accel", "qemu", "guest_kernel", "host_kernel",
                                                                 "host_cpu", "host_cpus") if k in df})
    out["quick_cli_total_s"] = total
    for name, figures in SPREAD.items():
        if quick:
            out.update(dict.fromkeys(figures, Skipped("full mode only (make bench without --quick)")))
            continue
        try:
            df = EXPERIMENTS[name].run(quick=False, progress=lambda m: print("  " + m, file=sys.stderr))
        except Exception as exc:          # reported as these figures' error
            out.update(dict.fromkeys(figures, Failed(f"{type(exc).__name__}: {exc}")))
            continue
        save(df, f"{name}-full")
        out.update({f: compute(name, df) for f, compute in figures.items()})
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["devices", *sys.argv[1:]]))
