"""Shared fixtures. After every test, no QEMU started by this test process may remain."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# A widget handler's failure raises in tests (vmlab.widgets.errors); a learner's session only shows and logs it.
# Child processes (notebook kernels, Jupyter servers in the browser test) inherit it.
os.environ.setdefault("VMLAB_STRICT", "1")


def qemu_children(parent: int | None = None) -> list[int]:
    """PIDs of QEMU processes whose parent is *parent* (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == parent and comm.startswith("qemu"):
            found.append(int(d.name))
    return found


def summary_tables(config: pytest.Config) -> list:
    """Tables (title, lines) a test module wants printed at the end of the run (e.g. notebook timings)."""
    if not hasattr(config, "_vmlab_tables"):
        config._vmlab_tables = []  # type: ignore[attr-defined]
    return config._vmlab_tables  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, lines in summary_tables(config):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def no_qemu_left_behind():
    yield
    deadline = time.monotonic() + 2.0
    left = qemu_children()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = qemu_children()
    if left:
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"QEMU processes left running after the test: {left}")


@pytest.fixture(scope="session")
def image():
    """The lesson guest image (built once, cached)."""
    from vmlab.image import ensure_image
    return ensure_image()


@pytest.fixture
def vm(image):
    """A booted default lesson guest under TCG, shut down after the test."""
    from vmlab import VM
    with VM(accel="tcg", image=image, name="test") as v:
        yield v
