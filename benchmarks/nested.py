"""Benchmark: a nested guest with a working /dev/kvm, and ``experiment exits --quick``.

Figures (repeats; median and spread by the runner):

* ``ready_cold_s``: ``VM(MachineSpec(nested=True))`` from ``start()`` to KVM proven inside
  (``vm.nested_kvm["seconds"]``: the guest booted, kvm_amd/kvm_intel loaded, ``hv nothing 1``
  ran a guest program under KVM in it), cold boots;
* ``ready_vs_plain_boot``: each cold ``ready_cold_s`` over the median cold boot of the plain lesson
  guest in the same run (what loading KVM and proving it adds, whatever the machine's speed);
* ``ready_warm_s``: the same from a warm snapshot;
* ``exits_quick_cli_s``: wall time of ``python -m vmlab experiment exits --quick --json`` (its
  nested guest restored warm, as a learner's second run is);
* ``nested_kvm_works``: the fraction of starts in which KVM worked inside.

Targets: benchmarks/targets.toml ([nested.*]; issue 11: ready <= 8 s from cold, exits --quick <= 60 s).

    .venv/bin/python -m benchmarks nested [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmlab import VM, MachineSpec  # noqa: E402
from vmlab.hostinfo import where  # noqa: E402


def _ready(spec: MachineSpec, warm: bool, repeats: int, seen: Dict[str, Any]) -> List[float]:
    times: List[float] = []
    for _ in range(repeats):
        with VM(spec, warm=warm) as vm:
            state = vm.nested_kvm
            seen["starts"] += 1
            if state is not None and state["works"]:
                seen["works"] += 1
                if vm.warm_restored == warm:
                    times.append(state["seconds"])
            seen["accel"], seen["release"] = vm.accel or "", vm.kernel_release or ""
    return times


def measure(quick: bool = False) -> Dict[str, Any]:
    repeats = 2 if quick else 5
    seen: Dict[str, Any] = {"starts": 0, "works": 0, "accel": "", "release": ""}
    spec = MachineSpec(name="bench-nested", nested=True)
    cold = _ready(spec, False, repeats, seen)
    plain: List[float] = []
    for _ in range(repeats):
        with VM(name="bench-plain") as vm:
            plain.append(float(vm.boot_seconds or "nan"))
    with VM(spec, warm=True):          # the first warm start may have to save the snapshot
        pass
    warm = _ready(spec, True, repeats, seen)
    cli: List[float] = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "vmlab", "experiment", "exits", "--quick", "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            cli.append(time.monotonic() - t0)
    plain_median = statistics.median(plain)
    return {"ready_cold_s": cold, "ready_vs_plain_boot": [c / plain_median for c in cold],
            "plain_boot_s": plain, "ready_warm_s": warm, "exits_quick_cli_s": cli,
            "nested_kvm_works": seen["works"] / max(1, seen["starts"]),
            "_where": where(seen["accel"], seen["release"])}


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["nested", *sys.argv[1:]]))
