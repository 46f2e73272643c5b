"""The instructor's side of the class prediction store: read it, summarise it, plot it (docs/instructor.md).

Students' kernels write with :mod:`vmlab.predictions_store`; this module reads. A store is

- a directory of ``<user>.json`` files (the directory store, or the predictions service's own directory when
  the dashboard runs on the hub's machine), or
- the URL of the class predictions service (``http://.../services/vmlab-predictions``): read with an
  instructor's hub token (``JUPYTERHUB_API_TOKEN`` in the instructor's own server).

::

    from vmlab import classroom
    df = classroom.load()                  # VMLAB_CLASS_STORE, or load("/path/to/dir"), load(URL, token=...)
    classroom.questions(df)                # one row per question: how many predicted, median, quartiles, measured
    classroom.plot_question(df, key)       # the class's predictions beside the measured value

Nothing here names a student beyond their hub user name, and nothing is sent anywhere: the service URL is
the hub's own.
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

from .config import class_store
from .predictions_store import USER_RE

__all__ = ["COLUMNS", "Dashboard", "distribution", "load", "plot_question", "questions", "read_directory", "read_service",
           "rows_from"]

#: the columns of :func:`load`'s table (one row per student and question)
COLUMNS = ["user", "key", "question", "unit", "predicted", "measured", "t"]


def rows_from(users: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows from ``{user: {"predictions": {key: record}}}`` (the service's answer, or the files read)."""
    rows = []
    for user, data in sorted(users.items()):
        if not USER_RE.match(str(user)) or not isinstance(data, dict):
            continue
        for key, rec in (data.get("predictions") or {}).items():
            if not isinstance(rec, dict):
                continue
            rows.append({"user": user, "key": str(rec.get("key", key)), "question": str(rec.get("question", "")),
                         "unit": str(rec.get("unit", "")), "predicted": _num(rec.get("predicted")),
                         "measured": _num(rec.get("measured")), "t": _num(rec.get("t"))})
    return rows


def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_directory(directory: Union[str, Path]) -> list[dict[str, Any]]:
    """Every record in a directory store (files that are not a student's are skipped)."""
    users: dict[str, Any] = {}
    d = Path(directory)
    if not d.is_dir():
        return []
    for p in sorted(d.glob("*.json")):
        try:
            users[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue                 # a file being replaced, or not ours
    return rows_from(users)


def read_service(url: str, token: Optional[str] = None, timeout: float = 10) -> list[dict[str, Any]]:
    """Every record, from the predictions service (an instructor's token; 403 for a student's)."""
    token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    req = urllib.request.Request(url.rstrip("/") + "/api/predictions",
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return rows_from(json.loads(resp.read()).get("users") or {})


def load(source: Optional[Union[str, Path]] = None, token: Optional[str] = None) -> Any:
    """The class's predictions as a DataFrame (:data:`COLUMNS`), empty if there are none yet.

    ``source``: a directory or the service URL; default ``VMLAB_CLASS_STORE``. No store at all is an empty table.
    """
    import pandas as pd
    where = source if source is not None else class_store()
    if where is None:
        rows: list[dict[str, Any]] = []
    elif str(where).startswith(("http://", "https://")):
        rows = read_service(str(where), token)
    else:
        rows = read_directory(where)
    return pd.DataFrame(rows, columns=COLUMNS)


def questions(df: Any) -> Any:
    """One row per question: n predicted, median and quartiles of the predictions, n measured, measured median."""
    import pandas as pd
    cols = ["key", "question", "unit", "n_predicted", "predicted_q1", "predicted_median", "predicted_q3",
            "n_measured", "measured_median", "last_t"]
    out = []
    for key, g in df.groupby("key", sort=False):
        p = g["predicted"].dropna()
        m = g["measured"].dropna()
        out.append({"key": key, "question": g["question"].iloc[-1], "unit": g["unit"].iloc[-1],
                    "n_predicted": len(p),
                    "predicted_q1": p.quantile(0.25) if len(p) else None,
                    "predicted_median": p.median() if len(p) else None,
                    "predicted_q3": p.quantile(0.75) if len(p) else None,
                    "n_measured": len(m), "measured_median": m.median() if len(m) else None,
                    "last_t": g["t"].max()})
    table = pd.DataFrame(out, columns=cols)
    return table.sort_values("last_t", ascending=False).reset_index(drop=True)


def distribution(df: Any, key: str) -> dict[str, Any]:
    """The predictions and measurements of one question: {"question", "unit", "predicted", "measured"}."""
    g = df[df["key"] == key]
    if g.empty:
        raise KeyError(f"no predictions for question {key!r} yet (known: {sorted(set(df['key']))})")
    return {"question": g["question"].iloc[-1], "unit": g["unit"].iloc[-1],
            "predicted": [float(x) for x in g["predicted"].dropna()],
            "measured": [float(x) for x in g["measured"].dropna()]}


def plot_question(df: Any, key: str, ax: Any = None, measured: Optional[float] = None) -> Any:
    """Histogram of the class's predictions of one question, the measured value (the median of the students'
    measurements, or ``measured``) as a vertical line. Log bins when every value is positive and they span
    more than 10x."""
    import numpy as np

    from . import plots
    d = distribution(df, key)
    ax = plots.axes(ax, figsize=(7, 3.6))
    pred = np.array(d["predicted"], dtype=float)
    meas = measured if measured is not None else (float(np.median(d["measured"])) if d["measured"] else None)
    values = np.concatenate([pred, [meas]]) if meas is not None else pred
    log = bool(len(values)) and bool((values > 0).all()) and values.max() / values.min() > 10
    if len(pred):
        if log:
            bins = np.logspace(np.log10(values.min() / 1.5), np.log10(values.max() * 1.5), 16)
        else:
            span = (values.max() - values.min()) or abs(values.max()) or 1.0
            bins = np.linspace(values.min() - 0.1 * span, values.max() + 0.1 * span, 16)
        ax.hist(pred, bins=bins, color="#56B4E9", edgecolor="#333333", label=f"predictions (n={len(pred)})")
    if meas is not None:
        who = "given" if measured is not None else f"median of {len(d['measured'])} students' runs"
        ax.axvline(meas, color="#D55E00", linewidth=2.5,
                   label=f"measured: {plots.number(meas)} {d['unit']} ({who})")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(d["unit"] or "value")
    ax.set_ylabel("students")
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(d["question"], fontsize=10, wrap=True)
    if len(pred) or meas is not None:
        ax.legend(loc="upper right", fontsize=8)
    return ax


# ------------------------------------------------------------------------------ the live dashboard
class Dashboard:
    """The instructor's live view (notebooks/demo/ClassPredictions.ipynb): pick a question, see the class's
    predictions beside the measured value, refreshed every ``refresh`` seconds (0: once, as when rendered
    headless). The widget lives here, not in vmlab.widgets, because it reads the store through this module.

    The figure is drawn off-screen (Agg) and shown as a PNG, so the refresh thread never touches pyplot.
    """

    def __init__(self, source: Optional[Union[str, Path]] = None, refresh: float = 5.0,
                 token: Optional[str] = None) -> None:
        import threading

        import ipywidgets as W
        self.source, self.refresh, self.token = source, refresh, token
        self.df = load(source, token)
        self.choice = W.Dropdown(description="question", layout=W.Layout(width="95%"),
                                 style={"description_width": "initial"})
        self.image = W.Image(format="png")
        self.status = W.HTML()
        self.table = W.HTML()
        self.widget = W.VBox([self.status, self.choice, self.image, self.table])
        self.widget.add_class("vmlab-class-dashboard")
        self._stop = threading.Event()
        self._seen: Any = None
        self.choice.observe(lambda _c: self.draw(), names="value")
        self.update()
        if refresh > 0:
            threading.Thread(target=self._loop, name="vmlab-class-dashboard", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                self.df = load(self.source, self.token)
                self.update()
            except Exception as exc:       # the store is down for a moment: say so, keep polling
                self.status.value = f"<i>could not read the class store: {exc}</i>"

    def stop(self) -> None:
        self._stop.set()

    def update(self) -> None:
        import time as _time
        q = questions(self.df)
        options = [(f"{r.question} ({r.n_predicted} predictions)", r.key) for r in q.itertuples()]
        current = self.choice.value
        self.choice.options = options
        if options:
            self.choice.value = current if current in dict(options).values() else options[0][1]
        students = self.df["user"].nunique()
        self.status.value = (f"<b>{students}</b> students, <b>{len(self.df)}</b> predictions; "
                             f"read {_time.strftime('%H:%M:%S')}" if len(self.df)
                             else "No predictions yet: they appear here as the students record them.")
        self.table.value = q.drop(columns=["key", "last_t"]).to_html(index=False, float_format="{:.3g}".format) \
            if len(q) else ""
        self.draw()

    def draw(self) -> None:
        key = self.choice.value
        snapshot = (key, len(self.df), float(self.df["t"].max()) if len(self.df) else 0.0)
        if key is None or snapshot == self._seen:
            return
        self._seen = snapshot
        self.image.value = self.png(key)

    def png(self, key: str) -> bytes:
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(7, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        plot_question(self.df, key, ax=fig.add_subplot(1, 1, 1))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
