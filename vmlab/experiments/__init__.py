"""Experiments: each module measures one contrast and returns a tidy DataFrame.

To add one: write ``vmlab/experiments/NAME.py`` with

    def run(quick: bool = False, progress=None, **options) -> pandas.DataFrame

(one row per device/setting x repeat x size; stamp rows with where-it-ran
columns via vmlab.measure.Rows) and register it below. The CLI
``python -m vmlab experiment NAME [--quick] [--json]`` then runs it, and
``python -m vmlab experiment list`` lists it.

    from vmlab.experiments import run_experiment
    df = run_experiment("clocks", quick=True)

Modules are imported when an experiment is run, so listing them (the CLI's
``--help``) imports none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Dict

from ..errors import SpecError
from ..measure import Progress

if TYPE_CHECKING:
    import pandas as pd

REGISTRY: Dict[str, str] = {}       # name -> module
DESCRIPTIONS: Dict[str, str] = {}   # name -> one line


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
register("clocks", "vmlab.experiments.clocks", "cost of reading the time under each clocksource (TSC, HPET, PM timer)")
register("balloon", "vmlab.experiments.balloon", "a virtio-balloon inflating and deflating: guest's and host's view")
register("awareness", "vmlab.experiments.awareness", "what a guest can tell about being virtualized (CPUID, dmesg)")
register("migration", "vmlab.experiments.migration", "live migration: downtime and total time vs dirty rate and bandwidth")
register("containers", "vmlab.experiments.containers", "containers vs VMs: start-up, memory, syscall and page-fault cost, isolation")
register("thin", "vmlab.experiments.thin", "thin provisioning: host allocation of qcow2 and raw images as the guest writes")
register("exits", "vmlab.experiments.exits", "VM exits by reason under KVM (a 200-line hypervisor; nested if need be)")


def get(name: str) -> Callable[..., pd.DataFrame]:
    """The ``run`` function of a registered experiment (SpecError naming the choices if unknown)."""
    if name not in REGISTRY:
        raise SpecError("experiment", f"unknown experiment {name!r}", fix="one of: " + ", ".join(REGISTRY))
    try:
        mod = importlib.import_module(REGISTRY[name])
    except ModuleNotFoundError as exc:
        if exc.name == REGISTRY[name]:
            raise SpecError("experiment", f"experiment {name!r} is not built yet",
                            fix="see `python -m vmlab experiment --help` for those available") from exc
        raise
    run: Callable[..., pd.DataFrame] = mod.run
    return run


def run_experiment(name: str, quick: bool = False, progress: Progress = None, *, nested: bool = False,
                   **options: Any) -> pd.DataFrame:
    """Run the registered experiment ``name``; its rows as a DataFrame.

    ``nested=True`` runs it inside a nested guest whose KVM works (vmlab.experiments.inside), so its
    guests run under real KVM even where the host's KVM cannot; ``options`` are then not allowed.
    """
    if nested:
        if options:
            raise SpecError("nested", f"a nested run takes no options ({', '.join(options)})",
                            fix="run the experiment's defaults (quick or full) with nested=True")
        get(name)       # an unknown or unbuilt experiment fails here, before any VM boots
        from .inside import run_nested
        return run_nested(name, quick=quick, progress=progress)
    return get(name)(quick=quick, progress=progress, **options)
