"""The live device-contrast widget: choose devices and sizes, run the contrast,
see its plot, the interventions plot and the ratios.

    from vmlab.widgets.devices import contrast_widget
    contrast_widget("disk")          # or "console", "net"

Sizes are passed to the experiments as strings with their unit ("2M", "64K"): the experiments read a bare
number differently (``disk.run(total=2)`` means 2 MiB, ``console.run(sizes=[2])`` 2 bytes), a unit leaves no
doubt. ``MENUS`` is the contract, and tests/test_widgets.py checks every entry against the experiment's parser.
Errors are shown in the widget with what to do, never raised out of a callback.
"""

from __future__ import annotations

import html
from typing import Any, Dict, List, Sequence, Tuple

from ..devices import QUICK_DEVICES, profiles
from ..errors import SpecError
from ..experiments import console, disk, net
from ..experiments.contrasts import measured_ratios, plot_interventions
from ..i18n import tr
from ..plots import table
from .errors import failed

EXPERIMENTS = {"disk": disk, "console": console, "net": net}

# contrast -> the experiment's keyword -> (menu label, value passed, default?) ; label and value say the same size
MENUS: Dict[str, Dict[str, List[Tuple[str, Any, bool]]]] = {
    "disk": {"total": [("1 MiB", "1M", False), ("2 MiB", "2M", True), ("8 MiB", "8M", False)],
             "bs": [("4 KiB", "4K", False), ("64 KiB", "64K", True), ("256 KiB", "256K", False)]},
    "console": {"sizes": [("16 KiB", "16K", False), ("64 KiB", "64K", True), ("256 KiB", "256K", False)],
                "bs": [("1 KiB", "1K", False), ("4 KiB", "4K", True)]},
    "net": {"count": [("500 packets", 500, False), ("2,000 packets", 2000, True), ("10,000 packets", 10000, False)],
            "sizes": [("64 B payload", 64, False), ("1472 B payload", 1472, True)]},
}
DESCRIPTIONS = {"total": "data", "bs": "block", "sizes": "size", "count": "packets"}
LIST_OPTIONS = {("disk", "bs"), ("console", "sizes"), ("net", "sizes")}   # the experiment takes a list


def run_options(contrast: str, devices: Sequence[str] = (), **choices: Any) -> Dict[str, Any]:
    """The keyword arguments the widget passes to ``EXPERIMENTS[contrast].run`` for these menu ``choices``."""
    if contrast not in MENUS:
        raise SpecError("contrast", f"{contrast!r} is not one of {', '.join(MENUS)}", fix='e.g. contrast_widget("disk")')
    opts: Dict[str, Any] = {"devices": list(devices), "repeats": 1}
    for key, entries in MENUS[contrast].items():
        value = choices.get(key, next(v for _label, v, default in entries if default))
        opts[key] = [value] if (contrast, key) in LIST_OPTIONS else value
    return opts


def contrast_widget(contrast: str, *, accel: str = "auto") -> Any:
    """Choose devices and sizes, run the contrast live, see the plot and the table."""
    import ipywidgets as W
    from IPython.display import display
    run_options(contrast)                        # an unknown contrast fails here, not in a click
    names = [p.name for p in profiles(contrast)]
    devs = W.SelectMultiple(options=names, value=tuple(QUICK_DEVICES[contrast]), description=tr("devices"),
                            rows=min(6, len(names)))
    menus = {key: W.Dropdown(options=[(label, value) for label, value, _d in entries],
                             value=next(v for _label, v, default in entries if default),
                             description=DESCRIPTIONS[key], style={"description_width": "initial"})
             for key, entries in MENUS[contrast].items()}
    button = W.Button(description=tr("Run"), icon="play", button_style="primary", layout=W.Layout(width="auto"))
    button.add_class("vmlab-contrast-run")
    status = W.HTML()
    status.add_class("vmlab-contrast-status")
    out = W.Output()
    out.add_class("vmlab-contrast-output")

    def go(_: Any) -> None:
        import matplotlib.pyplot as plt
        import numpy as np
        out.clear_output()
        if not devs.value:
            status.value = "<b style='color:#D55E00'>choose at least one device</b> (ctrl-click for several)"
            return
        button.disabled = True
        status.value = f"<i>measuring {len(devs.value)} device(s): one VM each...</i>"
        with out:
            try:
                opts = run_options(contrast, devs.value, **{k: m.value for k, m in menus.items()})
                mod = EXPERIMENTS[contrast]
                df = mod.run(quick=True, accel=accel, progress=print, **opts)
                for draw in (mod.plot, plot_interventions):
                    # each figure itself, not pyplot's "show whatever is open": a CI run under load got one
                    # plot of the two, another widget's thread being free to show or close pyplot's figures
                    fig = np.ravel(draw(df))[0].figure
                    display(fig)
                    plt.close(fig)
                display(table(measured_ratios(df, contrast)))
                status.value = "<b>done</b>"
            except Exception as exc:  # shown, never raised out of a callback
                msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                fix = getattr(exc, "fix", None)
                status.value = ("<b style='color:#D55E00'>failed:</b> " + _escape(msg)
                                + (f" <i>(fix: {_escape(fix)})</i>" if fix else ""))
                failed(f"{contrast} contrast", exc)      # logged; raised when VMLAB_STRICT=1
            finally:
                button.disabled = False

    button.on_click(go)
    box = W.VBox([W.HBox([devs, W.VBox([*menus.values(), button])]), status, out])
    box.add_class("vmlab-contrast")
    return box


def _escape(text: Any) -> str:
    return html.escape(str(text))
