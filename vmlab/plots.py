"""Plot and table conventions shared by every lesson: a colour-blind-safe palette (Okabe & Ito) with one
colour per device (emulated devices in warm hues, paravirtual in cool ones), labelled axes with units, category
labels that never run into each other, log axes only for wide ranges and labelled in plain numbers, where it was
measured in small print under the axis, and tables for people (:func:`table`).

Lesson-specific plots live beside their experiment (e.g. ``plot_*`` functions in
``vmlab/experiments/disk.py``) and use these helpers. Every plot function takes
an optional ``ax`` and starts the same way::

    def plot_thing(df, ax=None):
        ax = plots.axes(ax, figsize=(7, 4))     # the caller's axes, or a new figure's
        ...
        return plots.style(ax, title=..., ylabel=..., source=plots.where_label(df))
"""

from __future__ import annotations

import html
import math
import re
import textwrap
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from . import i18n
from .i18n import tr

# Okabe & Ito (2008), safe for the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
KIND_COLORS = {"emulated": "#D55E00", "paravirtual": "#0072B2", "native": "#000000",
               "tcg": "#E69F00", "kvm": "#009E73"}


def figure(figsize: Tuple[float, float] = (7, 4), nrows: int = 1, ncols: int = 1) -> Tuple[Any, Any]:
    """A new figure and its axes (one ``Axes``, or an array of them for ``nrows``/``ncols`` > 1). The layout is
    matplotlib's constrained one: titles, labels, legends and source notes get room and never overlap."""
    import matplotlib.pyplot as plt
    language_font()
    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained")


# The Korean edition's plots: Latin text in matplotlib's DejaVu Sans, Hangul from Debian's fonts-nanum (matplotlib
# falls back glyph by glyph along font.family).
KOREAN_FONT = "NanumGothic"
LATIN_FONT = "DejaVu Sans"
_FONT_DIRS = ("/usr/share/fonts/truetype/nanum", "/usr/share/fonts/nanum", "/usr/local/share/fonts")


def korean_font_available() -> bool:
    """Is NanumGothic known to matplotlib? (Registers the installed files when its font cache predates them.)"""
    from pathlib import Path

    from matplotlib import font_manager
    names = {f.name for f in font_manager.fontManager.ttflist}
    if KOREAN_FONT in names:
        return True
    for d in _FONT_DIRS:
        for path in sorted(Path(d).glob(f"{KOREAN_FONT}*.ttf")) if Path(d).is_dir() else []:
            font_manager.fontManager.addfont(str(path))
    return KOREAN_FONT in {f.name for f in font_manager.fontManager.ttflist}


def font_family() -> list:
    """The font.family for the learner's language: Hangul needs NanumGothic behind the Latin font."""
    if i18n.lang() == "ko" and korean_font_available():
        return [LATIN_FONT, KOREAN_FONT]
    return [LATIN_FONT]


def language_font() -> None:
    """In the Korean edition, make matplotlib draw Hangul (``fonts-nanum``; without it ``make setup`` says what
    to install and the text shows as boxes). Does nothing in English."""
    if i18n.lang() != "ko":
        return
    import matplotlib as mpl
    family = font_family()
    if list(mpl.rcParams["font.family"]) != family:
        mpl.rcParams["font.family"] = family


def axes(ax: Any = None, *, figsize: Tuple[float, float] = (7, 4), nrows: int = 1, ncols: int = 1) -> Any:
    """The axes a plot function draws on: the caller's ``ax`` if given, else those of a new figure."""
    if ax is not None:
        return ax
    return figure(figsize, nrows, ncols)[1]


# One colour per device, the same in every plot of every lesson: emulated devices in warm hues, paravirtual in
# cool ones (Okabe & Ito), so the family reads at a glance and each device stays distinct.
DEVICE_COLORS = {
    "ide-pio": "#D55E00", "ide-dma": "#E69F00", "ahci": "#CC79A7", "nvme": "#F0E442",
    "virtio-blk": "#0072B2", "virtio-scsi": "#56B4E9",
    "uart": "#D55E00", "virtio-console": "#0072B2",
    "rtl8139": "#E69F00", "e1000": "#D55E00", "virtio-net": "#0072B2",
}
_FAMILY = {"emulated": ["#D55E00", "#E69F00", "#CC79A7", "#F0E442"],
           "paravirtual": ["#0072B2", "#56B4E9", "#009E73"]}
EDGE = "#333333"     # a thin dark edge keeps the light colours (yellow, sky blue) visible on white


def color_for(key: str, index: int = 0) -> str:
    return KIND_COLORS.get(key, OKABE_ITO[index % len(OKABE_ITO)])


HATCHES = ["", "//", "..", "xx", "\\\\", "++"]


def grouped_bars(ax: Any, table: Any, *, colors: Any, hatches: bool = False, labels: Any = None,
                 yerr: Any = None, rotation: Optional[int] = None) -> Any:
    """One group of bars per row of *table* (a DataFrame: index = x positions, columns = series).

    ``colors`` maps a series to its colour (a dict or a function; give each series its own, e.g.
    :func:`device_colors`); ``labels`` to its legend text; ``hatches`` adds patterns as a second cue (never the
    only one); ``yerr`` maps a series to a (2, n) error array. The group labels are laid out by
    :func:`category_labels` unless ``rotation`` is given.
    """
    import numpy as np
    x = np.arange(len(table.index))
    series = list(table.columns)
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        color = colors(name) if callable(colors) else colors.get(name)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, table[name].to_numpy(dtype=float), width,
               color=color, edgecolor=EDGE, linewidth=0.5,
               hatch=HATCHES[i % len(HATCHES)] if hatches else None,
               label=labels(name) if callable(labels) else (labels or {}).get(name, name),
               yerr=None if yerr is None else yerr.get(name), capsize=2 if yerr is not None else 0)
    if rotation is None:
        category_labels(ax, [str(i) for i in table.index])
    else:
        ax.set_xticks(x)
        ax.set_xticklabels(list(table.index), rotation=rotation, ha="right" if rotation else "center",
                           rotation_mode="anchor")
    return x




def device_colors(devices: Sequence[str], kinds: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A distinct colour for each device in ``devices``: its own colour from ``DEVICE_COLORS``, or the next free
    colour of its kind's family (``kinds`` maps device -> "emulated"/"paravirtual"), or of the whole palette."""
    out: Dict[str, str] = {}
    for d in devices:
        c = DEVICE_COLORS.get(d)
        if c is None or c in out.values():
            family = _FAMILY.get((kinds or {}).get(d, ""), []) + OKABE_ITO
            c = next((x for x in family if x not in out.values()), OKABE_ITO[len(out) % len(OKABE_ITO)])
        out[d] = c
    return out


# ------------------------------------------------------------- numbers on axes
def number(x: float) -> str:
    """A tick or bar label for people: 0.05, 2, 1,640, 20,000; powers of ten past a million."""
    if x == 0:
        return "0"
    if abs(x) >= 1e6:
        exp = math.floor(math.log10(abs(x)))
        mant = x / 10 ** exp
        return f"10$^{{{exp}}}$" if abs(mant - 1) < 1e-9 else f"{mant:.3g}×10$^{{{exp}}}$"
    return fmt_number(x, 3)


def is_wide(values: Any, ratio: float = 30.0) -> bool:
    """True when positive ``values`` span more than ``ratio`` (max/min): the reason to draw a log axis.
    Bar lengths read linearly; a log axis is for ranges a linear one would flatten."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    return len(vals) >= 2 and max(vals) / min(vals) > ratio


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log ``axis`` that reads: plain-number labels at 1-2-5 steps when it spans three decades or fewer,
    at every decade otherwise, with minor ticks between."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    lo, hi = getattr(ax, f"get_{axis}lim")()
    getattr(ax, f"set_{axis}scale")("log")
    if lo <= 0:                      # bars start at 0: start the axis a little below the smallest value
        vals = _positive_values(ax, axis)
        if vals:
            lo = min(vals) / 2
            hi = max(hi, max(vals) * 1.5)
            getattr(ax, f"set_{axis}lim")(lo, hi)
    lo, hi = getattr(ax, f"get_{axis}lim")()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    a = ax.yaxis if axis == "y" else ax.xaxis
    subs: Any = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    a.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    a.set_major_formatter(FuncFormatter(lambda v, _pos: number(v)))
    a.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=30))
    a.set_minor_formatter(NullFormatter())


def _positive_values(ax: Any, axis: str) -> list:
    vals: list = []
    for p in ax.patches:
        v = p.get_height() if axis == "y" else p.get_width()
        if v and v > 0 and math.isfinite(v):
            vals.append(float(v))
    for line in ax.lines:
        data = line.get_ydata() if axis == "y" else line.get_xdata()
        try:
            vals += [float(v) for v in data if float(v) > 0 and math.isfinite(float(v))]
        except (TypeError, ValueError):
            continue
    return vals


# ---------------------------------------------------------------- category labels
def category_labels(ax: Any, labels: Sequence[str], axis: str = "x") -> None:
    """Category tick labels that never run into each other: kept level when they fit, wrapped at spaces when
    that makes them fit, else rotated 30 degrees (right-anchored under their tick). Widths are measured with
    the tick font, with a margin for the room a legend or a neighbour takes later."""
    labels = [str(s) for s in labels]
    if axis == "y":
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels([textwrap.fill(s, 28) for s in labels])
        return
    ax.set_xticks(range(len(labels)))
    if not labels:
        return
    size = _fontsize()
    room = 0.75 * ax.get_position().width * ax.figure.get_figwidth() * 72 / len(labels) - size   # points
    if max(_width(s, size) for s in labels) <= room:
        ax.set_xticklabels(labels)
        return
    for chars in range(max(len(line) for s in labels for line in s.split("\n")), 3, -1):
        wrapped = ["\n".join(textwrap.fill(line, chars, break_long_words=False, break_on_hyphens=False)
                             for line in s.split("\n")) for s in labels]
        if max(_width(s, size) for s in wrapped) <= room:
            ax.set_xticklabels(wrapped)
            return
    # rotated: one line each, 30 degrees when the slanted lines stay a line height apart, else upright (90)
    flat = [" ".join(s.split("\n")) for s in labels]
    spacing = ax.get_position().width * ax.figure.get_figwidth() * 72 / len(labels)
    angle = 30 if spacing * 0.5 >= 1.3 * size else 90
    ax.set_xticklabels(flat, rotation=angle, ha="right" if angle == 30 else "center", rotation_mode="anchor",
                       va="top" if angle == 30 else "center")


def _fontsize() -> float:
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties
    return float(FontProperties(size=mpl.rcParams["xtick.labelsize"]).get_size_in_points())


def _width(label: str, size: float) -> float:
    """The width in points of the widest line of ``label`` at font ``size``."""
    from matplotlib.textpath import TextPath
    return max(TextPath((0, 0), line or " ", size=size).get_extents().width for line in label.split("\n"))


# ----------------------------------------------------------- where it was measured
def source_note(ax: Any, text: str) -> Any:
    """Where it was measured, in small print under the axis: below the x label and tick labels (and a legend
    placed below the axes), right-aligned, so it never sits on a label, a bar annotation or the title."""
    from matplotlib.transforms import Bbox

    def below(renderer: Any) -> Any:
        boxes = [ax.bbox, ax.xaxis.get_tightbbox(renderer)]
        leg = ax.get_legend()
        # a legend placed by loc="best" stays inside the axes (and asks where the texts are: not this note's)
        if leg is not None and leg.get_visible() and getattr(leg, "_loc", 0) != 0:
            lb = leg.get_window_extent(renderer)
            if lb.y0 < ax.bbox.y0:
                boxes.append(lb)
        return Bbox.union([b for b in boxes if b is not None and b.width > 0])

    for old in [c for c in ax.texts if getattr(c, "_vmlab_source", False)]:
        old.remove()
    note = ax.annotate(text, xy=(1.0, 0.0), xycoords=below, xytext=(0, -4), textcoords="offset points",
                       ha="right", va="top", fontsize=7, color="#555555", annotation_clip=False)
    note._vmlab_source = True
    return note


def style(ax: Any, *, title: str = "", xlabel: str = "", ylabel: str = "", log: Optional[str] = None,
          source: str = "") -> Any:
    """Label an axis the lesson way; ``source`` notes where it ran.

    ``log`` is "x", "y" or "xy": a log axis (:func:`log_axis`), its label saying so. Use it only for a range a
    linear axis would flatten (:func:`is_wide`), never for bars whose length is the point.
    """
    language_font()
    title, xlabel, ylabel = tr(title), tr(xlabel), tr(ylabel)
    if title:
        ax.set_title(title)
    for axis in "xy":
        label = xlabel if axis == "x" else ylabel
        if log and axis in log:
            log_axis(ax, axis)
            if label and "log" not in label and tr("log") not in label:
                label = label[:-1] + tr(", log scale)") if label.endswith(")") else label + tr(" (log scale)")
        if label:
            getattr(ax, f"set_{axis}label")(label)
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if source:
        source_note(ax, source)
    if i18n.lang() == "ko":   # texts made before the font was chosen (axes from plt.subplots, a Figure)
        family = font_family()
        legend = ax.get_legend()
        for text in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                     *(legend.get_texts() if legend is not None else [])]:
            text.set_fontfamily(family)
    return ax


def where_label(df: Any) -> str:
    """'measured under TCG, QEMU 7.2.22, guest 6.1.0, AMD EPYC' from a frame's where columns."""
    if df is None or len(df) == 0:
        return ""
    r = df.iloc[0]
    parts = []
    if "accel" in df:
        parts.append(tr("measured under {accel}").format(accel=str(r["accel"]).upper()))
    if "qemu" in df:
        parts.append(f"QEMU {r['qemu']}")
    if "guest_kernel" in df and r["guest_kernel"]:
        parts.append(tr("guest {kernel}").format(kernel=r["guest_kernel"]))
    if "host_cpu" in df:
        parts.append(str(r["host_cpu"]))
    return ", ".join(parts)


# =========================================================================== tables
# Column-name suffix -> (what it is, unit): "throughput_mb_s" reads "throughput (MB/s)".
UNIT_SUFFIXES = [
    ("_mb_s", "MB/s"), ("_ops_s", "ops/s"), ("_per_mb", "per MB"), ("_per_byte", "per byte"),
    ("_per_packet", "per packet"), ("_per_read", "per read"), ("_per_s", "per s"),
    ("_mib", "MiB"), ("_mb", "MiB"), ("_kb", "KiB"), ("_bytes", "bytes"),
    ("_ns", "ns"), ("_us", "µs"), ("_ms", "ms"), ("_s", "s"), ("_pct", "%"),
]
_LABEL_FIXES = {"ns cv": "ns spread (CV)", "cpu": "CPU", "qemu": "QEMU", "vcpu": "vCPU", "rss": "RSS",
                "pss": "PSS", "lat": "latency", "kvm": "KVM", "tcg": "TCG", "bs": "block size (bytes)"}


def header(name: Any) -> str:
    """A column name for people: ``throughput_mb_s`` -> ``throughput (MB/s)``, ``lat_us_median`` ->
    ``latency median (µs)``; names that already read (spaces, a unit in brackets) are kept."""
    s = str(name)
    if " " in s or "(" in s or ("_" not in s and s not in _LABEL_FIXES):
        return s
    unit = ""
    for suffix, u in UNIT_SUFFIXES:
        m = re.search(re.escape(suffix) + r"(_(median|p99|mean|min|max|cv|sd))?$", s)
        if m:
            stat = m.group(2) or ""
            s = s[: m.start()] + (f"_{stat}" if stat else "")
            unit = u
            break
    words = " ".join(_LABEL_FIXES.get(w, w) for w in s.split("_")).strip()
    words = _LABEL_FIXES.get(words, words)
    if unit.startswith("per "):
        return f"{words} {unit}"
    return f"{words} ({unit})" if unit else words


def fmt_number(x: Any, digits: int = 3) -> str:
    """``digits`` significant figures with thousands separators: 254,883; 2.97e8 -> 297,417,788; 0.0123."""
    if x is None or isinstance(x, str):
        return "" if x is None else x
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "—" if math.isnan(v) else str(v)
    if isinstance(x, int) or (v.is_integer() and abs(v) >= 1):
        return f"{round(v):,}"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1:
        return f"{round(v):,}"
    if mag < -4:
        return f"{v:.{digits - 1}e}"
    out = f"{v:,.{max(0, digits - 1 - mag)}f}"
    return out.rstrip("0").rstrip(".") if "." in out else out


class Table:
    """A DataFrame shown for people: units in the headers, thousands separators and ``digits`` significant
    figures, text left-aligned; past ``max_rows`` rows the first ones, with every row one click away (a
    "show all" fold). ``.data`` is the frame itself, unchanged."""

    def __init__(self, df: Any, *, digits: int = 3, max_rows: int = 15, caption: str = "",
                 index: Optional[bool] = None) -> None:
        self.data = df
        self.digits, self.max_rows, self.caption = digits, max_rows, caption
        import pandas as pd
        named = df.index.name is not None or any(n is not None for n in (df.index.names or []))
        self.index = index if index is not None else (named or not isinstance(df.index, pd.RangeIndex))

    def _html(self, df: Any) -> str:
        import pandas as pd
        shown = df.copy()
        text_cols = [c for c in shown.columns if not pd.api.types.is_numeric_dtype(shown[c])
                     or pd.api.types.is_bool_dtype(shown[c])]
        for c in shown.columns:
            if pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c]):
                shown[c] = [fmt_number(v, self.digits) for v in shown[c]]
        shown.columns = [header(c) for c in shown.columns]
        if self.index:
            shown.index = shown.index.set_names([header(n) if n is not None else None for n in shown.index.names])
        num_idx = [i for i, c in enumerate(df.columns) if c not in text_cols]
        tid = f"vmlab-t{uuid.uuid4().hex[:10]}"      # an id: its rules win over JupyterLab's right-aligned cells
        css = [f"<style>#{tid} td, #{tid} th {{text-align: left; white-space: normal;}}"]
        off = df.index.nlevels if self.index else 0
        for i in num_idx:
            css.append(f"#{tid} td:nth-child({i + 1 + off}) {{text-align: right; "
                       f"font-variant-numeric: tabular-nums; white-space: nowrap;}}")
        for i, c in enumerate(df.columns):      # short words (ide-dma, guest->host) are not broken at a hyphen
            if c in text_cols and df[c].astype(str).str.len().max() <= 24:
                css.append(f"#{tid} td:nth-child({i + 1 + off}) {{white-space: nowrap;}}")
        css.append("</style>")
        return "".join(css) + shown.to_html(index=self.index, classes="vmlab-table", table_id=tid, border=0,
                                            escape=True, na_rep="—")

    def _repr_html_(self) -> str:
        df = self.data
        cap = f"<div><b>{html.escape(self.caption)}</b></div>" if self.caption else ""
        if len(df) <= self.max_rows:
            return cap + self._html(df)
        return (cap + f"<div>{len(df):,} rows; the first {self.max_rows}:</div>" + self._html(df.head(self.max_rows))
                + f"<details class='vmlab-table-all'><summary>show all {len(df):,} rows</summary>"
                + "<div style='max-height: 30em; overflow: auto'>" + self._html(df) + "</div></details>")

    def __repr__(self) -> str:
        return repr(self.data)

    def __len__(self) -> int:
        return len(self.data)


def table(df: Any, **kw: Any) -> Table:
    """``Table(df, **kw)``: how lessons show a frame (see :class:`Table`)."""
    return Table(df, **kw)
