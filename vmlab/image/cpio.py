"""A deterministic "newc" cpio writer (and reader): the initramfs format the kernel unpacks.

Entries are sorted by path, with mtime 0, uid/gid 0 and sequential inode numbers, so the
same tree gives the same bytes. Hard links are not preserved. Device nodes come in as
``extra`` entries (creating them as files needs root; the archive needs no privilege).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, TypedDict

from ..errors import ImageError
from ..tools import need_tool, run_tool

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass
class CpioEntry:
    """One archive member."""

    name: str               # without leading "/", e.g. "bin/busybox"
    mode: int               # full st_mode (type + permissions)
    data: bytes = b""       # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)
    source: Optional[Path] = None  # regular file to stream instead of data
    size: int = 0


class CpioRecord(TypedDict):
    """One member as :func:`read_cpio` parsed it."""

    name: str
    mode: int
    ino: int
    uid: int
    gid: int
    mtime: int
    nlink: int
    rdev: tuple[int, int]
    data: bytes


def _header(ino: int, e: CpioEntry, size: int, nlink: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (ino, e.mode, 0, 0, nlink, 0, size, 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    hdr = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields) + name
    return hdr + b"\0" * (-len(hdr) % 4)


def _scan(src: Path) -> dict[str, CpioEntry]:
    entries: dict[str, CpioEntry] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, src)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = CpioEntry(rel, stat.S_IFLNK | 0o777, data=os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = CpioEntry(rel, st.st_mode)
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = CpioEntry(rel, st.st_mode, source=Path(p), size=st.st_size)
            else:
                entries[rel] = CpioEntry(rel, st.st_mode, rdev=(os.major(st.st_rdev),
                                                                os.minor(st.st_rdev)))
    return entries


def write_cpio(src_dir: Optional[Path], out: Path, extra: Iterable[CpioEntry] = (),
               include: Optional[Callable[[str], bool]] = None) -> int:
    """Write ``src_dir`` (plus ``extra`` entries) as a deterministic newc cpio.

    Entries are sorted by path, with mtime 0, uid/gid 0 and sequential inode
    numbers; hard links are not preserved. ``include`` (a path relative to ``src_dir``
    -> keep it?) filters what is taken from ``src_dir``; the parents of what is kept
    are always written. Returns the number of entries.
    """
    entries = _scan(Path(src_dir)) if src_dir is not None else {}
    if include is not None:
        entries = {rel: e for rel, e in entries.items() if include(rel)}
    for e in extra:
        entries[e.name.strip("/")] = CpioEntry(e.name.strip("/"), e.mode, e.data, e.rdev,
                                               e.source, e.size)
    # parents must exist in the archive before children (the kernel needs them)
    for name in list(entries):
        parent = os.path.dirname(name)
        while parent and parent not in entries:
            entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755)
            parent = os.path.dirname(parent)
    ordered = sorted(entries.values(), key=lambda e: e.name.split("/"))
    with open(out, "wb") as f:
        for ino, e in enumerate(ordered, start=1):
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            if e.source is not None:
                size = os.path.getsize(e.source)
                f.write(_header(ino, e, size, nlink))
                with open(e.source, "rb") as s:
                    shutil.copyfileobj(s, f, 1 << 20)
            else:
                size = len(e.data)
                f.write(_header(ino, e, size, nlink))
                f.write(e.data)
            f.write(b"\0" * (-size % 4))
        f.write(_header(0, CpioEntry(TRAILER, 0), 0, 1))
        pos = f.tell()
        f.write(b"\0" * (-pos % 512))
    return len(ordered)


def read_cpio(path: Path) -> list[CpioRecord]:
    """Parse a newc cpio: one record per member (the trailer not included)."""
    out: list[CpioRecord] = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ImageError(f"{path}: bad cpio header at offset {pos}",
                             fix="rebuild the image: python -m vmlab image build --force")
        v = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = v
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            break
        out.append({"name": name, "mode": mode, "ino": ino, "uid": uid, "gid": gid,
                    "mtime": mtime, "nlink": nlink, "rdev": (rmaj, rmin), "data": body})
    return out


#: the legacy LZ4 frame (``lz4 -l``), the only LZ4 format the kernel's initramfs unpacker reads
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def compress_lz4(src: Path, dest: Path) -> None:
    """``lz4 -l -9 src dest``: the initramfs QEMU boots (~2.8x smaller than the cpio, docs/boot.md).

    Smaller in QEMU's RSS (it keeps the ``-initrd`` file mapped) and in the guest's RAM (the compressed copy the kernel
    unpacks); LZ4 decompresses fast enough under TCG that no boot cost was measured, where ``zstd -19`` cost ~1 s.
    Debian's kernels read it (``CONFIG_RD_LZ4``).
    """
    lz4 = need_tool("lz4", needed_for="to compress the guest's initramfs")
    run_tool([lz4, "-l", "-9", "-q", "-f", src, dest], what="compressing the initramfs with lz4", error=ImageError)
    with open(dest, "rb") as f:
        if f.read(4) != LZ4_LEGACY_MAGIC:
            raise ImageError(f"{lz4} -l did not write a legacy LZ4 frame to {dest}",
                             fix="install Debian's lz4 (apt-get install lz4)")
