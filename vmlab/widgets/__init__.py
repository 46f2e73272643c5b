"""Jupyter widgets for the lessons: predict-then-measure exercises (predict), the VM control panel (control_panel)."""
