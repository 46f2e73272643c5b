"""Predictions whose answer is not a quantity: yes/no, and a count (a whole number).

    from vmlab.widgets.choices import YesNoPrediction, CountPrediction

    p = YesNoPrediction("After sync, does quit() keep the file?")       # two buttons: yes / no
    p.measured(kept)                     # True/False (or 1/0): "Right: ..." / "Not this time: ..."
    n = CountPrediction("Of the five paths, how many keep the file?", low=0, high=5)   # an integer slider
    n.measured(3)                        # exact: "spot on"; otherwise off by how many
    c = CountPrediction("Exits for 1,000 `out` instructions", unit="exits", low=0, high=100000)  # a number box

Both are :class:`vmlab.widgets.predict.Prediction` (same record/measured/feedback contract, same CSS classes);
only the input differs: toggle buttons for yes/no, an integer slider for small ranges (up to 20 values) and an
integer box for wide ones.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..i18n import tr
from .predict import Prediction

__all__ = ["CountPrediction", "YesNoPrediction", "count_feedback", "yes_no_feedback"]


def _yes(v: Optional[float]) -> str:
    return tr("yes" if v else "no")


def yes_no_feedback(predicted: Optional[float], measured: Optional[float]) -> str:
    """Right or wrong, in words (1 = yes, 0 = no)."""
    if measured is None:
        return tr("No measurement yet: run the experiment cell first.")
    if predicted is None:
        return tr("Measured: {measured}. You did not record a prediction; try predicting before you measure next "
                  "time: the surprise is the lesson.").format(measured=_yes(measured))
    if bool(predicted) == bool(measured):
        return tr("Right: the answer measured here is {measured}.").format(measured=_yes(measured))
    return tr("Not this time: you said {predicted}, the measurement here says {measured}.").format(
        predicted=_yes(predicted), measured=_yes(measured))


def count_feedback(predicted: Optional[float], measured: Optional[float], unit: str = "") -> str:
    """Exact, or off by how many (and by what factor when both are positive)."""
    if measured is None or (isinstance(measured, float) and not math.isfinite(measured)):
        return tr("No measurement yet: run the experiment cell first.")
    m = round(measured)
    u = f" {unit}" if unit else ""
    if predicted is None:
        return tr("Measured {measured}. You did not record a prediction; try predicting before you measure next "
                  "time: the surprise is the lesson.").format(measured=f"{m:,}{u}")
    p = round(predicted)
    if p == m:
        return tr("Measured {measured}: exactly your prediction.").format(measured=f"{m:,}{u}")
    off = tr("off by {n}").format(n=f"{abs(p - m):,}")
    factor = max(p / m, m / p) if p > 0 and m > 0 else 0
    if factor >= 2:
        f = f"{factor:,.0f}" if factor >= 10 else f"{factor:.2g}"
        off += ", " + (tr("{factor}x too high") if p > m else tr("{factor}x too low")).format(factor=f)
    return tr("Measured {measured}; you predicted {predicted} ({off}).").format(
        measured=f"{m:,}{u}", predicted=f"{p:,}", off=off)


class YesNoPrediction(Prediction):
    """A yes/no prediction: toggle buttons; ``measured(True/False)``; right-or-wrong feedback."""

    def __init__(self, question: str, measure: Any = None, *, yes: str = "yes", no: str = "no") -> None:
        super().__init__(question, "", measure, lambda p, m: yes_no_feedback(p, m))
        self.labels = (yes, no)

    def record(self, value: Any) -> Prediction:
        return super().record(None if value is None else int(bool(value)))

    def measured(self, value: Any) -> Any:
        return super().measured(None if value is None else int(bool(value)))

    def _recorded_text(self) -> str:
        if self.prediction is None:
            return tr("no prediction recorded yet")
        return tr("your prediction: {value} (recorded)").format(
            value=tr(self.labels[0] if self.prediction else self.labels[1]))

    def _build(self) -> Any:
        import ipywidgets as W
        box = super()._build()
        toggle = W.ToggleButtons(options=[(tr(self.labels[0]), 1), (tr(self.labels[1]), 0)], value=None,
                                 style={"button_width": "auto"})
        toggle.add_class("vmlab-predict-input")
        row = box.children[1]
        row.children = (toggle, *row.children[1:])
        self._input = toggle
        return box


class CountPrediction(Prediction):
    """A whole-number prediction between *low* and *high*: an integer slider for up to 20 values, else a box."""

    def __init__(self, question: str, unit: str = "", measure: Any = None, *, low: int = 0, high: int = 10,
                 value: Optional[int] = None) -> None:
        if not (isinstance(low, int) and isinstance(high, int)) or not low < high:
            raise ValueError(f"a count needs whole numbers low < high, not {low!r}, {high!r}")
        super().__init__(question, unit, measure, lambda p, m: count_feedback(p, m, unit), value=value)
        self.low, self.high = low, high         # after super(): the base would build a float slider from them
        self.count_range = (low, high)

    def record(self, value: Any) -> Prediction:
        return super().record(None if value is None else round(float(value)))

    def _recorded_text(self) -> str:
        if self.prediction is None:
            return tr("no prediction recorded yet")
        return tr("your prediction: {value} (recorded)").format(value=f"{round(self.prediction):,} {self.unit}".strip())

    def _build(self) -> Any:
        import ipywidgets as W
        box = super()._build()
        low, high = self.count_range
        start = round(self._initial) if self._initial is not None else (low + high) // 2
        wide = {"description_width": "initial"}
        if high - low <= 20:
            inp = W.IntSlider(value=start, min=low, max=high, step=1, description=self.unit or tr("count"),
                              continuous_update=False, style=wide)
        else:
            inp = W.BoundedIntText(value=start, min=low, max=high, step=1,
                                   description=self.unit or tr("count"), style=wide)
        inp.add_class("vmlab-predict-input")
        row = box.children[1]
        row.children = (inp, *row.children[1:])
        self._input = inp
        return box
