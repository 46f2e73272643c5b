"""Build (and cache) the tiny guest image vmlab boots: a kernel and an initramfs.

What it makes, in ``cache_dir()/images/<key>/``:

``vmlinux``
    the uncompressed kernel (an ELF with a PVH note), so QEMU can boot it with
    ``-kernel`` directly (no firmware decompression step: ~3 s instead of ~12 s); its segments
    store no zero tails (QEMU zero-fills ``p_memsz``, and keeps less of the file mapped).
``initrd.cpio``
    an uncompressed "newc" cpio (deterministic: sorted entries, mtime 0, uid/gid 0,
    sequential inode numbers) holding busybox (vmlab's musl build of Debian's busybox source,
    :mod:`.busybox`), the guest ``/init``, the guest tools
    (``/bin/vmagent``, ``/bin/vmbench``) and the kernel modules of ``guest/modules.txt``
    with their dependency closure (plus a ``modules.dep`` so busybox ``modprobe`` resolves
    dependencies in the guest).
``initrd.lz4``
    the same cpio without the optional kernel modules (those not marked ``base`` in
    ``modules.txt``), compressed with ``lz4 -l``: what QEMU boots for a guest that loads only the
    base modules (``GuestImage.initrd``; the whole cpio is ``GuestImage.cpio``). Smaller in QEMU's
    memory and in the guest's (docs/boot.md).
``initrd-all.lz4``
    ``initrd.lz4`` followed by a second LZ4 frame with a cpio of the optional modules: what a
    guest that loads any of them boots (``GuestImage.initrd_all``; ``GuestImage.initrd_for``
    picks one of the two).
``manifest.json``
    what went in (kernel package and version, busybox, modules included and
    missing, gcc, sizes and sha256 of the outputs, build seconds).

The kernel is the lesson kernel (:mod:`.lessonkernel`): Debian's ``linux-source-X.Y`` at the version of
the generic ``linux-image-<ver>-amd64`` package, configured by ``guest/lesson-kernel.config`` and built
once into ``cache_dir()/kernels/<key>/`` (about 8 minutes on two cores). ``VMLAB_GUEST_KERNEL=debian``
(or ``ensure_image(guest_kernel="debian")``) takes Debian's packaged kernel instead (downloaded with
``apt-get download``, no root needed); ``VMLAB_KERNEL`` names a kernel file of yours
(``VMLAB_KERNEL_MODULES`` optionally names its ``/lib/modules/<ver>`` directory).

The key is a hash of every input, so a second call only hashes a few small files
and returns the cached image (well under a second).

The rooms (each imports only those above it in this list, and vmlab's bottom layers):

================ ==========================================================================
``util``         progress, hashing, the guest sources dir, cleanup
``elf``          ELF facts (PT_INTERP, PVH note), vmlinux out of a bzImage, kernel version
``cpio``         the deterministic newc writer and a reader
``debian``       Debian version comparison, which kernel package, ``apt-get download``
``guesttools``   busybox, gcc, the table of C tools compiled into the guest (add one there)
``lessonkernel`` the lesson kernel: its key, its build from Debian's source package, its cache
``busybox``      the guest's busybox: Debian's source linked with musl, its key, build, cache and fallback
``kernel``       the kernel source: the lesson kernel, Debian's package or ``VMLAB_KERNEL`` (+ modules dir)
``modules``      ``modules.txt``, the dependency closure, copying, depmod
``cache``        :class:`GuestImage`, the cache layout, checks, the build lock, pruning
``rootfs``       the root file system tree (build and unpack)
``build``        inputs and key, :func:`ensure_image`
``status``       :func:`image_status` (never builds)
``cli``          ``python -m vmlab image build|status``
================ ==========================================================================

Paths and environment variables come from :mod:`vmlab.config` (``cache_dir()`` lives there).
"""

from __future__ import annotations

from .build import BUILDER_VERSION, ensure_image
from .cache import GuestImage
from .cli import build_image_cli
from .cpio import CpioEntry, read_cpio, write_cpio
from .elf import extract_vmlinux
from .guesttools import GUEST_TOOLS, GuestTool, native_programs, native_tool
from .rootfs import build_rootfs, unpack_rootfs
from .status import image_status

__all__ = [
    "BUILDER_VERSION",
    "GUEST_TOOLS",
    "CpioEntry",
    "GuestImage",
    "GuestTool",
    "build_image_cli",
    "build_rootfs",
    "ensure_image",
    "extract_vmlinux",
    "image_status",
    "native_programs",
    "native_tool",
    "read_cpio",
    "unpack_rootfs",
    "write_cpio",
]
