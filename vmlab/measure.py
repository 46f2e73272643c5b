"""Shared measurement plumbing: repeats with median and spread, where it ran,
rows kept when an experiment fails part way, CSV in and out, progress.

Progress: an experiment's ``progress`` argument is any callable taking a
message (``print`` works). :class:`ProgressBar` is one bar per experiment:
``disk.run(quick=True, progress=ProgressBar("disk"))`` shows the step count,
the time left and the current step (device, workload) in one line — an
ipywidgets bar in Jupyter, a line rewritten in place on a terminal — while
every message also goes to the ``vmlab.progress`` logger (``VMLAB_LOG=info``).
Experiments call :func:`say` for a message, :func:`plan` once with the number
of steps and :func:`advance` after each.

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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TextIO

from .errors import ExperimentError, VMLabError
from .log import get_logger

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
Progress = Optional[Callable[[str], None]]
_progress_log = get_logger("vmlab.progress")


def say(progress: Progress, message: str) -> None:
    """Tell ``progress`` (any callable, e.g. print or a :class:`ProgressBar`) what is happening now."""
    _progress_log.info("%s", message)
    if progress:
        progress(message)


def plan(progress: Progress, steps: int) -> None:
    """The experiment will take ``steps`` steps (a :class:`ProgressBar` then shows the time left)."""
    if isinstance(progress, ProgressBar):
        progress.plan(steps)


def advance(progress: Progress, steps: int = 1) -> None:
    """``steps`` more steps are done."""
    if isinstance(progress, ProgressBar):
        progress.advance(steps)


def _in_jupyter() -> bool:
    return "ipykernel" in sys.modules


class ProgressBar:
    """One progress bar for one experiment: steps done of planned, time left, the current step.

    Callable like ``print``: each message replaces the "current step" text (and goes to the
    ``vmlab.progress`` logger). In Jupyter it is an ipywidgets bar; on a terminal one stderr
    line rewritten in place; elsewhere (a pipe, a log file) only the logger. Use it as a context
    manager, or call :meth:`close` when the experiment is done.
    """

    def __init__(self, title: str, steps: Optional[int] = None, *, stream: Optional[TextIO] = None) -> None:
        self.title = title
        self.total = steps
        self.done = 0
        self.message = ""
        self.t0 = time.monotonic()
        self.closed = False
        self.failed = False
        self._stream = stream
        self._widget: Any = None
        if stream is None and _in_jupyter():
            self._widget = self._make_widget()
        elif stream is None and sys.stderr.isatty():
            self._stream = sys.stderr
        self._show()

    def _make_widget(self) -> Any:
        try:
            import ipywidgets as w
            from IPython.display import display
        except ImportError:
            return None
        bar = w.IntProgress(value=0, min=0, max=1, description=self.title,
                            layout=w.Layout(width="40%"), style={"description_width": "initial"})
        label = w.HTML()
        box = w.HBox([bar, label])
        display(box)
        return (bar, label)

    # -- what is shown ----------------------------------------------------------
    def status(self) -> str:
        """``3/12 steps, 0:41 elapsed, ~2:03 left: disk: ide-pio read seq bs=4096``."""
        elapsed = time.monotonic() - self.t0
        parts = [f"{self.done}/{self.total}" if self.total else f"{self.done} steps", f"{_clock(elapsed)} elapsed"]
        if self.total and 0 < self.done < self.total:
            parts.append(f"~{_clock(elapsed / self.done * (self.total - self.done))} left")
        return ", ".join(parts) + (f": {self.message}" if self.message else "")

    def _show(self) -> None:
        if self._widget is not None:
            bar, label = self._widget
            bar.max = max(1, self.total or 1)
            bar.value = min(self.done, bar.max) if self.total else 0
            bar.bar_style = ("danger" if self.failed else "success") if self.closed else ""
            label.value = _html_escape(self.status())
        elif self._stream is not None:
            line = f"{self.title}: {self.status()}"
            self._stream.write("\r" + line[:150].ljust(150) + ("\n" if self.closed else ""))
            self._stream.flush()

    # -- what the experiment calls ----------------------------------------------
    def __call__(self, message: str) -> None:
        self.message = str(message)
        self._show()

    def plan(self, steps: int) -> None:
        self.total = max(0, int(steps))
        self._show()

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        self._show()

    def close(self, message: str = "done", *, failed: bool = False) -> None:
        """Show the bar finished: full and green, or (``failed``) red where it stopped."""
        if self.closed:
            return
        self.closed = True
        self.failed = failed
        if self.total and not failed:
            self.done = max(self.done, self.total)
        self.message = message
        self._show()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("failed" if exc[0] else "done", failed=exc[0] is not None)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
        full.setdefault("measured_at", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
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
