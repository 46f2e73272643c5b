"""Benchmark: the lessons' own time in quick mode against the baseline commit a5b29a9, same session, same machine
(issue 18: "All lessons in quick mode <= 0.5 x the time of commit a5b29a9 ... and no single lesson cell longer than
20 s in quick mode").

The baseline is a throw-away copy of commit a5b29a9 (``git archive``, removed at the end) from the repository this
benchmark runs in; without that commit (a shallow clone) the figures that need it are skipped, with the reason.
Every numbered lesson notebook (``notebooks/NN.MM-*.ipynb``: not the dashboards in demo/, not the glossary) of both
trees is executed headless with nbclient in quick mode (``VMLAB_QUICK=1``), one at a time, each in a fresh kernel
whose ``PYTHONPATH`` puts its tree first and whose cwd is its tree's notebooks/ folder; a last cell appended to
every notebook prints ``vmlab.__file__`` of the kernel, and a run whose vmlab came from the wrong tree fails.
Every code cell is timed (nbclient's cell hooks: request sent to reply and outputs in). Fair interleaving: per
lesson, the baseline's notebook and then the current one (so a change of load hits both), then the lessons only
the current tree has.

Set-up is not lesson time: before timing, each tree builds (or finds) its guest image and its KVM verdict
(``vmlab.lessons.setup(True)`` and ``kvm_verdict()``, what a5b29a9's lessons do in their set-up cell). The
baseline's image key differs from the current one, and a5b29a9 prunes images without the current grace period,
so the baseline runs on its own cache, ``<cache>/bench-baseline-a5b29a9/`` (kept between runs; the downloads are
hard-linked from the shared cache): the first run also saves the baseline's warm snapshots during its lessons,
which the report says (``baseline_cache_fresh``).

Figures: ``lessons_baseline_s`` (the baseline's lessons, summed), ``lessons_same_nine_s`` (the same lessons,
current tree), ``lessons_vs_baseline`` (their ratio, same run), ``lessons_all_s`` (every current lesson),
``slowest_cell_s`` (the slowest code cell of any current lesson); ``_lessons`` (per lesson and tree: seconds,
cells, the slowest cells with notebook, cell index, first source line, the sha256 of the notebook as it ran),
``_current_tree`` (HEAD and the uncommitted changes under notebooks/ and vmlab/, before and after: a shared work
tree may change during the run), ``_setup``, ``_load_avg``, ``_where``.
A notebook that fails fails the figures that include it, naming the cell and the error. ``--quick``: one round;
without it two rounds (each figure then has two samples).

    .venv/bin/python -m benchmarks lessons [--quick]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import Failed, Skipped  # noqa: E402

BASELINE = "a5b29a9"
NUMBERED = re.compile(r"^\d\d\.\d\d-[A-Za-z0-9-]+\.ipynb$")
TIMEOUT = 900                     # per notebook: a hang, not a speed target
TAG_VAR = "VMLAB_BENCH_LESSONS"   # in every kernel's environment (QEMU inherits it): finds what we started
PROBE_MARK = "VMLAB-BENCH-PROBE "
PROBE_CELL = ("import json as _j, os as _o, sys as _s\nimport vmlab as _v\n"
              f"print({PROBE_MARK!r} + _j.dumps({{'vmlab': _v.__file__, 'cwd': _o.getcwd()}}))")
WARMUP = f"""
import json, time, vmlab
t0 = time.monotonic()
from vmlab.lessons import setup
image = setup(True, progress=lambda message: None)
t1 = time.monotonic()
try:
    from vmlab.vm.sync import kvm_verdict
except ImportError:
    from vmlab.accel import kvm_verdict
verdict = kvm_verdict()
t2 = time.monotonic()
print({PROBE_MARK!r} + json.dumps({{"vmlab": vmlab.__file__, "image_s": t1 - t0, "kvm_verdict_s": t2 - t1,
      "image_key": image.key, "kernel": image.kernel_version, "kvm_usable": bool(verdict["usable"])}}))
"""


class LessonRunError(RuntimeError):
    """A lesson notebook failed: the message names the tree, the notebook, the cell and the error."""


@dataclass
class CellTime:
    notebook: str
    index: int           # position in the notebook's cells (markdown cells counted, as Jupyter shows them)
    first_line: str
    seconds: float


@dataclass
class NotebookRun:
    notebook: str
    tree: str
    seconds: float                      # kernel start to the last lesson cell's reply
    cells: List[CellTime] = field(default_factory=list)
    vmlab_file: str = ""
    error: Optional[str] = None
    qemu_left: List[int] = field(default_factory=list)
    sha256: str = ""                    # of the notebook file as it ran (a shared work tree may change under us)

    @property
    def cell_seconds(self) -> float:
        return sum(c.seconds for c in self.cells)

    def slowest(self, n: int = 3) -> List[CellTime]:
        return sorted(self.cells, key=lambda c: c.seconds, reverse=True)[:n]


def first_line(source: Any) -> str:
    text = "".join(source) if isinstance(source, list) else str(source)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def lesson_notebooks(tree: Path) -> List[Path]:
    """The numbered lesson notebooks of a tree (``notebooks/NN.MM-*.ipynb``; not demo/, not the glossary)."""
    return sorted(p for p in (tree / "notebooks").glob("*.ipynb") if NUMBERED.match(p.name))


def kernel_env(tree: Path, tag: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a lesson kernel of *tree*: that tree first on PYTHONPATH, quick mode, the tag."""
    old = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=str(tree) + (os.pathsep + old if old else ""), VMLAB_QUICK="1",
               PYTHONUNBUFFERED="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    env[TAG_VAR] = tag
    env.update(extra or {})
    return env


def tagged_qemus(tag: str) -> List[int]:
    """QEMU processes whose environment carries *tag* (started by a kernel of this benchmark)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "comm").read_text().startswith("qemu"):
                continue
            if f"{TAG_VAR}={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def reap_qemus(tag: str, within: float = 30.0) -> List[int]:
    """Wait up to *within* s for our QEMUs to go (they die with their kernel); kill and return any left."""
    deadline = time.monotonic() + within
    left = tagged_qemus(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = tagged_qemus(tag)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def _shutdown(km: Any) -> None:
    """Stop the notebook's kernel process (nbclient leaves a kernel manager it did not create running)."""
    from jupyter_core.utils import run_sync
    try:
        if run_sync(km.is_alive)():
            run_sync(km.shutdown_kernel)(now=True)
    except Exception as exc:      # reported, not hidden: the figures still stand, the leak is named
        _print(f"could not stop the kernel of a lesson run: {type(exc).__name__}: {exc}")


def run_notebook(path: Path, *, tree: Path, label: str, tag: str, timeout: int = TIMEOUT,
                 env_extra: Optional[Dict[str, str]] = None) -> NotebookRun:
    """Execute one notebook in a fresh kernel (cwd = its folder, *tree* first on PYTHONPATH), timing every code
    cell. Never raises for a failing cell: the run's ``error`` names the cell and the error."""
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    raw = path.read_bytes()
    nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    lesson_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE_CELL))
    started: Dict[int, float] = {}
    took: Dict[int, float] = {}
    current: List[int] = [-1]

    def before(cell: Any, cell_index: int, **_: Any) -> None:
        current[0] = cell_index
        started[cell_index] = time.monotonic()

    def after(cell: Any, cell_index: int, **_: Any) -> None:
        took[cell_index] = time.monotonic() - started[cell_index]

    sockets = Path(tempfile.mkdtemp(prefix="vmlab-kernel-"))     # 0700: the kernel's sockets, not TCP
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(sockets / "kernel"))
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_execute=before, on_cell_executed=after)
    run = NotebookRun(notebook=path.name, tree=label, seconds=float("nan"), sha256=hashlib.sha256(raw).hexdigest()[:12])
    t0 = time.monotonic()
    try:
        client.execute(env=kernel_env(tree, tag, env_extra), cwd=str(path.parent))
    except CellExecutionError as exc:
        i = current[0]
        src = first_line(nb.cells[i].source) if 0 <= i < len(nb.cells) else ""
        what = f"{getattr(exc, 'ename', type(exc).__name__)}: {getattr(exc, 'evalue', '')}".strip()
        run.error = f"{label} {path.name}: cell {i} ({src!r}) failed: {what}"
    except Exception as exc:   # a timeout, a dead kernel: reported as this notebook's failure
        i = current[0]
        run.error = f"{label} {path.name}: cell {i} did not finish: {type(exc).__name__}: {exc}"
    finally:
        _shutdown(km)        # a kernel manager handed to NotebookClient is not shut down by it
        run.qemu_left = reap_qemus(tag)
        shutil.rmtree(sockets, ignore_errors=True)
    last = max((i for i in took if i < lesson_cells), default=None)
    run.seconds = (started[last] + took[last] - t0) if last is not None else time.monotonic() - t0
    run.cells = [CellTime(path.name, i, first_line(nb.cells[i].source), took[i])
                 for i in sorted(took) if i < lesson_cells]
    for out in nb.cells[-1].get("outputs", []):
        for line in (out.get("text") or "").splitlines():
            if line.startswith(PROBE_MARK):
                run.vmlab_file = json.loads(line[len(PROBE_MARK):])["vmlab"]
    want = (tree / "vmlab" / "__init__.py").resolve()
    if run.error is None and Path(run.vmlab_file or "/nonexistent").resolve() != want:
        run.error = (f"{label} {path.name}: the kernel imported vmlab from {run.vmlab_file or '(no probe output)'}, "
                     f"not from {want}: PYTHONPATH did not put the tree first")
    if run.error is None and run.qemu_left:
        run.error = f"{label} {path.name}: QEMU {run.qemu_left} outlived the kernel (killed)"
    return run


# ------------------------------------------------------------------------------------------- the baseline tree
def has_commit(repo: Path, commit: str) -> bool:
    p = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return p.returncode == 0


@contextlib.contextmanager
def baseline_tree(repo: Path = ROOT, commit: str = BASELINE) -> Iterator[Tuple[Optional[Path], str]]:
    """A throw-away copy of *commit*'s files (``git archive``), removed on exit: (path, "") or (None, why not)."""
    if not has_commit(repo, commit):
        yield None, (f"commit {commit} (the baseline of issue 18) is not in {repo} (a shallow clone?): "
                     f"git fetch --unshallow, then run again")
        return
    tmp = Path(tempfile.mkdtemp(prefix="vmlab-baseline-"))
    try:
        tree = tmp / commit
        tree.mkdir()
        archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit],
                                   stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {commit} failed (exit {archive.returncode})")
        yield tree, ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def baseline_cache(shared: Path, commit: str = BASELINE) -> Tuple[Path, bool]:
    """The baseline's own vmlab cache (kept between runs), its downloads hard-linked from the shared cache."""
    cache = shared / f"bench-baseline-{commit}"
    fresh = not (cache / "images").is_dir()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    src, dst = shared / "downloads", cache / "downloads"
    if src.is_dir():
        dst.mkdir(mode=0o700, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and not (dst / f.name).exists():
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)
    return cache, fresh


def warm_up(tree: Path, tag: str, env_extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The tree's set-up (guest image, KVM verdict) before any timing, with that tree's code: what it cost."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WARMUP], cwd=str(tree / "notebooks"), capture_output=True, text=True,
                       env=kernel_env(tree, tag, env_extra), timeout=1800)
    seconds = time.monotonic() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(PROBE_MARK)]
    if p.returncode != 0 or not lines:
        raise LessonRunError(f"set-up of {tree} failed (exit {p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
    info: Dict[str, Any] = json.loads(lines[-1][len(PROBE_MARK):])
    info["seconds"] = round(seconds, 1)
    if Path(info["vmlab"]).resolve() != (tree / "vmlab" / "__init__.py").resolve():
        raise LessonRunError(f"set-up of {tree} imported vmlab from {info['vmlab']}: PYTHONPATH did not put it first")
    return info


# --------------------------------------------------------------------------------------------------- figures
def figures(rounds: List[Dict[str, List[NotebookRun]]], baseline_missing: str = "") -> Dict[str, Any]:
    """The judged figures from each round's runs ({"baseline": [...], "current": [...]}): one sample per round."""
    base_s: List[float] = []
    same_s: List[float] = []
    ratio: List[float] = []
    all_s: List[float] = []
    slow: List[float] = []
    base_err: List[str] = []
    cur_err: List[str] = []
    for rnd in rounds:
        base, cur = rnd.get("baseline", []), rnd.get("current", [])
        base_err += [r.error for r in base if r.error]
        cur_err += [r.error for r in cur if r.error]
        shared = {r.notebook[:5] for r in base}
        all_s.append(sum(r.seconds for r in cur))
        cells = [c for r in cur for c in r.cells]
        slow.append(max((c.seconds for c in cells), default=float("nan")))
        if base:
            b = sum(r.seconds for r in base)
            s = sum(r.seconds for r in cur if r.notebook[:5] in shared)
            base_s.append(b)
            same_s.append(s)
            ratio.append(s / b if b else float("nan"))
    out: Dict[str, Any] = {}
    cur_fail = Failed("; ".join(cur_err)) if cur_err else None
    both_fail = Failed("; ".join(base_err + cur_err)) if (base_err or cur_err) else None
    out["lessons_all_s"] = cur_fail or all_s
    out["slowest_cell_s"] = cur_fail or slow
    if baseline_missing:
        for k in ("lessons_baseline_s", "lessons_same_nine_s", "lessons_vs_baseline"):
            out[k] = Skipped(baseline_missing)
    else:
        out["lessons_baseline_s"] = Failed("; ".join(base_err)) if base_err else base_s
        out["lessons_same_nine_s"] = cur_fail or same_s
        out["lessons_vs_baseline"] = both_fail or ratio
    return out


def detail(rounds: List[Dict[str, List[NotebookRun]]], top: int = 10) -> Dict[str, Any]:
    """Per lesson and tree: seconds and slowest cells; the *top* slowest current cells of the whole run."""
    per: List[Dict[str, Any]] = []
    for n, rnd in enumerate(rounds):
        for label, runs in rnd.items():
            for r in runs:
                per.append({"round": n, "tree": label, "notebook": r.notebook, "seconds": round(r.seconds, 2),
                            "cell_seconds": round(r.cell_seconds, 2), "code_cells": len(r.cells),
                            "vmlab": r.vmlab_file, "sha256": r.sha256, "error": r.error, "qemu_left": r.qemu_left,
                            "slowest": [asdict(c) for c in r.slowest(3)]})
    cur = [c for rnd in rounds for r in rnd.get("current", []) for c in r.cells]
    return {"per_lesson": per,
            "slowest_current_cells": [asdict(c) for c in sorted(cur, key=lambda c: c.seconds, reverse=True)[:top]]}


def tree_state(repo: Path = ROOT) -> Dict[str, Any]:
    """The commit and the uncommitted changes of the lessons and the package (a shared work tree moves)."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--porcelain", "--", "notebooks", "vmlab").splitlines()}


def _print(msg: str) -> None:
    print(f"   {msg}", flush=True)


def measure(quick: bool = False) -> Dict[str, Any]:
    from vmlab.config import cache_dir
    from vmlab.hostinfo import where

    load_before = os.getloadavg()
    n_rounds = 1 if quick else 2
    tag = uuid.uuid4().hex
    current = lesson_notebooks(ROOT)
    rounds: List[Dict[str, List[NotebookRun]]] = []
    setup_info: Dict[str, Any] = {}
    state_before = tree_state()
    with baseline_tree() as (base_tree, missing):
        base_env: Dict[str, str] = {}
        base_nbs: Dict[str, Path] = {}
        if base_tree is not None:
            cache, fresh = baseline_cache(cache_dir())
            base_env = {"VMLAB_CACHE": str(cache)}
            base_nbs = {p.name[:5]: p for p in lesson_notebooks(base_tree)}
            setup_info["baseline"] = {**warm_up(base_tree, tag, base_env), "cache": str(cache),
                                      "baseline_cache_fresh": fresh}
            _print(f"baseline {BASELINE} set-up: {setup_info['baseline']['seconds']} s "
                   f"(image {setup_info['baseline']['image_s']:.1f} s, KVM verdict "
                   f"{setup_info['baseline']['kvm_verdict_s']:.1f} s; cache {cache}{', fresh' if fresh else ''})")
        setup_info["current"] = warm_up(ROOT, tag)
        _print(f"current set-up: {setup_info['current']['seconds']} s")
        for n in range(n_rounds):
            rnd: Dict[str, List[NotebookRun]] = {"baseline": [], "current": []}
            order = sorted(current, key=lambda p: (p.name[:5] not in base_nbs, p.name))
            for p in order:
                if p.name[:5] in base_nbs and base_tree is not None:
                    b = run_notebook(base_nbs[p.name[:5]], tree=base_tree, label="baseline", tag=tag,
                                     env_extra=base_env)
                    rnd["baseline"].append(b)
                    _print(f"round {n + 1} baseline {b.notebook}: {b.seconds:.1f} s" + (f"  {b.error}" if b.error else ""))
                c = run_notebook(p, tree=ROOT, label="current", tag=tag)
                rnd["current"].append(c)
                top = c.slowest(1)
                _print(f"round {n + 1} current  {c.notebook}: {c.seconds:.1f} s"
                       + (f" (slowest cell #{top[0].index} {top[0].seconds:.1f} s)" if top else "")
                       + (f"  {c.error}" if c.error else ""))
            rounds.append(rnd)
    out = figures(rounds, missing)
    accel = "kvm" if setup_info["current"].get("kvm_usable") else "tcg"
    out["_lessons"] = detail(rounds)
    _print("slowest current cells (the JSON has every lesson's):")
    for c in out["_lessons"]["slowest_current_cells"]:
        _print(f"  {c['seconds']:6.1f} s  {c['notebook']} cell {c['index']}: {c['first_line'][:70]}")
    out["_setup"] = setup_info
    out["_baseline"] = {"commit": BASELINE, "missing": missing}
    out["_current_tree"] = {"before": state_before, "after": tree_state()}
    out["_where"] = where(accel, setup_info["current"].get("kernel", ""))
    out["_load_avg"] = [*load_before, *os.getloadavg()]
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["lessons", *sys.argv[1:]]))
