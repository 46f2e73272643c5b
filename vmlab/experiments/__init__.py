"""Experiments: each module measures one contrast and returns a tidy DataFrame.

To add one: write ``vmlab/experiments/NAME.py`` with

    def run(quick: bool = False, progress=None, **options) -> pandas.DataFrame

(one row per device/setting x repeat x size; stamp rows with where-it-ran
columns via vmlab.measure.Rows) and list it in REGISTRY below. The CLI
``python -m vmlab experiment NAME [--quick] [--json]`` then runs it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional

from ..errors import SpecError

REGISTRY: Dict[str, str] = {
    # name: (module, one-line description)
}
DESCRIPTIONS: Dict[str, str] = {}


def register(name: str, module: str, description: str) -> None:
    REGISTRY[name] = module
    DESCRIPTIONS[name] = description


register("disk", "vmlab.experiments.disk", "emulated (IDE, AHCI) vs paravirtual (virtio) disks")
register("console", "vmlab.experiments.console", "16550 UART vs virtio-console")
register("net", "vmlab.experiments.net", "rtl8139, e1000 vs virtio-net")
register("cpu", "vmlab.experiments.cpu", "nanobenchmarks: native vs TCG (vs KVM)")
register("lifecycle", "vmlab.experiments.lifecycle", "boot and shutdown from either side, events and data kept")
register("sharing", "vmlab.experiments.sharing", "N VMs sharing the host's cores and memory")
register("hosted", "vmlab.experiments.hosted",
         "bare metal vs hosted: path of work (native / KVM / TCG) and a noisy neighbour")


def get(name: str) -> Callable[..., Any]:
    if name not in REGISTRY:
        raise SpecError("experiment", f"unknown experiment {name!r}", fix="one of: " + ", ".join(REGISTRY))
    try:
        mod = importlib.import_module(REGISTRY[name])
    except ModuleNotFoundError as exc:
        if exc.name == REGISTRY[name]:
            raise SpecError("experiment", f"experiment {name!r} is not built yet",
                            fix="see `python -m vmlab experiment --help` for those available") from exc
        raise
    return mod.run


def run(name: str, quick: bool = False, progress: Optional[Callable[[str], None]] = None, **options: Any):
    return get(name)(quick=quick, progress=progress, **options)
