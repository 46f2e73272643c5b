"""vmlab.widgets.choices: yes/no and count predictions (headless and as widgets)."""

from __future__ import annotations

import pytest

from vmlab.widgets.choices import CountPrediction, YesNoPrediction, count_feedback, yes_no_feedback


def test_yes_no_feedback_and_widget():
    p = YesNoPrediction("Does it keep the file?")
    assert type(p.widget.children[1].children[0]).__name__ == "ToggleButtons"
    p._input.value = 1
    p._on_record()
    assert p.prediction == 1 and "yes" in p._recorded_text()
    assert p.measured(False).startswith("Not this time: you said yes")
    assert p.measured(True).startswith("Right")
    assert "did not record" in yes_no_feedback(None, 1) and "No measurement" in yes_no_feedback(1, None)


@pytest.mark.parametrize("high, kind", [(5, "IntSlider"), (100000, "BoundedIntText")])
def test_count_widget_fits_the_range(high, kind):
    c = CountPrediction("How many?", unit="paths", low=0, high=high)
    assert type(c.widget.children[1].children[0]).__name__ == kind
    c.record(3.4)
    assert c.prediction == 3
    assert c.measured(3) == "Measured 3 paths: exactly your prediction."


def test_count_feedback_and_bad_range():
    assert count_feedback(1000, 10, "exits") == "Measured 10 exits; you predicted 1,000 (off by 990, 100x too high)."
    assert count_feedback(4, 5) == "Measured 5; you predicted 4 (off by 1)."
    with pytest.raises(ValueError, match="whole numbers"):
        CountPrediction("x", low=0.5, high=3)    # type: ignore[arg-type]
