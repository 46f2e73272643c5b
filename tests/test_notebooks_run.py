"""Every notebook a learner or an instructor opens, executed headless in quick mode (VMLAB_QUICK=1).

One test per notebook (found by glob: lessons notebooks/NN.MM-*.ipynb and dashboards notebooks/demo/*.ipynb), in
its own kernel, cwd = its folder, with VMLAB_STRICT=1 so a failing widget handler raises (vmlab.widgets.errors).
A notebook fails on an error output, a traceback, warning text or asyncio noise in any output, and on a widget
handler failure recorded anywhere in the kernel (background threads included). No QEMU may outlive the kernel.
What each notebook cost (wall time, code cells, the slowest cell) is printed as a table at the end of the run
and written to build/notebook-timings.csv.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import summary_table

from vmlab import procfs

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p for p in [*NB_DIR.glob("[0-9][0-9].[0-9][0-9]-*.ipynb"), *NB_DIR.glob("demo/*.ipynb")]
                   if ".ipynb_checkpoints" not in p.parts)
TIMINGS_CSV = ROOT / "build" / "notebook-timings.csv"
TIMEOUT = 600                      # per notebook, whole notebook (a hang, not a speed target)

# text that must not appear in any output of a notebook run
BAD_TEXT = [
    (re.compile(r"Traceback \(most recent call last\)"), "a traceback"),
    (re.compile(r"\b[A-Z]\w*Warning\b"), "a Python warning"),
    (re.compile(r"^\s*(WARNING|Warning|warning)\b[:\s]", re.M), "warning text"),
    (re.compile(r"Task was destroyed but it is pending|exception was never retrieved"), "asyncio noise"),
    (re.compile(r"^Exception in thread", re.M), "an exception in a thread"),
]
FINAL_CELL = ("import json as _j, os as _o\nfrom vmlab import procfs as _p\n"
              "from vmlab.widgets.errors import FAILURES as _F\n"
              "print('VMLAB-RUN-END ' + _j.dumps({'failures': list(_F), 'qemu': [q for q in _p.descendants(_o.getpid())"
              " if _p.comm(q).startswith('qemu')]}))")

_ROWS: list[dict[str, Any]] = []


def _id(p: Path) -> str:
    return str(p.relative_to(NB_DIR))


def output_text(out: Any) -> str:
    """All the text of one output: stream text, traceback, text/plain, text/html."""
    if out.output_type == "stream":
        return out.text
    if out.output_type == "error":
        return f"{out.ename}: {out.evalue}\n" + "\n".join(out.traceback)
    data = out.get("data", {})
    return "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/html", "text/markdown"))


def problems(nb: Any) -> list[str]:
    """Every error output and every bad text in the outputs, as 'cell N: what: the line'."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.append(f"cell {i}: error output {out.ename}: {out.evalue}")
                continue
            text = output_text(out)
            for pattern, what in BAD_TEXT:
                m = pattern.search(text)
                if m:
                    line = text[max(0, text.rfind("\n", 0, m.start()) + 1):].splitlines()[0][:200]
                    found.append(f"cell {i}: {what}: {line!r}")
    return found


def _seconds(cell: Any) -> float:
    t = cell.metadata.get("execution", {})
    try:
        a = _dt.datetime.fromisoformat(t["iopub.execute_input"].replace("Z", "+00:00"))
        b = _dt.datetime.fromisoformat(t["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return float("nan")
    return (b - a).total_seconds()


def wait_gone(pids: list[int], within: float = 60.0) -> list[int]:
    """The pids still alive after waiting up to *within* s (an event wait, not a speed target)."""
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and not procfs.is_zombie(p)]
    return alive


@pytest.fixture(scope="module", autouse=True)
def timings_table(pytestconfig):
    yield
    if not _ROWS:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")      # under `pytest -n`, each worker has its own table
    csv_path = TIMINGS_CSV.with_name(f"notebook-timings-{worker}.csv") if worker else TIMINGS_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_ROWS[0]))
        w.writeheader()
        w.writerows(_ROWS)
    lines = [f"{'notebook':<52} {'status':<7} {'wall s':>7} {'cells':>5} {'slowest cell':>13}"]
    for r in _ROWS:
        lines.append(f"{r['notebook']:<52} {r['status']:<7} {r['wall_s']:>7.1f} {r['code_cells']:>5} "
                     f"{r['slowest_cell_s']:>8.1f} (#{r['slowest_cell']})")
    lines.append(f"{'total':<52} {'':<7} {sum(r['wall_s'] for r in _ROWS):>7.1f}   (load average "
                 f"{os.getloadavg()[0]:.1f}; {csv_path.relative_to(ROOT)})")
    title = "notebooks executed in quick mode (tests/test_notebooks_run.py" + (f", worker {worker})" if worker else ")")
    summary_table(pytestconfig, f"notebooks-{worker or 'main'}", title, lines)


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT + 120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_notebook_runs_clean_in_quick_mode(path, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("VMLAB_QUICK", "1")
    monkeypatch.setenv("VMLAB_STRICT", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONWARNINGS", "default")      # every warning shows (and fails the notebook)
    nb = nbformat.read(str(path), as_version=4)
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(FINAL_CELL))
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.monotonic()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = exc
    finally:
        wall = time.monotonic() - t0
        code = [(i, c) for i, c in enumerate(nb.cells[:-1]) if c.cell_type == "code"]
        slow = max(code, key=lambda ic: _seconds(ic[1]) if _seconds(ic[1]) == _seconds(ic[1]) else -1,
                   default=(None, None))
        _ROWS.append({"notebook": _id(path), "status": "failed" if error else "ok", "wall_s": round(wall, 1),
                      "code_cells": code_cells, "slowest_cell": slow[0],
                      "slowest_cell_s": round(_seconds(slow[1]), 1) if slow[1] is not None else float("nan")})
    bad = problems(nb)
    assert error is None and not bad, f"{path.name}:\n" + "\n".join(bad or [str(error)[-3000:]])
    end = [ln for c in nb.cells[-1:] for o in c.outputs if o.output_type == "stream"
           for ln in o.text.splitlines() if ln.startswith("VMLAB-RUN-END ")]
    assert len(end) == 1, "the final check cell ran"
    report = json.loads(end[0].split(" ", 1)[1])
    assert report["failures"] == [], f"{path.name}: widget handler failures: {report['failures']}"
    assert wait_gone(report["qemu"]) == [], f"QEMU {report['qemu']} outlived the notebook's kernel"
