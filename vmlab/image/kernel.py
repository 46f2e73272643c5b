"""Where the guest kernel comes from: the lesson kernel (the default), Debian's package, or ``VMLAB_KERNEL``.

:func:`resolve_kernel` is cheap (no extraction, no build): it finds the inputs and what identifies
them for the image key. Debian's kernel package is downloaded here if it is missing; the lesson
kernel (:mod:`.lessonkernel`) is built by the image build, only when the image is not cached.
``VMLAB_KERNEL`` wins over ``VMLAB_GUEST_KERNEL``; ``VMLAB_GUEST_KERNEL=debian`` picks Debian's package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import config
from ..errors import ImageError
from .debian import download_deb, find_deb, resolve_package
from .elf import kernel_version_of
from .lessonkernel import LessonKernel, lesson_kernel
from .util import Progress, cached_sha256, umask


@dataclass
class KernelSource:
    """The kernel inputs, resolved cheaply before any build."""

    kind: str                              # "lesson", "debian" or "file"
    version: str                           # e.g. "6.1.0-56-amd64"
    key_parts: dict[str, Any]              # goes into the image key and the manifest
    kernel_file: Optional[Path] = None     # VMLAB_KERNEL
    modules_dir: Optional[Path] = None     # VMLAB_KERNEL_MODULES
    package: Optional[str] = None          # linux-image-6.1.0-56-amd64
    package_version: Optional[str] = None  # 6.1.192-2
    deb: Optional[Path] = None
    lesson: Optional[LessonKernel] = None  # the lesson kernel (built by the image build if need be)


def resolve_kernel(progress: Progress, *, download: bool = True, guest_kernel: Optional[str] = None,
                   guest_dir: Optional[Path] = None) -> KernelSource:
    """Find the kernel inputs and what identifies them (for the key). *guest_kernel* (``lesson`` or
    ``debian``) overrides ``VMLAB_GUEST_KERNEL``; ``VMLAB_KERNEL`` overrides both."""
    env_kernel = config.kernel_file()
    if env_kernel:
        return _file_kernel(env_kernel)
    kind = guest_kernel or config.guest_kernel()
    downloads = config.cache_dir() / "downloads"
    with umask(0o077):
        downloads.mkdir(exist_ok=True)
    package, pkg_version = resolve_package(downloads)
    if kind == "lesson":
        k = lesson_kernel(pkg_version, guest_dir)
        parts: dict[str, Any] = {"lesson_kernel": k.key, "source_package": k.source_package,
                                 "package_version": pkg_version, "version": k.release}
        return KernelSource("lesson", k.release, parts, kernel_file=k.vmlinux, modules_dir=k.modules_dir,
                            package=k.source_package, package_version=pkg_version, lesson=k)
    version = package[len("linux-image-"):]
    deb = find_deb(downloads, package, pkg_version)
    if deb is None and download:
        with umask(0o077):
            deb = download_deb(downloads, package, pkg_version, progress)
    parts = {"package": package, "package_version": pkg_version, "version": version}
    if deb is not None:
        parts["deb_sha256"] = cached_sha256(deb, deb.with_name(deb.name + ".sha256.json"))
    return KernelSource("debian", version, parts, package=package, package_version=pkg_version,
                        deb=deb)


def _file_kernel(env_kernel: str) -> KernelSource:
    kfile = Path(env_kernel).expanduser()
    if not kfile.is_file():
        raise ImageError(f"VMLAB_KERNEL={env_kernel} is not a file",
                         fix="point VMLAB_KERNEL to a kernel (vmlinuz or vmlinux), "
                             "or unset it to use Debian's kernel package")
    parts: dict[str, Any] = {"kernel_file": str(kfile.resolve()),
                             "kernel_sha256": cached_sha256(kfile, config.cache_dir() / "hashes.json")}
    mods_env = config.kernel_modules_dir()
    mdir = None
    if mods_env:
        mdir = Path(mods_env).expanduser()
        if not mdir.is_dir():
            raise ImageError(f"VMLAB_KERNEL_MODULES={mods_env} is not a directory",
                             fix="point it at the kernel's /lib/modules/<version> "
                                 "directory, or unset it to build an image without modules")
        parts["modules_dir"] = str(mdir.resolve())
        parts["modules_listing_sha256"] = _listing_digest(mdir)
        version = mdir.resolve().name
    else:
        version = kernel_version_of(kfile) or "unknown"
    parts["version"] = version
    return KernelSource("file", version, parts, kernel_file=kfile, modules_dir=mdir)


def _listing_digest(mdir: Path) -> str:
    """Hash of the names, sizes and mtimes under a modules dir (cheap; no contents)."""
    listing = []
    for dirpath, dirnames, filenames in os.walk(mdir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.stat(p)
                listing.append(f"{os.path.relpath(p, mdir)}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()
