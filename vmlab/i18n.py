"""The Korean edition (한국어판): which language a learner reads, library strings in it, translation coverage.

    python -m vmlab.i18n status [--lang ko] [--verbose]   # per notebook: translated / missing / stale cells
    python -m vmlab.i18n extract                          # learner-facing strings without a translation
    python -m vmlab.i18n build [--out DIR]                # write the Korean notebooks (python -m vmlab.edition)

One source, translated (docs/translation.md). The English notebooks (``notebooks/``) are the source; beside them:

* ``vmlab/locale/ko/notebooks/<stem>.toml`` (``demo-<stem>.toml`` for the dashboards): one entry per markdown
  cell, keyed by the cell id, ``en_sha`` (:func:`en_sha` of the English source) and ``ko``. A different
  ``en_sha`` is STALE, no entry is MISSING. Code cells are never translated; the generated nav and course-map
  cells are generated in Korean (vmlab.edition).
* ``vmlab/locale/ko/strings.toml``: ``"English" = "Korean"`` under ``[strings]``, for what library code shows
  (widget labels, prediction questions written in code cells, plot titles, doctor): :func:`tr`.
* ``vmlab/locale/ko/answers/NN.MM.toml``: the Korean worked solutions and checks (:func:`solution`,
  :func:`checks`), each entry with the ``en_sha`` of its English text.

The language (:func:`lang`): ``VMLAB_LANG`` (vmlab.config); else, in a Jupyter kernel, the notebook's folder:
``JPY_SESSION_NAME`` (the notebook path Jupyter Server gives the kernel) under a ``ko/`` folder, or a
``.vmlab-edition`` file (written by the edition build) in the working directory or its parent (Voila); else
English.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import config
from .errors import SpecError

PKG = Path(__file__).resolve().parent
ROOT = PKG.parent
NOTEBOOKS = ROOT / "notebooks"
LOCALE = PKG / "locale"
ANSWERS = PKG / "answers"
LANGS = ("en", "ko")
TRANSLATED = ("ko",)
EDITION_MARKER = ".vmlab-edition"
NAV_TAG = "vmlab-nav"        # = vmlab.lessons.NAV_TAG (a test checks): generated cells, not translated
MAP_TAG = "vmlab-map"        # = vmlab.lessons.MAP_TAG
NUMBERED = re.compile(r"^(\d\d)\.(\d\d)-[A-Za-z0-9-]+\.ipynb$")

__all__ = ["AnswerStatus", "NotebookStatus", "answers_status", "check_sha", "checks", "en_sha", "extract",
           "lang", "lang_of_session", "notebook_key", "notebook_translations", "notebooks", "reload", "solution",
           "status", "strings", "tr", "translated_title"]


# ================================================================== the language
def _normal(value: str) -> str:
    """``ko``, ``ko_KR.UTF-8``, ``KO-kr`` -> ``ko``; an unknown language is an error naming the choices."""
    code = re.split(r"[_.\-@]", value.strip().lower(), maxsplit=1)[0]
    if code not in LANGS:
        raise SpecError("VMLAB_LANG", f"{value!r} is not a language of this course (it has: {', '.join(LANGS)})",
                        fix="export VMLAB_LANG=ko for the Korean edition, VMLAB_LANG=en (or unset) for English")
    return code


def lang_of_session(path: Optional[str]) -> Optional[str]:
    """The edition a notebook belongs to, from its path (``JPY_SESSION_NAME``): an absolute path by the
    ``.vmlab-edition`` file in its folder or the folder above; a path relative to the server's root
    (``ko/01.00-....ipynb``, ``ko/demo/...``) by a folder named ``ko``."""
    if not path:
        return None
    if os.path.isabs(path):
        return _marker_lang(Path(path).parent)
    parts = PurePosixPath(path.replace("\\", "/")).parts[:-1]
    for code in TRANSLATED:
        if code in parts:
            return code
    return None


def _marker_lang(cwd: Path) -> Optional[str]:
    for d in (cwd, cwd.parent):
        try:
            text = (d / EDITION_MARKER).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text in TRANSLATED:
            return text
    return None


def lang() -> str:
    """The learner's language: ``"ko"`` or ``"en"`` (read at every call: a test or a notebook may change it)."""
    value = config.env("VMLAB_LANG")
    if value:
        return _normal(value)
    found = lang_of_session(os.environ.get("JPY_SESSION_NAME"))
    if found:
        return found
    try:
        cwd = Path.cwd()
    except OSError:
        return "en"
    return _marker_lang(cwd) or "en"


# ================================================================ library strings
def _load_toml(path: Path) -> Dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("translation", f"{path} is not valid TOML: {exc}",
                        fix=f"correct the syntax of {path} (docs/translation.md)") from None


@cache
def strings(language: str = "ko") -> Dict[str, str]:
    """``English -> translation`` from ``vmlab/locale/<language>/strings.toml`` (empty for English)."""
    if language not in TRANSLATED:
        return {}
    table = _load_toml(LOCALE / language / "strings.toml").get("strings", {})
    return {str(k): str(v) for k, v in table.items()}


def reload() -> None:
    """Forget the loaded translation files (after editing them in a running kernel)."""
    strings.cache_clear()
    _answers.cache_clear()


def tr(text: str) -> str:
    """``text`` in the learner's language: its translation from strings.toml, else ``text`` as it is.

    For text with values, translate the template and fill it in: ``tr("Measured {value}.").format(value=v)``.
    """
    language = lang()
    if language == "en" or not text:
        return text
    return strings(language).get(text, text)


# ======================================================================= notebooks
def en_sha(source: str) -> str:
    """What a translation records of its English cell: the first 12 hex digits of the source's sha256."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]


def generated(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags") or []
    return NAV_TAG in tags or MAP_TAG in tags


def translatable(nb: Any) -> List[Any]:
    """The cells a translation covers: every markdown cell but the generated nav and course map."""
    return [c for c in nb.cells if c.cell_type == "markdown" and not generated(c)]


def notebooks(directory: Path = NOTEBOOKS) -> List[Path]:
    """The translated notebooks: the numbered lessons, the dashboards in ``demo/`` and the glossary."""
    directory = Path(directory)
    lessons = sorted(p for p in directory.glob("*.ipynb") if NUMBERED.match(p.name))
    return lessons + sorted((directory / "demo").glob("*.ipynb")) + sorted((directory / "glossary").glob("*.ipynb"))


def notebook_key(path: Path) -> str:
    """The translation file's stem: ``01.00-What-a-VM-Needs``, or ``demo-DeviceRace`` for a dashboard."""
    path = Path(path)
    return f"demo-{path.stem}" if path.parent.name == "demo" else path.stem


def translation_file(path: Path, language: str = "ko", locale: Path = LOCALE) -> Path:
    return Path(locale) / language / "notebooks" / f"{notebook_key(path)}.toml"


def notebook_translations(path: Path, language: str = "ko", locale: Path = LOCALE) -> Dict[str, Dict[str, str]]:
    """cell id -> {"en_sha": ..., language: ...} for the notebook at ``path``."""
    cells = _load_toml(translation_file(path, language, locale)).get("cells", {})
    return {str(k): dict(v) for k, v in cells.items() if isinstance(v, dict)}


def _read(path: Path) -> Any:
    import nbformat
    return nbformat.read(str(path), as_version=4)


def translated_title(path: Path, language: Optional[str] = None) -> Optional[str]:
    """The lesson's title (its title cell's ``# `` line) in ``language`` (default: the learner's), when that cell's
    translation is there and fresh; else None."""
    language = language or lang()
    if language not in TRANSLATED:
        return None
    nb = _read(path)
    entries = notebook_translations(path, language)
    for c in translatable(nb):
        if any(line.startswith("# ") for line in c.source.splitlines()):
            e = entries.get(c.get("id", ""))
            if e and e.get("en_sha") == en_sha(c.source):
                return next((ln[2:].strip() for ln in str(e.get(language, "")).splitlines() if ln.startswith("# ")),
                            None)
            return None
    return None


@dataclass
class NotebookStatus:
    notebook: str                                      # the translation key (notebook_key)
    total: int = 0
    translated: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    stale: List[str] = field(default_factory=list)
    orphans: List[str] = field(default_factory=list)    # entries whose cell id is no longer in the notebook
    no_ids: bool = False                                # nbformat < 4.5: cells have no id to key on

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.no_ids)


def cell_status(nb: Any, entries: Dict[str, Dict[str, str]], language: str = "ko") -> Dict[str, str]:
    """cell id -> "translated" | "missing" | "stale" for every translatable cell of ``nb``."""
    out = {}
    for c in translatable(nb):
        e = entries.get(c.get("id", ""))
        if not e or not str(e.get(language, "")).strip():
            out[c.get("id", "")] = "missing"
        elif e.get("en_sha") != en_sha(c.source):
            out[c.get("id", "")] = "stale"
        else:
            out[c.get("id", "")] = "translated"
    return out


def status(directory: Path = NOTEBOOKS, language: str = "ko", locale: Path = LOCALE) -> List[NotebookStatus]:
    """Per notebook: which markdown cells are translated, missing or stale."""
    result = []
    for p in notebooks(directory):
        nb = _read(p)
        entries = notebook_translations(p, language, locale)
        st = NotebookStatus(notebook_key(p), no_ids=any("id" not in c for c in nb.cells))
        cells = cell_status(nb, entries, language)
        st.total = len(cells)
        for cid, what in cells.items():
            getattr(st, what).append(cid)
        ids = {c.get("id") for c in nb.cells}
        st.orphans = sorted(k for k in entries if k not in ids)
        result.append(st)
    return result


# ========================================================================= answers
def check_sha(question: str, choices: Sequence[str], explanation: str) -> str:
    """A check entry's ``en_sha``: of question, the choices and the explanation, one per line."""
    return en_sha(question + "\n" + "\n".join(choices) + "\n" + explanation)


@cache
def _answers(lesson: str, language: str) -> Dict[str, Any]:
    return _load_toml(LOCALE / language / "answers" / f"{lesson}.toml")


def _english_answers(lesson: str, answers_dir: Path = ANSWERS) -> Dict[str, Any]:
    return _load_toml(Path(answers_dir) / f"{lesson}.toml")


def solution(lesson: str, key: str, english: str, language: str = "ko") -> Optional[str]:
    """The translated worked solution, or None when there is none or it is stale (older than ``english``)."""
    e = _answers(lesson, language).get("solutions", {}).get(key)
    if isinstance(e, dict) and e.get("en_sha") == en_sha(english) and str(e.get("text", "")).strip():
        return str(e["text"])
    return None


def checks(lesson: str, english: Sequence[Tuple[str, Sequence[str], int, str]],
           language: str = "ko") -> List[Optional[Tuple[str, List[str], int, str]]]:
    """The translated check, question by question (None for a missing or stale one; the answer index is the
    English one)."""
    got = _answers(lesson, language).get("check", [])
    out: List[Optional[Tuple[str, List[str], int, str]]] = []
    for i, (q, choices, answer, why) in enumerate(english):
        e = got[i] if i < len(got) else None
        if (isinstance(e, dict) and e.get("en_sha") == check_sha(q, choices, why)
                and len(e.get("choices", [])) == len(choices)):
            out.append((str(e["question"]), [str(c) for c in e["choices"]], answer, str(e["explanation"])))
        else:
            out.append(None)
    return out


@dataclass
class AnswerStatus:
    lesson: str
    total: int = 0
    translated: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    stale: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale)


def answers_status(language: str = "ko", answers_dir: Path = ANSWERS, locale: Path = LOCALE) -> List[AnswerStatus]:
    """Per lesson: which solutions (``solution:KEY``) and check questions (``check:N``) are translated."""
    out = []
    for path in sorted(Path(answers_dir).glob("*.toml")):
        lesson = path.stem
        en = _load_toml(path)
        ko = _load_toml(Path(locale) / language / "answers" / f"{lesson}.toml")
        st = AnswerStatus(lesson)
        for key, text in en.get("solutions", {}).items():
            e = ko.get("solutions", {}).get(key)
            what = ("missing" if not isinstance(e, dict) or not str(e.get("text", "")).strip()
                    else "translated" if e.get("en_sha") == en_sha(text) else "stale")
            getattr(st, what).append(f"solution:{key}")
        kos = ko.get("check", [])
        for i, q in enumerate(en.get("check", [])):
            e = kos[i] if i < len(kos) else None
            sha = check_sha(q["question"], q["choices"], q["explanation"])
            what = ("missing" if not isinstance(e, dict) else
                    "translated" if e.get("en_sha") == sha and len(e.get("choices", [])) == len(q["choices"])
                    else "stale")
            getattr(st, what).append(f"check:{i + 1}")
        st.total = len(st.translated) + len(st.missing) + len(st.stale)
        out.append(st)
    return out


# ========================================================================= extract
def _literal(node: Optional[ast.AST]) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def prediction_questions(directory: Path = NOTEBOOKS) -> Dict[str, List[str]]:
    """What the notebooks' code cells hand to translating library code -> where it is: ``Prediction("question")``
    (and ``YesNoPrediction``...), the literal ``title``/``xlabel``/``ylabel`` of ``plots.style(...)``, the ``label``
    or ``title`` of ``Solution``/``Check``, ``facts_md("template")`` (vmlab.facts) and ``tr("...")``. (An f-string title stays
    English: write ``tr("... {n} ...").format(n=...)`` in the cell instead.)"""
    found: Dict[str, List[str]] = {}
    for p in notebooks(directory):
        for c in _read(p).cells:
            if c.cell_type != "code":
                continue
            try:
                tree = ast.parse(c.source)
            except SyntaxError:      # IPython magics: skip the cell
                continue
            for node in ast.walk(tree):
                texts: List[Optional[str]] = []
                if isinstance(node, ast.Call) and _call_name(node).endswith("Prediction"):   # YesNoPrediction too
                    texts = [_literal(node.args[0]) if node.args else _literal(
                        next((k.value for k in node.keywords if k.arg == "question"), None))]
                elif isinstance(node, ast.Call) and _call_name(node) == "facts_md" and node.args:   # vmlab.facts
                    texts = [_literal(node.args[0])]
                elif isinstance(node, ast.Call) and _call_name(node) in ("style", "tr", "lesson", "Solution", "Check"):
                    texts = [_literal(k.value) for k in node.keywords if k.arg in ("title", "xlabel", "ylabel", "label")]
                    texts += [_literal(node.args[0])] if _call_name(node) == "tr" and node.args else []
                for q in texts:
                    if q:
                        found.setdefault(q, []).append(f"{notebook_key(p)}:{c.get('id', '?')}")
    return found


def library_strings(package: Path = PKG) -> Dict[str, List[str]]:
    """What the library shows a learner through :func:`tr` -> where it is: the literal arguments of ``tr(...)``
    calls and the literal ``title``/``xlabel``/``ylabel`` of ``plots.style(...)`` calls (style translates them)."""
    found: Dict[str, List[str]] = {}
    for path in sorted(Path(package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            args: List[ast.AST] = []
            if _call_name(node) == "tr" and node.args:
                arg = node.args[0]     # tr("a") or tr("a" if x else "b")
                args = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
            elif _call_name(node) == "style":
                args = [k.value for k in node.keywords if k.arg in ("title", "xlabel", "ylabel")]
            for a in args:
                s = _literal(a)
                if s:
                    found.setdefault(s, []).append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def extract(language: str = "ko", directory: Path = NOTEBOOKS, package: Path = PKG) -> Dict[str, List[str]]:
    """Learner-facing strings (tr() literals, prediction questions) without a translation -> where they are."""
    have = strings(language)
    wanted = {**library_strings(package), **prediction_questions(directory)}
    return {s: where for s, where in sorted(wanted.items()) if s not in have}


# ============================================================================= CLI
def _ids(label: str, ids: Iterable[str]) -> str:
    ids = list(ids)
    return f"  {label} ({len(ids)}): {', '.join(ids)}" if ids else ""


def status_report(language: str = "ko", verbose: bool = False, directory: Path = NOTEBOOKS) -> Tuple[str, bool]:
    """The coverage table (and, with ``verbose``, the cell ids); True when everything is translated."""
    rows = status(directory, language)
    ans = answers_status(language)
    w = max(len(r.notebook) for r in rows) if rows else 10
    lines = [f"{'notebook':<{w}}  {'cells':>5}  {'done':>5}  {'missing':>7}  {'stale':>5}"]
    for r in rows:
        lines.append(f"{r.notebook:<{w}}  {r.total:>5}  {len(r.translated):>5}  {len(r.missing):>7}  "
                     f"{len(r.stale):>5}" + ("  (no cell ids: nbformat 4.5 needed)" if r.no_ids else "")
                     + (f"  (orphan entries: {len(r.orphans)})" if r.orphans else ""))
        if verbose:
            lines += [x for x in (_ids("missing", r.missing), _ids("stale", r.stale), _ids("orphans", r.orphans))
                      if x]
    total = sum(r.total for r in rows)
    done = sum(len(r.translated) for r in rows)
    lines.append(f"{'markdown cells':<{w}}  {total:>5}  {done:>5}  {sum(len(r.missing) for r in rows):>7}  "
                 f"{sum(len(r.stale) for r in rows):>5}")
    lines.append("")
    lines.append(f"{'answers (solutions, checks)':<{w}}  {'items':>5}  {'done':>5}  {'missing':>7}  {'stale':>5}")
    for a in ans:
        lines.append(f"{a.lesson:<{w}}  {a.total:>5}  {len(a.translated):>5}  {len(a.missing):>7}  {len(a.stale):>5}")
        if verbose:
            lines += [x for x in (_ids("missing", a.missing), _ids("stale", a.stale)) if x]
    missing_strings = extract(language, directory)
    lines.append("")
    lines.append(f"library strings and prediction questions without a translation: {len(missing_strings)}"
                 + (" (python -m vmlab.i18n extract)" if missing_strings else ""))
    ok = all(r.ok for r in rows) and all(a.ok for a in ans) and not missing_strings
    return "\n".join(lines), ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmlab.i18n", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="per notebook: translated, missing and stale markdown cells; answers")
    s.add_argument("--lang", default="ko", choices=TRANSLATED)
    s.add_argument("--verbose", "-v", action="store_true", help="list the cell ids")
    s.add_argument("--json", action="store_true", help="machine-readable")
    e = sub.add_parser("extract", help="library strings and prediction questions lacking a translation")
    e.add_argument("--lang", default="ko", choices=TRANSLATED)
    e.add_argument("--toml", action="store_true", help="print them as strings.toml lines to fill in")
    b = sub.add_parser("build", help="write the Korean notebooks (the same as python -m vmlab.edition build)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "build":     # the edition (nav cells in Korean) is built a layer up: a process, not an import
        return subprocess.call([sys.executable, "-m", "vmlab.edition", "build", *args.rest])
    if args.cmd == "extract":
        todo = extract(args.lang)
        for text, where in todo.items():
            if args.toml:
                print(f"{json.dumps(text, ensure_ascii=False)} = \"\"    # {', '.join(where[:3])}")
            else:
                print(f"{text!r}  ({', '.join(where[:3])})")
        print(f"{len(todo)} string(s) without a translation in vmlab/locale/{args.lang}/strings.toml",
              file=sys.stderr)
        return 1 if todo else 0
    if args.json:
        print(json.dumps({"notebooks": [r.__dict__ for r in status(language=args.lang)],
                          "answers": [a.__dict__ for a in answers_status(args.lang)]}, indent=1))
        return 0
    text, ok = status_report(args.lang, args.verbose)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
