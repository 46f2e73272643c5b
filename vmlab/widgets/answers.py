"""The lessons' worked solutions and end-of-lesson checks, kept out of the notebooks' cell source.

A lesson shows them with ``Solution.lesson("01.00", "rss")`` and ``Check.lesson("01.00")``
(vmlab.widgets.predict): the cell says only which one, the text stays out of the page until the learner presses
the button. The texts live in one file per lesson, ``vmlab/answers/NN.MM.toml``::

    [solutions]
    rss = '''
    QEMU allocates guest RAM lazily ...'''

    [[check]]
    question = 'What does the table call ...?'
    choices = ['KVM', 'TCG', 'PVM']
    answer = 1                       # index of the right choice
    explanation = 'TCG, QEMU's Tiny Code Generator ...'

Writing one: add it to the lesson's file; ``tests/test_widgets.py`` checks that every
``Solution.lesson``/``Check.lesson`` in the notebooks has its entry and that no notebook carries a solution's
text or a check's answers in its source.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import SpecError

QuestionT = Tuple[str, Sequence[str], int, str]   # question, choices, index of the right choice, explanation

ANSWERS_DIR = Path(__file__).resolve().parent.parent / "answers"


@cache
def _lesson(lesson: str) -> Dict[str, Any]:
    path = ANSWERS_DIR / f"{lesson}.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("answers", f"{path} is not valid TOML: {exc}", fix=f"correct the syntax of {path}") from None


def lessons() -> List[str]:
    """Every lesson number that has an answers file."""
    return sorted(p.stem for p in ANSWERS_DIR.glob("*.toml"))


def solutions(lesson: str) -> Dict[str, str]:
    """Every worked solution of ``lesson``, by key."""
    return dict(_lesson(lesson).get("solutions", {}))


def checks(lesson: str) -> List[QuestionT]:
    """The end-of-lesson check of ``lesson`` (empty if it has none)."""
    return [(q["question"], list(q["choices"]), int(q["answer"]), q["explanation"])
            for q in _lesson(lesson).get("check", [])]


def solution(lesson: str, key: str) -> str:
    """The worked solution ``key`` of ``lesson`` ("01.00")."""
    sols = solutions(lesson)
    try:
        return sols[key]
    except KeyError:
        known = ", ".join(f"{k!r}" for k in sols) or "none"
        raise SpecError("solution", f"lesson {lesson!r} has no solution {key!r} (it has: {known})",
                        fix=f"add it under [solutions] in {ANSWERS_DIR / (lesson + '.toml')}") from None


def check(lesson: str) -> List[QuestionT]:
    """The end-of-lesson check of ``lesson``: (question, choices, answer index, explanation) tuples."""
    qs = checks(lesson)
    if not qs:
        with_check = ", ".join(x for x in lessons() if checks(x))
        raise SpecError("check", f"lesson {lesson!r} has no check (lessons with one: {with_check})",
                        fix=f"add [[check]] entries to {ANSWERS_DIR / (lesson + '.toml')}")
    return qs
