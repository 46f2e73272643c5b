"""A live memory-balloon widget: a slider sets the balloon target; a plot shows the
guest's view (/proc/meminfo) and the host's (QEMU's RSS) over time.

    from vmlab import VM
    from vmlab.widgets.balloon import BalloonWidget
    vm = VM(accel="tcg", memory=256, balloon=True).start()
    w = BalloonWidget(vm); w                    # move the slider, press "touch"
    w.set_target(128); w.touch(100)             # the same from code (headless runs)
    w.frame()                                   # every sample as a DataFrame

Every callback catches its exceptions and shows them in the widget's log.
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..experiments.balloon import plot, sample, set_balloon, touch
from ..guestinfo import where_vm
from ..i18n import tr
from ..plots import figure
from ..vm import VM
from .errors import failed

if TYPE_CHECKING:
    import pandas as pd


class BalloonWidget:
    """Slider -> ``balloon`` target; plot of guest MemTotal/MemAvailable and QEMU RSS."""

    def __init__(self, vm: VM, step: int = 8, touch_mb: Optional[int] = None) -> None:
        import ipywidgets as W
        self.vm = vm
        self.samples: List[Dict[str, Any]] = []
        self.t0 = time.monotonic()
        mem = vm.spec.memory_mb
        first = sample(vm, self.t0, target_mb=mem)
        self.samples.append(dict(first, phase="start"))
        self.slider = W.IntSlider(value=round(first["balloon_actual_mb"]), min=64, max=mem, step=step,
                                  description=tr("guest MiB"), continuous_update=False,
                                  layout=W.Layout(width="420px"))
        self.touch_mb = W.BoundedIntText(value=touch_mb or mem // 2, min=1, max=mem, description=tr("touch MiB"),
                                         layout=W.Layout(width="180px"))
        self.touch_button = W.Button(description=tr("guest touches memory"), icon="hand-pointer-o",
                                     layout=W.Layout(width="auto"))
        self.sample_button = W.Button(description=tr("sample now"), icon="refresh", layout=W.Layout(width="auto"))
        self.slider.add_class("vmlab-balloon-slider")
        self.touch_button.add_class("vmlab-balloon-touch")
        self.sample_button.add_class("vmlab-balloon-sample")
        self.status = W.HTML()
        self.status.add_class("vmlab-balloon-status")
        # a PNG in an Image widget, not an Output: the slider's callback and the balloon's samples may come
        # from another thread, where an Output's capture does not reach the page (the plot vanished)
        self.plot_img = W.Image(format="png", layout=W.Layout(width="800px"))
        self.plot_img.add_class("vmlab-balloon-plot")
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self._updating = False
        self.slider.observe(self._on_slider, names="value")
        self.touch_button.on_click(lambda _b: self._safe(self.touch, self.touch_mb.value))
        self.sample_button.on_click(lambda _b: self._safe(self.sample))
        self.widget = W.VBox([W.HBox([self.slider, self.sample_button]),
                              W.HBox([self.touch_mb, self.touch_button]),
                              self.status, self.plot_img, self.log])
        self.widget.add_class("vmlab-balloon")
        self._redraw()

    # ---------------------------------------------------------------- actions
    def _safe(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:            # shown, never lost in a callback
            with self.log:
                print(f"error: {exc}")
                traceback.print_exc(limit=2)
            self.status.value = f"<b style='color:#D55E00'>error:</b> {exc}"
            failed(getattr(fn, "__name__", "balloon"), exc)      # logged; raised when VMLAB_STRICT=1
            return None

    def _add(self, s: Dict[str, Any], phase: str) -> None:
        self.samples.append(dict(s, phase=phase))
        self._redraw()

    def set_target(self, target_mb: int) -> int:
        """Ask for a guest memory size; samples both views until the balloon settles. Returns actual MiB."""
        self.status.value = f"balloon target {target_mb} MiB..."
        actual = set_balloon(self.vm, target_mb, on_sample=lambda s: self._add(s, f"target {target_mb}"),
                             t0=self.t0, every=0.4) >> 20
        self.sample(phase=f"settled at {actual}")
        if self.slider.value != target_mb:          # called from code: keep the slider in step
            self._updating = True
            try:
                self.slider.value = int(target_mb)
            finally:
                self._updating = False
        return actual

    def _on_slider(self, change: Dict[str, Any]) -> None:
        if not self._updating:
            self._safe(self.set_target, change["new"])

    def touch(self, mb: int) -> Dict[str, Any]:
        """The guest writes ``mb`` MiB then frees it: watch the host's RSS."""
        self.status.value = f"guest touching {mb} MiB..."
        res = touch(self.vm, mb)
        self.sample(phase=f"touched {mb}")
        return res

    def sample(self, phase: str = "sample") -> Dict[str, Any]:
        s = sample(self.vm, self.t0, target_mb=self.slider.value)
        self._add(s, phase)
        return s

    # ---------------------------------------------------------------- views
    def frame(self) -> pd.DataFrame:
        import pandas as pd
        df = pd.DataFrame(self.samples)
        for k, v in where_vm(self.vm).items():
            df[k] = v
        return df

    def _redraw(self) -> None:
        import io

        import matplotlib.pyplot as plt
        last = self.samples[-1]
        self.status.value = tr("guest MemTotal <b>{total} MiB</b>, MemAvailable {available} MiB; balloon actual "
                               "{actual} MiB; host: QEMU RSS <b>{rss} MiB</b>").format(
            total=f"{last['guest_total_mb']:.0f}", available=f"{last['guest_available_mb']:.0f}",
            actual=f"{last['balloon_actual_mb']:.0f}", rss=f"{last['qemu_rss_mb']:.0f}")
        fig, ax = figure(figsize=(8, 3.6))
        try:
            plot(self.frame(), ax=ax)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
            self.plot_img.value = buf.getvalue()
        finally:
            plt.close(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
