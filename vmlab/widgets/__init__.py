"""Jupyter widgets for the lessons, one module each:

predict        predict-then-measure exercises (Prediction, Solution, Check)
answers        the lessons' solutions and checks, kept out of the notebooks' source
control_panel  the VM control panel (ControlPanel)
devices        a device contrast run live (contrast_widget)
cpu            one nanobenchmark, native vs guest (CompareWidget)
balloon        the memory balloon, live (BalloonWidget)
sharing        the sharing experiment's plot, redrawn as VMs report (LivePlot)
race           two VMs' disks side by side, for the instructor dashboard (DeviceRace)
"""


def __getattr__(name: str):
    # lazy: importing vmlab.widgets must not import ipywidgets or the VM machinery
    if name == "ControlPanel":
        from .control_panel import ControlPanel
        return ControlPanel
    raise AttributeError(f"module 'vmlab.widgets' has no attribute {name!r}")
