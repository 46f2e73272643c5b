"""Live migration, measured: one guest moved between two QEMU processes on this host.

    from vmlab.experiments import migration
    df = migration.run(quick=True)          # one row per migration
    migration.plot_downtime(df); migration.plot_timeline(df); migration.summary(df)
    # in steps, on one started LiveGuest g: the pre-copy grid, then a special case; one frame again
    grid = migration.run(quick=True, guest=g, special=False)
    stuck = migration.run(quick=True, guest=g, bandwidths=(), special_cases=("non-converging",))
    df = migration.combine(grid, stuck)

The guest runs ``vmbench dirty`` (vmlab/guest/vmbench.c): it writes one word
per 4 KiB page of a working set at a chosen rate (MiB of pages per second) and
sends a heartbeat every 5 ms, a UDP datagram carrying a counter, through an
e1000 NIC whose other end is a socketpair read by this host
(:mod:`vmlab.experiments.liveguest`). The destination QEMU is the same machine
started with ``-incoming defer`` (:mod:`vmlab.vm.migrate`); the stream goes over
a unix socket in its private 0700 directory. Pre-copy runs under a bandwidth
limit (``max-bandwidth``) and QEMU's downtime limit (``downtime-limit``,
default 300 ms). After each move the guest is checked (it answers, kept its
state file, its kernel printed nothing alarming); a guest that fails is
replaced by a fresh boot.

Columns, per migration (docs/migration.md defines every one): ``case``
(precopy | non-converging | auto-converge | postcopy | stop-and-copy),
``bandwidth_mbs``, ``later_bandwidth_mbs``, ``dirty_rate_mbs``,
``achieved_dirty_mbs``, ``status``, ``converged``, ``wall_s``,
``total_time_s``, ``downtime_ms``, ``guest_gap_ms`` (last heartbeat from the
source to the first from the destination, host clock), ``guest_clock_gap_ms``
(the same two heartbeats on the guest's clock), ``rounds``, ``transferred_mb``,
``max_throttle_pct``, ``counter_kept``, ``file_kept``, ``stale_pages``,
``guest_ok``, ``guest_failure``, and the where-it-ran columns.
``df.attrs["timelines"]``: QEMU's samples of the special cases;
``df.attrs["guests_lost"]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .. import plots
from ..errors import SpecError
from ..hostinfo import where
from ..image import ensure_image
from ..measure import Progress, Rows, advance, plan, say
from ..plots import OKABE_ITO, style, where_label
from .liveguest import LiveGuest, check_rate

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

NAME = "migration"
__all__ = ["FULL", "QUICK", "SPECIAL", "LiveGuest", "combine", "plot_downtime", "plot_timeline", "run", "summary"]

QUICK: Dict[str, Any] = {"bandwidths": (64, 256), "rates": (0, 16), "working_set": 32, "timeout": 6.0,
                         "special_later": 4, "special_working_set": 4}
FULL: Dict[str, Any] = {"bandwidths": (32, 64, 128), "rates": (0, 4, 8, 16, 32), "working_set": 32,
                        "special_later": 4, "special_working_set": 4,
                        "timeout": 15.0}
# the cases that cannot converge by pre-copy alone, and the three ways out (run in this order)
SPECIAL = ("non-converging", "auto-converge", "postcopy", "stop-and-copy")
_SPECIAL_RUN: Dict[str, Any] = {"non-converging": ({}, None), "auto-converge": ({"auto-converge": True}, None),
                                "postcopy": ({"postcopy-ram": True}, 1.0), "stop-and-copy": ({}, None)}


def _check(bandwidths: Sequence[int], rates: Sequence[float], working_set: int, memory: int,
           timeout: float, cases: Sequence[str] = ()) -> None:
    for c in cases:
        if c not in SPECIAL:
            raise SpecError("special_cases", f"unknown case {c!r}", fix="some of: " + ", ".join(SPECIAL))
    if not bandwidths and not cases:
        raise SpecError("bandwidths", "nothing to run: no bandwidths for the pre-copy grid and no special case",
                        fix="e.g. bandwidths=(64, 256), or bandwidths=() with special=True for the special cases only")
    if bandwidths and not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 100000
                                 for b in bandwidths):
        raise SpecError("bandwidths", f"{bandwidths!r} is not a list of bandwidth limits in MiB/s",
                        fix="e.g. bandwidths=(16, 32, 128)")
    if bandwidths and not rates:
        raise SpecError("rates", "no dirty rates given", fix="e.g. rates=(0, 8, 32)")
    for r in rates:
        check_rate(r)
    if not isinstance(memory, int) or memory < 128:
        raise SpecError("memory", f"{memory!r} MiB is too little for the lesson guest", fix="memory=256")
    if not isinstance(working_set, int) or not 1 <= working_set <= memory // 2:
        raise SpecError("working_set", f"{working_set!r} MiB: the dirtied working set must be 1 to memory/2 MiB",
                        fix=f"e.g. working_set=32 (memory={memory})")
    if not isinstance(timeout, (int, float)) or not 1 <= timeout <= 600:
        raise SpecError("timeout", f"{timeout!r} is not a time limit in seconds (1 to 600)", fix="e.g. timeout=10")


def run(quick: bool = False, progress: Progress = None, *, bandwidths: Optional[Sequence[int]] = None,
        rates: Optional[Sequence[float]] = None, working_set: Optional[int] = None, memory: int = 256,
        downtime_limit_ms: int = 300, timeout: Optional[float] = None, special: bool = True,
        special_cases: Sequence[str] = SPECIAL,
        special_bandwidth: int = 32, special_later: Optional[int] = None, special_rate: float = 16.0,
        special_working_set: Optional[int] = None, image: Optional[GuestImage] = None, guest: Optional[LiveGuest] = None) -> pd.DataFrame:
    """Migrate one guest back and forth: every bandwidth x dirty rate, then (``special``) a case that
    cannot converge (the guest rewrites a small working set, ``special_working_set`` MiB, over and over;
    after the first pass at ``special_bandwidth`` the link drops to ``special_later`` MiB/s, so each round
    takes about a second and leaves more than the pause limit allows), the same with auto-converge, with a
    switch to post-copy, and stop-and-copy.

    In steps: ``special=False`` runs only the pre-copy grid; ``bandwidths=()`` runs only the special
    cases, ``special_cases`` a subset of :data:`SPECIAL` (in that order); :func:`combine` joins the frames.

    ``guest``: a started :class:`LiveGuest` to use (a lesson's; it is left running); without it one is
    booted and closed."""
    p = QUICK if quick else FULL
    bandwidths = tuple(bandwidths if bandwidths is not None else p["bandwidths"])
    rates = tuple(rates if rates is not None else p["rates"])
    working_set = int(working_set if working_set is not None else p["working_set"])
    timeout = float(timeout if timeout is not None else p["timeout"])
    special_later = int(special_later if special_later is not None else p["special_later"])
    special_ws = int(special_working_set if special_working_set is not None else p["special_working_set"])
    if isinstance(special_cases, str):
        raise SpecError("special_cases", f"{special_cases!r} is one name, not a list of cases",
                        fix=f"e.g. special_cases=({special_cases!r},)")
    _check(bandwidths, rates, working_set, memory, timeout, tuple(special_cases) if special else ())
    cases = tuple(c for c in SPECIAL if c in special_cases) if special else ()
    if not 1 <= special_ws <= memory // 2:
        raise SpecError("special_working_set", f"{special_ws!r} MiB: must be 1 to memory/2",
                        fix="e.g. special_working_set=4")
    if image is None and guest is None:
        image = ensure_image()
    rows = Rows(NAME)
    timelines: Dict[str, List[Dict[str, Any]]] = {}
    own = guest is None
    if guest is None:
        guest = LiveGuest(memory=memory, image=image, working_set=working_set)
    plan(progress, int(own) + len(bandwidths) * len(rates) + len(cases))   # boot, each migration
    with rows.guard():
        try:
            if own:
                say(progress, f"booting the guest ({memory} MiB, an e1000 NIC for the heartbeat)")
                guest.start()
                advance(progress)
            rows.where = where(guest.accel, guest.kernel_release)
            for bw in bandwidths:
                for rate in rates:
                    say(progress, f"pre-copy at {bw} MiB/s, guest dirtying {rate:g} MiB/s")
                    row = guest.migrate(bandwidth_mbs=bw, dirty_rate_mbs=rate, downtime_limit_ms=downtime_limit_ms,
                                        timeout=timeout, fresh=True)
                    row.pop("samples")
                    rows.add(case="precopy", **row)
                    say(progress, _said(row))
                    advance(progress)
            if cases:
                # the first pass at special_bandwidth, then the link drops to special_later MiB/s: each round
                # sends the small working set the guest keeps rewriting (about a second), more than the pause
                # limit allows, so pre-copy cannot converge; QEMU syncs the dirty log at the end of each round,
                # so auto-converge (which judges once a second, at a sync) gets to act within the time limit.
                # The lesson does not wait for the first pass over ~100 MiB at a few MiB/s.
                for case in cases:
                    caps, after = _SPECIAL_RUN[case]
                    say(progress, f"{case}: {special_bandwidth} then {special_later} MiB/s, "
                                  f"guest dirtying {special_rate:g} MiB/s of {special_ws} MiB")
                    row = guest.migrate(bandwidth_mbs=special_bandwidth, later_bandwidth_mbs=special_later,
                                        dirty_rate_mbs=special_rate, downtime_limit_ms=downtime_limit_ms,
                                        timeout=timeout * (3 if case == "auto-converge" else 1),
                                        capabilities=caps, postcopy_after_s=after, fresh=True,
                                        stop_first=case == "stop-and-copy", working_set=special_ws)
                    timelines[case] = row.pop("samples")
                    rows.add(case=case, **row)
                    say(progress, _said(row))
                    advance(progress)
        finally:
            if own:
                guest.close()
    df = rows.frame()
    df.attrs["timelines"] = timelines
    df.attrs["guests_lost"] = guest.lost
    return df


def combine(*frames: pd.DataFrame) -> pd.DataFrame:
    """Frames of several :func:`run` calls on one guest (a lesson's steps) as one frame: the rows in order,
    ``attrs["timelines"]`` merged, ``attrs["guests_lost"]`` the guest's count after the last run."""
    import pandas as pd
    if not frames:
        raise SpecError("frames", "no frames to combine", fix="e.g. combine(grid, special)")
    df = pd.concat(frames, ignore_index=True)
    timelines: Dict[str, List[Dict[str, Any]]] = {}
    for f in frames:
        timelines.update(f.attrs.get("timelines", {}))
    df.attrs = {"timelines": timelines, "guests_lost": max(int(f.attrs.get("guests_lost", 0)) for f in frames)}
    return df


def _said(row: Dict[str, Any]) -> str:
    if not row["guest_ok"]:
        return f"  the guest did not survive: {row['guest_failure']} (a fresh guest was booted)"
    if not row["converged"]:
        return (f"  {row['status']} after {row['wall_s']:.1f} s, {row['rounds']} rounds "
                f"(the guest dirtied faster than the link could send)")
    return (f"  done in {row['total_time_s']:.2f} s, {row['rounds']} rounds, downtime {row['downtime_ms']:.0f} ms "
            f"(QEMU) / {row['guest_gap_ms']:.0f} ms (heartbeat), state kept: {row['file_kept'] and row['counter_kept']}")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """The figures of each case and setting, one line each (for the lesson's table)."""
    cols = ["case", "bandwidth_mbs", "dirty_rate_mbs", "status", "total_time_s", "downtime_ms", "guest_gap_ms",
            "guest_clock_gap_ms", "rounds", "transferred_mb", "achieved_dirty_mbs", "max_throttle_pct",
            "file_kept", "counter_kept", "guest_ok", "stale_pages"]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True)


# ----------------------------------------------------------------- plots
def plot_downtime(df: pd.DataFrame, ax: Any = None) -> Any:
    """Downtime (QEMU's and the heartbeat's) and total time against the dirty rate, one line per bandwidth.

    Two panels; a migration that did not converge is drawn as an x at the top of the total-time panel.
    """
    pre = df[df["case"] == "precopy"]
    if ax is None:
        _, ax = plots.figure(figsize=(11, 4), ncols=2)
    a1, a2 = ax
    for i, (bw, g) in enumerate(pre.groupby("bandwidth_mbs")):
        c = OKABE_ITO[i % len(OKABE_ITO)]
        ok = g[g["converged"]].sort_values("dirty_rate_mbs")
        a1.plot(ok["dirty_rate_mbs"], ok["downtime_ms"], "o-", color=c, label=f"{bw} MiB/s: QEMU")
        a1.plot(ok["dirty_rate_mbs"], ok["guest_gap_ms"], "s--", color=c, alpha=0.7, label=f"{bw} MiB/s: heartbeat")
        a2.plot(ok["dirty_rate_mbs"], ok["total_time_s"], "o-", color=c, label=f"{bw} MiB/s")
        bad = g[~g["converged"]]
        if len(bad):
            a2.plot(bad["dirty_rate_mbs"], bad["wall_s"], "x", color=c, markersize=12, mew=3,
                    label=f"{bw} MiB/s: gave up (no convergence)")
    src = where_label(df)
    style(a1, title="Downtime: the guest stopped", xlabel="guest dirty rate (MiB/s)", ylabel="downtime (ms)",
          source=src)
    style(a2, title="Total migration time", xlabel="guest dirty rate (MiB/s)", ylabel="seconds", source=src)
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return ax


def plot_timeline(df: pd.DataFrame, ax: Any = None) -> Any:
    """Bytes left to send against time for the special cases (from ``df.attrs["timelines"]``)."""
    ax = plots.axes(ax, figsize=(8, 4))
    tl = df.attrs.get("timelines", {})
    for i, (case, samples) in enumerate(tl.items()):
        t = [s["t"] for s in samples if s.get("remaining") is not None]
        left = [s["remaining"] / 2**20 for s in samples if s.get("remaining") is not None]
        ax.plot(t, left, color=OKABE_ITO[(i + 3) % len(OKABE_ITO)], label=case)
        thr = [(s["t"], s["throttle_pct"]) for s in samples if s.get("throttle_pct")]
        if thr:
            ax.annotate(f"CPU throttled to {max(x[1] for x in thr)} %", (thr[-1][0], 0), fontsize=8,
                        xytext=(0, 20), textcoords="offset points")
    style(ax, title="What is left to send, as pre-copy goes round", xlabel="seconds since migrate",
          ylabel="MiB left (QEMU's 'remaining')", source=where_label(df))
    ax.legend(fontsize=8)
    return ax


def figures(df: pd.DataFrame) -> Dict[str, float]:
    """Headline numbers for the lesson's prose: medians over the pre-copy runs that converged."""
    pre = df[(df["case"] == "precopy") & (df["converged"])]
    out: Dict[str, float] = {}
    for col in ("downtime_ms", "guest_gap_ms", "total_time_s"):
        v = pre[col].dropna()
        out[col] = float(v.median()) if len(v) else math.nan
    return out
