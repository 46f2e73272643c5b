"""The live device-contrast widget: choose devices and sizes, run the contrast,
see its plot, the interventions plot and the ratios.

    from vmlab.widgets.devices import contrast_widget
    contrast_widget("disk")          # or "console", "net"

Errors are shown in the widget, never raised out of a callback.
"""

from __future__ import annotations

from typing import Any, Dict

from ..devices import QUICK_DEVICES, profiles
from ..experiments import console, disk, net
from ..experiments.contrasts import measured_ratios, plot_interventions

EXPERIMENTS = {"disk": disk, "console": console, "net": net}


def contrast_widget(contrast: str, *, accel: str = "auto") -> Any:
    """Choose devices and sizes, run the contrast live, see the plot and the table."""
    import ipywidgets as W
    from IPython.display import display
    names = [p.name for p in profiles(contrast)]
    devs = W.SelectMultiple(options=names, value=tuple(QUICK_DEVICES[contrast]), description="devices",
                            rows=min(6, len(names)))
    if contrast == "disk":
        size = W.Dropdown(options=[("1 MiB", 1 << 20), ("2 MiB", 2 << 20), ("8 MiB", 8 << 20)],
                          value=2 << 20, description="total")
        extra = W.Dropdown(options=[("4 KiB", 4096), ("64 KiB", 65536), ("256 KiB", 262144)], value=65536,
                           description="block")
    elif contrast == "console":
        size = W.Dropdown(options=[("16 KiB", 16 << 10), ("64 KiB", 64 << 10), ("256 KiB", 256 << 10)],
                          value=64 << 10, description="bytes")
        extra = W.Dropdown(options=[("1 KiB", 1024), ("4 KiB", 4096)], value=4096, description="write size")
    else:
        size = W.Dropdown(options=[("500", 500), ("2000", 2000), ("10000", 10000)], value=2000,
                          description="packets")
        extra = W.Dropdown(options=[("64 B", 64), ("1472 B", 1472)], value=1472, description="payload")
    button = W.Button(description="Run", button_style="primary")
    out = W.Output()

    def go(_: Any) -> None:
        import matplotlib.pyplot as plt
        out.clear_output()
        button.disabled = True
        with out:
            try:
                opts: Dict[str, Any] = {"devices": list(devs.value), "accel": accel, "repeats": 1,
                                        "progress": print}
                if contrast == "disk":
                    opts.update(total=size.value, bs=[extra.value])
                elif contrast == "console":
                    opts.update(sizes=[size.value], bs=extra.value)
                else:
                    opts.update(count=size.value, sizes=[extra.value])
                mod = EXPERIMENTS[contrast]
                df = mod.run(quick=True, **opts)
                mod.plot(df)
                plt.show()
                plot_interventions(df)
                plt.show()
                display(measured_ratios(df, contrast))
            except Exception as exc:  # shown, never raised out of a callback
                print(f"failed: {exc}")
            finally:
                button.disabled = False

    button.on_click(go)
    box = W.VBox([W.HBox([devs, W.VBox([size, extra, button])]), out])
    return box
