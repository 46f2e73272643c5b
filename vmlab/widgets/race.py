"""The live device race: two VMs read their disks side by side, an emulated
device against a paravirtual one, and a plot of cumulative MB vs time grows as
they run. Used by the instructor dashboard notebooks/demo/DeviceRace.ipynb.
"""

from __future__ import annotations

import html
import io
import json
import threading
import time
from typing import Any, Callable, Dict, List, Sequence

from .. import devices, plots
from ..errors import SpecError
from ..guestinfo import where_vm
from ..i18n import tr
from ..vm import VM
from .errors import failed


class DeviceRace:
    """Two (or more) VMs read their disks side by side; a plot of cumulative MB vs time grows as they run.

        race = DeviceRace(["ide-pio", "virtio-blk"], seconds=30); race        # a Start button in the widget
        race.run()                                                             # or headless: blocks, returns rows

    Each racer boots its own VM (the device profile of ``vmlab.devices``, traces off), then repeats
    ``vmbench disk --dev PATH --mode read --pattern seq --bs BS --total CHUNK --direct`` at advancing
    offsets until ``seconds`` have passed. Errors show in the widget; the VMs are always shut down.
    """

    def __init__(self, devices: Sequence[str] = ("ide-pio", "virtio-blk"), *, seconds: float = 30,
                 chunk_mb: int = 4, bs: int = 65536, disk_mb: int = 64, interval: float = 0.5,
                 accel: str = "auto") -> None:
        if not 0 < chunk_mb < disk_mb:
            raise SpecError("chunk_mb", f"{chunk_mb} must be between 0 and the disk size {disk_mb}",
                            fix="e.g. chunk_mb=4, disk_mb=64")
        self.racers = [self._profile(n) for n in devices]
        self.seconds, self.chunk_mb, self.bs, self.disk_mb = float(seconds), int(chunk_mb), int(bs), int(disk_mb)
        self.interval, self.accel = interval, accel
        self.data: Dict[str, List[tuple]] = {r["name"]: [] for r in self.racers}
        self.where: Dict[str, str] = {}
        self.errors: List[str] = []
        self.running = False
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: List[threading.Thread] = []
        self._widget: Any = None

    @staticmethod
    def _profile(name: str) -> Dict[str, Any]:
        p = devices.get(name, "disk")
        return dict(name=p.name, kind=p.kind, title=p.title, path=p.guest_path,
                    spec=lambda accel, mb, p=p: p.spec(accel=accel, disk_size=f"{mb}M", trace=False,
                                                       name=f"race-{p.name}"))

    # ------------------------------------------------------------- running
    def _race_one(self, racer: Dict[str, Any], ready: threading.Barrier) -> None:
        name = racer["name"]
        vm = None
        try:
            vm = VM(racer["spec"](self.accel, self.disk_mb)).start()
            self.where = where_vm(vm)
            ready.wait(timeout=120)
            t0, total, k = time.monotonic(), 0, 0
            self.data[name] = [(0.0, 0.0)]
            span = self.disk_mb // self.chunk_mb
            while not self._stop.is_set() and time.monotonic() - t0 < self.seconds:
                off = (k % span) * self.chunk_mb << 20
                r = vm.run(f"vmbench disk --dev {racer['path']} --mode read --pattern seq --bs {self.bs} "
                           f"--total {self.chunk_mb}M --offset {off} --direct", timeout=120)
                total += json.loads(r.stdout.strip().splitlines()[-1])["bytes"]
                k += 1
                self.data[name].append((time.monotonic() - t0, total / 1e6))
        except Exception as exc:  # shown in the widget, never raised from a thread
            self.errors.append(f"{name}: {getattr(exc, 'message', None) or exc}")
            self._stop.set()
            try:
                ready.abort()
            except Exception:
                pass
            failed(f"race {name}", exc)      # logged; raised when VMLAB_STRICT=1
        finally:
            if vm is not None:
                try:
                    vm.shutdown()
                except Exception as exc:
                    self.errors.append(f"{name}: shutdown: {exc}")

    def start(self) -> None:
        """Start the race in the background (the Start button calls this)."""
        if self.running:
            return
        self.running = True
        self._stop.clear()
        self._done.clear()
        self.errors.clear()
        self.data = {r["name"]: [] for r in self.racers}
        ready = threading.Barrier(len(self.racers))
        self._threads = [threading.Thread(target=self._race_one, args=(r, ready), daemon=True,
                                          name=f"race-{r['name']}") for r in self.racers]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._watch, daemon=True, name="race-plot").start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float = 300) -> None:
        for t in self._threads:
            t.join(timeout)

    def run(self):
        """Race headless (blocking) and return the rows as a DataFrame."""
        self.start()
        self.wait()
        self._done.wait(30)
        return self.frame()

    def _watch(self) -> None:
        try:
            while any(t.is_alive() for t in self._threads):
                self._redraw()
                time.sleep(self.interval)
        finally:
            self.running = False
            self._redraw()
            self._done.set()

    # ---------------------------------------------------------- results
    def frame(self):
        import pandas as pd
        rows = [{"device": n, "t_s": t, "mb": mb, **self.where} for n, pts in self.data.items() for t, mb in pts]
        return pd.DataFrame(rows)

    def rates(self) -> Dict[str, float]:
        """MB/s of each racer so far (total MB / elapsed s)."""
        return {n: (pts[-1][1] / pts[-1][0]) for n, pts in self.data.items() if pts and pts[-1][0] > 0}

    def figure_png(self) -> bytes:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(8, 3.6), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        rates = self.rates()
        colors = plots.device_colors([r["name"] for r in self.racers], {r["name"]: r["kind"] for r in self.racers})
        for r in self.racers:
            pts = self.data.get(r["name"]) or [(0.0, 0.0)]
            label = f"{r['title']} ({tr(r['kind'])})" + (f": {rates[r['name']]:.1f} MB/s" if r["name"] in rates else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=2.5, label=label,
                    color=colors[r["name"]])
        ax.set_xlim(0, self.seconds)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", frameon=False)
        src = plots.where_label(self.frame()) if any(self.data.values()) else ""
        plots.style(ax, title="Device race: data read from the virtual disk", xlabel="time since the start (s)",
                    ylabel="data read (MB)", source=src)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")     # the source note under the axis included
        return buf.getvalue()

    # ----------------------------------------------------------- widget
    def _redraw(self) -> None:
        if self._widget is None:
            return
        try:
            self._image.value = self.figure_png()
            rates = self.rates()
            state = "racing" if self.running else ("finished" if any(self.data.values()) else "ready")
            if self.running and not any(len(v) > 1 for v in self.data.values()):
                state = "booting the VMs"
            parts = [f"<b>{html.escape(tr(state))}</b>"]
            if len(rates) == 2 and min(rates.values()) > 0:
                (a, ra), (b, rb) = list(rates.items())
                parts.append(f"{b} / {a}: {rb / ra:.1f}x")
            self._status.value = " &nbsp; ".join(parts)
            self._status_text = state
            if self.errors:
                self._err.value = "<pre style='color:#D55E00'>" + html.escape("\n".join(self.errors)) + "</pre>"
            self._go.disabled = self.running
        except Exception as exc:  # a redraw must not kill the watcher
            self.errors.append(f"redraw: {exc}")
            failed("redraw", exc)      # logged; raised when VMLAB_STRICT=1

    @property
    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            self._go = W.Button(description=tr("Start the race"), icon="flag-checkered", button_style="success",
                                layout=W.Layout(width="auto"))
            self._go.add_class("vmlab-race-start")
            halt = W.Button(description=tr("Stop"), icon="stop", layout=W.Layout(width="auto"))
            halt.add_class("vmlab-race-stop")
            self._go.on_click(lambda _b: self._safe(self.start))
            halt.on_click(lambda _b: self._safe(self.stop))
            self._status = W.HTML(f"<b>{html.escape(tr('ready'))}</b>")
            self._status.add_class("vmlab-race-status")
            self._image = W.Image(format="png", layout=W.Layout(width="800px"))
            self._image.add_class("vmlab-race-plot")
            self._err = W.HTML("")
            self._err.add_class("vmlab-error")
            self._widget = W.VBox([W.HBox([self._go, halt, self._status]), self._image, self._err])
            self._widget.add_class("vmlab-race")
            self._image.value = self.figure_png()
        return self._widget

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors.append(str(exc))
            self._redraw()
            failed(getattr(fn, "__name__", "race"), exc)      # logged; raised when VMLAB_STRICT=1

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
