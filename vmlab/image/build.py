"""Build the guest image (or return the cached one): :func:`ensure_image`.

The key is a hash of every input (builder version, kernel identity, busybox (vmlab's musl build,
:mod:`.busybox`), the guest sources directory, gcc), so a second call only hashes a few small files and returns the
cached image (well under a second). Steps of a build, in a private temp dir under the
images dir: extract the kernel package and run depmod; build the root file system (fails
fast on a missing required module); decompress the kernel to ``vmlinux`` and check its PVH
note and stop storing its zero tails; write ``initrd.cpio`` and the two initramfs files QEMU boots
(``initrd.lz4`` without the optional modules, ``initrd-all.lz4`` with them); write the manifest; rename into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .. import config
from ..errors import ImageError
from ..tools import need_tool, run_tool
from .busybox import BusyboxChoice, guest_busybox
from .cache import (
    OUTPUTS,
    GuestImage,
    build_lock,
    check_cached,
    check_writable,
    images_dir,
    install,
    mark_used,
    prune_images,
    remove_leftovers,
)
from .cpio import CpioEntry, compress_lz4, write_cpio
from .elf import drop_section_table, elf_info, extract_vmlinux, trim_zero_tails
from .guesttools import check_guest_dir, gcc_version
from .kernel import KernelSource, resolve_kernel
from .lessonkernel import ensure_lesson_kernel
from .modules import depmod, optional_module_files, prepare_modules_dir, signatures_enforced
from .rootfs import build_rootfs
from .util import Progress, cached_sha256, resolve_guest_dir, rmtree, say, sha256_file, umask, write_json

#: Bump when the builder changes what it produces; it is part of every key.
BUILDER_VERSION = "vmlab-image-7"   # 2: hv and its guest programs (/bin/hv, /lib/hv/); 3: module signatures stripped;
# 4: vmlinux's zero tails not stored, initrd.lz4 booted; 5: initrd.lz4 without the optional modules, initrd-all.lz4,
# guest tools stripped; 6: vmlinux without its symbol table and section headers (QEMU starts ~10 ms sooner);
# 7: /etc/vmlab/applets (the agent runs a plain command without the shell, as ash would)


#: device nodes every initramfs gets (creating them as files needs root)
DEVICE_NODES = (CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
                CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))


def guest_files_digest(gdir: Path) -> str:
    """Hash of every file (name and content) in the guest sources dir."""
    h = hashlib.sha256()
    for p in sorted(gdir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            rel = p.relative_to(gdir).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def image_inputs(kernel: KernelSource, busybox: Path, gdir: Path, gcc: str) -> dict[str, Any]:
    """Everything the image depends on (what :func:`image_key` hashes)."""
    return {
        "builder": BUILDER_VERSION,
        "kernel": kernel.key_parts,
        "busybox_sha256": cached_sha256(busybox, config.cache_dir() / "hashes.json"),
        "guest_files_sha256": guest_files_digest(gdir),
        "gcc": gcc,
    }


def image_key(inputs: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the inputs (sorted JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def ensure_image(force: bool = False, progress: Callable[[str], None] | None = None, *,
                 guest_dir: Path | None = None, guest_kernel: str | None = None,
                 retry_busybox: bool = False) -> GuestImage:
    """Return the guest image for the current inputs, building it if needed.

    Cheap when the image is cached (sizes are checked; sha256 too when
    ``VMLAB_VERIFY_IMAGE=1`` or ``force``). A damaged cached image is rebuilt. *guest_kernel*
    (``"lesson"`` or ``"debian"``) overrides ``VMLAB_GUEST_KERNEL``; the first build of the
    lesson kernel takes minutes (:mod:`vmlab.image.lessonkernel`), later images reuse it; so does the first
    build of the guest's busybox (:mod:`vmlab.image.busybox`, about 40 s), which *retry_busybox* tries again
    if it failed within the hour.
    """
    with umask(0o077):
        return _ensure_image(force, progress, guest_dir, guest_kernel, retry_busybox)


def _ensure_image(force: bool, progress: Progress, guest_dir: Optional[Path],
                  guest_kernel: Optional[str] = None, retry_busybox: bool = False) -> GuestImage:
    gdir = resolve_guest_dir(guest_dir)
    check_guest_dir(gdir)
    cache = config.cache_dir()
    images = images_dir()
    choice = guest_busybox(progress, retry=retry_busybox)
    busybox = choice.path
    gcc = gcc_version()
    kernel = resolve_kernel(progress, guest_kernel=guest_kernel, guest_dir=gdir)
    inputs = image_inputs(kernel, busybox, gdir, gcc)
    key = image_key(inputs)
    final = images / key
    verify = config.verify_image()

    if not force:
        manifest, why = check_cached(final, key, verify)
        if manifest is not None:
            mark_used(final)
            return GuestImage.from_dir(final, manifest)

    check_writable(cache, 600 << 20 if kernel.kind == "debian" else 0)
    with umask(0o077), build_lock(images, progress):
        manifest, why = check_cached(final, key, verify or force)
        if manifest is not None and not force:
            return GuestImage.from_dir(final, manifest)     # someone else just built it
        if final.exists() and not force:
            say(progress, f"cached image {key} is damaged ({why}); rebuilding it")
        remove_leftovers(images)      # we hold the lock: leftovers of builders that died
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=images))
        try:
            try:
                manifest = _build(tmp, kernel, choice, gdir, inputs, key, progress)
            except OSError as exc:      # ENOSPC, EDQUOT, EACCES... while writing the build
                raise ImageError(f"building the guest image in {images} failed: {exc.strerror or exc}"
                                 + (f" ({exc.filename2 or exc.filename})" if exc.filename else ""),
                                 fix="free some space (the build needs ~600 MB) or set VMLAB_CACHE to a "
                                     "directory on a bigger disk") from exc
            install(tmp / "out", final, images, key)
        finally:
            rmtree(tmp)
        prune_images(images, keep=final)
    say(progress, f"image ready: {final} (kernel {manifest['kernel_version']}, "
                  f"{manifest['build_seconds']:.1f} s)")
    return GuestImage.from_dir(final, manifest)


def _unpack_debian(kernel: KernelSource, work: Path, manifest: dict[str, Any],
                   progress: Progress) -> tuple[Path, Path]:
    """Extract the kernel package; (vmlinuz, modules dir with a fresh modules.dep)."""
    assert kernel.deb is not None
    version = kernel.version
    manifest["kernel"] = {"source": "debian", "package": kernel.package,
                          "package_version": kernel.package_version,
                          "deb": str(kernel.deb), "deb_sha256": kernel.key_parts["deb_sha256"]}
    dpkg_deb = need_tool("dpkg-deb", needed_for="to build the guest image")
    ext = work / "extract"
    ext.mkdir()
    say(progress, f"extracting {kernel.deb.name}")
    try:
        run_tool([dpkg_deb, "-x", kernel.deb, ext], what=f"extracting {kernel.deb.name}",
                 fix="the download was damaged and has been removed; run the build again",
                 error=ImageError)
    except ImageError:
        with contextlib.suppress(OSError):
            kernel.deb.unlink()
        raise
    kfile = ext / "boot" / f"vmlinuz-{version}"
    mdir = ext / "lib" / "modules" / version
    if not kfile.is_file() or not mdir.is_dir():
        raise ImageError(f"{kernel.deb.name} has no boot/vmlinuz-{version} or "
                         f"lib/modules/{version}",
                         fix="set VMLAB_KERNEL to a kernel file instead")
    say(progress, f"running depmod for {version}")
    depmod(ext, version)
    return kfile, mdir


def _build(tmp: Path, kernel: KernelSource, busybox: BusyboxChoice, gdir: Path, inputs: dict[str, Any],
           key: str, progress: Progress) -> dict[str, Any]:
    t0 = time.monotonic()
    work = tmp / "work"
    out = tmp / "out"
    work.mkdir()
    out.mkdir()
    version = kernel.version
    manifest: dict[str, Any] = {"builder": BUILDER_VERSION, "key": key, "inputs": inputs,
                                "kernel_version": version, "busybox_build": busybox.describe()}
    mdir: Optional[Path]
    strip = False
    if kernel.kind == "debian":
        kfile, mdir = _unpack_debian(kernel, work, manifest, progress)
        # Debian's kernels load unsigned modules (tainted); a check per module costs boot time
        strip = not signatures_enforced(work / "extract" / "boot" / f"config-{version}")
    elif kernel.kind == "lesson":
        assert kernel.lesson is not None and kernel.kernel_file is not None and kernel.modules_dir is not None
        ensure_lesson_kernel(kernel.lesson, progress)
        kfile = kernel.kernel_file
        manifest["kernel"] = {"source": "lesson", "dir": str(kernel.lesson.dir), **kernel.key_parts}
        mdir = prepare_modules_dir(kernel.modules_dir, version, work, progress)
    else:
        assert kernel.kernel_file is not None
        kfile = kernel.kernel_file
        manifest["kernel"] = {"source": "file", "path": str(kfile),
                              "sha256": inputs["kernel"]["kernel_sha256"],
                              "modules_dir": str(kernel.modules_dir) if kernel.modules_dir
                              else None}
        mdir = None
        if kernel.modules_dir is not None:
            mdir = prepare_modules_dir(kernel.modules_dir, version, work, progress)

    # the root file system first: it fails fast on a missing required module
    rootfs = work / "rootfs"
    say(progress, "building the root file system")
    build_rootfs(rootfs, kernel_version=version, guest_dir=gdir, modules_dir=mdir,
                 busybox=busybox.path, manifest=manifest, progress=progress,
                 strip_module_signatures=strip)

    say(progress, "decompressing the kernel to vmlinux")
    vmlinux = out / "vmlinux"
    extract_vmlinux(kfile, vmlinux)
    if not elf_info(vmlinux)["pvh"]:
        raise ImageError(f"the kernel {kfile} has no PVH ELF note, so QEMU cannot boot it "
                         "with -kernel",
                         fix="use Debian's kernel (unset VMLAB_KERNEL) or build the kernel "
                             "with CONFIG_PVH=y")
    manifest["vmlinux_zeros_not_stored"] = trim_zero_tails(vmlinux)
    manifest["vmlinux_symbols_not_stored"] = drop_section_table(vmlinux)

    say(progress, "writing initrd.cpio, initrd.lz4 and initrd-all.lz4")
    cpio = out / "initrd.cpio"
    n = write_cpio(rootfs, cpio, extra=DEVICE_NODES)
    optional = optional_module_files(rootfs, version, manifest["modules_base"])
    _write_initrds(rootfs, out, work, optional)
    files = [out / name for name in OUTPUTS]
    for p in files:
        p.chmod(0o600)
    manifest["initrd_entries"] = n
    manifest["initrd_optional_modules"] = len(optional)
    manifest["outputs"] = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    manifest["build_seconds"] = round(time.monotonic() - t0, 2)
    write_json(out / "manifest.json", manifest)
    out.chmod(0o700)
    return manifest


def _write_initrds(rootfs: Path, out: Path, work: Path, optional: set[str]) -> None:
    """``initrd.lz4``: the root file system without the ``optional`` module files (what a guest
    that loads only the base modules boots); ``initrd-all.lz4``: the same bytes followed by a
    second LZ4 frame holding a cpio of the optional modules. The kernel unpacks concatenated
    archives in one pass (and so does ``lz4 -dc``), so that guest sees every file of ``initrd.cpio``.
    """
    base, rest = work / "base.cpio", work / "optional.cpio"
    write_cpio(rootfs, base, extra=DEVICE_NODES, include=lambda rel: rel not in optional)
    write_cpio(rootfs, rest, include=lambda rel: rel in optional)
    compress_lz4(base, out / "initrd.lz4")
    compress_lz4(rest, work / "optional.lz4")
    with open(out / "initrd-all.lz4", "wb") as dest:
        for part in (out / "initrd.lz4", work / "optional.lz4"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dest, 1 << 20)
