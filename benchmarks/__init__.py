"""vmlab's benchmarks, each figure held to a target (``make bench`` = ``python -m benchmarks``).

A benchmark is a module ``benchmarks/NAME.py`` with::

    def measure(quick: bool = False) -> dict[str, float | list[float] | Skipped]

returning its figures by name; a list is the repeats of one figure (the runner reports the median and the
spread and judges the median unless the target says otherwise). The targets are in ``benchmarks/targets.toml``,
one table per target, ``[NAME.FIGURE]`` with ``max =`` and/or ``min =``. Wherever a figure depends on the machine
the target is a ratio measured within one run (vmlab's boot against a plain QEMU boot in the same run, virtio
against the emulated device in the same run); absolute targets are kept for budgets a learner feels (a quick
experiment's wall time) and for machine-independent figures (memory, leaks). docs/developers.md, "Benchmarks".
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

HERE = Path(__file__).resolve().parent
TARGETS_FILE = HERE / "targets.toml"
STATS = ("median", "min", "max", "mean", "cv")


@dataclass(frozen=True)
class Skipped:
    """A figure this machine cannot measure (e.g. no usable KVM): reported, neither met nor missed."""
    reason: str


@dataclass(frozen=True)
class Failed:
    """A figure whose measurement failed (the benchmark went on with its other figures): judged an error."""
    reason: str


Figure = Union[float, int, List[float], Skipped, Failed, None]


@dataclass(frozen=True)
class Target:
    bench: str
    figure: str
    max: Optional[float] = None
    min: Optional[float] = None
    stat: str = "median"
    unit: str = ""
    why: str = ""

    @property
    def key(self) -> str:
        return f"{self.bench}.{self.figure}"

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        s = " and ".join(parts) + (f" {self.unit}" if self.unit else "")
        return s if self.stat == "median" else f"{self.stat} {s}"

    def met_by(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return (self.max is None or value <= self.max) and (self.min is None or value >= self.min)


class TargetsError(ValueError):
    """benchmarks/targets.toml is malformed: the message names the table and the fix."""


def load_targets(path: Path = TARGETS_FILE) -> List[Target]:
    """Every target in the file, in file order, validated."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out = []
    for bench, figures in data.items():
        if not isinstance(figures, dict):
            raise TargetsError(f"{path.name}: top-level key {bench!r} must be a table [{bench}.FIGURE]")
        for figure, spec in figures.items():
            where = f"{path.name} [{bench}.{figure}]"
            if not isinstance(spec, dict):
                raise TargetsError(f"{where}: must be a table with max = and/or min =")
            unknown = set(spec) - {"max", "min", "stat", "unit", "why"}
            if unknown:
                raise TargetsError(f"{where}: unknown keys {sorted(unknown)}; use max, min, stat, unit, why")
            if "max" not in spec and "min" not in spec:
                raise TargetsError(f"{where}: give max = and/or min =")
            for k in ("max", "min"):
                if k in spec and not isinstance(spec[k], (int, float)):
                    raise TargetsError(f"{where}: {k} must be a number, not {spec[k]!r}")
            stat = spec.get("stat", "median")
            if stat not in STATS:
                raise TargetsError(f"{where}: stat = {stat!r}; use one of {', '.join(STATS)}")
            out.append(Target(bench, figure, max=spec.get("max"), min=spec.get("min"), stat=stat,
                              unit=spec.get("unit", ""), why=spec.get("why", "")))
    return out


def summarize(value: Figure) -> Dict[str, Any]:
    """Median and spread of a figure (a single number is one sample)."""
    if isinstance(value, Skipped):
        return {"skipped": value.reason}
    if isinstance(value, Failed):
        return {"failed": value.reason}
    if value is None:
        return {"n": 0}
    samples = [float(x) for x in (value if isinstance(value, (list, tuple)) else [value])]
    finite = [x for x in samples if math.isfinite(x)]
    if not finite:
        return {"n": 0, "samples": samples}
    mean = statistics.fmean(finite)
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"n": len(finite), "median": statistics.median(finite), "min": min(finite), "max": max(finite),
            "mean": mean, "cv": sd / mean if mean else math.nan, "samples": samples}


def verdict(target: Target, figures: Dict[str, Figure], error: Optional[str] = None) -> Dict[str, Any]:
    """One target judged against one run's figures: met, MISSED, skipped, missing or error."""
    row: Dict[str, Any] = {"target": target.key, "wanted": target.describe(), "why": target.why}
    if error is not None:
        return {**row, "verdict": "error", "detail": error}
    if target.figure not in figures:
        return {**row, "verdict": "missing",
                "detail": f"benchmarks/{target.bench}.py measure() returned no figure {target.figure!r}"}
    s = summarize(figures[target.figure])
    row["measured"] = s
    if "skipped" in s:
        return {**row, "verdict": "skipped", "detail": s["skipped"]}
    if "failed" in s:
        return {**row, "verdict": "error", "detail": s["failed"]}
    if not s.get("n"):
        return {**row, "verdict": "missing", "detail": "no finite sample"}
    value = s[target.stat]
    row["value"] = value
    return {**row, "verdict": "met" if target.met_by(value) else "MISSED"}


def failed(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if r["verdict"] in ("MISSED", "missing", "error")]


def bench_module(name: str) -> Any:
    return importlib.import_module(f"benchmarks.{name}")


def available() -> List[str]:
    """Benchmarks: modules here with a measure() function (found by file, imported only when run)."""
    return sorted(p.stem for p in HERE.glob("*.py")
                  if not p.stem.startswith("_") and "def measure(" in p.read_text())


def experiment_cli_runs(name: str, repeats: int, timeout: float = 900) -> List[Dict[str, Any]]:
    """Run ``python -m vmlab experiment NAME --quick --json`` *repeats* times: each run's wall time and rows."""
    runs = []
    for _ in range(repeats):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vmlab", "experiment", name, "--quick", "--json"],
                           cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"`vmlab experiment {name} --quick` failed: {p.stderr[-800:]}")
        runs.append({"seconds": time.monotonic() - t0, "rows": json.loads(p.stdout)})
    return runs
