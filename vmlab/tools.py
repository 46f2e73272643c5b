"""Host tools: find one (the error names the Debian package) and run one (the error says why).

Layer 2: imports only :mod:`vmlab.errors`. Used by the image builder (gcc, depmod, dpkg-deb,
apt-get, zstd, busybox) and the disk helpers (qemu-img, qemu-io, e2fsprogs)::

    gcc = need_tool("gcc")                       # SetupError "... fix: apt-get install gcc libc6-dev"
    run_tool([gcc, "--version"], what="gcc --version", error=SetupError)

A failing run raises ``error`` (default :class:`ToolError`) whose message names what was being
done, the exit status, the command and the tail of its stderr; the exception it wraps is kept
as ``__cause__``. Add a tool's package to :data:`PACKAGES` when vmlab starts to use one.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal, Optional, Sequence, Union, overload

from . import config
from .errors import SetupError, ToolError, VMLabError

__all__ = ["PACKAGES", "find_tool", "need_tool", "run_tool", "tail"]

#: tool -> the Debian package(s) that install it (the fix of a "not installed" error)
PACKAGES: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "bc": "bc",
    "bison": "bison",
    "busybox": "busybox-static",
    "debugfs": "e2fsprogs",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "e2fsck": "e2fsprogs",
    "flex": "flex",
    "gcc": "gcc libc6-dev",
    "lz4": "lz4",
    "make": "make",
    "mke2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "setpriv": "util-linux",
    "zstd": "zstd",
}

# a normal user's PATH often lacks the sbin directories (depmod, mke2fs, e2fsck live there)
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

Arg = Union[str, "os.PathLike[str]"]


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of ``text`` (trailing blank space dropped)."""
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def find_tool(name: str) -> Optional[str]:
    """Path of ``name``: shutil.which, then the sbin/bin dirs a user's PATH may lack; or None."""
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_DIRS:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def need_tool(name: str, package: Optional[str] = None, *, needed_for: str = "") -> str:
    """Path of ``name``, or SetupError naming the package to install (``package`` or
    :data:`PACKAGES`) and, if given, what it is ``needed_for``."""
    path = find_tool(name)
    if path:
        return path
    pkg = package or PACKAGES.get(name, name)
    why = f" (needed {needed_for})" if needed_for else ""
    raise SetupError(f"the tool {name!r} is not installed{why}", fix=f"apt-get install {pkg}")


def _text(out: Union[str, bytes, None]) -> str:
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


@overload
def run_tool(cmd: Sequence[Arg], *, what: str, fix: Optional[str] = ..., ok: Sequence[int] = ...,
             cwd: Optional[Path] = ..., input: Optional[bytes] = ..., timeout: float = ...,
             text: Literal[False] = ..., error: type[VMLabError] = ...) -> subprocess.CompletedProcess[bytes]: ...


@overload
def run_tool(cmd: Sequence[Arg], *, what: str, fix: Optional[str] = ..., ok: Sequence[int] = ...,
             cwd: Optional[Path] = ..., input: Optional[bytes] = ..., timeout: float = ...,
             text: Literal[True], error: type[VMLabError] = ...) -> subprocess.CompletedProcess[str]: ...


def run_tool(cmd: Sequence[Arg], *, what: str, fix: Optional[str] = None, ok: Sequence[int] = (0,),
             cwd: Optional[Path] = None, input: Optional[bytes] = None, timeout: float = 600,
             text: bool = False, error: type[VMLabError] = ToolError
             ) -> Union[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[str]]:
    """Run ``cmd`` (output captured); an exit status outside ``ok`` or a timeout raises ``error``.

    ``what`` says what was being done ("compiling vmagent.c"); ``fix`` is the remedy shown.
    A program that does not exist raises SetupError. A :class:`ToolError` subclass as
    ``error`` also gets ``.stderr``, ``.command`` and ``.exit_code``; any other class gets the
    stderr tail in its message.
    """
    argv = [os.fspath(c) for c in cmd]
    prog = os.path.basename(argv[0])
    try:
        proc = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, timeout=timeout,
                              check=False, text=text)
    except FileNotFoundError as exc:
        pkg = PACKAGES.get(prog)
        raise SetupError(f"{what}: the program {argv[0]!r} is not installed",
                         fix=fix or (f"apt-get install {pkg}" if pkg else None)) from exc
    except subprocess.TimeoutExpired as exc:
        raise _error(error, f"{what}: {prog} did not finish in {timeout:g} s", fix, argv, None,
                     _text(exc.stderr)) from exc
    except OSError as exc:
        raise error(f"{what}: cannot run {argv[0]}: {exc}", fix=fix) from exc
    if proc.returncode not in ok:
        detail = _text(proc.stderr) or _text(proc.stdout)
        msg = f"{what} failed (exit status {proc.returncode}): {' '.join(argv)}"
        raise _error(error, msg, fix, argv, proc.returncode, detail)
    return proc


def _error(error: type[VMLabError], message: str, fix: Optional[str], argv: list[str],
           exit_code: Optional[int], detail: str) -> VMLabError:
    if issubclass(error, ToolError):
        return error(message, fix=fix, stderr=detail, command=argv, exit_code=exit_code)
    short = tail(detail)
    if short:
        message += "\n    " + short.replace("\n", "\n    ")
    return error(message, fix=fix)


# QEMU itself: found here (the bottom layer) so that hostinfo and the VM driver share one lookup.
def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (``$VMLAB_QEMU`` overrides)."""
    name = config.qemu_binary()
    path = shutil.which(name)
    if not path:
        raise SetupError(f"QEMU is not installed: {name!r} is not on PATH",
                         fix="apt-get install qemu-system-x86 qemu-utils (or run `make setup`); "
                             "or set VMLAB_QEMU to the binary")
    return path


@functools.lru_cache(maxsize=8)
def _version_of(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run {path} --version: {exc}",
                         fix="reinstall QEMU: apt-get install --reinstall qemu-system-x86") from exc
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise SetupError(f"{path} did not report a version ({out.strip()[:80]!r})",
                         fix="point VMLAB_QEMU at a qemu-system-x86_64 binary")
    return m.group(1)


def qemu_version() -> str:
    """The version of the QEMU binary vmlab uses, e.g. ``"7.2.15"``."""
    return _version_of(qemu_binary())


def qemu_img() -> str:
    """Path of qemu-img."""
    path = shutil.which("qemu-img")
    if not path:
        raise SetupError("qemu-img is not installed", fix="apt-get install qemu-utils")
    return path
