"""The image cache: ``cache_dir()/images/<key>/`` with a manifest, checked before use.

A built image is a directory named by its key holding ``vmlinux``, ``initrd.cpio`` (the root file system, read by
:func:`~vmlab.image.unpack_rootfs`), ``initrd.lz4`` (the same without the optional kernel modules, compressed: what
QEMU boots for a guest that loads only the base ones), ``initrd-all.lz4`` (with them) and ``manifest.json`` (sizes
and sha256 of all four). Builders take an exclusive ``flock`` on
``images/.lock``; a build goes to ``images/.build-<key>-*`` and is renamed into place, so a
reader never sees half an image. The newest :data:`KEEP_IMAGES` images are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .. import config
from ..errors import ImageError
from .cpio import LZ4_LEGACY_MAGIC, NEWC_MAGIC
from .elf import ELF_MAGIC
from .modules import modname
from .util import Progress, exclusive_lock, rmtree, sha256_file, umask

KEEP_IMAGES = 3        # images kept in the cache; a VM already running keeps its open files
RECENT_USE_S = 6 * 3600  # an image used this recently is never pruned (another process may boot it next)
OUTPUTS = ("vmlinux", "initrd.cpio", "initrd.lz4", "initrd-all.lz4")


@dataclass(frozen=True)
class GuestImage:
    """A built guest image (kernel + initramfs) in the cache."""

    kernel: Path          # uncompressed vmlinux (ELF with PVH note) for -kernel
    initrd: Path          # the initramfs for -initrd: the newc cpio without the optional modules, lz4 -l
    kernel_version: str   # e.g. "6.1.0-56-amd64"
    key: str              # hex digest of all inputs (16 chars)
    root: Path            # the cache directory of this build
    manifest: dict[str, Any] = field(compare=False, hash=False, repr=False)
    initrd_all: Optional[Path] = None  # initrd followed by the optional modules (None: initrd has them all)

    @classmethod
    def from_dir(cls, root: Path, manifest: dict[str, Any]) -> GuestImage:
        """The image in cache directory ``root`` described by its ``manifest``."""
        return cls(kernel=root / "vmlinux", initrd=root / "initrd.lz4",
                   kernel_version=manifest["kernel_version"], key=manifest["key"],
                   root=root, manifest=manifest, initrd_all=root / "initrd-all.lz4")

    @property
    def kernel_origin(self) -> str:
        """Where the guest kernel came from, in a few words (for lesson tables)."""
        k = self.manifest.get("kernel", {})
        if k.get("source") == "lesson":
            return (f"built for the lessons from Debian's Linux source ({k.get('source_package')} "
                    f"{k.get('package_version')}), configured small")
        if k.get("source") == "debian":
            return f"Debian's packaged kernel ({k.get('package')} {k.get('package_version')})"
        return f"the kernel file {k.get('path')} (VMLAB_KERNEL)"

    @property
    def base_modules(self) -> frozenset[str]:
        """The modules :attr:`initrd` carries (every guest loads them at boot; with dependencies)."""
        return frozenset(self.manifest.get("modules_base", ()))

    def initrd_for(self, modules: Iterable[str]) -> Path:
        """The initramfs to boot for a guest that loads ``modules`` beyond the base ones:
        :attr:`initrd` when all are in it, else :attr:`initrd_all`."""
        extra = {modname(m) for m in modules} - self.base_modules
        return self.initrd_all if extra and self.initrd_all is not None else self.initrd

    @property
    def cpio(self) -> Path:
        """The uncompressed newc cpio of the whole root file system (what :attr:`initrd_all` holds, for reading)."""
        return self.root / "initrd.cpio"

    @property
    def sizes(self) -> dict[str, int]:
        """Bytes of each output (``vmlinux``, ``initrd.cpio``, ``initrd.lz4``)."""
        return {k: int(v["size"]) for k, v in self.manifest["outputs"].items()}


def images_dir() -> Path:
    """``cache_dir()/images`` (made user-only)."""
    d = config.cache_dir() / "images"
    if not d.is_dir():
        with umask(0o077):
            d.mkdir(parents=True, exist_ok=True)
    return d


def check_writable(path: Path, need_bytes: int = 0) -> None:
    """ImageError unless ``path`` is writable and has ``need_bytes`` free."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ImageError(f"the vmlab cache directory {path} is not writable: {exc.strerror}",
                         fix="set VMLAB_CACHE to a directory you can write, e.g. "
                             "export VMLAB_CACHE=/tmp/$USER-vmlab") from exc
    try:
        st = os.statvfs(path)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < need_bytes:
        raise ImageError(
            f"less than {need_bytes >> 20} MB free in {path} (the build unpacks a "
            "~400 MB kernel package)",
            fix="free some space or set VMLAB_CACHE to a directory on a bigger disk")


def check_cached(root: Path, key: str, verify: bool) -> tuple[Optional[dict[str, Any]], str]:
    """(manifest, "") if the image in ``root`` is intact, else (None, reason)."""
    if not root.is_dir():
        return None, "not built"
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        outputs = manifest["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "its manifest.json is missing or unreadable"
    if manifest.get("key") != key:
        return None, "its manifest names another key"
    for name in OUTPUTS:
        p = root / name
        want = outputs.get(name) or {}
        try:
            size = p.stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if size != want.get("size"):
            return None, f"{name} is {size} bytes, the manifest says {want.get('size')}"
        if verify and sha256_file(p) != want.get("sha256"):
            return None, f"{name} does not match its sha256 in the manifest"
    with open(root / "vmlinux", "rb") as f:
        if f.read(4) != ELF_MAGIC:
            return None, "vmlinux is not an ELF file"
    with open(root / "initrd.cpio", "rb") as f:
        if f.read(6) != NEWC_MAGIC:
            return None, "initrd.cpio is not a newc cpio"
    for name in ("initrd.lz4", "initrd-all.lz4"):
        with open(root / name, "rb") as f:
            if f.read(4) != LZ4_LEGACY_MAGIC:
                return None, f"{name} is not a legacy LZ4 frame"
    return manifest, ""


@contextlib.contextmanager
def build_lock(images: Path, progress: Progress) -> Iterator[None]:
    """Hold the builders' exclusive lock (waiting, with a message, if another build runs)."""
    with exclusive_lock(images, progress, "the image"):
        yield


def remove_leftovers(images: Path) -> None:
    """Remove build and swap directories of builders that died (call with the lock held)."""
    for pattern in (".build-*", ".old-*"):
        for stale in images.glob(pattern):
            rmtree(stale)


def install(out: Path, final: Path, images: Path, key: str) -> None:
    """Move a finished build ``out`` to ``final``, replacing an older (damaged) one."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=images))
        os.replace(final, old / "image")
        os.replace(out, final)
        rmtree(old)
    else:
        os.replace(out, final)


def mark_used(root: Path) -> None:
    """Record that ``root`` was just handed out (its mtime), so a concurrent build does not prune it."""
    try:
        os.utime(root)
    except OSError:
        pass    # a read-only shared cache: nothing prunes it either


def prune_images(images: Path, keep: Path, most: int = KEEP_IMAGES, recent_s: float = RECENT_USE_S) -> None:
    """Keep the *most* newest images (about 76 MB each) and any used in the last *recent_s* seconds.

    Older ones are from other inputs. An image another process handed out recently stays: that process may
    still start VMs from it (a test session, a lesson kernel).
    """
    built = sorted((d for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    now = time.time()
    for old in [d for d in built if d != keep][max(0, most - 1):]:
        if now - old.stat().st_mtime < recent_s:
            continue
        rmtree(old)
