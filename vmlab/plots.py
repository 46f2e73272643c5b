"""Plot conventions shared by every lesson: a colour-blind-safe palette
(Okabe & Ito), emulated vs paravirtual colours, labelled axes with units.

Lesson-specific plots live beside their experiment (e.g. ``plot_*`` functions in
``vmlab/experiments/disk.py``) and use these helpers.
"""

from __future__ import annotations

from typing import Any, Optional

# Okabe & Ito (2008), safe for the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
KIND_COLORS = {"emulated": "#D55E00", "paravirtual": "#0072B2", "native": "#000000",
               "tcg": "#E69F00", "kvm": "#009E73"}


def color_for(key: str, index: int = 0) -> str:
    return KIND_COLORS.get(key, OKABE_ITO[index % len(OKABE_ITO)])


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
        ax.annotate(source, xy=(1.0, -0.18), xycoords="axes fraction", ha="right", va="top",
                    fontsize=7, color="#555555")
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
