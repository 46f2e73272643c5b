"""benchmarks/lessons.py's timing and figure code on tiny synthetic notebooks executed for real (the lessons
themselves run in tests/test_notebooks_run.py and in `make bench`): a cell's time, the slowest cell named, the
tree's vmlab imported (PYTHONPATH first, ahead of the editable install), a failing cell failing the figures by name."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import nbformat
import pytest

from benchmarks import Failed, Skipped
from benchmarks import lessons as bl


def _tree(tmp_path: Path, *cells: str) -> Path:
    """A tree with its own (empty) vmlab package and one lesson notebook: a markdown cell, then *cells*."""
    tree = tmp_path / "tree"
    (tree / "vmlab").mkdir(parents=True)
    (tree / "vmlab" / "__init__.py").write_text("")
    (tree / "notebooks" / "demo").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, str(tree / "notebooks" / "01.00-Tiny.ipynb"))
    nbformat.write(nb, str(tree / "notebooks" / "demo" / "Dashboard.ipynb"))
    return tree


def _run(tree: Path) -> bl.NotebookRun:
    [path] = bl.lesson_notebooks(tree)                      # the lesson only: not demo/
    return bl.run_notebook(path, tree=tree, label="current", tag=uuid.uuid4().hex, timeout=120)


def _kernels_of_this_process() -> list[int]:
    """PIDs of ipykernel processes whose parent is this test process."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"ipykernel" in cmd:
                found.append(int(d.name))
    return found


def test_cell_times_and_slowest_cell(tmp_path):
    tree = _tree(tmp_path, "x = 1", "import time\ntime.sleep(0.3)", "print(x)")
    before = _kernels_of_this_process()
    run = _run(tree)
    assert _kernels_of_this_process() == before, "the notebook's kernel was stopped after the run"
    assert run.error is None
    assert run.vmlab_file == str(tree / "vmlab" / "__init__.py")     # this tree's vmlab, not the installed one
    assert [c.index for c in run.cells] == [1, 2, 3]
    slow = run.slowest(1)[0]
    assert (slow.index, slow.first_line) == (2, "import time")
    assert slow.seconds >= 0.3
    assert run.seconds >= run.cell_seconds
    assert len(run.sha256) == 12                         # which version of the notebook ran
    figs = bl.figures([{"baseline": [run], "current": [run]}])
    assert figs["slowest_cell_s"] == [slow.seconds]
    assert figs["lessons_vs_baseline"] == [1.0]
    assert figs["lessons_baseline_s"] == figs["lessons_same_nine_s"] == figs["lessons_all_s"] == [run.seconds]
    top = bl.detail([{"current": [run]}])["slowest_current_cells"][0]
    assert (top["notebook"], top["index"], top["first_line"]) == ("01.00-Tiny.ipynb", 2, "import time")
    missing = bl.figures([{"current": [run]}], baseline_missing="no commit")
    assert isinstance(missing["lessons_vs_baseline"], Skipped) and missing["lessons_all_s"] == [run.seconds]


def test_failing_cell_fails_the_figures_with_the_cell_named(tmp_path):
    tree = _tree(tmp_path, "x = 1", "1 / 0", "print('never')")
    run = _run(tree)
    assert run.error is not None
    assert "01.00-Tiny.ipynb: cell 2 ('1 / 0') failed: ZeroDivisionError" in run.error
    figs = bl.figures([{"baseline": [], "current": [run]}])
    for name in ("lessons_all_s", "slowest_cell_s", "lessons_same_nine_s", "lessons_vs_baseline"):
        assert isinstance(figs[name], Failed), name
        assert "cell 2" in figs[name].reason and "ZeroDivisionError" in figs[name].reason


def test_missing_baseline_commit_is_a_reason_not_a_number(tmp_path):
    with bl.baseline_tree(commit="0" * 40) as (tree, why):
        assert tree is None
        assert "is not in" in why and "git fetch --unshallow" in why


@pytest.mark.parametrize("name, lesson", [("01.03-Live-Migration.ipynb", True), ("Glossary.ipynb", False),
                                          ("1.3-x.ipynb", False)])
def test_lesson_names(name, lesson):
    assert bool(bl.NUMBERED.match(name)) is lesson
