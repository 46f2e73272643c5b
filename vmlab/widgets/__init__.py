"""Jupyter widgets for the lessons: predict-then-measure exercises (predict), the VM control panel (control_panel)."""


def __getattr__(name: str):
    # lazy: importing vmlab.widgets must not import ipywidgets or the VM machinery
    if name == "ControlPanel":
        from .control_panel import ControlPanel
        return ControlPanel
    raise AttributeError(f"module 'vmlab.widgets' has no attribute {name!r}")
