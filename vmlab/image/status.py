"""What ``doctor`` and ``python -m vmlab image status`` show: :func:`image_status`.

It never builds or downloads anything: it checks the host's tools, resolves the kernel
without downloading, computes the key and checks the cached image.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

from .. import config
from ..errors import SetupError, VMLabError
from ..tools import find_tool, need_tool
from .build import image_inputs, image_key
from .busybox import guest_busybox
from .cache import check_cached, check_writable, images_dir
from .guesttools import check_guest_dir, find_busybox, gcc_version
from .kernel import resolve_kernel
from .util import resolve_guest_dir, umask

_NEEDED = "to build the guest image"


def image_status(*, guest_dir: Path | None = None) -> dict[str, Any]:
    """What a ``doctor`` command shows; never builds or downloads anything.

    Keys: ``built``, ``path``, ``kernel_version``, ``key``, ``cache_dir``, ``problems``
    (a list of ``{"problem", "fix"}``), and when known ``kernel_package``, ``note``,
    ``sizes``, ``modules_missing``.
    """
    with umask(0o077):
        return _image_status(guest_dir)


def _host_problems(gdir: Path, problems: list[dict[str, str]]) -> None:
    """Append a problem for each missing tool; stops at the first missing group."""
    def problem(exc: VMLabError) -> None:
        problems.append({"problem": exc.message, "fix": exc.fix or ""})

    checks: list[Callable[[], object]] = [
        lambda: check_guest_dir(gdir), find_busybox, gcc_version,
        lambda: need_tool("depmod", needed_for=_NEEDED)]
    ok = True
    for fn in checks:
        try:
            fn()
        except SetupError as exc:
            problem(exc)
            ok = False
    if ok and not config.kernel_file():
        try:
            need_tool("dpkg-deb", needed_for=_NEEDED)
            need_tool("apt-get", needed_for=_NEEDED)
        except SetupError as exc:
            problem(exc)
            ok = False
    if ok and not problems:
        libc = subprocess.run([find_tool("gcc") or "gcc", "-print-file-name=libc.a"],
                              capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(libc):
            problems.append({"problem": "the static C library (libc.a) is missing",
                             "fix": "apt-get install gcc libc6-dev"})


def _image_status(guest_dir: Optional[Path]) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    status: dict[str, Any] = {"built": False, "path": None, "kernel_version": None, "key": None,
                              "problems": problems}
    gdir = resolve_guest_dir(guest_dir)
    try:
        status["cache_dir"] = str(config.cache_dir())
        check_writable(Path(status["cache_dir"]))
    except SetupError as exc:
        problems.append({"problem": exc.message, "fix": exc.fix or ""})
    _host_problems(gdir, problems)
    if problems:
        return status
    try:
        kernel = resolve_kernel(None, download=False)
        status["kernel_version"] = kernel.version
        status["kernel_kind"] = kernel.kind
        if kernel.kind == "lesson" and kernel.lesson is not None and not kernel.lesson.built():
            status["note"] = (f"the lesson kernel {kernel.version} is not built yet; `python -m vmlab image build` "
                              f"will build it from {kernel.package} {kernel.package_version} (about 8 min on two "
                              "cores, once)")
        if kernel.kind == "debian":
            status["kernel_package"] = f"{kernel.package} {kernel.package_version}"
            if kernel.deb is None:
                status["note"] = (f"{kernel.package} is not downloaded yet; "
                                  "`python -m vmlab image build` will fetch it (~70 MB)")
                return status
        busybox = guest_busybox(None, build=False)
        status["busybox"] = busybox.describe()
        if busybox.pending:
            status["note"] = (status["note"] + "; " if status.get("note") else "") + \
                "the guest's busybox (musl) is not built yet; `python -m vmlab image build` builds it (about 40 s)"
            return status
        if busybox.fallback and not status.get("note"):
            status["note"] = f"the guest gets Debian's glibc busybox: {busybox.fallback}"
        key = image_key(image_inputs(kernel, busybox.path, gdir, gcc_version()))
        status["key"] = key
        root = images_dir() / key
        manifest, why = check_cached(root, key, config.verify_image())
        if manifest is not None:
            status.update(built=True, path=str(root),
                          sizes={k: v["size"] for k, v in manifest["outputs"].items()},
                          modules_missing=manifest.get("modules_missing", []))
        elif root.exists():
            problems.append({"problem": f"the cached image {root} is damaged ({why})",
                             "fix": "python -m vmlab image build --force"})
    except SetupError as exc:
        problems.append({"problem": exc.message, "fix": exc.fix or ""})
    return status
