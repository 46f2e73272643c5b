"""The learner's copy of the lessons: ``make lab`` and ``make demo`` serve it, so the tracked ``notebooks/`` (the
course's source) are never saved into, and ``make test`` and ``git status`` stay clean after a lesson.

    python -m vmlab.lessons workspace [--to DIR]     # default: workspace/ in the repository (ignored by git)

Refreshing follows nbgitpuller's rule: what the learner changed is never overwritten (see :func:`sync_workspace`).
Also here: :func:`drop_widget_views`, the Jupyter pre-save hook that keeps widget views out of saved notebooks
(etc/jupyter/jupyter_server_config.json).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .config import atomic_write
from .errors import SetupError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WORKSPACE = ROOT / "workspace"
WORKSPACE_MANIFEST = ".vmlab-workspace.json"


def kernel_metadata() -> Dict[str, Any]:
    """The notebook metadata JupyterLab writes as soon as this environment's python3 kernel connects; a lesson
    copied with it is not marked unsaved the moment it opens."""
    display_name = "Python 3 (ipykernel)"
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        display_name = KernelSpecManager().get_kernel_spec("python3").display_name
    except Exception:  # no jupyter_client or no kernelspec: JupyterLab's default name
        pass
    major = sys.version_info[0]
    return {"kernelspec": {"name": "python3", "display_name": display_name, "language": "python"},
            "language_info": {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                              "codemirror_mode": {"name": "ipython", "version": major},
                              "pygments_lexer": f"ipython{major}", "nbconvert_exporter": "python",
                              "file_extension": ".py"}}


def lesson_digest(path: Path) -> str:
    """What a learner edits in a lesson: its cells' kinds and sources (not outputs, counts or metadata)."""
    if path.suffix != ".ipynb":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [(c.get("cell_type"), "".join(c.get("source", ""))) for c in nb.get("cells", [])]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def _copy_lesson(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix != ".ipynb":
        shutil.copyfile(src, dest)
        return
    nb = json.loads(src.read_text(encoding="utf-8"))
    nb.setdefault("metadata", {}).update(kernel_metadata())
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(dest)


def sync_workspace(source: Path = NOTEBOOKS, workspace: Path = WORKSPACE) -> List[Tuple[str, str]]:
    """Bring the learner's ``workspace`` up to date with the course's ``source`` notebooks; returns
    (file, what happened) pairs. A lesson is

    * copied when the workspace lacks it (new, or deleted by the learner: restored, as nbgitpuller does);
    * replaced by the course's new version when the learner has not edited it (outputs alone are not edits);
    * kept as it is when the learner edited it; if the course changed it too, the course's version is written
      beside it as ``NAME.course-update.ipynb``.

    The manifest ``.vmlab-workspace.json`` remembers what was last copied. Copies carry this environment's
    kernel metadata (see :func:`kernel_metadata`).
    """
    source, workspace = Path(source), Path(workspace)
    if not source.is_dir():
        raise SetupError(f"the course's notebooks are not at {source}", fix="run from the vmlab repository")
    workspace.mkdir(parents=True, exist_ok=True)
    mpath = workspace / WORKSPACE_MANIFEST
    try:
        manifest: Dict[str, str] = json.loads(mpath.read_text()) if mpath.exists() else {}
    except ValueError:
        manifest = {}
    report: List[Tuple[str, str]] = []
    for src in sorted(p for p in source.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts):
        rel = src.relative_to(source).as_posix()
        dest = workspace / rel
        new, last = lesson_digest(src), manifest.get(rel)
        if not dest.exists():
            _copy_lesson(src, dest)
            action = "restored" if last else "new"
        else:
            mine = lesson_digest(dest)
            if mine == new:
                action = "up to date"
            elif last is not None and mine == last:
                _copy_lesson(src, dest)
                action = "updated"
            elif last == new:
                action = "kept (your edits)"
            else:
                side = dest.with_name(f"{dest.stem}.course-update{dest.suffix}")
                _copy_lesson(src, side)
                action = f"kept (your edits); the course's new version is {side.name}"
                new = last if last is not None else new
        manifest[rel] = new
        report.append((rel, action))
    atomic_write(mpath, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return report


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_widget_views(model: Dict[str, Any], **_kw: Any) -> None:
    """A Jupyter pre-save hook (etc/jupyter/jupyter_server_config.json): a saved notebook keeps its tables and
    plots but not its widget views, which point at objects of a kernel that will be gone when it is reopened
    ("Error displaying widget: model not found"). Rerunning the cell brings the widget back."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    nb = model["content"]
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = [o for o in cell.get("outputs", []) if WIDGET_VIEW not in (o.get("data") or {})]
    (nb.get("metadata") or {}).pop("widgets", None)
