"""A live plot for the sharing experiment: redrawn in the notebook as each VM reports.

    from vmlab.experiments import sharing
    from vmlab.widgets.sharing import LivePlot
    live = LivePlot()
    df = sharing.run(quick=True, on_row=live)
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..experiments.sharing import plot
from ..plots import figure


class LivePlot:
    """An ``on_row`` callback that redraws the sharing plot in a notebook as VMs report.

        live = LivePlot()
        df = sharing.run(quick=QUICK, on_row=live)
    """

    def __init__(self) -> None:
        import matplotlib.pyplot as plt
        self.fig, self.axes = figure(figsize=(10, 3.8), ncols=2)
        plt.close(self.fig)  # shown through the display handle only
        self.per_vm: List[Dict[str, Any]] = []
        self.steps: List[Dict[str, Any]] = []
        self.handle: Any = None
        try:
            from IPython.display import display
            self.handle = display(self.fig, display_id=True)
        except ImportError:
            pass

    def __call__(self, row: Dict[str, Any]) -> None:
        import pandas as pd
        if row.get("kind") == "vm":
            self.per_vm.append(row)
        elif row.get("kind") == "step":
            self.steps.append(row)
        df = pd.DataFrame(self.steps) if self.steps else None
        plot(df, self.axes, self.per_vm)          # plots.figure lays itself out (constrained)
        if self.handle is not None:
            self.handle.update(self.fig)
