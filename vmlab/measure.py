"""Shared measurement plumbing: repeats with median and spread, where it ran,
rows kept when an experiment fails part way, CSV in and out.

Every frame an experiment returns carries the columns of
:func:`vmlab.hostinfo.where` (accel, qemu, guest_kernel, host_kernel,
host_cpu, host_cpus) plus ``measured_at``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from .errors import ExperimentError, VMLabError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
Progress = Optional[Callable[[str], None]]


def say(progress: Progress, message: str) -> None:
    if progress:
        progress(message)


def stats(values: Iterable[float]) -> Dict[str, float]:
    """Median and spread of repeated measurements."""
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "cv": math.nan, "iqr": math.nan}
    mean = statistics.fmean(v)
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1],
            "cv": sd / mean if mean else math.nan, "iqr": q[2] - q[0]}


class Rows:
    """Collects an experiment's rows; on failure the rows so far survive.

        rows = Rows("disk")
        with rows.guard():
            ... rows.add(device="ide", ...)
        return rows.frame()

    If the block raises, ExperimentError carries ``.rows`` (a DataFrame of what
    was measured) and the cause; a copy is also written to the partial-results
    directory so nothing is lost when a kernel dies.
    """

    def __init__(self, experiment: str, where: Optional[Dict[str, str]] = None) -> None:
        self.experiment = experiment
        self.where = dict(where or {})
        self.rows: List[Dict[str, Any]] = []

    def add(self, **row: Any) -> Dict[str, Any]:
        full = {"experiment": self.experiment, **row}
        for k, v in self.where.items():
            full.setdefault(k, v)
        full.setdefault("measured_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.rows.append(full)
        return full

    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    @contextlib.contextmanager
    def guard(self) -> Iterator[Rows]:
        try:
            yield self
        except ExperimentError:
            raise
        except (VMLabError, OSError, ValueError, KeyError, RuntimeError, TimeoutError) as exc:
            partial = self.frame()
            saved = ""
            if len(partial):
                with contextlib.suppress(OSError):
                    saved = f"; the rows so far are saved in {save(partial, self.experiment + '-partial')}"
            raise ExperimentError(f"{self.experiment} experiment failed after {len(self.rows)} rows: "
                                  f"{getattr(exc, 'message', exc)}{saved}", rows=partial,
                                  fix=getattr(exc, "fix", None)) from exc


def save(df, name: str, directory: Optional[Path] = None) -> Path:
    """Save a frame as CSV under data/measured/ (or *directory*); returns the path."""
    d = Path(directory) if directory else DATA_DIR / "measured"
    d.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = d / f"{name}-{stamp}.csv"
    df.to_csv(path, index=False)
    return path


def load(path) -> Any:
    import pandas as pd
    return pd.read_csv(path)


def to_json_rows(df) -> str:
    """The CLI's --json form: a JSON array of objects (NaN becomes null)."""
    records = json.loads(df.to_json(orient="records"))
    return json.dumps(records, indent=1)
