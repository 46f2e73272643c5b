"""Benchmark: the CPU experiment (nanobenchmarks native vs TCG) and the clocksource costs, with median and spread.

Figures: ``cli_quick_s`` (wall time of ``python -m vmlab experiment cpu --quick``, as a learner runs it);
``native_cv_worst`` (the largest coefficient of variation of a native nanobenchmark over the repeats of one
vmbench run); per privileged operation the TCG/native ratio of the fastest repeats of one run
(``tcg_vs_native_null_syscall``, ``..._page_fault``, ``..._fork_wait``) and the same for the register-only loop
(``tcg_vs_native_compute``); ``hpet_vs_fastest_clock`` (an HPET clock read over the fastest clocksource the guest
offers, one guest, one run). Targets: benchmarks/targets.toml.

    .venv/bin/python -m benchmarks cpu [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import Skipped  # noqa: E402
from vmlab.experiments import clocks, cpu  # noqa: E402
from vmlab.hostinfo import where  # noqa: E402

PRIVILEGED = ("null_syscall", "page_fault", "fork_wait")


def quick_cli_seconds(times: int) -> List[float]:
    """Wall time of `python -m vmlab experiment cpu --quick --json`, as a learner runs it."""
    out = []
    for _ in range(times):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "vmlab", "experiment", "cpu", "--quick", "--json"], cwd=ROOT,
                       check=True, capture_output=True)
        out.append(time.monotonic() - t0)
    return out


def measure(quick: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {"cli_quick_s": quick_cli_seconds(1 if quick else 3)}
    df = (cpu.run(quick=True, repeats=7, scale=0.05, rounds=2) if quick else cpu.run(quick=False))
    nat = df[df.platform == "native"].set_index("benchmark")
    tcg = df[df.platform == "tcg"].set_index("benchmark")
    # quick repeats are too short to be steady on a shared machine: the CV target is for the full sizes
    out["native_cv_worst"] = (Skipped("full mode only (quick repeats are too short to be steady)") if quick
                              else float(nat["ns_cv"].max()))
    for b in (*PRIVILEGED, "compute"):
        out[f"tcg_vs_native_{b}"] = float(tcg.loc[b, "ns_min"] / nat.loc[b, "ns_min"])
    out["_where"] = where(str(df["accel"].iloc[0]) if "accel" in df else "tcg",
                          str(df["guest_kernel"].iloc[0]) if "guest_kernel" in df else "")
    out["_kvm"] = df.attrs.get("kvm", {}).get("reason")
    clk = clocks.run(quick=quick).set_index("clocksource")
    avail = clk[clk["available"].astype(bool)]
    fastest = avail.drop(index="hpet", errors="ignore")["ns_per_read"].min()
    out["hpet_vs_fastest_clock"] = float(avail.loc["hpet", "ns_per_read"] / fastest)
    out["hpet_traps_per_read"] = float(avail.loc["hpet", "traps_per_read"])
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["cpu", *sys.argv[1:]]))
