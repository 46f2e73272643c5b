"""The house rules (docs/developers.md): imports only go down the layers, no circle, small modules, clean lint.

The layer of a module is the first row of LAYERS whose prefix matches its dotted name. An import from a
module to a module of a higher layer fails, wherever it is written (module top or inside a function), and so
does any import circle, even within one layer.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vmlab"

# (layer number, module prefixes) — bottom first. Must match docs/developers.md.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (1, ("vmlab.errors", "vmlab.config", "vmlab.log")),
    (2, ("vmlab.procfs", "vmlab.tools", "vmlab.hostinfo", "vmlab.spec", "vmlab.measure", "vmlab.plots",
         "vmlab.i18n", "vmlab.predictions_store")),
    (3, ("vmlab.image",)),
    (4, ("vmlab.vm",)),
    (5, ("vmlab.devices", "vmlab.disks", "vmlab.install", "vmlab.netsink", "vmlab.hostview",
         "vmlab.guestinfo", "vmlab.nested")),
    (6, ("vmlab.experiments",)),
    (7, ("vmlab.widgets",)),
    (8, ("vmlab.lessons", "vmlab.workspace", "vmlab.cli", "vmlab.__main__", "vmlab.classroom", "vmlab.facts",
         "vmlab.edition")),
    (9, ("vmlab",)),  # the package's __init__ re-exports the public API
]

MAX_LINES = 620


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(name: str) -> int:
    for number, prefixes in LAYERS:
        for prefix in prefixes:
            if name == prefix or (prefix != "vmlab" and name.startswith(prefix + ".")):
                return number
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and to docs/developers.md")


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, is_package, node)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("vmlab"):
                continue
            # the longest known module that is a prefix of the target
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    g = {}
    for name, path in known.items():
        deps = imports_of(name, path, known)
        # importing a package runs its __init__, but a submodule importing its own package's siblings
        # through the package name is not an edge to the package's re-exports
        g[name] = {d for d in deps if not name.startswith(d + ".")}
    return g


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_only_go_down():
    upward = []
    for name, deps in graph().items():
        for d in deps:
            if layer_of(d) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {d} (layer {layer_of(d)})")
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    g = graph()
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if seen.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[n] = 2

    for n in sorted(g):
        if n not in seen:
            visit(n)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_are_small():
    long = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    too_long = {n: c for n, c in long.items() if c > MAX_LINES}
    assert not too_long, f"modules longer than {MAX_LINES} lines: {too_long}"


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make setup` (it comes with the dev extras)")
    return found


def test_ruff_clean():
    r = subprocess.run([_tool("ruff"), "check", "vmlab", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean():
    r = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr
