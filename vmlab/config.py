"""Configuration and paths: every ``VMLAB_*`` variable, the cache, the private runtime root.

Bottom layer: imports only :mod:`vmlab.errors`. Every function reads the environment when it is
called (never at import time), so a test or a notebook can change a variable and see the effect.

Environment variables (all optional):

======================== ================================================== =====================
variable                 meaning                                            read by
======================== ================================================== =====================
``VMLAB_CACHE``          cache directory (images, downloads, warm           :func:`cache_dir`
                         snapshots, KVM verdicts, the native vmbench);
                         default ``$XDG_CACHE_HOME/vmlab`` or
                         ``~/.cache/vmlab``
``VMLAB_QEMU``           the ``qemu-system-x86_64`` binary (name or path)   :func:`qemu_binary`
``VMLAB_ACCEL``          ``tcg`` or ``kvm``: what ``accel="auto"`` means     :func:`accel_override`
``VMLAB_GUEST_KERNEL``   ``lesson`` (default): the kernel vmlab builds for   :func:`guest_kernel`
                         the lesson guest from Debian's source package;
                         ``debian``: Debian's packaged generic kernel
``VMLAB_KERNEL``         a kernel file (vmlinuz or vmlinux) instead of      :func:`kernel_file`
                         either
``VMLAB_KERNEL_MODULES`` that kernel's ``/lib/modules/<version>`` directory :func:`kernel_modules_dir`
``VMLAB_BUSYBOX``        the static busybox put into the guest image;        :func:`busybox_override`
                         ``debian``: the host's busybox-static; unset:
                         vmlab's musl build (vmlab.image.busybox)
``VMLAB_DEBIAN_MIRROR``  the Debian archive the busybox source comes from   :func:`debian_mirror`
                         (default http://deb.debian.org/debian)
``VMLAB_VERIFY_IMAGE``   ``1``: check a cached image's sha256 on every use  :func:`verify_image`
``VMLAB_QUICK``          ``1``: lessons run small sizes and few repeats;    :func:`quick`
                         ``0``: full sizes; unset: quick in an interactive
                         Jupyter kernel, full elsewhere (scripts, the CLI)
``VMLAB_LOG``            ``debug``, ``info`` or ``warning``: show the        :func:`log_level`
                         ``vmlab`` logger on stderr (quiet when unset)
``VMLAB_CLASS_STORE``    on a JupyterHub: where predictions go, a           :func:`class_store`
                         directory (one file per student) or the URL of
                         the class predictions service (docs/classroom.md)
``VMLAB_STRICT``         ``1``: a widget handler's failure is raised after   :func:`strict`
                         it is shown and logged (tests set it)
``VMLAB_SLOW_KVM``       ``1``: KVM here is itself emulated (vmlab inside a  :func:`slow_kvm`
                         nested TCG guest: vmlab.vm.inner sets it); KVM
                         boots get TCG's timeouts
``VMLAB_LANG``           ``ko``: the Korean edition's library strings,      :func:`vmlab.i18n.lang`
                         answers and plot font; ``en`` or unset: English
                         (unset: the notebook's folder decides)
======================== ================================================== =====================

(``VMLAB_HELPER_EXIT`` is read only by a test helper, ``tests/helpers/start_vm_and_wait.py``.)
Notebooks read ``VMLAB_QUICK`` themselves, in their set-up cell, so they run without vmlab
changes; :func:`quick` is the same test for Python code.

Paths:

- :func:`cache_dir`: created 0700 on first use; unusable paths raise :class:`ImageError` naming
  the path and the fix.
- :func:`private_root`: where each VM's private 0700 directory is made (``$XDG_RUNTIME_DIR`` if
  usable and its files take ``O_DIRECT``, else the temp dir).
- :func:`takes_direct_io`: whether a file can be opened with ``O_DIRECT`` (a disk's ``cache=none``).

:func:`atomic_write` writes a file so that readers see the old or the new content, never a
part, with the mode set before the content is visible.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

from .errors import ImageError, SetupError

__all__ = [
    "ENV_VARS",
    "accel_override",
    "atomic_write",
    "busybox_override",
    "cache_dir",
    "cache_subdir",
    "class_store",
    "debian_mirror",
    "env",
    "env_flag",
    "guest_kernel",
    "kernel_file",
    "kernel_modules_dir",
    "log_level",
    "private_root",
    "qemu_binary",
    "quick",
    "slow_kvm",
    "strict",
    "takes_direct_io",
    "verify_image",
]

#: Every variable vmlab reads, with a one-line meaning (the table above, for ``doctor``).
ENV_VARS: dict[str, str] = {
    "VMLAB_CACHE": "cache directory (default $XDG_CACHE_HOME/vmlab or ~/.cache/vmlab)",
    "VMLAB_QEMU": "the qemu-system-x86_64 binary",
    "VMLAB_ACCEL": "tcg or kvm instead of auto",
    "VMLAB_GUEST_KERNEL": "lesson (default: built for the guest from Debian's source) or debian (Debian's package)",
    "VMLAB_KERNEL": "a kernel file instead of the lesson or Debian kernel",
    "VMLAB_KERNEL_MODULES": "that kernel's /lib/modules/<version> directory",
    "VMLAB_BUSYBOX": "the static busybox for the guest image; debian: the host's busybox-static; unset: musl build",
    "VMLAB_DEBIAN_MIRROR": "the Debian archive the guest busybox's source is downloaded from",
    "VMLAB_VERIFY_IMAGE": "1: check the cached image's sha256 on every use",
    "VMLAB_QUICK": "1: small sizes and few repeats",
    "VMLAB_LOG": "debug/info/warning: show the vmlab logger on stderr",
    "VMLAB_CLASS_STORE": "on a JupyterHub: the class prediction store (a directory or the service URL)",
    "VMLAB_STRICT": "1: widget handler failures are raised, not only shown (tests)",
    "VMLAB_SLOW_KVM": "1: KVM is emulated here (nested in a TCG guest): TCG's boot timeouts for KVM",
    "VMLAB_LANG": "ko: the Korean edition (library strings, answers, plot font); en or unset: English",
}

_CACHE_FIX = "set VMLAB_CACHE to a directory you can write, e.g. export VMLAB_CACHE=/tmp/$USER-vmlab"


def env(name: str) -> Optional[str]:
    """The value of ``name`` if set and not empty, else None. ``name`` must be in :data:`ENV_VARS`."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a vmlab variable (add it to vmlab.config.ENV_VARS)")
    return os.environ.get(name) or None


def env_flag(name: str) -> bool:
    """True if the variable is set to anything but empty or ``0``."""
    return (env(name) or "0") != "0"


# --------------------------------------------------------------------------- typed accessors


def qemu_binary() -> str:
    """``$VMLAB_QEMU``, else ``qemu-system-x86_64`` (looked up on PATH by the caller)."""
    return env("VMLAB_QEMU") or "qemu-system-x86_64"


def accel_override() -> Optional[str]:
    """``tcg`` or ``kvm`` from ``$VMLAB_ACCEL`` (what ``accel="auto"`` means), else None."""
    value = env("VMLAB_ACCEL")
    return value if value in ("tcg", "kvm") else None


GUEST_KERNELS = ("lesson", "debian")


def guest_kernel() -> str:
    """``$VMLAB_GUEST_KERNEL``: ``lesson`` (the default) or ``debian``; anything else is a ConfigError."""
    value = (env("VMLAB_GUEST_KERNEL") or "lesson").strip().lower()
    if value not in GUEST_KERNELS:
        raise SetupError(f"VMLAB_GUEST_KERNEL={value!r} is not a guest kernel vmlab knows",
                          fix="set it to lesson (the kernel built for the lesson guest) or debian "
                              "(Debian's packaged kernel), or unset it")
    return value


def kernel_file() -> Optional[str]:
    """``$VMLAB_KERNEL`` as given (not checked: the image builder names a bad value)."""
    return env("VMLAB_KERNEL")


def kernel_modules_dir() -> Optional[str]:
    """``$VMLAB_KERNEL_MODULES`` as given."""
    return env("VMLAB_KERNEL_MODULES")


def busybox_override() -> Optional[str]:
    """``$VMLAB_BUSYBOX`` as given."""
    return env("VMLAB_BUSYBOX")


def debian_mirror() -> Optional[str]:
    """``$VMLAB_DEBIAN_MIRROR`` as given (the Debian archive of the busybox source)."""
    return env("VMLAB_DEBIAN_MIRROR")


def verify_image() -> bool:
    """``VMLAB_VERIFY_IMAGE=1``: hash the cached image on every use."""
    return env_flag("VMLAB_VERIFY_IMAGE")


def quick() -> bool:
    """Small sizes and few repeats? ``VMLAB_QUICK=1`` yes, ``0`` no; unset: yes in a Jupyter kernel.

    A learner at a notebook waits seconds, not minutes, unless they ask for the full run
    (``VMLAB_QUICK=0`` or ``QUICK = False`` in the lesson's parameters cell); scripts, the CLI
    and ``make lessons`` (which sets the variable) run what they are told.
    """
    value = env("VMLAB_QUICK")
    if value in ("0", "1"):
        return value == "1"
    return "ipykernel" in sys.modules


def strict() -> bool:
    """``VMLAB_STRICT=1``: a widget handler's failure is raised after it is shown (tests, CI)."""
    return env_flag("VMLAB_STRICT")


def slow_kvm() -> bool:
    """``VMLAB_SLOW_KVM=1``: KVM here runs inside a TCG guest (vmlab.vm.inner), as slow as TCG."""
    return env_flag("VMLAB_SLOW_KVM")


def log_level() -> Optional[str]:
    """``$VMLAB_LOG`` lower-cased (``debug``, ``info``, ``warning``...), or None."""
    value = env("VMLAB_LOG")
    return value.strip().lower() if value else None


def class_store() -> Optional[str]:
    """``$VMLAB_CLASS_STORE`` as given: a directory or an ``http://`` URL (see vmlab.predictions_store)."""
    return env("VMLAB_CLASS_STORE")


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """$VMLAB_CACHE, else $XDG_CACHE_HOME/vmlab, else ~/.cache/vmlab (created 0700)."""
    value = env("VMLAB_CACHE")
    if value:
        path = Path(value).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) \
            else Path.home() / ".cache"
        path = base / "vmlab"
    if not path.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                raise ImageError(f"the vmlab cache path {path} exists but is not a directory",
                                 fix=_CACHE_FIX) from None
        except OSError as exc:
            raise ImageError(f"cannot create the vmlab cache directory {path}: {exc.strerror}",
                             fix=_CACHE_FIX) from exc
    return path


def cache_subdir(name: str) -> Path:
    """``cache_dir()/name``, created 0700 if missing (``images``, ``warm``, ``native``...)."""
    d = cache_dir() / name
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def private_root() -> Path:
    """Where private VM directories live: $XDG_RUNTIME_DIR if usable, else the temp dir.

    A scratch disk is made in the private directory and opened with ``cache=none`` (``O_DIRECT``). A desktop's
    $XDG_RUNTIME_DIR is a tmpfs, which refuses ``O_DIRECT`` before Linux 6.6 (Debian 12 runs 6.1): such a
    directory is passed over for the temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK) and _dir_takes_direct_io(base):
        return Path(base)
    return Path(tempfile.gettempdir())


def takes_direct_io(path: Union[str, Path]) -> bool:
    """Whether the file ``path`` can be opened with ``O_DIRECT``, as QEMU opens a disk with ``cache=none`` or
    ``directsync``. tmpfs before Linux 6.6 and ramfs refuse it (EINVAL); other errors (a missing or unreadable
    file) are not this question's, and QEMU reports them."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno != errno.EINVAL
    return True


_direct_io_dirs: Dict[str, bool] = {}   # directory -> whether a new file there takes O_DIRECT


def _dir_takes_direct_io(directory: str) -> bool:
    """:func:`takes_direct_io` for a new file in ``directory`` (probed once per directory and process)."""
    if directory not in _direct_io_dirs:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".vmlab-direct-", dir=directory)
        except OSError:
            return False
        os.close(fd)
        try:
            _direct_io_dirs[directory] = takes_direct_io(tmp)
        finally:
            os.unlink(tmp)
    return _direct_io_dirs[directory]


def atomic_write(path: Union[str, Path], data: Union[bytes, str], mode: int = 0o600) -> Path:
    """Replace ``path`` with ``data`` in one step (a temp file in the same directory, then
    ``os.replace``). The file has ``mode`` before its name appears; readers see the old or
    the new content, never a part. ``str`` data is written as UTF-8. Returns ``path``."""
    target = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(raw)
        os.replace(tmp, target)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target
