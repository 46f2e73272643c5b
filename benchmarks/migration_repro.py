"""Reproduction of the TCG live-migration corruption (docs/migration.md, "Guests lost"): N live pre-copy
migrations of one guest writing memory, counting guests that arrive broken, for one candidate setting.

    .venv/bin/python -m benchmarks.migration_repro fixed 8          # vmlab's setting (8 KiB more memory)
    .venv/bin/python -m benchmarks.migration_repro plain 8          # without it (QEMU < 9.0: guests break)
    .venv/bin/python -m benchmarks.migration_repro single 8         # without it, -accel tcg,thread=single

``plain`` and ``single`` switch vmlab's work-around off (and migrate()'s refusal of a source without it):
they exist to show the bug, never for a lesson. Prints one JSON line per migration and a summary line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("fixed", "plain", "single")
KEYS = ("status", "rounds", "total_time_s", "downtime_ms", "guest_ok", "guest_failure", "file_kept",
        "counter_kept", "stale_pages", "achieved_dirty_mbs")


def run(variant: str, n: int, rate: float = 16.0, bandwidth: int = 64) -> Dict[str, Any]:
    import vmlab.experiments.liveguest as lg
    import vmlab.vm.migrate as mig
    import vmlab.vm.qemu as q
    if variant not in VARIANTS:
        raise SystemExit(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
    if variant != "fixed":
        lg.migratable_args = lambda memory_mb, version=None: ()
        mig._has_odd_memory = lambda vm: True
    if variant == "single":
        q.accel_args = lambda accel: ["-accel", f"tcg,thread=single,tb-size={q.TCG_TB_MIB}"
                                      if accel == "tcg" else accel]
    t0 = time.monotonic()
    rows: List[Dict[str, Any]] = []
    with lg.LiveGuest(memory=256, working_set=32) as g:
        for i in range(n):
            row = g.migrate(bandwidth_mbs=bandwidth, dirty_rate_mbs=rate, fresh=True, timeout=60)
            rows.append({k: row.get(k) for k in KEYS})
            print(i, json.dumps(rows[-1], default=str), flush=True)
    done = [r for r in rows if r["status"] == "completed"]
    return {"variant": variant, "migrations": n, "completed": len(done),
            "broken": sum(not r["guest_ok"] for r in done),
            "kept_file_and_counter": sum(bool(r["guest_ok"] and r["file_kept"] and r["counter_kept"]) for r in done),
            "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(run(args[0] if args else "fixed", int(args[1]) if len(args) > 1 else 8)))
