"""Benchmark: cold boot, warm restore and run() round trip of the default lesson guest.

Targets (issue 2, 2-core machine under TCG): cold boot to a ready guest <= 2.5 s
median; warm restore <= 0.5 s; run("true") round trip <= 20 ms median; QEMU RSS
<= 300 MB. Printed with where it ran; not asserted (tests check direction only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmlab.cli import boot_figures
from vmlab.hostinfo import where

TARGETS = {"cold_boot_s": 2.5, "warm_boot_s": 0.5, "run_roundtrip_ms": 20.0, "qemu_rss_mb": 300.0}


def main() -> int:
    fig = boot_figures(repeats=5, roundtrips=100)
    fig["where"] = where(fig["accel"], fig["guest_kernel"])
    print(json.dumps(fig, indent=1))
    for key, target in TARGETS.items():
        value = fig.get(key)
        verdict = "n/a" if value is None else ("meets" if value <= target else "MISSES")
        print(f"{key:<18} {value!s:>8}  target <= {target:<6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
