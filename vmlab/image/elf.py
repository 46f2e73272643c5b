"""Just enough ELF for the image builder: PT_INTERP, the PVH note, vmlinux out of a bzImage, zero tails,
no section table.

QEMU boots an uncompressed ``vmlinux`` with ``-kernel`` directly when it carries the PVH
ELF note (``XEN_ELFNOTE_PHYS32_ENTRY``): no firmware decompression step. Debian ships a
bzImage whose payload is an xz stream holding exactly that ELF; :func:`extract_vmlinux`
finds the stream and decompresses it.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Optional, Tuple, TypedDict

from ..errors import ImageError

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP, _PT_NOTE = 1, 2, 3, 4
_PAGE = 4096
_XEN_ELFNOTE_PHYS32_ENTRY = 18


class ElfInfo(TypedDict):
    """What :func:`elf_info` found in a file (all False for a non-ELF file)."""

    elf: bool
    interp: bool      # has PT_INTERP: a dynamically linked program
    dynamic: bool     # has PT_DYNAMIC
    pvh: bool         # has the Xen PVH entry note: QEMU can boot it with -kernel


def elf_info(path: Path) -> ElfInfo:
    """Parse just enough ELF: is it one, does it have PT_INTERP, PT_DYNAMIC, a PVH note."""
    found: ElfInfo = {"elf": False, "interp": False, "pvh": False, "dynamic": False}
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != ELF_MAGIC:
                return found
            found["elf"] = True
            is64 = ident[4] == 2
            end = "<" if ident[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(end + "Q", ident, 0x20)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x36)
            else:
                phoff, = struct.unpack_from(end + "I", ident, 0x1C)
                phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x2A)
            for i in range(min(phnum, 256)):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if len(ph) < (56 if is64 else 32):
                    break
                if is64:
                    p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                        end + "IIQQQQ", ph, 0)
                else:
                    p_type, p_offset, _va, _pa, p_filesz = struct.unpack_from(end + "IIIII", ph, 0)
                if p_type == _PT_INTERP:
                    found["interp"] = True
                elif p_type == _PT_DYNAMIC:
                    found["dynamic"] = True
                elif p_type == _PT_NOTE and 0 < p_filesz < (1 << 20):
                    f.seek(p_offset)
                    if has_pvh_note(f.read(p_filesz), end):
                        found["pvh"] = True
    except OSError:
        pass
    return found


def has_pvh_note(notes: bytes, end: str) -> bool:
    """True if a PT_NOTE segment's bytes hold the Xen PHYS32_ENTRY note (``end``: "<" or ">")."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(end + "III", notes, pos)
        pos += 12
        name = notes[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
        if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
    return False


def extract_vmlinux(src: Path, dest: Path) -> None:
    """Write the uncompressed ELF kernel of ``src`` (bzImage with xz, or ELF) to ``dest``."""
    src = Path(src)
    try:
        with open(src, "rb") as f:
            head = f.read(4)
            if head == ELF_MAGIC:
                f.seek(0)
                with open(dest, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                return
            f.seek(0)
            data = f.read()
    except OSError as exc:
        raise ImageError(f"cannot read the kernel {src}: {exc.strerror}",
                         fix="set VMLAB_KERNEL to a readable kernel file") from exc
    pos = data.find(XZ_MAGIC)
    tried = 0
    while pos >= 0:
        tried += 1
        if _try_xz(data, pos, dest):
            return
        pos = data.find(XZ_MAGIC, pos + 1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    raise ImageError(
        f"{src} is neither an ELF vmlinux nor a bzImage with an xz-compressed ELF kernel "
        f"({tried} xz stream(s) tried)",
        fix="use Debian's kernel (unset VMLAB_KERNEL) or point VMLAB_KERNEL to an "
            "uncompressed vmlinux built with CONFIG_PVH=y")


def _elf64_le(f: BinaryIO) -> Optional[Tuple[bytearray, int, int, int, bytearray]]:
    """The ELF header, ``e_phoff``, ``e_phentsize``, ``e_phnum`` and the program-header table of an open
    ELF64 little-endian file; None for any other file."""
    head = bytearray(f.read(64))
    if len(head) < 64 or head[:4] != ELF_MAGIC or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    f.seek(phoff)
    return head, phoff, phentsize, phnum, bytearray(f.read(phentsize * phnum))


def trim_zero_tails(path: Path, *, dry_run: bool = False) -> int:
    """Shrink each ``PT_LOAD``'s ``p_filesz`` to its last non-zero byte (page-rounded); the bytes saved.

    QEMU zero-fills a segment's ``p_memsz`` beyond ``p_filesz``, so the guest sees the same memory. What changes is
    QEMU's RSS: it keeps every loaded segment of ``-kernel`` mapped (to reload it at a reset), and Debian's vmlinux
    stores ``.bss``, ``.brk`` and ``.init.scratch`` as ~23 MiB of zeros (docs/boot.md). Only the program headers are
    rewritten (not even those with ``dry_run``: then it only counts); a non-ELF64-little-endian file is left alone (0).
    """
    with open(path, "rb" if dry_run else "r+b") as f:
        elf = _elf64_le(f)
        if elf is None:
            return 0
        _head, phoff, phentsize, phnum, table = elf
        saved = 0
        for i in range(phnum):
            o = i * phentsize
            p_type, _flags, off, _va, _pa, filesz, _memsz, _align = struct.unpack_from("<IIQQQQQQ", table, o)
            if p_type != _PT_LOAD or filesz == 0:
                continue
            f.seek(off)
            used = len(f.read(filesz).rstrip(b"\0"))
            new = min(filesz, (used + _PAGE - 1) // _PAGE * _PAGE)
            if new < filesz:
                struct.pack_into("<Q", table, o + 32, new)
                saved += filesz - new
        if saved and not dry_run:
            f.seek(phoff)
            f.write(table)
    return saved


def drop_section_table(path: Path) -> int:
    """Remove what follows the last segment (``.symtab``, ``.strtab``, the section headers); the bytes saved.

    QEMU reads a ``-kernel`` ELF's program headers and segments to boot it, and also its symbol table, which it
    sorts and keeps for its disassembler at every start: for the lesson kernel (~55,000 symbols, 2.4 MB) that was
    ~10 ms of a QEMU start and ~2 MiB of its RSS, cold boot and warm restore alike (docs/boot.md). The guest
    never sees these bytes (its symbols are ``/proc/kallsyms``, inside the kernel). The ELF header's section
    fields are zeroed and the file ends after the last byte a program header points to. A non-ELF64-little-endian
    file, or one whose section table lies inside its segments, is left alone (0).
    """
    with open(path, "r+b") as f:
        elf = _elf64_le(f)
        if elf is None:
            return 0
        head, phoff, phentsize, phnum, table = elf
        shoff, = struct.unpack_from("<Q", head, 0x28)
        end = max(64, phoff + phentsize * phnum)
        for i in range(phnum):
            _type, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            end = max(end, off + filesz)
        size = f.seek(0, os.SEEK_END)
        if shoff == 0 or shoff < end or size <= end:
            return 0
        struct.pack_into("<Q", head, 0x28, 0)            # e_shoff
        struct.pack_into("<HHH", head, 0x3A, 0, 0, 0)     # e_shentsize, e_shnum, e_shstrndx
        f.seek(0)
        f.write(head)
        f.truncate(end)
    return size - end


def _try_xz(data: bytes, pos: int, dest: Path) -> bool:
    """Decompress the xz stream at ``pos`` into ``dest``; True if it is a whole ELF file."""
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        with open(dest, "wb") as out:
            first = b""
            off = pos
            while not dec.eof and off < len(data):
                chunk = dec.decompress(data[off:off + (1 << 20)])
                off += 1 << 20
                if len(first) < 4:
                    first += chunk[:4]
                    if len(first) >= 4 and first[:4] != ELF_MAGIC:
                        break
                out.write(chunk)
            return dec.eof and first[:4] == ELF_MAGIC
    except (lzma.LZMAError, EOFError):
        return False


_VERSION_RE = re.compile(rb"Linux version (\S+)")


def kernel_version_of(path: Path) -> Optional[str]:
    """Version string of a bzImage (setup header) or vmlinux ("Linux version ...")."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x1000)
            if len(head) > 0x210 and head[0x202:0x206] == b"HdrS":
                off, = struct.unpack_from("<H", head, 0x20E)
                f.seek(0x200 + off)
                s = f.read(128).split(b"\0")[0].split()
                if s:
                    return s[0].decode(errors="replace")
            f.seek(0)
            data = f.read()
    except OSError:
        return None
    m = _VERSION_RE.search(data)
    return m.group(1).decode(errors="replace") if m else None
