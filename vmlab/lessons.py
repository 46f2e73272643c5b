"""The lesson sequence: set-up helpers for notebooks, navigation cells, headless rendering.

    python -m vmlab.lessons nav                    # (re)write the previous/next cell of every numbered notebook
    python -m vmlab.lessons nav --check            # exit 1 if a nav cell is missing or stale
    python -m vmlab.lessons render [--quick] [--only PATTERN] [--timeout S] [--out DIR]
    python -m vmlab.lessons workspace [--to DIR]   # the learner's copy of the lessons (make lab; vmlab.workspace)

``render`` executes each numbered notebook headless in its own process (nbclient; cwd notebooks/;
VMLAB_QUICK=1 with --quick, else 0), writes HTML (nbconvert) and ``index.html`` to build/lessons/ with a
timing table (also ``timings.csv``): seconds, status, peak QEMU RSS (polled from the process tree),
CPU seconds (getrusage of the finished children plus this process). A failing notebook is reported
and makes the exit status non-zero; the others still render.

In notebooks:

    from vmlab.lessons import setup, doctor_table, course_table
    image = setup(QUICK)          # the guest image, built with visible progress if needed
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import html
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import config, workspace
from .config import atomic_write
from .i18n import tr, translated_title
from .plots import Table, table
from .procfs import comm, descendants, status_kb

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build" / "lessons"
INDEX_NAME = "00.00-Index.ipynb"
GLOSSARY = "glossary/Glossary.ipynb"      # markdown only: rendered, not executed; lessons link its anchors
NAV_TAG = "vmlab-nav"
MAP_TAG = "vmlab-map"
NUMBERED = re.compile(r"^(\d\d)\.(\d\d)-[A-Za-z0-9-]+\.ipynb$")
DEFAULT_TIMEOUT = 900          # seconds per notebook (whole notebook, not per cell)
QUICK_TIMEOUT = 300


# =============================================================== notebook helpers
class Progress:
    """A progress line for long operations: a widget label in Jupyter, print() elsewhere.

        p = Progress("guest image"); ensure_image(progress=p); p.done("ready")
    """

    def __init__(self, what: str = "working") -> None:
        self.what = what
        self.messages: List[str] = []
        self._t0 = time.monotonic()
        self._label = None
        try:
            from IPython import get_ipython
            if get_ipython() is not None and getattr(get_ipython(), "kernel", None) is not None:
                import ipywidgets as W
                from IPython.display import display
                self._label = W.HTML(f"<code>{html.escape(what)}: starting</code>")
                display(self._label)
        except ImportError:
            pass

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        line = f"{self.what}: {message} ({time.monotonic() - self._t0:.0f} s)"
        if self._label is not None:
            self._label.value = f"<code>{html.escape(line)}</code>"
        else:
            print(line, flush=True)

    def done(self, message: str) -> None:
        self(message)


def setup(quick: bool = False, progress: Optional[Callable[[str], None]] = None):
    """Every lesson's set-up cell: the guest image (built once, with progress), and where we run."""
    from .image import ensure_image
    p = progress or Progress("guest image")
    t0 = time.monotonic()
    image = ensure_image(progress=p)
    took = time.monotonic() - t0
    msg = f"ready, kernel {image.kernel_version}" + (f" (built in {took:.0f} s)" if took > 5 else " (cached)")
    p(msg)
    try:   # lesson tables carry sentences (reasons, fixes): show them whole
        import pandas as pd
        pd.set_option("display.max_colwidth", 200)
    except ImportError:
        pass
    if quick:
        print("QUICK mode: small sizes and few repeats (the full run: QUICK = False in the parameters cell)")
    return image


def doctor_table(report: Optional[Dict[str, Any]] = None) -> Table:
    """`vmlab.cli.doctor_report()` as a small two-column table, text left-aligned (``.data``: the DataFrame)."""
    import pandas as pd
    if report is None:
        from .cli import doctor_report
        report = doctor_report()
    acc = report.get("accelerators", {})
    h = report.get("host", {})
    hv = h.get("virtualization", {}) or {}
    q = report.get("qemu") or {}
    img = report.get("image") or {}

    def yesno(v: Dict[str, Any]) -> str:
        return tr("yes: " if v.get("usable") else "no: ") + str(v.get("reason", ""))

    why = [w for w in (hv.get("detected"), "CPUID hypervisor flag" if hv.get("cpuid_hypervisor_flag") else None) if w]
    rows = [
        (tr("lessons run under"), str(report.get("default_accel", "?")).upper()),
        (tr("KVM (hardware-assisted)"), yesno(acc.get("kvm", {}))),
        *([(tr("nested KVM (inside a TCG guest)"), tr("yes: " if report["nested_kvm"].get("works") else "no: ")
            + str(report["nested_kvm"].get("reason", "")))] if report.get("nested_kvm") else []),
        (tr("TCG (binary translation)"), yesno(acc.get("tcg", {}))),
        ("QEMU", f"{q.get('version')} ({q.get('path')})" if q else tr("missing")),
        (tr("guest image"), tr("built, kernel {kernel}").format(kernel=img.get("kernel_version")) if img.get("built") else tr("not built yet")),
        (tr("host CPU"), tr("{cpu}, {cpus} CPUs, {memory} MiB").format(cpu=h.get("cpu"), cpus=h.get("cpus"), memory=h.get("memory_mb"))),
        (tr("host is itself a VM"), tr("yes" if hv.get("is_vm") else "no") + (f" ({', '.join(why)})" if why else "")
         + (tr("; its KVM is PVM (nested, paravirtual)") if hv.get("pvm_host") else "")),
    ]
    if hv.get("container"):
        rows.append((tr("container"), str(hv["container"])))
    for p in report.get("problems", []):
        rows.append((tr("problem"), tr("{problem} (fix: {fix})").format(problem=tr(str(p.get("problem"))), fix=tr(str(p.get("fix"))))))
    return table(pd.DataFrame(rows, columns=[tr("what"), tr("here")]).set_index(tr("what")))


# ================================================================ instructor mode


# ===================================================================== notebooks
def numbered_notebooks(directory: Path = NOTEBOOKS) -> List[Path]:
    return sorted(p for p in Path(directory).glob("*.ipynb") if NUMBERED.match(p.name))


def _read(path: Path):
    import nbformat
    return nbformat.read(str(path), as_version=4)


def _source(cell: Any) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _generated(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags") or []
    return NAV_TAG in tags or MAP_TAG in tags


def title_of(nb: Any, path: Path) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and not _generated(cell):
            for line in _source(cell).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem.split("-", 1)[1].replace("-", " ")


def summary_of(nb: Any) -> str:
    """The first plain paragraph of the title cell (what the lesson shows)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown" or _generated(cell):
            continue
        paras = [p.strip() for p in _source(cell).split("\n\n")]
        for p in paras:
            if p and not p.startswith("#") and not p.startswith("- ") and not p.startswith("<"):
                return _first_sentences(" ".join(p.split()))
        return ""
    return ""


def _first_sentences(text: str, limit: int = 240) -> str:
    """Whole sentences up to about *limit* characters; a trailing colon becomes an ellipsis."""
    parts = re.split(r"(?<=[.!?])\s+", text)
    out = ""
    for part in parts:
        if out and len(out) + len(part) + 1 > limit:
            break
        out = f"{out} {part}".strip()
    if len(out) > limit + 60:
        out = out[:limit].rsplit(" ", 1)[0] + " …"
    out = re.sub(r":$", " …", out.replace("*", ""))     # no half-closed emphasis in the map
    if out.count('"') % 2:
        out += '"' if out.endswith(("…", ".", "!", "?")) else ' …"'
    return out


def short_title(title: str) -> str:
    """A lesson title without its own number prefix."""
    return re.sub(r"^\d\d\.\d\d[\s:.-]+", "", title)


def _label(path: Path, titles: Dict[Path, str]) -> str:
    return f"{path.name[:5]} {short_title(titles[path])}"   # lessons may number their own title


NAV_WORDS = {"previous": "Previous", "index": "Index", "next": "Next", "made_by": "`python -m vmlab.lessons nav`"}


def nav_source(prev: Optional[Path], nxt: Optional[Path], titles: Dict[Path, str], index: Optional[Path],
               words: Dict[str, str] = NAV_WORDS) -> str:
    """The nav cell's markdown; ``words`` are its words in an edition's language (see vmlab.edition)."""
    parts = [f"&larr; {words['previous']}: [{_label(prev, titles)}]({prev.name})" if prev else "",
             f"[{words['index']}]({index.name})" if index else "",
             f"{words['next']}: [{_label(nxt, titles)}]({nxt.name}) &rarr;" if nxt else ""]
    return "---\n" + " | ".join(p for p in parts if p) + f"\n\n<!-- generated by {words['made_by']}; do not edit -->"


def study_minutes(path: Path) -> Optional[int]:
    """The author's estimate of a lesson's study time (notebook metadata ``vmlab.minutes``)."""
    return _read(path).metadata.get("vmlab", {}).get("minutes")


def _map_source(paths: Sequence[Path], titles: Dict[Path, str], summaries: Dict[Path, str]) -> str:
    lines = ["## The course map", "", "| lesson | what it shows | study time (estimate) |", "|---|---|---|"]
    for p in paths:
        if p.name == INDEX_NAME:
            continue
        what = summaries.get(p, "").replace("|", "\\|")
        minutes = study_minutes(p)
        lines.append(f"| [{_label(p, titles)}]({p.name}) | {what} | {f'about {minutes} min' if minutes else ''} |")
    lines += ["", "Study times are the authors' estimates for reading, running and the exercises; the table below "
                  "the doctor check shows how long each lesson took to run headless on this machine "
                  "(from `make lessons`).", "", "**한국어판** (the course in Korean): [00.00 목차](ko/00.00-Index.ipynb) (`make lab EDITION=ko`).",
              "", "<!-- generated by `python -m vmlab.lessons nav` from each lesson's title cell; do not edit -->"]
    return "\n".join(lines)


def _tagged(cell: Any, tag: str) -> bool:
    return tag in (cell.get("metadata", {}).get("tags") or [])


def _new_md(source: str, tag: str):
    import nbformat
    c = nbformat.v4.new_markdown_cell(source)
    c.metadata["tags"] = [tag]
    return c


def nav_plan(directory: Path = NOTEBOOKS) -> Dict[Path, Any]:
    """The notebooks whose nav (or course map) cell is missing or stale -> their updated notebook."""
    paths = numbered_notebooks(directory)
    nbs = {p: _read(p) for p in paths}
    titles = {p: title_of(nbs[p], p) for p in paths}
    summaries = {p: summary_of(nbs[p]) for p in paths}
    index = next((p for p in paths if p.name == INDEX_NAME), None)
    changed: Dict[Path, Any] = {}
    for i, p in enumerate(paths):
        nb = nbs[p]
        before = json.dumps([(c.cell_type, _source(c), c.get("metadata", {}).get("tags")) for c in nb.cells])
        want = nav_source(paths[i - 1] if i > 0 else None, paths[i + 1] if i + 1 < len(paths) else None,
                          titles, index if p != index else None)
        navs = [c for c in nb.cells if _tagged(c, NAV_TAG)]
        if len(navs) == 1 and nb.cells and nb.cells[-1] is navs[0]:
            navs[0].source = want
        else:
            nb.cells = [c for c in nb.cells if not _tagged(c, NAV_TAG)]
            nb.cells.append(_new_md(want, NAV_TAG))
        if p == index:
            maps = [c for c in nb.cells if _tagged(c, MAP_TAG)]
            src = _map_source(paths, titles, summaries)
            if maps:
                maps[0].source = src
            else:   # after the title cell
                nb.cells.insert(1 if nb.cells else 0, _new_md(src, MAP_TAG))
        after = json.dumps([(c.cell_type, _source(c), c.get("metadata", {}).get("tags")) for c in nb.cells])
        if after != before:
            changed[p] = nb
    return changed


def nav(directory: Path = NOTEBOOKS, check: bool = False) -> List[Path]:
    """Write the nav cells (idempotent; only changed notebooks are written). Returns the changed paths."""
    import nbformat
    plan = nav_plan(directory)
    if not check:
        for p, nb in plan.items():
            text = nbformat.writes(nb)
            atomic_write(p, text if text.endswith("\n") else text + "\n", mode=stat.S_IMODE(p.stat().st_mode))
    return sorted(plan)


# ===================================================================== rendering
class QemuPoller(threading.Thread):
    """Polls the process tree under *pid* for QEMU processes: peak RSS of one, peak sum, count."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_one_kb = 0
        self.peak_total_kb = 0
        self.seen: set = set()
        self.known: List[int] = []
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.poll()
            self._stop_ev.wait(self.interval)

    def poll(self) -> None:
        total = 0
        tree = descendants(self.pid)
        self.known = tree
        for p in tree:
            if comm(p).startswith("qemu"):
                self.seen.add(p)
                hwm = status_kb(p, "VmHWM")   # the kernel's own peak for this process
                total += status_kb(p, "VmRSS")
                self.peak_one_kb = max(self.peak_one_kb, hwm)
        self.peak_total_kb = max(self.peak_total_kb, total)

    def stop(self) -> None:
        self._stop_ev.set()


def _html_links(text: str) -> str:
    """Links between lessons point at the rendered .html files."""
    return re.sub(r'href="((?:\.\./|glossary/|ko/)?[^"/:#]+)\.ipynb(#[^"]*)?"', lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', text)


def render_static(src: Path, out_html: Path) -> Path:
    """A notebook without code (the glossary) as HTML, its links pointing at the rendered lessons."""
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_notebook_node(_read(src))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(_html_links(body), encoding="utf-8")
    return out_html


def execute_one(src: Path, out_html: Path, timeout: int, quick: bool) -> Dict[str, Any]:
    """Runs in the child process: execute *src* (cwd = its folder) and write HTML. Raises on failure."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter
    nb = _read(src)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent)}}, store_widget_state=True)
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = exc
    exporter = HTMLExporter()
    body, _ = exporter.from_notebook_node(nb)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(_html_links(body), encoding="utf-8")
    if error is not None:
        raise error
    return {"cells": len(nb.cells)}


def _cpu_now() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _kill_tree(pids: Sequence[int]) -> None:
    for p in reversed(list(pids)):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def child_env(quick: bool) -> Dict[str, str]:
    """The environment of a notebook's process: ``VMLAB_QUICK`` always set, ``1`` or ``0`` (a lesson's
    parameters cell is quick when the variable is unset, so a full render must say ``0``)."""
    return dict(os.environ, VMLAB_QUICK="1" if quick else "0",
                PYTHONUNBUFFERED="1", MPLBACKEND="module://matplotlib_inline.backend_inline")


def render_one(src: Path, out_dir: Path, *, quick: bool, timeout: int,
               progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Execute and render one notebook in a child process; returns its timing row."""
    out_html = out_dir / (src.stem + ".html")
    env = child_env(quick)
    cmd = [sys.executable, "-m", "vmlab.lessons", "_execute", str(src), str(out_html),
           "--timeout", str(timeout)] + (["--quick"] if quick else [])
    cpu0, t0 = _cpu_now(), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(src.parent), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    poller = QemuPoller(proc.pid)
    poller.start()
    status, detail = "ok", ""
    try:
        out, _ = proc.communicate(timeout=timeout + 30)
        if proc.returncode != 0:
            status = "failed"
            detail = _error_summary(out)
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"did not finish within {timeout} s"
        poller.poll()
        _kill_tree([proc.pid, *poller.known])
        out, _ = proc.communicate()
    finally:
        poller.stop()
        poller.join(2)
    seconds = time.monotonic() - t0
    cpu = _cpu_now() - cpu0
    left = [p for p in descendants(proc.pid) if comm(p).startswith("qemu")]
    row: Dict[str, Any] = {"notebook": src.name, "seconds": round(seconds, 1), "status": status,
           "peak_qemu_rss_mb": round(poller.peak_one_kb / 1024, 1) if poller.seen else "",
           "peak_qemu_total_rss_mb": round(poller.peak_total_kb / 1024, 1) if poller.seen else "",
           "qemu_processes": len(poller.seen), "cpu_s": round(cpu, 1),
           "quick": int(quick), "html": out_html.name if out_html.exists() else "", "detail": detail}
    if left:
        row["detail"] = (row["detail"] + f"; QEMU left running: {left}").strip("; ")
    progress(f"{src.name}: {status} in {seconds:.1f} s (CPU {cpu:.1f} s"
             + (f", peak QEMU RSS {row['peak_qemu_rss_mb']} MB" if poller.seen else "") + ")"
             + (f"\n    {detail}" if detail else ""))
    return row


def _error_summary(output: str) -> str:
    lines = [ln for ln in (output or "").splitlines() if ln.strip()]
    text = (lines[-1] if lines else "no output").strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text[:300]


FIELDS = ["notebook", "seconds", "status", "peak_qemu_rss_mb", "peak_qemu_total_rss_mb", "qemu_processes",
          "cpu_s", "quick", "html", "detail"]


def write_index(rows: List[Dict[str, Any]], out_dir: Path, *, quick: bool, titles: Dict[str, str]) -> Path:
    from .hostinfo import host_cpu
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "timings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    total = sum(float(r["seconds"]) for r in rows)
    cpu = sum(float(r["cpu_s"]) for r in rows)
    trs = []
    for r in rows:
        name = html.escape(titles.get(r["notebook"], r["notebook"]))
        link = f'<a href="{html.escape(r["html"])}">{name}</a>' if r.get("html") else name
        cls = "ok" if r["status"] == "ok" else "bad"
        trs.append(f"<tr class='{cls}'><td>{html.escape(r['notebook'][:5])}</td><td>{link}</td>"
                   f"<td class=n>{r['seconds']}</td><td>{html.escape(r['status'])}</td>"
                   f"<td class=n>{r['peak_qemu_rss_mb']}</td><td class=n>{r['qemu_processes']}</td>"
                   f"<td class=n>{r['cpu_s']}</td><td>{html.escape(str(r.get('detail', '')))}</td></tr>")
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vmlab lessons</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd}}
td.n{{text-align:right}}tr.bad{{background:#fde0d0}}</style></head><body>
<h1>vmlab lessons</h1>
<p>Executed headless {'in QUICK mode (VMLAB_QUICK=1) ' if quick else ''}on {html.escape(host_cpu())}, {os.cpu_count()} CPUs, {when}.
Total {total:.0f} s wall, {cpu:.0f} CPU-seconds.</p>
<table id="timings"><tr><th>#</th><th>lesson</th><th>seconds</th><th>status</th><th>peak QEMU RSS (MB)</th>
<th>QEMU processes</th><th>CPU s</th><th>detail</th></tr>
{''.join(trs)}
</table>
<p><a href="glossary/Glossary.html">Glossary</a>: every term, with the Korean term and the lesson that measures it.</p>
<p>Peak QEMU RSS: the largest VmHWM of one QEMU process seen while polling the notebook's process tree.
CPU s: getrusage of the notebook's process tree (kernel and QEMU) after it exited, plus this renderer.</p>
</body></html>"""
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    return out_dir / "index.html"


def render(*, quick: bool = False, only: Optional[str] = None, timeout: Optional[int] = None,
           directory: Path = NOTEBOOKS, out_dir: Path = BUILD,
           progress: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    quick = quick or config.quick()      # VMLAB_QUICK=1 in the environment also means quick
    paths = numbered_notebooks(directory)
    if only:
        rx = re.compile(only)
        paths = [p for p in paths if rx.search(p.name)]
    timeout = timeout or (QUICK_TIMEOUT if quick else DEFAULT_TIMEOUT)
    out_dir = Path(out_dir)
    titles = {}
    rows = []
    for p in paths:
        titles[p.name] = f"{p.name[:5]} {title_of(_read(p), p)}"
        progress(f"executing {p.name} ...")
        rows.append(render_one(p, out_dir, quick=quick, timeout=timeout, progress=progress))
    # keep rows of notebooks not re-rendered this time (--only), so index.html lists the whole course
    old = out_dir / "timings.csv"
    if only and old.exists():
        done = {r["notebook"] for r in rows}
        with open(old) as f:
            for r in csv.DictReader(f):
                if r["notebook"] not in done and (directory / r["notebook"]).exists():
                    rows.append(r)
                    titles[r["notebook"]] = f"{r['notebook'][:5]} {title_of(_read(directory / r['notebook']), directory / r['notebook'])}"
        rows.sort(key=lambda r: r["notebook"])
    if (directory / GLOSSARY).exists():         # not executed: markdown only
        render_static(directory / GLOSSARY, out_dir / Path(GLOSSARY).with_suffix(".html"))
    write_index(rows, out_dir, quick=quick, titles=titles)
    return rows


def timings(path: Path = BUILD / "timings.csv"):
    """The last `make lessons` timing table (a DataFrame), or None if it has not been run."""
    import pandas as pd
    if not Path(path).exists():
        return None
    return pd.read_csv(path)


COURSE_TIMES = ROOT / "data" / "course" / "lesson_times.csv"


def course_table(directory: Path = NOTEBOOKS, timings_csv: Path = BUILD / "timings.csv",
                 reference_csv: Path = COURSE_TIMES) -> Table:
    """The lessons: their title, the study time the author planned (metadata ``vmlab.minutes``) and how long the
    code takes headless in quick mode: measured on this machine by the last ``make lessons`` if there is one,
    else the course's own run (``data/course/lesson_times.csv``, which says where it ran), so a fresh clone
    has figures too."""
    import pandas as pd
    here, ref = timings(timings_csv), timings(reference_csv)
    mine = {} if here is None else {r.notebook: r for r in here.itertuples() if int(r.quick)}
    course = {} if ref is None else {r.notebook: r for r in ref.itertuples()}
    rows = []
    for p in numbered_notebooks(directory):
        if p.name == INDEX_NAME:
            continue
        r, where = mine.get(p.name), tr("this machine (make lessons)")
        if r is None:
            r = course.get(p.name)
            where = tr("course run ({host}, {date})").format(host=r.host, date=r.date) if r is not None else ""
        run = "" if r is None else (f"{float(r.seconds):,.0f}" + ("" if r.status == "ok" else f" ({r.status})"))
        rows.append({tr("lesson"): p.name[:5], tr("title"): short_title(translated_title(p) or title_of(_read(p), p)).split(":")[0],
                     tr("study (min)"): study_minutes(p), tr("code, quick mode (s)"): run or tr("new: not timed yet"),
                     tr("timed on"): where})
    df = pd.DataFrame(rows).set_index(tr("lesson")) if rows else pd.DataFrame(columns=[tr("title")])
    return table(df, max_rows=50)


# =========================================================================== CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmlab.lessons", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="execute every numbered notebook headless and write HTML + timings")
    r.add_argument("--quick", action="store_true", help="VMLAB_QUICK=1: small sizes, few repeats")
    r.add_argument("--only", metavar="PATTERN", help="regular expression on the notebook file name")
    r.add_argument("--timeout", type=int, help=f"seconds per notebook (default {QUICK_TIMEOUT} quick, {DEFAULT_TIMEOUT})")
    r.add_argument("--out", type=Path, default=BUILD)
    r.add_argument("--notebooks", type=Path, default=NOTEBOOKS)
    ws = sub.add_parser("workspace", help="copy new and updated lessons into the learner's workspace, "
                                         "never over the learner's edits")
    ws.add_argument("--to", type=Path, default=workspace.WORKSPACE, help="the workspace (default: workspace/)")
    ws.add_argument("--notebooks", type=Path, default=NOTEBOOKS)
    n = sub.add_parser("nav", help="write the previous/next cells (and the index's course map)")
    n.add_argument("--check", action="store_true", help="only report; exit 1 if anything is stale")
    n.add_argument("--notebooks", type=Path, default=NOTEBOOKS)
    x = sub.add_parser("_execute", help=argparse.SUPPRESS)
    x.add_argument("src", type=Path)
    x.add_argument("out", type=Path)
    x.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT)
    x.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "workspace":
        for name, what in workspace.sync_workspace(args.notebooks, args.to):
            if what != "up to date":
                print(f"{name}: {what}")
        print(f"your copy of the lessons: {args.to}/ (JupyterLab opens it; notebooks/ is the course's source)")
        return 0
    if args.cmd == "nav":
        changed = nav(args.notebooks, check=args.check)
        print("\n".join(("stale: " if args.check else "updated: ") + p.name for p in changed) or "nav cells up to date")
        return 1 if (args.check and changed) else 0
    if args.cmd == "_execute":
        try:
            execute_one(args.src, args.out, args.timeout, args.quick)
        except Exception as exc:  # the parent reports it
            ename = getattr(exc, "ename", None)     # nbclient's CellExecutionError: the cell's own error
            print(f"{ename}: {getattr(exc, 'evalue', '')}" if ename else f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    t0 = time.monotonic()
    rows = render(quick=args.quick, only=args.only, timeout=args.timeout, directory=args.notebooks,
                  out_dir=args.out)
    return report_rendered(rows, t0, args.out)


def report_rendered(rows: List[Dict[str, Any]], t0: float, out: Path) -> int:
    """Print the rendered notebooks' timing table and the total; the exit status (1: none matched, or one failed)."""
    if not rows:
        print("no notebooks matched", file=sys.stderr)
        return 1
    bad = [r for r in rows if r["status"] != "ok"]
    w = max(len(r["notebook"]) for r in rows)
    print(f"\n{'notebook':<{w}}  {'seconds':>7}  {'status':<7}  {'peak QEMU RSS MB':>16}  {'CPU s':>6}")
    for row in rows:
        print(f"{row['notebook']:<{w}}  {row['seconds']:>7}  {row['status']:<7}  {row['peak_qemu_rss_mb']!s:>16}  "
              f"{row['cpu_s']:>6}")
    print(f"total {time.monotonic() - t0:.0f} s; HTML in {out}/index.html")
    if bad:
        print(f"{len(bad)} notebook(s) failed: " + ", ".join(r["notebook"] for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
