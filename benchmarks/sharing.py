"""Benchmark: N CPU-bound TCG VMs sharing the host's cores (issue 5).

Figures: ``cli_quick_s`` (wall time of ``python -m vmlab experiment sharing --quick``, as a learner runs it);
``efficiency_4_vs_2`` and ``efficiency_8_vs_2`` (guest work per second of host CPU the vCPU threads got, N VMs
running ``vmbench spin`` at once over 2 VMs, same repeat: the cores are shared, not lost to switching -- judged);
``total_4_vs_2``/``total_8_vs_2`` (total throughput over 2 VMs: equal to the above only when nobody else uses
the machine, so information only) and per N: cores used, RSS and PSS. The runner records the load average.

    .venv/bin/python -m benchmarks sharing [--quick]
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

from vmlab.experiments import sharing  # noqa: E402
from vmlab.hostinfo import where  # noqa: E402


def cli_quick_seconds(repeats: int) -> List[float]:
    """Wall time of the CLI command, start to exit; the CLI must stay within 4 VMs in quick mode."""
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vmlab", "experiment", "sharing", "--quick", "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        times.append(time.monotonic() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"`vmlab experiment sharing --quick` failed: {p.stderr[-800:]}")
        rows = json.loads(p.stdout)
        if max(r["vms"] for r in rows) > 4:
            raise RuntimeError("quick mode ran more than 4 VMs")
    return times


def measure(quick: bool = False) -> Dict[str, Any]:
    repeats, seconds = (1, 2.0) if quick else (3, 3.0)
    out: Dict[str, Any] = {"cli_quick_s": cli_quick_seconds(repeats)}
    ratios: Dict[int, List[float]] = {4: [], 8: []}
    efficiency: Dict[int, List[float]] = {4: [], 8: []}
    per_n: Dict[str, List[float]] = {}
    for rep in range(repeats):
        print(f"  repeat {rep + 1}/{repeats}: 2, 4, 8 VMs, spin {seconds:g} s", file=sys.stderr, flush=True)
        df = sharing.run(counts=(2, 4, 8), seconds=seconds)
        out.setdefault("_where", {k: str(df.iloc[0][k]) for k in where("tcg") if k in df})
        t = df.set_index("vms")
        for n in ratios:
            ratios[n].append(float(t.loc[n, "total_ops_s"] / t.loc[2, "total_ops_s"]))
            efficiency[n].append(float(t.loc[n, "ops_per_cpu_s"] / t.loc[2, "ops_per_cpu_s"]))
        for n in (2, 4, 8):
            for k in ("cores_used", "host_rss_mb", "host_pss_mb"):
                per_n.setdefault(f"vms{n}_{k}", []).append(float(t.loc[n, k]))
    out["total_4_vs_2"] = ratios[4]
    out["total_8_vs_2"] = ratios[8]
    out["efficiency_4_vs_2"] = efficiency[4]
    out["efficiency_8_vs_2"] = efficiency[8]
    out.update(per_n)
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["sharing", *sys.argv[1:]]))
