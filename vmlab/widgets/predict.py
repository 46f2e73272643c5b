"""Self-paced study widgets: predict, then measure; hidden solutions; an end-of-lesson check.

    from vmlab.widgets.predict import Prediction, Solution, Check

    p = Prediction("How long does a cold boot take under TCG?", unit="s",
                   low=0.1, high=60, log=True)
    p                                  # the learner records a guess (slider or text box)
    ...                                # the experiment runs
    p.measured(vm.boot_seconds)        # feedback computed from THEIR measurement

    Solution("The boot is dominated by ...")          # a button reveals it
    Check([("Which is paravirtual?", ["IDE", "virtio-blk"], 1, "virtio-blk knows it is virtual.")])

    Solution.lesson("01.00", "rss")     # in a lesson: the text lives in vmlab/answers/NN.MM.toml,
    Check.lesson("01.00")               # not in the cell the learner reads

The feedback has one place: the prediction's widget. ``p.measured(x)`` returns it as text (a ``Feedback``,
a ``str``) and, as a cell's last expression, shows it only when the widget was never displayed, so Run All
shows each feedback once. A solution's text is not in the page (nor in the saved widget state) until the
learner presses the button; a check's answers and explanations only after "Check answers".

Everything works headless too (rendered lessons, tests): ``p.record(3)`` sets a prediction from code,
``p.feedback_text`` / ``check.score`` hold the results, and a missing prediction is said, not invented.
``measure=`` may be a value or a callable that returns the measured value (run by the "Measure" button or
by ``p.measure()``); ``feedback=`` replaces the default ratio feedback with ``callable(predicted,
measured) -> str``.
"""

from __future__ import annotations

import html
import math
import random
import traceback
import zlib
from typing import Any, Callable, List, Optional, Sequence, Union

from .. import i18n, predictions_store
from ..i18n import tr
from . import answers
from .errors import failed

Number = Union[int, float]


def _fmt(x: Optional[float], unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    ax = abs(x)
    if ax == 0:
        s = "0"
    elif ax >= 100:
        s = f"{x:,.0f}"
    elif ax >= 1:
        s = f"{x:.3g}" if ax < 10 else f"{x:.1f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def ratio_feedback(predicted: Optional[float], measured: Optional[float], unit: str = "",
                   tolerance: float = 2.0) -> str:
    """The default feedback: how far the prediction was, as a ratio of the measurement.

    ``tolerance`` is the factor counted as "close" (2 = within 2x either way).
    """
    if measured is None or (isinstance(measured, float) and not math.isfinite(measured)):
        return tr("No measurement yet: run the experiment cell first.")
    m = _fmt(measured, unit)
    if predicted is None:
        return tr("Measured {measured}. You did not record a prediction; try predicting before you measure next "
                  "time: the surprise is the lesson.").format(measured=m)
    if predicted == measured:
        return tr("Measured {measured}: exactly your prediction.").format(measured=m)
    p = _fmt(predicted, unit)
    if predicted <= 0 or measured <= 0:
        diff = measured - predicted
        return tr("Measured {measured}; you predicted {predicted} (off by {off}).").format(
            measured=m, predicted=p, off=_fmt(abs(diff), unit))
    r = predicted / measured
    factor = max(r, 1 / r)
    high = r > 1
    if factor <= 1.1:
        verdict = tr("spot on (within 10 %)")
    elif factor <= tolerance:
        verdict = (tr("close: within {tolerance}x ({factor}x too high)") if high else
                   tr("close: within {tolerance}x ({factor}x too low)")).format(tolerance=f"{tolerance:g}",
                                                                               factor=f"{factor:.2g}")
    elif factor <= 10:
        verdict = (tr("{factor}x too high") if high else tr("{factor}x too low")).format(factor=f"{factor:.2g}")
    else:
        verdict = (tr("about {factor}x too high (an order of magnitude or more)") if high else
                   tr("about {factor}x too low (an order of magnitude or more)")).format(
                       factor=f"{10 ** round(math.log10(factor)):,}")
    return tr("Measured {measured}; you predicted {predicted}: {verdict}.").format(measured=m, predicted=p,
                                                                                   verdict=verdict)


class Feedback(str):
    """Feedback text. Displayed as a cell's result it shows (as HTML, not a quoted string) only when its
    prediction's widget is not on the page, where the same feedback already is."""

    prediction: Optional[Prediction] = None

    @property
    def shown_in_widget(self) -> bool:
        return self.prediction is not None and self.prediction._widget is not None

    def _ipython_display_(self) -> None:
        if self.shown_in_widget:
            return
        from IPython.display import display
        display({"text/html": f"<div class='vmlab-predict-feedback'><b>{html.escape(str(self))}</b></div>",
                 "text/plain": str(self)}, raw=True)


def _button(W: Any, description: str, icon: str, css: str, **kw: Any) -> Any:
    """A button whose label is never cut off (its width follows its text)."""
    b = W.Button(description=description, icon=icon, tooltip=description,
                 layout=W.Layout(width="auto", align_self="flex-start"), **kw)   # not stretched across a VBox
    b.add_class(css)
    return b


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
        ip = get_ipython()
        return ip is not None and getattr(ip, "kernel", None) is not None
    except ImportError:
        return False


class Prediction:
    """Predict-then-measure: the learner's guess, then feedback from their own measurement.

    question   the question shown above the input
    unit       the unit of the answer ("s", "MB/s", "x")
    measure    a value, or a callable returning the measured value (a "Measure" button runs it),
               or None to give the measurement later with :meth:`measured`
    feedback   callable(predicted, measured) -> str (default: :func:`ratio_feedback`)
    low, high  the slider range (omit both for a free text box); ``log=True`` for a log slider
    value      the slider's starting position (default: the middle of the range)
    tolerance  factor counted as "close" by the default feedback (2 = within 2x)
    """

    def __init__(self, question: str, unit: str = "", measure: Any = None,
                 feedback: Optional[Callable[[Optional[float], Optional[float]], str]] = None, *,
                 low: Optional[Number] = None, high: Optional[Number] = None, log: bool = False,
                 value: Optional[Number] = None, tolerance: float = 2.0) -> None:
        if (low is None) != (high is None):
            raise ValueError("give both low and high for a slider, or neither for a text box")
        if low is not None and high is not None and not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if log and (low is None or low <= 0):
            raise ValueError("a log slider needs 0 < low < high")
        self.question = question
        self.unit = unit
        self._measure = measure
        self._feedback = feedback
        self.low, self.high, self.log = low, high, log
        self.tolerance = tolerance
        self.prediction: Optional[float] = None
        self.measurement: Optional[float] = None
        self.feedback_text = ""
        self._initial = value
        self._widget: Any = None

    # ----------------------------------------------------------- headless API
    def record(self, value: Optional[Number]) -> Prediction:
        """Record a prediction from code (the widget's button does the same)."""
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"a prediction must be a finite number, not {value!r}")
        self.prediction = value
        predictions_store.save(self.question, self.unit, self.prediction, self.measurement)  # on a hub only
        if self._widget is not None:
            self._status.value = self._recorded_text()
        return self

    def measured(self, value: Optional[Number]) -> Feedback:
        """Give the measurement; returns the feedback (and shows it in the widget)."""
        self.measurement = None if value is None else float(value)
        predictions_store.save(self.question, self.unit, self.prediction, self.measurement)  # on a hub only
        if self._feedback is not None:
            text = str(self._feedback(self.prediction, self.measurement))
        else:
            text = ratio_feedback(self.prediction, self.measurement, self.unit, self.tolerance)
        self.feedback_text = text
        if self._widget is not None:
            self._out.value = f"<b>{html.escape(text)}</b>"
        fb = Feedback(text)
        fb.prediction = self
        return fb

    def measure(self) -> Feedback:
        """Run ``measure`` (value or callable) and give feedback."""
        if self._measure is None:
            raise ValueError("this Prediction has no measure=; call .measured(value) with your measurement")
        value = self._measure() if callable(self._measure) else self._measure
        return self.measured(value)

    @property
    def ratio(self) -> Optional[float]:
        """prediction / measurement (None until both exist)."""
        if self.prediction is None or not self.measurement:
            return None
        return self.prediction / self.measurement

    def _recorded_text(self) -> str:
        if self.prediction is None:
            return tr("no prediction recorded yet")
        return tr("your prediction: {value} (recorded)").format(value=_fmt(self.prediction, self.unit))

    # ----------------------------------------------------------------- widget
    @property
    def widget(self):
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _build(self):
        import ipywidgets as W
        q = W.HTML(f"<b>{html.escape(tr('Predict:'))}</b> {html.escape(tr(self.question))}")
        wide = {"description_width": "initial"}      # the unit is the description: never cut it off
        if self.low is not None and self.high is not None:
            if self.log:
                lo, hi = math.log10(self.low), math.log10(self.high)
                start = math.log10(self._initial) if self._initial else (lo + hi) / 2
                self._input = W.FloatLogSlider(value=10 ** start, base=10, min=lo, max=hi, step=0.05,
                                               description=self.unit or tr("value"), readout_format=".3g",
                                               continuous_update=False, style=wide)
            else:
                start = self._initial if self._initial is not None else (self.low + self.high) / 2
                self._input = W.FloatSlider(value=start, min=self.low, max=self.high,
                                            step=(self.high - self.low) / 200,
                                            description=self.unit or tr("value"), readout_format=".3g",
                                            continuous_update=False, style=wide)
        else:
            self._input = W.Text(placeholder=tr("your guess ({unit})").format(unit=self.unit) if self.unit
                                 else tr("your guess"), description=tr("guess"), style=wide)
        self._input.add_class("vmlab-predict-input")
        rec = _button(W, tr("Record prediction"), "pencil", "vmlab-predict-record")
        self._status = W.HTML(self._recorded_text())
        self._out = W.HTML("")
        self._out.add_class("vmlab-predict-feedback")
        self._err = W.Output()
        rec.on_click(lambda _b: self._on_record())
        buttons = [rec]
        if self._measure is not None:
            mb = _button(W, tr("Measure"), "play", "vmlab-predict-measure")
            mb.on_click(lambda _b: self._on_measure(mb))
            buttons.append(mb)
        box = W.VBox([q, W.HBox([self._input, *buttons]), self._status, self._out, self._err])
        box.add_class("vmlab-prediction")
        return box

    def _on_record(self) -> None:
        with self._err:
            self._err.clear_output()
            v = self._input.value
            if isinstance(v, str):
                try:
                    v = float(v.replace(",", "").strip().split()[0])
                except (ValueError, IndexError):
                    print(tr("please type a number (in {unit})").format(unit=self.unit) if self.unit
                          else tr("please type a number"))
                    return
            self.record(v)

    def _on_measure(self, button) -> None:
        button.disabled = True
        try:
            with self._err:
                self._err.clear_output()
                try:
                    self.measure()
                except Exception as exc:   # a widget callback must never die silently
                    traceback.print_exc()
                    failed("measure", exc)      # logged; raised when VMLAB_STRICT=1
        finally:
            button.disabled = False

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    def __repr__(self) -> str:
        return (f"<Prediction {self.question!r} predicted={_fmt(self.prediction, self.unit)} "
                f"measured={_fmt(self.measurement, self.unit)}>")


class Solution:
    """A worked solution, hidden until the learner presses the button.

    In a lesson use ``Solution.lesson("01.00", "rss")``: the text comes from vmlab/answers/NN.MM.toml, so the
    cell the learner reads does not give it away. Its text reaches the page only when revealed.
    """

    def __init__(self, markdown: str, label: str = "Show solution") -> None:
        self.markdown = markdown
        self.label = label
        self.revealed = False
        self._widget: Any = None

    @classmethod
    def lesson(cls, lesson: str, key: str, label: str = "Show solution") -> Solution:
        """The worked solution ``key`` of ``lesson`` ("01.00"), from vmlab/answers/<lesson>.toml (in the Korean
        edition from vmlab/locale/ko/answers/<lesson>.toml, when its translation is there and not stale)."""
        english = answers.solution(lesson, key)
        language = i18n.lang()
        translated = i18n.solution(lesson, key, english, language) if language != "en" else None
        return cls(translated or english, label=label)

    def reveal(self) -> None:
        self.revealed = True
        if self._widget is not None:
            self._body.value = self.html
            self._body.layout.display = None
            self._button.description = tr("Hide solution")

    def hide(self) -> None:
        self.revealed = False
        if self._widget is not None:
            self._body.layout.display = "none"
            self._button.description = tr(self.label)

    def toggle(self) -> None:
        self.hide() if self.revealed else self.reveal()

    @property
    def html(self) -> str:
        try:
            import markdown as md  # optional
            return md.markdown(self.markdown)
        except ImportError:
            pass
        try:
            from nbconvert.filters.markdown import markdown2html_mistune
            return markdown2html_mistune(self.markdown)
        except ImportError:
            return "<pre>" + html.escape(self.markdown) + "</pre>"

    @property
    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            self._button = _button(W, tr(self.label), "eye", "vmlab-solution-button")
            self._body = W.HTML("", layout=W.Layout(display="none"))     # filled in by reveal()
            self._body.add_class("vmlab-solution")
            self._button.on_click(lambda _b: self.toggle())
            self._widget = W.VBox([self._button, self._body])
        return self._widget

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)


QuestionT = answers.QuestionT


class Check:
    """A short multiple-choice check: ``Check([(question, choices, answer_index, explanation), ...])``."""

    @classmethod
    def lesson(cls, lesson: str, title: str = "Check your understanding") -> Check:
        """The end-of-lesson check of ``lesson`` ("01.00"), from vmlab/answers/<lesson>.toml (translated in the
        Korean edition, question by question, where vmlab/locale/ko/answers/<lesson>.toml has it fresh)."""
        english = answers.check(lesson)
        language = i18n.lang()
        if language != "en":
            translated = i18n.checks(lesson, english, language)
            english = [t or e for t, e in zip(translated, english, strict=True)]
        return cls(english, title=title)

    def __init__(self, questions: Sequence[QuestionT], title: str = "Check your understanding") -> None:
        qs: List[QuestionT] = []
        for i, item in enumerate(questions):
            try:
                question, choices, answer, explanation = item
            except (TypeError, ValueError):
                raise ValueError(f"question {i + 1}: expected (question, choices, answer_index, explanation)") from None
            choices = list(choices)
            if len(choices) < 2:
                raise ValueError(f"question {i + 1}: give at least two choices")
            if not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise ValueError(f"question {i + 1}: answer_index {answer!r} is not an index into its "
                                 f"{len(choices)} choices")
            qs.append((str(question), choices, answer, str(explanation)))
        if not qs:
            raise ValueError("a Check needs at least one question")
        self.questions = qs
        self.title = title
        self.answers: List[Optional[int]] = [None] * len(qs)
        self.score: Optional[int] = None
        self.results: List[str] = []
        self._widget: Any = None

    def answer(self, indices: Sequence[Optional[int]]) -> int:
        """Answer from code (headless); returns the score. The widget's button calls this."""
        if len(indices) != len(self.questions):
            raise ValueError(f"give {len(self.questions)} answers, got {len(indices)}")
        self.answers = list(indices)
        score, lines = 0, []
        for n, ((_q, choices, right, why), got) in enumerate(zip(self.questions, self.answers, strict=False), 1):
            if got is None:
                lines.append(tr("{n}. not answered. The answer: {answer}. {why}").format(
                    n=n, answer=choices[right], why=why))
            elif got == right:
                score += 1
                lines.append(tr("{n}. right. {why}").format(n=n, why=why))
            else:
                lines.append(tr("{n}. not quite: you chose {chosen}; the answer is {answer}. {why}").format(
                    n=n, chosen=repr(choices[got]), answer=repr(choices[right]), why=why))
        self.score, self.results = score, lines
        if self._widget is not None:
            items = "".join(f"<li>{html.escape(s)}</li>" for s in lines)
            self._out.value = f"<b>{score} / {len(self.questions)}</b><ol style='list-style:none;padding-left:0'>{items}</ol>"
        return score

    @property
    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            self._radios = []
            parts = [W.HTML(f"<h4>{html.escape(tr(self.title))}</h4>")]
            for n, (q, choices, _a, _w) in enumerate(self.questions, 1):
                order = list(range(len(choices)))     # a fixed shuffle: the answer is not always in one place
                random.Random(zlib.crc32(q.encode())).shuffle(order)
                r = W.RadioButtons(options=[(choices[i], i) for i in order], value=None,
                                   layout=W.Layout(width="auto"))
                self._radios.append(r)
                parts += [W.HTML(f"<b>{n}.</b> {html.escape(q)}"), r]
            b = _button(W, tr("Check answers"), "check", "vmlab-check-button")
            self._out = W.HTML("")
            self._out.add_class("vmlab-check-result")
            b.on_click(lambda _b: self.answer([r.value for r in self._radios]))
            self._widget = W.VBox([*parts, b, self._out])
            self._widget.add_class("vmlab-check")
        return self._widget

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)
