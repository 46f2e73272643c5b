"""The lesson notebooks: structure, outputs stripped, navigation up to date; the study widgets;
headless rendering (a failing notebook reported; every notebook is executed by tests/test_notebooks_run.py)."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from vmlab import lessons
from vmlab.widgets.predict import Check, Prediction, Solution, ratio_feedback

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NUMBERED = lessons.numbered_notebooks(NB_DIR)
ALL = sorted(NB_DIR.rglob("*.ipynb"))
ALL = [p for p in ALL if ".ipynb_checkpoints" not in p.parts]
QUICK_LINE = 'QUICK = os.environ.get("VMLAB_QUICK", "1") != "0"'    # quick unless VMLAB_QUICK=0
FULL_SWITCH = "# QUICK = False"                                        # the full run, one switch away


def _md(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _id(p: Path) -> str:
    return str(p.relative_to(NB_DIR))


def test_the_sequence_starts_with_the_index_and_the_first_lesson():
    names = [p.name for p in NUMBERED]
    assert names[:2] == ["00.00-Index.ipynb", "01.00-What-a-VM-Needs.ipynb"]
    for p in NB_DIR.glob("*.ipynb"):
        assert lessons.NUMBERED.match(p.name), f"{p.name}: lesson names are NN.MM-Title-With-Dashes.ipynb"


@pytest.mark.parametrize("path", NUMBERED, ids=_id)
def test_numbered_notebook_structure(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "first cell: the title"
    md = _md(nb)
    for heading in ("## Objectives", "## Summary", "## Exercises"):
        assert re.search(rf"^{re.escape(heading)}\b", md, re.M), f"{path.name} lacks a '{heading}' heading"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a lesson has code"
    first = code[0]
    assert "parameters" in (first.metadata.get("tags") or []), "the first code cell is tagged 'parameters'"
    assert QUICK_LINE in first.source, f"the parameters cell defines {QUICK_LINE}"
    assert FULL_SWITCH in first.source and "VMLAB_QUICK=0" in first.source, \
        "the parameters cell shows the way to the full run: '# QUICK = False' (or VMLAB_QUICK=0)"
    assert re.search(r"Prediction\(", "\n".join(c.source for c in code)), "Exercises include a predict-then-measure"
    nav = [c for c in nb.cells if lessons.NAV_TAG in (c.metadata.get("tags") or [])]
    assert len(nav) == 1 and nb.cells[-1] is nav[0], "one nav cell, the last one (python -m vmlab.lessons nav)"


@pytest.mark.parametrize("path", NUMBERED, ids=_id)
def test_quick_is_the_default_and_full_is_one_switch_away(path, monkeypatch):
    """The parameters cell itself, run as Python: quick unless VMLAB_QUICK=0; the commented line means full."""
    nb = nbformat.read(str(path), as_version=4)
    source = next(c for c in nb.cells if c.cell_type == "code").source

    def quick(env=None, uncomment=False):
        if env is None:
            monkeypatch.delenv("VMLAB_QUICK", raising=False)
        else:
            monkeypatch.setenv("VMLAB_QUICK", env)
        ns: dict = {}
        exec(source.replace(FULL_SWITCH, "QUICK = False") if uncomment else source, ns)
        return ns["QUICK"]
    assert quick() is True, "unset: quick mode (a learner's first run)"
    assert quick("1") is True
    assert quick("0") is False, "VMLAB_QUICK=0: the full run (make lessons without --quick)"
    assert quick(uncomment=True) is False, "uncommenting '# QUICK = False' gives the full run"


def test_a_full_render_says_so_to_its_notebooks(monkeypatch, tmp_path):
    """render() without --quick gives each notebook VMLAB_QUICK=0 (unset would be quick); --quick, or
    VMLAB_QUICK=1 in the environment, gives 1. No notebook is executed here."""
    seen = []

    def fake_render_one(p, out_dir, *, quick, timeout, progress):
        seen.append(lessons.child_env(quick)["VMLAB_QUICK"])
        return {"notebook": p.name, "seconds": 0.0, "status": "ok", "quick": int(quick), "html": ""}
    monkeypatch.setattr(lessons, "render_one", fake_render_one)
    monkeypatch.setattr(lessons, "render_static", lambda *a, **k: None)
    monkeypatch.setattr(lessons, "write_index", lambda *a, **k: None)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)     # as in `make lessons`: no kernel here
    monkeypatch.delenv("VMLAB_QUICK", raising=False)
    for quick, env, want in ((False, None, "0"), (True, None, "1"), (False, "1", "1"), (False, "0", "0")):
        if env is not None:
            monkeypatch.setenv("VMLAB_QUICK", env)
        seen.clear()
        lessons.render(quick=quick, only=r"^01\.00", out_dir=tmp_path, progress=lambda m: None)
        assert seen == [want], (quick, env, seen)


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_outputs_are_stripped(path):
    nb = nbformat.read(str(path), as_version=4)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.outputs == [], f"{path.name} cell {i} has outputs: save notebooks without outputs"
            assert c.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name} carries saved widget state"


def test_nav_is_up_to_date():
    stale = lessons.nav(NB_DIR, check=True)
    assert not stale, f"run `python -m vmlab.lessons nav`: stale {[p.name for p in stale]}"


def test_nav_is_idempotent_and_repairs(tmp_path):
    for p in NUMBERED:
        shutil.copy(p, tmp_path / p.name)
    # break it: drop the nav cell of one notebook, move another's to the top
    a, b = tmp_path / NUMBERED[0].name, tmp_path / NUMBERED[-1].name
    nb = nbformat.read(str(a), as_version=4)
    nb.cells = [c for c in nb.cells if lessons.NAV_TAG not in (c.metadata.get("tags") or [])]
    nbformat.write(nb, str(a))
    nb = nbformat.read(str(b), as_version=4)
    nb.cells.insert(0, nb.cells.pop())
    nbformat.write(nb, str(b))
    changed = lessons.nav(tmp_path)
    assert {p.name for p in changed} >= {a.name} | ({b.name} if a != b else set())
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")}
    assert lessons.nav(tmp_path) == []
    assert before == {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")}, "a second run changes nothing"
    for p in tmp_path.glob("*.ipynb"):
        nb = nbformat.read(str(p), as_version=4)
        navs = [c for c in nb.cells if lessons.NAV_TAG in (c.metadata.get("tags") or [])]
        assert len(navs) == 1 and nb.cells[-1] is navs[0]


def test_nav_links_previous_and_next(tmp_path):
    for name in ("00.00-Index.ipynb", "01.00-Alpha.ipynb", "01.01-Beta.ipynb"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name[6:-6]}\n\nShows {name[:5]}.")])
        nbformat.write(nb, str(tmp_path / name))
    lessons.nav(tmp_path)
    mid = nbformat.read(str(tmp_path / "01.00-Alpha.ipynb"), as_version=4).cells[-1].source
    assert "(00.00-Index.ipynb)" in mid and "(01.01-Beta.ipynb)" in mid and "Previous" in mid and "Next" in mid
    last = nbformat.read(str(tmp_path / "01.01-Beta.ipynb"), as_version=4).cells[-1].source
    assert "Next" not in last
    index = nbformat.read(str(tmp_path / "00.00-Index.ipynb"), as_version=4)
    course_map = [c for c in index.cells if lessons.MAP_TAG in (c.metadata.get("tags") or [])]
    assert len(course_map) == 1 and "[01.01 Beta](01.01-Beta.ipynb) | Shows 01.01." in course_map[0].source


# ------------------------------------------------------------------ widgets
def test_ratio_feedback():
    assert "within 2x" in ratio_feedback(1.5, 1.0, "s")
    assert "too high" in ratio_feedback(1.5, 1.0) and "too low" in ratio_feedback(0.6, 1.0)
    assert "spot on" in ratio_feedback(1.05, 1.0)
    assert "order of magnitude" in ratio_feedback(100, 1.0)
    assert "did not record" in ratio_feedback(None, 3.0)
    assert "No measurement" in ratio_feedback(2.0, None)


def test_prediction_feedback_from_the_learners_measurement():
    p = Prediction("boot time?", unit="s", low=0.1, high=100, log=True)
    p.record(2)
    text = p.measured(4.0)
    assert "2x too low" in text and p.ratio == 0.5
    q = Prediction("x?", measure=lambda: 10.0, feedback=lambda pred, got: f"{pred}->{got}")
    q.record(5)
    assert q.measure() == "5.0->10.0"
    with pytest.raises(ValueError):
        Prediction("bad", low=1)
    with pytest.raises(ValueError):
        Prediction("bad", low=0, high=10, log=True)


def test_prediction_widget_records_and_measures():
    p = Prediction("MB/s?", unit="MB/s", measure=lambda: 40.0, low=1, high=1000, log=True)
    w = p.widget
    p._input.value = 20.0
    record = next(c for c in w.children[1].children if "vmlab-predict-record" in c._dom_classes)
    measure = next(c for c in w.children[1].children if "vmlab-predict-measure" in c._dom_classes)
    record.click()
    assert p.prediction == pytest.approx(20.0, rel=0.01)
    measure.click()
    assert p.measurement == 40.0 and "2x too low" in p._out.value
    t = Prediction("text box", unit="ms")
    assert t.widget is not None                     # builds the text box
    t._input.value = "not a number"
    t._on_record()
    assert t.prediction is None


def test_solution_is_hidden_until_revealed():
    s = Solution("**Because** the device is emulated.")
    w = s.widget
    assert s._body.layout.display == "none" and not s.revealed
    w.children[0].click()
    assert s.revealed and s._body.layout.display is None and "Because" in s._body.value
    w.children[0].click()
    assert not s.revealed


def test_check_scores_and_explains():
    c = Check([("Which is paravirtual?", ["IDE", "virtio-blk"], 1, "virtio knows."),
               ("Which is emulated?", ["e1000", "virtio-net"], 0, "e1000 is a real card.")])
    assert c.answer([1, 1]) == 1
    assert c.results[0].startswith("1. right") and "the answer is 'e1000'" in c.results[1]
    assert c.widget is not None                     # builds the radio buttons
    c._radios[0].value, c._radios[1].value = 1, 0
    next(b for b in c.widget.children if "vmlab-check-button" in getattr(b, "_dom_classes", ())).click()
    assert c.score == 2 and "2 / 2" in c._out.value
    with pytest.raises(ValueError):
        Check([("q", ["only one"], 0, "")])
    with pytest.raises(ValueError):
        Check([("q", ["a", "b"], 2, "")])


def test_doctor_table_shows_kvm_or_tcg_and_why():
    report = {"default_accel": "tcg", "problems": [],
              "accelerators": {"kvm": {"usable": False, "reason": "no /dev/kvm"}, "tcg": {"usable": True, "reason": "sw"}},
              "qemu": {"version": "7.2", "path": "/q"}, "image": {"built": True, "kernel_version": "6.1"},
              "host": {"cpu": "X", "cpus": 2, "memory_mb": 1000, "virtualization": {"is_vm": True, "detected": "kvm"}}}
    t = lessons.doctor_table(report).data      # a Table for people; .data is the frame
    assert t.loc["lessons run under", "here"] == "TCG"
    assert t.loc["KVM (hardware-assisted)", "here"] == "no: no /dev/kvm"
    assert t.loc["host is itself a VM", "here"].startswith("yes (kvm")


# ---------------------------------------------------------------- rendering
@pytest.mark.integration
def test_render_executes_notebooks_and_reports_a_failure(tmp_path):
    # the lessons themselves are executed once, by tests/test_notebooks_run.py; here: render's bookkeeping,
    # on a small notebook that boots a VM and one that fails
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    ok = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Boots\n\nSee [next](00.50-Broken.ipynb)."),
                                         nbformat.v4.new_code_cell("from vmlab import VM\n"
                                                                   "with VM(accel='tcg', name='render') as vm:\n"
                                                                   "    print(vm.run('echo booted-ok').stdout)")])
    ok.metadata["kernelspec"] = kernelspec
    nbformat.write(ok, str(nbs / "00.10-Boots.ipynb"))
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Broken"),
                                          nbformat.v4.new_code_cell("raise RuntimeError('deliberately broken')")])
    bad.metadata["kernelspec"] = kernelspec
    nbformat.write(bad, str(nbs / "00.50-Broken.ipynb"))
    out = tmp_path / "html"
    rc = lessons.main(["render", "--quick", "--notebooks", str(nbs), "--out", str(out), "--timeout", "120"])
    assert rc == 1, "a failing notebook makes render exit non-zero"
    with open(out / "timings.csv") as f:
        rows = {r["notebook"]: r for r in csv.DictReader(f)}
    assert rows["00.50-Broken.ipynb"]["status"] == "failed"
    assert "deliberately broken" in rows["00.50-Broken.ipynb"]["detail"]
    r = rows["00.10-Boots.ipynb"]
    assert r["status"] == "ok", r
    assert float(r["peak_qemu_rss_mb"]) > 0, "the notebook boots a VM and the poller sees QEMU"
    assert float(r["cpu_s"]) > 0
    html_ok = (out / "00.10-Boots.html").read_text()
    assert "booted-ok" in html_ok
    assert 'href="00.50-Broken.html"' in html_ok, "links between rendered notebooks point at HTML"
    index = (out / "index.html").read_text()
    assert "00.10-Boots.html" in index and "failed" in index


@pytest.mark.integration
def test_device_race_virtio_outruns_ide_pio():
    from vmlab.widgets.race import DeviceRace
    race = DeviceRace(["ide-pio", "virtio-blk"], seconds=3, chunk_mb=4, disk_mb=32, accel="tcg")
    assert race.widget is not None                  # the dashboard widget, redrawn as it runs
    df = race.run()
    assert not race.errors, race.errors
    rates = race.rates()
    assert set(df.device) == {"ide-pio", "virtio-blk"} and (df.groupby("device").mb.max() > 0).all()
    assert rates["virtio-blk"] > 1.5 * rates["ide-pio"], rates
    assert race._image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "finished" in race._status.value
