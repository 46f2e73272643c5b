"""The glossary (notebooks/glossary/Glossary.ipynb): every entry complete, every glossary link in every notebook
resolves to an anchor, every lesson the glossary names exists. Reads files only: no kernel, no VM."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import nbformat
import pytest

from vmlab import lessons

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
GLOSSARY = NB_DIR / lessons.GLOSSARY
ANCHOR = re.compile(r'<a id="([a-z0-9-]+)"></a>')
LINK = re.compile(r"\]\([^)#\s]*Glossary\.ipynb#([^)\s]*)\)")
NOTEBOOKS = sorted(p for p in NB_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _markdown(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "markdown"]


@functools.cache
def anchors() -> tuple[str, ...]:
    return tuple(a for src in _markdown(GLOSSARY) for a in ANCHOR.findall(src))


def test_anchors_are_unique_and_each_entry_is_complete():
    found = anchors()
    assert len(found) >= 40 and len(found) == len(set(found)), "one <a id> per entry, no duplicates"
    for src in _markdown(GLOSSARY)[1:]:
        a = ANCHOR.findall(src)
        assert len(a) == 1, f"one anchor per entry cell: {src[:80]!r}"
        assert re.search(r"^### \S", src, re.M), f"{a[0]}: a '### Term' heading"
        assert "**Korean:**" in src and re.search(r"[\uac00-\ud7a3]", src), f"{a[0]}: the Korean term"
        assert "**Measured in:**" in src, f"{a[0]}: the lesson that measures it"


def test_the_title_lists_every_term():
    title = _markdown(GLOSSARY)[0]
    for a in anchors():
        assert f"(#{a})" in title, f"the glossary's first cell links #{a}"


def test_lessons_named_in_the_glossary_exist():
    for src in _markdown(GLOSSARY):
        for target in re.findall(r"\]\(\.\./([^)#]+\.ipynb)", src):
            assert (NB_DIR / target).exists(), f"the glossary links {target}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(NB_DIR)))
def test_every_glossary_link_resolves(path):
    known = set(anchors())
    for i, src in enumerate(_markdown(path)):
        for anchor in LINK.findall(src):
            where = f"{path.name} markdown cell {i}: Glossary.ipynb#{anchor}"
            assert anchor in known, f"{where}: no such anchor (known: {', '.join(sorted(known))})"
        for m in re.finditer(r"\]\(([^)#\s]*Glossary\.ipynb)#", src):
            assert (path.parent / m.group(1)).resolve() == GLOSSARY.resolve(), (
                f"{path.name} cell {i}: {m.group(1)} does not point at {GLOSSARY.relative_to(NB_DIR)} "
                "(from notebooks/ write glossary/Glossary.ipynb#ID, from notebooks/demo/ ../glossary/Glossary.ipynb#ID)")


def test_lessons_link_the_glossary():
    linked = {p.name for p in lessons.numbered_notebooks(NB_DIR)
              if any(LINK.search(src) for src in _markdown(p))}
    assert "01.00-What-a-VM-Needs.ipynb" in linked and "03.02-Hardware-Assisted-Virtualization.ipynb" in linked


def test_the_glossary_renders_to_html_with_its_anchors(tmp_path):
    """make lessons writes build/lessons/glossary/Glossary.html: anchors kept, lesson links point at .html files."""
    out = lessons.render_static(GLOSSARY, tmp_path / "glossary" / "Glossary.html")
    page = out.read_text(encoding="utf-8")
    for a in anchors():
        assert f'id="{a}"' in page, a
    assert "../03.02-Hardware-Assisted-Virtualization.html" in page and ".ipynb" not in page.replace("ipynb_", "")
