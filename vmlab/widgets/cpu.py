"""Native vs guest, one benchmark at a time: pick a vmbench nanobenchmark, run it
natively and in a booted guest, see both side by side.

    from vmlab.widgets.cpu import CompareWidget
    w = CompareWidget(vm); w            # choose, press the button
    w.run_once("null_syscall")          # the same from code; returns the rows

Errors are shown in the widget, never lost in a callback.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..experiments.cpu import BENCHMARKS, DESCRIPTIONS, PAPER_NAME, run_guest, run_native, where_native
from ..guestinfo import accel_of
from ..i18n import tr
from ..plots import color_for, figure, style
from ..vm import VM
from .errors import failed

if TYPE_CHECKING:
    import pandas as pd


class CompareWidget:
    """Pick a benchmark, run it natively and in a booted guest, see both side by side.

        w = CompareWidget(vm); w            # choose, press the button
        w.run_once("null_syscall")          # the same from code; returns the rows
    """

    def __init__(self, vm: VM, benchmark: str = "null_syscall", scale: float = 0.1, repeats: int = 5) -> None:
        import ipywidgets as W
        self.vm = vm
        self.history: List[Dict[str, Any]] = []
        self.bench = W.Dropdown(options=list(BENCHMARKS), value=benchmark, description=tr("benchmark"))
        self.scale = W.FloatLogSlider(value=scale, base=10, min=-3, max=0, step=0.25, description=tr("scale"),
                                      continuous_update=False)
        self.repeats = W.IntSlider(value=repeats, min=1, max=15, description=tr("repeats"), continuous_update=False)
        self.button = W.Button(description=tr("run natively and in the guest"), icon="play",
                               layout=W.Layout(width="auto"))
        self.button.add_class("vmlab-cpu-run")
        self.what = W.HTML()
        self.out = W.Output()
        self.err = W.Output()
        self.button.on_click(lambda _b: self._safe())
        self.bench.observe(lambda ch: self._describe(), names="value")
        self._describe()
        self.widget = W.VBox([W.HBox([self.bench, self.button]), W.HBox([self.scale, self.repeats]),
                              self.what, self.out, self.err])

    def _describe(self) -> None:
        b = self.bench.value
        paper = PAPER_NAME.get(b)
        self.what.value = (f"<i>{DESCRIPTIONS[b]}</i>" + (f" &mdash; Adams &amp; Agesen's <code>{paper}</code>"
                                                           if paper else ""))

    def _safe(self) -> None:
        self.err.clear_output()
        try:
            self.run_once()
        except Exception as exc:            # shown, never lost in a callback
            with self.err:
                print(f"error: {exc}")
            failed("run natively and in the guest", exc)      # logged; raised when VMLAB_STRICT=1

    def run_once(self, benchmark: Optional[str] = None) -> pd.DataFrame:
        import matplotlib.pyplot as plt
        import pandas as pd
        from IPython.display import clear_output, display
        b = benchmark or self.bench.value
        if benchmark:
            self.bench.value = benchmark
        reps, scale = int(self.repeats.value), float(self.scale.value)
        self.button.disabled = True
        try:
            nat = run_native([b], reps, scale)["results"][0]
            gst = run_guest(self.vm, [b], reps, scale)["results"][0]
        finally:
            self.button.disabled = False
        for plat, r in (("native", nat), (accel_of(self.vm), gst)):
            self.history.append({"benchmark": b, "platform": plat, "ns_per_op": r.get("ns_per_op", math.nan),
                                 "ns_min": r.get("ns_min", math.nan), "ns_max": r.get("ns_max", math.nan),
                                 "skipped": r.get("skipped", "")})
        df = pd.DataFrame(self.history[-2:])
        with self.out:
            clear_output(wait=True)
            fig, ax = figure(figsize=(5.5, 2.6))
            y = df.ns_per_op.fillna(0).to_numpy()
            ax.barh(df.platform, y, color=[color_for(p) for p in df.platform],
                    xerr=[y - df.ns_min.fillna(0).to_numpy(), df.ns_max.fillna(0).to_numpy() - y])
            for i, r in df.iterrows():
                txt = f"skipped: {r.skipped}" if r.skipped else f"{r.ns_per_op:,.1f} ns"
                ax.annotate(txt, (0, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                            color="white" if not r.skipped and y[i] > 0.3 * y.max() else "black")
            ratio = (df.ns_per_op.iloc[1] / df.ns_per_op.iloc[0]) if df.ns_per_op.iloc[0] > 0 else math.nan
            style(ax, title=f"{b}: {accel_of(self.vm).upper()}/native = "
                            + (f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a (no native figure)"),
                  xlabel="ns per operation (median; bars = min..max)",
                  source=f"native on this host; guest under {accel_of(self.vm).upper()}, "
                         f"QEMU {where_native()['qemu']}, guest kernel {self.vm.kernel_release}")
            display(fig)                       # plots.figure lays itself out (constrained)
            plt.close(fig)
        return df

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
