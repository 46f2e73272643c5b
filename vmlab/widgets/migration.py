"""Live migration, live: sliders for the guest's dirty rate and the link's bandwidth, a Migrate
button, and the guest's heartbeat counter ticking on while it moves between QEMU processes.

    from vmlab.experiments.liveguest import LiveGuest
    from vmlab.widgets.migration import MigrationWidget
    g = LiveGuest(memory=256).start()
    w = MigrationWidget(g); w              # move the sliders, press Migrate, watch the counter
    w.migrate(bandwidth_mbs=32, dirty_rate_mbs=8)    # the same from code (headless runs)
    w.frame()                              # one row per migration
    g.close()

The counter is the last heartbeat the host received from the guest (a UDP
datagram every 5 ms from ``vmbench dirty``); it keeps counting from where it
was on the new QEMU process. A migration runs on a thread, so the counter
keeps moving while it does. Every callback shows its errors in the widget.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..experiments.liveguest import LiveGuest
from ..i18n import tr
from ..plots import OKABE_ITO, figure, style
from .errors import failed

if TYPE_CHECKING:
    import pandas as pd


class MigrationWidget:
    """Sliders -> ``LiveGuest.migrate``; the heartbeat counter, live; a table and plot of the migrations."""

    def __init__(self, guest: LiveGuest, refresh_s: float = 0.25) -> None:
        import ipywidgets as W
        self.guest = guest
        self.rows: List[Dict[str, Any]] = []
        self.rate = W.FloatLogSlider(value=8, base=2, min=0, max=10, step=1, description=tr("dirty MiB/s"),
                                     continuous_update=False, layout=W.Layout(width="380px"))
        self.bandwidth = W.IntSlider(value=32, min=8, max=256, step=8, description=tr("link MiB/s"),
                                     continuous_update=False, layout=W.Layout(width="380px"))
        self.downtime = W.IntSlider(value=300, min=10, max=2000, step=10, description=tr("max pause ms"),
                                    continuous_update=False, layout=W.Layout(width="380px"))
        self.auto = W.Checkbox(value=False, description=tr("auto-converge (throttle the guest)"))
        self.post = W.Checkbox(value=False, description=tr("switch to post-copy after 1 s"))
        self.idle = W.Checkbox(value=False, description=tr("guest idle (heartbeat only, no writes)"))
        self.button = W.Button(description=tr("Migrate"), icon="truck", button_style="primary")
        self.counter = W.HTML()
        self.status = W.HTML(tr("ready"))
        self.plot_out = W.Output()
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        for w, css in ((self.rate, "rate"), (self.bandwidth, "bandwidth"), (self.button, "migrate"),
                       (self.counter, "counter"), (self.status, "status")):
            w.add_class(f"vmlab-migration-{css}")
        self.button.on_click(lambda _b: self._start_thread())
        self.widget = W.VBox([W.HBox([W.VBox([self.rate, self.bandwidth, self.downtime]),
                                      W.VBox([self.idle, self.auto, self.post, self.button])]),
                              self.counter, self.status, self.plot_out, self.log])
        self.widget.add_class("vmlab-migration")
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(refresh_s,), name="vmlab-migration-ticker",
                                        daemon=True)
        self._tick_once()
        self._ticker.start()

    # ---------------------------------------------------------------- the counter
    def _tick_once(self) -> None:
        n = self.guest.counter
        moving = " <i>(migrating...)</i>" if self._busy.locked() else ""
        self.counter.value = (f"<span style='font-size:1.3em'>guest heartbeat counter: <b>{n if n is not None else '—'}"
                              f"</b></span> &nbsp; running in QEMU {self.guest.where_now}{moving}")

    def _tick(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                self._tick_once()
            except Exception:           # the widget may be gone: the ticker just stops
                return
            time.sleep(every)

    def close(self) -> None:
        """Stop the counter's thread (the guest is the caller's to close)."""
        self._stop.set()

    # ---------------------------------------------------------------- migrating
    def _start_thread(self) -> None:
        if self._busy.locked():
            self.status.value = "a migration is already running"
            return
        threading.Thread(target=self._safe_migrate, name="vmlab-migrate", daemon=True).start()

    def _safe_migrate(self) -> None:
        try:
            self.migrate()
        except Exception as exc:            # shown, never lost in a callback
            with self.log:
                print(f"error: {exc}")
                traceback.print_exc(limit=2)
            self.status.value = f"<b style='color:#D55E00'>error:</b> {exc}"
            failed("migrate", exc)

    def migrate(self, bandwidth_mbs: Optional[int] = None, dirty_rate_mbs: Optional[float] = None,
                downtime_limit_ms: Optional[int] = None) -> Dict[str, Any]:
        """One migration with the sliders' settings (or these); its row."""
        bw = int(bandwidth_mbs if bandwidth_mbs is not None else self.bandwidth.value)
        rate = float(dirty_rate_mbs if dirty_rate_mbs is not None else (0 if self.idle.value else self.rate.value))
        limit = int(downtime_limit_ms if downtime_limit_ms is not None else self.downtime.value)
        caps = {"auto-converge": bool(self.auto.value), "postcopy-ram": bool(self.post.value)}
        with self._busy:
            self.button.disabled = True
            self.status.value = f"migrating at {bw} MiB/s, the guest writing {rate:g} MiB/s..."
            try:
                row = self.guest.migrate(bandwidth_mbs=bw, dirty_rate_mbs=rate, downtime_limit_ms=limit,
                                         timeout=30.0, capabilities=caps,
                                         postcopy_after_s=1.0 if caps["postcopy-ram"] else None)
            finally:
                self.button.disabled = False
        row.pop("samples", None)
        self.rows.append(row)
        self.status.value = self._said(row)
        self._tick_once()
        self._redraw()
        return row

    @staticmethod
    def _said(row: Dict[str, Any]) -> str:
        if not row.get("guest_ok"):
            return (f"<b style='color:#D55E00'>the guest did not survive</b>: {row.get('guest_failure')} "
                    "(a fresh guest was booted)")
        if not row["converged"]:
            return (f"<b>gave up</b> after {row['wall_s']:.1f} s and {row['rounds']} rounds: the guest wrote faster "
                    "than the link could send. The guest never stopped; it is still where it was.")
        return (f"<b>moved</b> in {row['total_time_s']:.2f} s, {row['rounds']} rounds, "
                f"{row['transferred_mb']:.0f} MiB sent; paused {row['downtime_ms']:.0f} ms (QEMU), "
                f"{row['guest_gap_ms']:.0f} ms between heartbeats (seen from the host); "
                f"file kept: {row['file_kept']}, counter went on: {row['counter_kept']}")

    # ---------------------------------------------------------------- display
    def frame(self) -> pd.DataFrame:
        import pandas as pd
        return pd.DataFrame(self.rows)

    def _redraw(self) -> None:
        if not self.rows:
            return
        import matplotlib.pyplot as plt
        from IPython.display import display
        df = self.frame()
        self.plot_out.clear_output(wait=True)
        with self.plot_out:
            fig, ax = figure(figsize=(7, 3.2))
            ok = df[df["converged"].astype(bool)]
            ax.scatter(ok["dirty_rate_mbs"], ok["total_time_s"], color=OKABE_ITO[5], label="total time (s)")
            ax.scatter(ok["dirty_rate_mbs"], ok["downtime_ms"] / 1e3, color=OKABE_ITO[6], marker="s",
                       label="QEMU's downtime (s)")
            bad = df[~df["converged"].astype(bool)]
            if len(bad):
                ax.scatter(bad["dirty_rate_mbs"], bad["wall_s"], color="black", marker="x", s=80,
                           label="gave up (no convergence)")
            style(ax, title="Your migrations", xlabel="guest dirty rate (MiB/s)", ylabel="seconds")
            ax.legend(fontsize=8)
            display(fig)        # this figure, not pyplot's current ones (another widget may be drawing)
            plt.close(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
