"""The learner-facing contracts of the widgets, plots and tables, without a browser (tests/test_browser.py clicks
them in one): the device widget's sizes, feedback shown once, solutions and answers kept out of the notebooks and
out of the page until asked for, full button labels, the control panel's power button while paused and its
timeline labels, the plot style (a colour per device, readable category and log axes, the source note clear of
every label), tables for people, and the learner's workspace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest

matplotlib.use("Agg")

import itertools

import matplotlib.pyplot as plt
from IPython.utils.capture import capture_output

from vmlab import lessons, plots, workspace
from vmlab.errors import SpecError
from vmlab.spec import parse_size
from vmlab.widgets import answers
from vmlab.widgets import devices as device_widget
from vmlab.widgets.predict import Check, Prediction, Solution

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
LESSONS = sorted(p for p in NB_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def widget_state(w) -> str:
    """Everything the front end receives for widget ``w`` and its children, as JSON text."""
    from ipywidgets.embed import dependency_state
    # only w and what it references: other tests' closed widgets stay in ipywidgets' global registry
    return json.dumps(dependency_state([w], drop_defaults=True))


# ------------------------------------------------------------- device widget
LABEL = re.compile(r"^([\d,]+) (KiB|MiB|B|packets)\b")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "packets": 1}


def read_as_experiment(contrast: str, key: str, value):
    """How the experiment's run() reads what the widget passes for ``key``."""
    from vmlab.experiments import disk
    if contrast == "disk" and key == "total":
        return parse_size(value, "total")
    if contrast == "disk" and key == "bs":
        return disk._sizes(value, "bs")[0]
    if contrast == "console":
        v = value[0] if isinstance(value, list) else value
        return parse_size(v, key, default_unit="K") if isinstance(v, str) else int(v)
    return int(value[0] if isinstance(value, list) else value)


@pytest.mark.parametrize("contrast", ["disk", "console", "net"])
def test_device_widget_sizes_mean_what_their_labels_say(contrast):
    """Every menu entry of the device widget is read by the experiment as exactly the size its label shows (the
    02.00 bug: "1 MiB" was passed as 1 << 20, which disk.run reads as MiB: a 1 TiB run)."""
    for key, entries in device_widget.MENUS[contrast].items():
        for label, value, _default in entries:
            m = LABEL.match(label)
            assert m, label
            want = int(m.group(1).replace(",", "")) * UNITS[m.group(2)]
            passed = device_widget.run_options(contrast, ["x"], **{key: value})[key]
            assert read_as_experiment(contrast, key, passed) == want, (contrast, label, passed)


def test_a_bare_number_is_mib_and_a_huge_disk_total_is_refused_clearly():
    from vmlab.experiments import disk
    assert parse_size(2, "total") == 2 << 20
    with pytest.raises(SpecError) as e:
        disk.run(quick=True, devices=["virtio-blk"], total=2 << 20)
    assert "total" in str(e.value) and "MiB" in str(e.value), str(e.value)


# ----------------------------------------------------------- predictions
def test_feedback_shows_once_when_the_widget_is_on_the_page():
    from IPython.core.interactiveshell import InteractiveShell
    InteractiveShell.instance()                  # display() goes through a shell, as in a notebook
    p = Prediction("boot time?", unit="s")
    p.record(2)
    with capture_output() as without_widget:
        from IPython.display import display
        display(p.measured(4.0))
    assert "2x too low" in str(without_widget.outputs[0].data["text/html"]), "no widget: the feedback shows here"
    q = Prediction("boot time?", unit="s")
    assert q.widget is not None         # the widget is on the page
    q.record(2)
    fb = q.measured(4.0)
    assert "2x too low" in fb and "2x too low" in q._out.value
    with capture_output() as with_widget:
        display(fb)
    assert with_widget.outputs == [], "the widget shows the feedback; the cell must not repeat it"


def test_buttons_are_as_wide_as_their_labels():
    p = Prediction("x", unit="per byte", measure=1.0, low=0.001, high=100, log=True)
    s = Solution("text")
    c = Check([("q", ["a", "b"], 0, "why")])
    buttons = [w for w in [*p.widget.children[1].children, s.widget.children[0], *c.widget.children]
               if type(w).__name__ == "Button"]
    assert len(buttons) == 4
    for b in buttons:
        assert b.layout.width == "auto", f"{b.description!r} can be cut off"
    assert p._input.style.description_width == "initial", "the unit (the slider's description) can be cut off"


def test_solution_text_reaches_the_page_only_when_revealed():
    text = answers.solution("01.00", "rss")
    s = Solution.lesson("01.00", "rss")
    w = s.widget
    assert text[:40] not in widget_state(w) and "lazily" not in widget_state(w)
    w.children[0].click()
    assert s.revealed and "lazily" in widget_state(w)


def test_check_answers_reach_the_page_only_when_checked():
    qs = answers.check("01.00")
    c = Check.lesson("01.00")
    state = widget_state(c.widget)
    for _q, _choices, _right, why in qs:
        assert why not in state
    orders = [[v for _label, v in r.options] for r in c._radios]
    assert any(o.index(right) != 1 for o, (_q, _c, right, _w) in zip(orders, qs, strict=True)), \
        "the right answer is always in the same place"
    for r, (_q, _c, right, _w) in zip(c._radios, qs, strict=True):
        r.value = right
    next(b for b in c.widget.children if "vmlab-check-button" in b._dom_classes).click()
    assert c.score == len(qs) and qs[0][3] in widget_state(c.widget)


def test_unknown_lesson_answers_say_where_to_add_them():
    with pytest.raises(SpecError, match=r"answers/09\.99\.toml"):
        Solution.lesson("09.99", "nope")
    with pytest.raises(SpecError, match=r"answers/09\.99\.toml"):
        Check.lesson("09.99")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_no_solution_or_answer_in_a_notebooks_source(path):
    nb = nbformat.read(str(path), as_version=4)
    src = "\n".join(c.source for c in nb.cells)
    assert not re.search(r"\bSolution\(\s*['\"]", src), "a Solution's text is in the cell: use Solution.lesson()"
    assert not re.search(r"\bCheck\(\s*\[", src), "a Check's answers are in the cell: use Check.lesson()"
    for lesson in answers.lessons():
        for text in answers.solutions(lesson).values():
            assert text[:50] not in src
        for _q, _c, _r, why in answers.checks(lesson):
            assert why not in src
    for lesson, key in re.findall(r"Solution\.lesson\(\s*\"([\d.]+)\",\s*\"([\w-]+)\"", src):
        answers.solution(lesson, key)
    for lesson in re.findall(r"Check\.lesson\(\s*\"([\d.]+)\"", src):
        answers.check(lesson)
    assert not re.search(r"print\(\s*\w+\.measured\(", src), "printing the feedback shows it twice"


# ----------------------------------------------------------- control panel
def test_control_panel_power_button_is_off_while_paused_with_a_hint():
    from vmlab.vm import RunState
    from vmlab.widgets.control_panel import ALLOWED, ControlPanel
    assert "power" not in ALLOWED[RunState.PAUSED] and "resume" in ALLOWED[RunState.PAUSED]
    assert "power" in ALLOWED[RunState.RUNNING]
    svg = ControlPanel._timeline_svg([{"t": 0.0, "event": "LAUNCH", "source": "vmlab", "data": {}},
                                      {"t": 0.5, "event": "ACTION", "source": "vmlab", "data": {}},
                                      {"t": 0.6, "event": "POWERDOWN", "source": "qemu", "data": {}},
                                      {"t": 2.0, "event": "GUEST_BYE", "source": "agent", "data": {}},
                                      {"t": 2.5, "event": "SHUTDOWN", "source": "qemu", "data": {}}])
    width = float(re.search(r"viewBox='0 0 (\d+)", svg).group(1))
    for x, anchor, label in re.findall(r"<text x='([\d.]+)' y='[\d.-]+' font-size='8' text-anchor='(\w+)'[^>]*>(\w+)<",
                                       svg):
        est = 5.5 * len(label)                 # a generous width for capitals at font-size 8
        left = {"start": 0, "middle": est / 2, "end": est}[anchor]
        assert float(x) - left >= 0 and float(x) - left + est <= width, (label, x, anchor)
    assert ">POWERDOWN<" in svg and ">GUEST_BYE<" in svg, "event names are shown whole"


# ------------------------------------------------------------------ plots
def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def disk_frame() -> pd.DataFrame:
    rows = []
    devs = ["ide-pio", "ide-dma", "ahci", "nvme", "virtio-blk", "virtio-scsi"]
    for i, d in enumerate(devs):
        for mode in ("read", "write"):
            for pattern in ("seq", "rand"):
                for bs in (4096, 65536, 262144):
                    rows.append({"device": d, "kind": "paravirtual" if d.startswith("virtio") else "emulated",
                                 "mode": mode, "pattern": pattern, "bs": bs, "repeat": 0,
                                 "throughput_mb_s": 5.0 * (i + 1) ** 2 * bs / 4096,
                                 "interventions_per_mb": 1e5 / (i + 1) ** 3, "accel": "tcg", "qemu": "7.2",
                                 "guest_kernel": "6.1.0", "host_cpu": "AMD EPYC 7B13 64-Core Processor"})
    return pd.DataFrame(rows)


def labels_clear(ax) -> None:
    """No two x tick labels overlap, and the source note overlaps no label, the title or the legend."""
    fig = ax.figure
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for t in ax.get_xticklabels() if t.get_text()]
    ticks = [t.get_window_extent(r) for t in texts]
    angle = texts[0].get_rotation() if texts else 0
    if angle:      # slanted labels: consecutive ones stay at least a line height apart across their slant
        import math
        xs = [ax.transData.transform((x, 0))[0] for x in ax.get_xticks()]
        height = texts[0].get_fontsize() * fig.dpi / 72
        for t in texts:
            assert "\n" not in t.get_text(), "a slanted label has one line"
        assert min(b - a for a, b in itertools.pairwise(xs)) * math.sin(math.radians(angle)) >= height
    else:
        for a, b in itertools.pairwise(ticks):
            assert not _overlap(a, b), "x tick labels overlap"
    notes = [t for t in ax.texts if getattr(t, "_vmlab_source", False)]
    assert len(notes) == 1
    note = notes[0].get_window_extent(r)
    others = ticks + [t.get_window_extent(r) for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    others += [t.get_window_extent(r) for t in ax.texts if not getattr(t, "_vmlab_source", False)]
    if ax.get_legend() is not None:
        others.append(ax.get_legend().get_window_extent(r))
    for o in others:
        assert not _overlap(note, o), "the source note sits on a label"


def test_disk_plot_reads_at_a_glance():
    from vmlab.experiments import disk
    ax = disk.plot(disk_frame(), metric="throughput_mb_s")
    bars = {}
    for patch, label in ((p, c.get_label()) for c in ax.containers for p in c.patches):
        bars.setdefault(label, set()).add(matplotlib.colors.to_hex(patch.get_facecolor()))
    assert len(bars) == 6 and all(len(c) == 1 for c in bars.values())
    assert len({next(iter(c)) for c in bars.values()}) == 6, "every device has its own colour"
    labelled = [t for t in ax.get_yticklabels() if t.get_text()]
    lo, hi = ax.get_ylim()
    shown = [t for t in labelled if lo <= t.get_position()[1] <= hi]
    assert len(shown) >= 3, "a log axis needs at least three labelled ticks"
    labels_clear(ax)
    plt.close(ax.figure)


def test_log_axis_is_labelled_in_plain_numbers():
    fig, ax = plt.subplots()
    ax.bar([0, 1], [12, 180])
    plots.log_axis(ax)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    texts = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(texts) >= 3 and "20" in texts and "100" in texts, texts
    plt.close(fig)
    assert plots.is_wide([1, 100]) and not plots.is_wide([10, 40])


def test_device_colours_are_distinct_and_stable():
    devs = ["ide-pio", "ide-dma", "ahci", "nvme", "virtio-blk", "virtio-scsi"]
    c = plots.device_colors(devs)
    assert len(set(c.values())) == 6
    assert plots.device_colors(["virtio-blk", "ide-pio"]) == {"virtio-blk": c["virtio-blk"], "ide-pio": c["ide-pio"]}
    odd = plots.device_colors(["x", "y", "z"], {"x": "emulated", "y": "emulated", "z": "paravirtual"})
    assert len(set(odd.values())) == 3


# ------------------------------------------------------------------ tables
def test_tables_read_for_people():
    assert plots.header("throughput_mb_s") == "throughput (MB/s)"
    assert plots.header("lat_us_median") == "latency median (µs)"
    assert plots.header("interventions_per_mb") == "interventions per MB"
    assert plots.header("the article says") == "the article says"
    assert plots.fmt_number(254882.8125) == "254,883"
    assert plots.fmt_number(2.974178e8) == "297,417,800"
    assert plots.fmt_number(0.012345) == "0.0123"
    assert plots.fmt_number(12.345) == "12.3"
    long = pd.DataFrame({"device": ["ide-pio"] * 360, "throughput_mb_s": [254882.8125] * 360})
    html = plots.table(long)._repr_html_()
    assert "throughput (MB/s)" in html and "254,883" in html and "254882.8" not in html
    assert "<details" in html and "show all 360 rows" in html, "a long frame is summarised, all rows one click away"
    assert html.index("<details") > html.index("254,883")
    short = plots.table(long.head(3))._repr_html_()
    assert "<details" not in short


def test_doctor_table_reads_left_aligned():
    report = {"default_accel": "tcg", "problems": [],
              "accelerators": {"kvm": {"usable": False, "reason": "no /dev/kvm"}, "tcg": {"usable": True, "reason": "sw"}},
              "qemu": {"version": "7.2", "path": "/q"}, "image": {"built": True, "kernel_version": "6.1"},
              "host": {"cpu": "X", "cpus": 2, "memory_mb": 1000, "virtualization": {"is_vm": True, "detected": "kvm"}}}
    html = lessons.doctor_table(report)._repr_html_()
    assert "text-align: left" in html and "TCG" in html


def test_course_table_has_times_on_a_fresh_clone(tmp_path):
    t = lessons.course_table(timings_csv=tmp_path / "absent.csv")
    text = t.data.to_string() if hasattr(t, "data") else t.to_string()
    assert "not run yet" not in text
    assert t.data["study (min)"].notna().all()


# --------------------------------------------------------------- workspace
def _lesson(path: Path, text: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {text}"), nbformat.v4.new_code_cell("1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def test_workspace_copies_refreshes_and_never_clobbers(tmp_path):
    src, ws = tmp_path / "notebooks", tmp_path / "ws"
    for name in ("01.00-A.ipynb", "01.01-B.ipynb", "01.02-C.ipynb", "demo/D.ipynb"):
        _lesson(src / name, name)
    first = dict(workspace.sync_workspace(src, ws))
    assert set(first.values()) == {"new"} and (ws / "demo" / "D.ipynb").exists()
    meta = nbformat.read(str(ws / "01.00-A.ipynb"), as_version=4).metadata
    assert meta["kernelspec"] == workspace.kernel_metadata()["kernelspec"], "no 'unsaved' the moment it opens"
    assert meta["language_info"]["version"]
    # the learner runs A (outputs only), edits B, deletes C; the course changes A and B
    a = nbformat.read(str(ws / "01.00-A.ipynb"), as_version=4)
    a.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"}, execution_count=1)]
    nbformat.write(a, str(ws / "01.00-A.ipynb"))
    b = nbformat.read(str(ws / "01.01-B.ipynb"), as_version=4)
    b.cells[1].source = "my own answer = 42"
    nbformat.write(b, str(ws / "01.01-B.ipynb"))
    (ws / "01.02-C.ipynb").unlink()
    _lesson(src / "01.00-A.ipynb", "A, second edition")
    _lesson(src / "01.01-B.ipynb", "B, second edition")
    second = dict(workspace.sync_workspace(src, ws))
    assert second["01.00-A.ipynb"] == "updated"
    assert "second edition" in (ws / "01.00-A.ipynb").read_text()
    assert second["01.01-B.ipynb"].startswith("kept")
    assert "my own answer = 42" in (ws / "01.01-B.ipynb").read_text(), "the learner's edit is kept"
    assert "second edition" in (ws / "01.01-B.course-update.ipynb").read_text()
    assert second["01.02-C.ipynb"] == "restored"
    assert second["demo/D.ipynb"] == "up to date"
    third = dict(workspace.sync_workspace(src, ws))
    assert third["01.00-A.ipynb"] == "up to date" and third["01.01-B.ipynb"].startswith("kept")


def test_saved_notebooks_keep_outputs_but_not_widget_views():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("w")])
    nb.cells[0].outputs = [
        nbformat.v4.new_output("display_data", {"text/plain": "VBox()", workspace.WIDGET_VIEW: {"model_id": "abc"}}),
        nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    model = {"type": "notebook", "content": json.loads(nbformat.writes(nb))}
    workspace.drop_widget_views(model)
    outs = model["content"]["cells"][0]["outputs"]
    assert [o["output_type"] for o in outs] == ["stream"] and "widgets" not in model["content"]["metadata"]
    cfg = json.loads((ROOT / "etc" / "jupyter" / "jupyter_server_config.json").read_text())
    assert cfg["ContentsManager"]["pre_save_hook"] == "vmlab.workspace.drop_widget_views"
