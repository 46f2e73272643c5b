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


ROOT = Path(__file__).resolve().parent.parent
SUMMARY_DIR = ROOT / "build" / "test-summary"    # tables written by the tests of this run, printed at its end

# `make test` runs two passes: `pytest -n 2 -m "not serial"` (two workers, `--dist loadfile`: a file stays on one
# worker, so its module-scoped guests boot once), then
# `pytest -m serial`. These modules are the serial ones: they measure contention between VMs for the host's cores
# (another worker's guests would be part of what they measure), or run a hub whose load test counts the
# machine's QEMU processes and memory per student.
SERIAL_MODULES = {"test_classroom", "test_hosted_sharing", "test_cpu_platform"}


@pytest.hookimpl(tryfirst=True)
def copy_builds(dest_cache: Path, *, link: bool = False) -> None:
    """Put the built lesson kernels and guest busybox of this cache into *dest_cache* (hard links with *link*), so
    that a test's fresh cache builds its image in seconds instead of compiling them again (8 minutes, 40 s)."""
    import shutil

    from vmlab.config import cache_dir

    def hardlink(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    for sub in ("kernels", "busybox"):
        for d in (cache_dir() / sub).glob("[0-9a-f]*"):
            if (d / "build.json").is_file():
                shutil.copytree(d, dest_cache / sub / d.name, symlinks=True,
                                copy_function=hardlink if link else shutil.copy2)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


def pytest_sessionstart(session):
    session.config._vmlab_started = time.time()  # type: ignore[attr-defined]


def summary_table(config: pytest.Config, name: str, title: str, lines: list) -> None:
    """A table (title, lines) printed at the end of the run, also from an xdist worker (through a file)."""
    SUMMARY_DIR.mkdir(parents=True, exist_ok=True)
    (SUMMARY_DIR / f"{name}.txt").write_text("\n".join([title, *lines]) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    started = getattr(config, "_vmlab_started", 0.0)
    for path in sorted(SUMMARY_DIR.glob("*.txt")) if SUMMARY_DIR.is_dir() else []:
        if path.stat().st_mtime < started:
            continue        # from an earlier run
        title, *lines = path.read_text().splitlines()
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
