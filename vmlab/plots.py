"""Plot conventions shared by every lesson: a colour-blind-safe palette
(Okabe & Ito), emulated vs paravirtual colours, labelled axes with units.

Lesson-specific plots live beside their experiment (e.g. ``plot_*`` functions in
``vmlab/experiments/disk.py``) and use these helpers. Every plot function takes
an optional ``ax`` and starts the same way::

    def plot_thing(df, ax=None):
        ax = plots.axes(ax, figsize=(7, 4))     # the caller's axes, or a new figure's
        ...
        return plots.style(ax, title=..., ylabel=..., source=plots.where_label(df))
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

# Okabe & Ito (2008), safe for the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
KIND_COLORS = {"emulated": "#D55E00", "paravirtual": "#0072B2", "native": "#000000",
               "tcg": "#E69F00", "kvm": "#009E73"}


def figure(figsize: Tuple[float, float] = (7, 4), nrows: int = 1, ncols: int = 1) -> Tuple[Any, Any]:
    """A new figure and its axes (one ``Axes``, or an array of them for ``nrows``/``ncols`` > 1)."""
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=figsize)


def axes(ax: Any = None, *, figsize: Tuple[float, float] = (7, 4), nrows: int = 1, ncols: int = 1) -> Any:
    """The axes a plot function draws on: the caller's ``ax`` if given, else those of a new figure."""
    if ax is not None:
        return ax
    return figure(figsize, nrows, ncols)[1]


def color_for(key: str, index: int = 0) -> str:
    return KIND_COLORS.get(key, OKABE_ITO[index % len(OKABE_ITO)])


HATCHES = ["", "//", "..", "xx", "\\\\", "++"]


def grouped_bars(ax: Any, table: Any, *, colors: Any, hatches: bool = False, labels: Any = None,
                 yerr: Any = None, rotation: int = 0) -> Any:
    """One group of bars per row of *table* (a DataFrame: index = x positions, columns = series).

    ``colors`` maps a series to its colour (a dict or a function); ``labels`` to its legend text;
    ``hatches`` tells series of the same colour apart; ``yerr`` maps a series to a (2, n) error array.
    """
    import numpy as np
    x = np.arange(len(table.index))
    series = list(table.columns)
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        color = colors(name) if callable(colors) else colors.get(name)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, table[name].to_numpy(dtype=float), width,
               color=color, edgecolor="white" if hatches else None,
               hatch=HATCHES[i % len(HATCHES)] if hatches else None,
               label=labels(name) if callable(labels) else (labels or {}).get(name, name),
               yerr=None if yerr is None else yerr.get(name), capsize=2 if yerr is not None else 0)
    ax.set_xticks(x)
    ax.set_xticklabels(list(table.index), rotation=rotation, ha="right" if rotation else "center")
    return x


def source_note(ax: Any, text: str) -> None:
    """Where it was measured, in small print at the top right, between the axes and the title
    (so it never collides with tick labels, however many lines they take)."""
    if ax.get_title():
        ax.set_title(ax.get_title(), pad=14)
    ax.annotate(text, xy=(1.0, 1.0), xycoords="axes fraction", xytext=(0, 3), textcoords="offset points",
                ha="right", va="bottom", fontsize=7, color="#555555")


def style(ax: Any, *, title: str = "", xlabel: str = "", ylabel: str = "", log: Optional[str] = None,
          source: str = "") -> Any:
    """Label an axis the lesson way; ``log`` is "x", "y" or "xy"; ``source`` notes where it ran."""
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if log and "x" in log:
        ax.set_xscale("log")
    if log and "y" in log:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if source:
        source_note(ax, source)
    return ax


def where_label(df: Any) -> str:
    """'measured under TCG, QEMU 7.2.22, guest 6.1.0, AMD EPYC' from a frame's where columns."""
    if df is None or len(df) == 0:
        return ""
    r = df.iloc[0]
    parts = []
    if "accel" in df:
        parts.append(f"measured under {str(r['accel']).upper()}")
    if "qemu" in df:
        parts.append(f"QEMU {r['qemu']}")
    if "guest_kernel" in df and r["guest_kernel"]:
        parts.append(f"guest {r['guest_kernel']}")
    if "host_cpu" in df:
        parts.append(str(r["host_cpu"]))
    return ", ".join(parts)
