"""Benchmark: live migration (issue 15): one guest moved between QEMU processes on this host.

Figures, from runs of ``python -m vmlab experiment migration --quick --json`` as a learner runs it:
``cli_quick_s`` (its wall time); ``idle_guests_kept`` (of the migrations of an idle guest, the fraction that
arrived with its file and counter: judged, must be all); ``busy_guests_survived`` (of the live pre-copy
migrations of a guest writing memory, the fraction whose guest passed the check afterwards: judged, must be all;
QEMU 7.2's TCG needs vmlab's work-around for it, docs/migration.md); ``heartbeat_vs_qemu_downtime`` (the pause the host saw in
the guest's heartbeat over QEMU's downtime, same migration: at least 1); ``downtime_vs_total`` (QEMU's downtime
over its total time, converged pre-copy: the guest runs during most of the move); ``dirty_vs_idle_total``
(total time with the highest dirty rate over idle, at the lowest bandwidth, same run); ``unreachable_limit_cancelled``
(the non-converging case did not converge); ``auto_converge_acted`` (the auto-converge case throttled the guest:
``max_throttle_pct`` > 0) and ``auto_converge_completed`` (and then completed, within its time limit);
``stop_and_copy_vs_precopy_downtime`` (stop-and-copy's downtime over idle pre-copy's, same run, scaled to the
same bandwidth: stop-and-copy runs at the special cases' link, pre-copy at its own). Targets:
benchmarks/targets.toml.

    .venv/bin/python -m benchmarks migration [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import experiment_cli_runs  # noqa: E402


def cli_runs(repeats: int) -> List[Dict[str, Any]]:
    """Each run: its wall time and rows."""
    return experiment_cli_runs("migration", repeats)


def _frac(rows: List[Dict[str, Any]], key: str) -> float:
    return sum(bool(r.get(key)) for r in rows) / len(rows) if rows else float("nan")


def measure(quick: bool = False) -> Dict[str, Any]:
    runs = cli_runs(1 if quick else 3)
    rows = [r for run in runs for r in run["rows"]]
    pre = [r for r in rows if r["case"] == "precopy"]
    idle = [r for r in pre if r["dirty_rate_mbs"] == 0]
    busy = [r for r in pre if r["dirty_rate_mbs"] > 0 and r["converged"]]
    ok = [r for r in pre if r["converged"] and r["guest_ok"]]
    out: Dict[str, Any] = {
        "cli_quick_s": [run["seconds"] for run in runs],
        "idle_guests_kept": sum(bool(r["guest_ok"] and r["file_kept"] and r["counter_kept"]) for r in idle)
        / max(1, len(idle)),
        "busy_guests_survived": _frac(busy, "guest_ok"),
        "heartbeat_vs_qemu_downtime": [r["guest_gap_ms"] / r["downtime_ms"] for r in ok if r["downtime_ms"]],
        "downtime_vs_total": [r["downtime_ms"] / 1e3 / r["total_time_s"] for r in pre if r["converged"]],
    }
    ratios: List[float] = []
    stop_ratios: List[float] = []
    cancelled: List[float] = []
    acted: List[float] = []
    ac_done: List[float] = []
    for run in runs:
        rs = run["rows"]
        low = min(r["bandwidth_mbs"] for r in rs if r["case"] == "precopy")
        t = {r["dirty_rate_mbs"]: r["total_time_s"] for r in rs
             if r["case"] == "precopy" and r["bandwidth_mbs"] == low and r["converged"]}
        busiest = max(t, default=0)
        if 0 in t and busiest > 0:
            ratios.append(t[busiest] / t[0])
        stop = [r for r in rs if r["case"] == "stop-and-copy" and r["converged"]]
        idle_rows = [r for r in rs if r["case"] == "precopy" and r["converged"] and r["dirty_rate_mbs"] == 0
                     and r["downtime_ms"]]
        if idle_rows and stop:
            i0 = min(idle_rows, key=lambda r: r["bandwidth_mbs"])
            # the copy at pre-copy's bandwidth would take stop_bw / pre_bw of stop-and-copy's time
            scale = stop[0]["bandwidth_mbs"] / i0["bandwidth_mbs"]
            stop_ratios.append(stop[0]["downtime_ms"] * scale / i0["downtime_ms"])
        cancelled += [0.0 if r["converged"] else 1.0 for r in rs if r["case"] == "non-converging"]
        ac = [r for r in rs if r["case"] == "auto-converge"]
        acted += [1.0 if (r["max_throttle_pct"] or 0) > 0 else 0.0 for r in ac]
        ac_done += [1.0 if r["converged"] and r["guest_ok"] else 0.0 for r in ac]
    out["dirty_vs_idle_total"] = ratios
    out["stop_and_copy_vs_precopy_downtime"] = stop_ratios
    out["unreachable_limit_cancelled"] = cancelled
    out["auto_converge_acted"] = acted
    out["auto_converge_completed"] = ac_done
    out["guests_lost"] = float(sum(not r["guest_ok"] for r in rows))
    first = rows[0] if rows else {}
    out["_where"] = {k: str(first.get(k, "")) for k in ("accel", "qemu", "guest_kernel", "host_kernel", "host_cpu")}
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["migration", *sys.argv[1:]]))
