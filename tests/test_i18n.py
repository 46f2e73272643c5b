"""The Korean edition (한국어판, docs/translation.md): every markdown cell, solution and check translated and fresh;
the built Korean notebooks carry the English code unchanged; a changed English cell makes its translation stale;
library strings (widget labels, prediction questions, plot labels) translated; the language switch; Hangul plots.

Reads files and draws one small figure: no kernel, no VM.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
import warnings
from pathlib import Path

import nbformat
import pytest

from vmlab import edition, i18n, lessons
from vmlab.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
SEE = "see them with: python -m vmlab.i18n status -v (docs/translation.md)"


@pytest.fixture
def ko(monkeypatch):
    monkeypatch.setenv("VMLAB_LANG", "ko")
    yield
    i18n.reload()


@pytest.fixture
def en(monkeypatch, tmp_path):
    monkeypatch.delenv("VMLAB_LANG", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ coverage (fails while translators work)
def test_every_markdown_cell_has_a_fresh_korean_translation():
    rows = i18n.status(NB_DIR)
    assert rows, "no notebooks found"
    bad = [r for r in rows if not r.ok]
    lines = []
    for r in bad:
        lines.append(f"{r.notebook}: {len(r.missing)} missing, {len(r.stale)} stale of {r.total}"
                     + (" (no cell ids: upgrade the notebook to nbformat 4.5)" if r.no_ids else ""))
        lines += [f"    missing {r.notebook}:{c}" for c in r.missing] + [f"    stale {r.notebook}:{c}" for c in r.stale]
    assert not bad, (f"{len(bad)} notebook(s) not fully translated into Korean "
                     f"(vmlab/locale/ko/notebooks/<notebook>.toml); {SEE}\n" + "\n".join(lines))


def test_every_solution_and_check_has_a_fresh_korean_translation():
    bad = [a for a in i18n.answers_status() if not a.ok]
    lines = [f"{a.lesson}: missing {', '.join(a.missing) or '-'}; stale {', '.join(a.stale) or '-'}" for a in bad]
    assert not bad, ("solutions/checks without a fresh translation in vmlab/locale/ko/answers/NN.MM.toml; "
                     f"{SEE}\n" + "\n".join(lines))


def test_translation_files_are_valid_and_name_real_cells():
    """A translation file for a notebook that does not exist, or entries for cells that are gone, are mistakes."""
    keys = {i18n.notebook_key(p) for p in i18n.notebooks(NB_DIR)}
    problems = []
    for f in sorted((i18n.LOCALE / "ko" / "notebooks").glob("*.toml")):
        data = tomllib.loads(f.read_text(encoding="utf-8"))    # raises on invalid TOML, naming the line
        if f.stem not in keys:
            problems.append(f"{f.name}: no notebook {f.stem} (names: {sorted(keys)})")
            continue
        for cid, e in data.get("cells", {}).items():
            if set(e) != {"en_sha", "ko"}:
                problems.append(f"{f.name} [{cid}]: keys {sorted(e)}, want en_sha and ko")
    for r in i18n.status(NB_DIR):
        problems += [f"{r.notebook}: entry for a cell that is not in the notebook: {c}" for c in r.orphans]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------ staleness
def _copy_course(tmp_path: Path, notebook: str) -> tuple[Path, Path]:
    """A notebook and its translation, copied so that the test can change the English."""
    src, loc = tmp_path / "notebooks", tmp_path / "locale"
    src.mkdir()
    shutil.copy(NB_DIR / notebook, src / notebook)
    (loc / "ko" / "notebooks").mkdir(parents=True)
    return src, loc


def test_a_changed_english_cell_makes_its_translation_stale(tmp_path):
    name = "00.00-Index.ipynb"
    src, loc = _copy_course(tmp_path, name)
    nb = nbformat.read(str(src / name), as_version=4)
    cells = i18n.translatable(nb)
    # a translation that is fresh for every cell (written here: the test does not depend on the translators)
    toml = "".join(f"[cells.{c.id}]\nen_sha = \"{i18n.en_sha(c.source)}\"\nko = '''\n한국어 {i}'''\n\n"
                   for i, c in enumerate(cells))
    (loc / "ko" / "notebooks" / "00.00-Index.toml").write_text(toml, encoding="utf-8")
    (st,) = i18n.status(src, locale=loc)
    assert st.ok and len(st.translated) == len(cells) and st.total == len(cells)
    changed = cells[-1]
    changed.source += "\nOne more English sentence."
    nbformat.write(nb, str(src / name))
    (st,) = i18n.status(src, locale=loc)
    assert st.stale == [changed.id] and not st.ok
    report = edition.build(src, tmp_path / "ko", locale=loc)
    assert report.fallback["00.00-Index"] == [f"stale:{changed.id}"]
    built = nbformat.read(str(tmp_path / "ko" / name), as_version=4)
    cell = next(c for c in built.cells if c.id == changed.id)
    assert cell.source.startswith(edition.STALE_NOTE) and "One more English sentence." in cell.source
    with pytest.raises(SystemExit, match="missing or stale"):
        edition.build(src, tmp_path / "ko2", locale=loc, strict=True)
    # a new English cell without an entry is MISSING
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("A new paragraph."))
    nbformat.write(nb, str(src / name))
    (st,) = i18n.status(src, locale=loc)
    assert st.missing == [nb.cells[1].id]


def test_en_sha_is_of_the_source_nbformat_reads():
    nb = nbformat.read(str(NB_DIR / "00.00-Index.ipynb"), as_version=4)
    c = i18n.translatable(nb)[0]
    raw = json.loads((NB_DIR / "00.00-Index.ipynb").read_text(encoding="utf-8"))
    src = next(x for x in raw["cells"] if x.get("id") == c.id)["source"]
    import hashlib
    assert i18n.en_sha(c.source) == hashlib.sha256("".join(src).encode("utf-8")).hexdigest()[:12]


# ------------------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("edition") / "ko"
    return edition.build(NB_DIR, out)


def test_korean_notebooks_have_the_english_code_cells(built):
    for rel in built.notebooks:
        en_nb = nbformat.read(str(NB_DIR / rel), as_version=4)
        ko_nb = nbformat.read(str(built.out / rel), as_version=4)
        assert [(c.get("id"), c.cell_type) for c in ko_nb.cells] == [(c.get("id"), c.cell_type) for c in en_nb.cells], rel
        en_code = [(c.id, c.source) for c in en_nb.cells if c.cell_type == "code"]
        ko_code = [(c.id, c.source) for c in ko_nb.cells if c.cell_type == "code"]
        assert ko_code == en_code, f"{rel}: the Korean edition's code cells differ from the English ones"


def test_korean_notebooks_say_korean_and_never_ship_english_silently(built):
    for rel in built.notebooks:
        nb = nbformat.read(str(built.out / rel), as_version=4)
        assert nb.metadata["language"] == "ko" and nb.metadata["vmlab"]["lang"] == "ko", rel
        status = i18n.cell_status(nbformat.read(str(NB_DIR / rel), as_version=4),
                                  i18n.notebook_translations(NB_DIR / rel))
        for c in i18n.translatable(nb):
            if status[c.id] == "translated":
                assert not c.source.startswith((edition.MISSING_NOTE, edition.STALE_NOTE)), f"{rel}:{c.id}"
            else:   # English only under a visible Korean notice
                assert c.source.startswith(edition.MISSING_NOTE if status[c.id] == "missing" else edition.STALE_NOTE)
    assert (built.out / i18n.EDITION_MARKER).read_text().strip() == "ko"


def test_korean_nav_and_course_map_are_generated_in_korean(built):
    index = nbformat.read(str(built.out / lessons.INDEX_NAME), as_version=4)
    course_map = next(c for c in index.cells if i18n.MAP_TAG in (c.metadata.get("tags") or []))
    assert course_map.source.startswith("## 과정 지도")
    assert f"]({edition.ENGLISH_INDEX})" in course_map.source, "the Korean index links the English edition"
    english = nbformat.read(str(NB_DIR / lessons.INDEX_NAME), as_version=4)
    english_map = next(c for c in english.cells if i18n.MAP_TAG in (c.metadata.get("tags") or []))
    assert "](ko/00.00-Index.ipynb)" in english_map.source, "the English index links the Korean edition"
    assert lessons._html_links('href="ko/00.00-Index.ipynb"') == 'href="ko/00.00-Index.html"'

    for p in lessons.numbered_notebooks(NB_DIR):
        assert f"]({p.name})" in course_map.source or p.name == lessons.INDEX_NAME
    first = nbformat.read(str(built.out / "01.00-What-a-VM-Needs.ipynb"), as_version=4)
    nav = first.cells[-1]
    assert i18n.NAV_TAG in nav.metadata["tags"]
    assert "이전:" in nav.source and "다음:" in nav.source and "[목차](00.00-Index.ipynb)" in nav.source


def test_tags_match_the_lessons_module():
    assert (i18n.NAV_TAG, i18n.MAP_TAG) == (lessons.NAV_TAG, lessons.MAP_TAG)


def test_status_cli_lists_what_is_missing(capsys):
    code = i18n.main(["status", "-v"])
    out = capsys.readouterr().out
    assert "00.00-Index" in out and "markdown cells" in out and "answers" in out, out
    complete = all(x.ok for x in i18n.status(NB_DIR)) and all(a.ok for a in i18n.answers_status()) \
        and not i18n.extract()
    assert code == (0 if complete else 1), out
    for r in i18n.status(NB_DIR):        # every missing or stale cell id is listed
        for cid in r.missing + r.stale:
            assert cid in out


# ------------------------------------------------------------------------------------- strings
def test_strings_cover_prediction_questions_widget_labels_and_plot_labels():
    todo = i18n.extract()
    assert not todo, ("learner-facing strings without Korean in vmlab/locale/ko/strings.toml "
                      "(python -m vmlab.i18n extract --toml):\n" + "\n".join(f"  {s!r} at {', '.join(w[:2])}"
                                                                              for s, w in todo.items()))


def test_widget_labels_that_tr_gets_from_tables_are_translated():
    from vmlab.widgets import control_panel
    have = i18n.strings("ko")
    wanted = [x for _key, label, _icon, tip, _style in control_panel.BUTTONS for x in (label, tip)]
    wanted += [s for s in control_panel.STATE_COLORS]
    wanted += ["Show solution", "Check your understanding", "racing", "finished", "booting the VMs",
               "emulated", "paravirtual"]
    assert [w for w in wanted if w not in have] == []


def test_translations_keep_their_placeholders():
    for en_text, ko_text in i18n.strings("ko").items():
        assert sorted(re.findall(r"\{\w*\}", en_text)) == sorted(re.findall(r"\{\w*\}", ko_text)), en_text
        assert ko_text.strip(), f"empty translation of {en_text!r}"


def test_lang_and_tr(monkeypatch, tmp_path, en):
    assert i18n.lang() == "en" and i18n.tr("Check answers") == "Check answers"
    monkeypatch.setenv("JPY_SESSION_NAME", "ko/01.00-What-a-VM-Needs.ipynb")     # Jupyter Server's notebook path
    assert i18n.lang() == "ko" and i18n.tr("Check answers") == "답 확인"
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ko/workspace/01.00-What-a-VM-Needs.ipynb")   # absolute: the marker
    assert i18n.lang() == "en"
    (tmp_path / "ko").mkdir()
    (tmp_path / "ko" / i18n.EDITION_MARKER).write_text("ko\n")
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "ko" / "01.00-What-a-VM-Needs.ipynb"))
    assert i18n.lang() == "ko"
    monkeypatch.delenv("JPY_SESSION_NAME")
    (tmp_path / "demo").mkdir()
    (tmp_path / i18n.EDITION_MARKER).write_text("ko\n")           # Voila: the kernel runs in the edition's folder
    monkeypatch.chdir(tmp_path / "demo")
    assert i18n.lang() == "ko"
    monkeypatch.setenv("VMLAB_LANG", "en")                         # the variable wins
    assert i18n.lang() == "en"
    monkeypatch.setenv("VMLAB_LANG", "ko_KR.UTF-8")
    assert i18n.lang() == "ko"
    assert i18n.tr("a string nobody translated") == "a string nobody translated"
    monkeypatch.setenv("VMLAB_LANG", "kr")
    with pytest.raises(SpecError, match=r"VMLAB_LANG.*'kr'") as exc:
        i18n.lang()
    assert "VMLAB_LANG=ko" in (exc.value.fix or "")


def test_widgets_speak_korean(ko):
    from vmlab.widgets.predict import Check, Prediction, Solution, ratio_feedback
    assert ratio_feedback(None, None) == "아직 측정값이 없습니다. 먼저 실험 셀을 실행하세요."
    assert ratio_feedback(2.0, 1.0, "s").startswith("측정값은 1 s, 예측은 2 s였습니다.")
    p = Prediction("QEMU RSS of a freshly booted 512 MiB guest", unit="MiB", low=1, high=1000, log=True)
    html = p.widget.children[0].value
    assert "예측:" in html and "막 부팅한 512 MiB 게스트의 QEMU RSS" in html
    assert p.question == "QEMU RSS of a freshly booted 512 MiB guest"   # the class store keeps the English key
    s = Solution("text")
    assert s.widget.children[0].description == "풀이 보기"
    c = Check([("q?", ["a", "b"], 1, "because")])
    assert "확인 문제" in c.widget.children[0].value
    c.answer([1])
    assert c.results == ["1. 정답입니다. because"]


def test_solution_and_check_come_from_the_korean_answers(ko):
    from vmlab.widgets import answers
    from vmlab.widgets.predict import Check, Solution
    have = [a for a in i18n.answers_status() if a.translated]
    if not have:
        pytest.skip("no Korean answers file yet")
    a = have[0]
    key = next((t.split(":", 1)[1] for t in a.translated if t.startswith("solution:")), None)
    if key:
        ko_text = Solution.lesson(a.lesson, key).markdown
        assert ko_text != answers.solution(a.lesson, key) and re.search(r"[\uac00-\ud7a3]", ko_text)
    if any(t.startswith("check:") for t in a.translated):
        n = int(next(t for t in a.translated if t.startswith("check:")).split(":")[1])
        q = Check.lesson(a.lesson).questions[n - 1]
        assert re.search(r"[\uac00-\ud7a3]", q[0])
        assert q[2] == answers.check(a.lesson)[n - 1][2], "the answer index is the English one"


def test_a_stale_answer_falls_back_to_english(ko):
    english = "some English solution that no translation was made for"
    assert i18n.solution("01.00", "rss", english) is None


# ------------------------------------------------------------------------------------ Hangul plots
def test_korean_plot_uses_nanum_and_misses_no_glyph(ko, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    from vmlab import plots
    if not plots.korean_font_available():
        pytest.fail("NanumGothic is not installed: run `make setup` (Debian package fonts-nanum, in apt.txt)")
    path = font_manager.findfont(font_manager.FontProperties(family="NanumGothic"), fallback_to_default=False)
    assert "nanum" in path.lower(), path
    fig, ax = plots.figure(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    plots.style(ax, title="Device race: data read from the virtual disk", xlabel="time since the start (s)",
                ylabel="가상 디스크 (MB)")
    assert ax.get_title() == "장치 경주: 가상 디스크에서 읽은 데이터"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "ko.png")
    plt.close(fig)
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing
    assert (tmp_path / "ko.png").stat().st_size > 1000
