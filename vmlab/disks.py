"""Virtual disks: create raw and qcow2 images, overlays, snapshots, checks.

Thin wrappers over ``qemu-img`` (and e2fsprogs for ext4 file systems) that a
lesson can call in one line and that return plain Python values:

    from vmlab import disks
    d = disks.create_image("/tmp/lesson.qcow2", "1G")            # 0600, thin
    disks.info(d)["actual_size"]                                  # bytes allocated on the host
    top = disks.create_overlay(d, "/tmp/try.qcow2")               # a throw-away disk over d
    disks.snapshot_create(d, "clean"); disks.snapshot_apply(d, "clean")
    disks.check(d)                                                # qemu-img check
    disks.fsck_ext4("/tmp/root.ext4")                             # e2fsck -n from the host

Every file is created with user-only permissions (0600), before qemu-img
writes to it, so no other user can read a disk even for a moment.

The experiments of the virtual-disk lesson (``01.01``: thin provisioning,
overlays), which boot a real guest, are in :mod:`vmlab.experiments.thin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .errors import DiskError, SpecError
from .spec import DISK_FORMATS, parse_size
from .tools import need_tool, qemu_img, run_tool

PathLike = Union[str, Path]
MiB = 1 << 20


# ----------------------------------------------------------------- helpers
def _run(argv: Sequence[str], what: str, *, ok: Sequence[int] = (0,), fix: Optional[str] = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a disk tool (text output); a failure is a DiskError with the tool's stderr."""
    return run_tool(argv, what=what, ok=ok, fix=fix, timeout=timeout, text=True, error=DiskError)


def _new_private_file(path: Path, overwrite: bool) -> None:
    """Create *path* empty with mode 0600 (atomically: never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SpecError("path", f"{path} already exists",
                        fix="pick another name, or pass overwrite=True to replace it") from None
    os.close(fd)
    os.chmod(path, 0o600)  # an existing file kept its old mode through O_TRUNC


def _fmt(fmt: str) -> str:
    if fmt not in DISK_FORMATS:
        raise SpecError("fmt", f"unknown disk format {fmt!r}", fix=f"use one of: {', '.join(DISK_FORMATS)}")
    return fmt


def _existing(path: PathLike, what: str = "path") -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(what, f"no such image file: {p}", fix="create it first with vmlab.disks.create_image")
    return p


# ------------------------------------------------------------ create, info
def create_image(path: PathLike, size: Union[int, str] = "64M", fmt: str = "qcow2", *,
                 overwrite: bool = False, preallocation: Optional[str] = None) -> Path:
    """Create an empty disk image (``qemu-img create``), mode 0600; returns its path.

    A bare number for ``size`` means MiB. ``fmt`` is ``"qcow2"`` (thin: grows as
    the guest writes) or ``"raw"`` (a sparse file on most host file systems).
    ``preallocation`` (``"off"``, ``"metadata"``, ``"falloc"``, ``"full"``)
    reserves host space up front.
    """
    p = Path(path).expanduser()
    _fmt(fmt)
    nbytes = parse_size(size, "size")
    if preallocation not in (None, "off", "metadata", "falloc", "full"):
        raise SpecError("preallocation", f"unknown preallocation {preallocation!r}",
                        fix="use off, metadata, falloc or full")
    if preallocation == "metadata" and fmt == "raw":
        raise SpecError("preallocation", "raw images have no metadata to preallocate",
                        fix="use falloc or full for raw images")
    _new_private_file(p, overwrite)
    argv = [qemu_img(), "create", "-q", "-f", fmt]
    if preallocation:
        argv += ["-o", f"preallocation={preallocation}"]
    try:
        _run([*argv, str(p), str(nbytes)], f"qemu-img create {p.name}", fix="check free space and the path")
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    return p


def create_overlay(base: PathLike, path: PathLike, *, overwrite: bool = False) -> Path:
    """A qcow2 overlay over ``base`` (its backing file): reads fall through to the
    base, writes stay in the overlay, so the base never changes. Mode 0600."""
    b = _existing(base, "base").resolve()
    p = Path(path).expanduser()
    if p.resolve() == b:
        raise SpecError("path", "the overlay cannot be its own base", fix="give the overlay another name")
    bfmt = info(b)["format"]
    _new_private_file(p, overwrite)
    try:
        _run([qemu_img(), "create", "-q", "-f", "qcow2", "-b", str(b), "-F", bfmt, str(p)],
             f"qemu-img create overlay {p.name}")
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    return p


def info(path: PathLike) -> Dict[str, Any]:
    """``qemu-img info --output=json`` (with ``-U``: safe while a VM uses the disk).

    Returns QEMU's keys plus ``virtual_size`` (what the guest sees),
    ``actual_size`` (what the host has allocated), ``format``, ``backing``
    (the backing file or None) and ``snapshots`` (a list of names).
    """
    p = _existing(path)
    out = json.loads(_run([qemu_img(), "info", "-U", "--output=json", str(p)], f"qemu-img info {p.name}").stdout)
    out["virtual_size"] = int(out.get("virtual-size", 0))
    out["actual_size"] = int(out.get("actual-size", 0))
    out["backing"] = out.get("full-backing-filename") or out.get("backing-filename")
    out["snapshots"] = [s.get("name") for s in out.get("snapshots", [])]
    return out


def allocated_bytes(path: PathLike) -> int:
    """Host bytes the image occupies now (``actual-size``)."""
    return info(path)["actual_size"]


def virtual_bytes(path: PathLike) -> int:
    """The disk size the guest sees (``virtual-size``)."""
    return info(path)["virtual_size"]


def sha256(path: PathLike, chunk: int = 4 * MiB) -> str:
    """SHA-256 of a file's bytes (to show a base image did not change)."""
    h = hashlib.sha256()
    with open(_existing(path), "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def convert(src: PathLike, dest: PathLike, fmt: str = "qcow2", *, overwrite: bool = False) -> Path:
    """Copy an image into another format (``qemu-img convert``), mode 0600."""
    s = _existing(src, "src")
    d = Path(dest).expanduser()
    _fmt(fmt)
    _new_private_file(d, overwrite)
    try:
        _run([qemu_img(), "convert", "-q", "-O", fmt, str(s), str(d)], f"qemu-img convert {s.name}")
    except BaseException:
        d.unlink(missing_ok=True)
        raise
    os.chmod(d, 0o600)
    return d


# ------------------------------------------------ host-side reads/writes
def _qemu_io() -> str:
    return need_tool("qemu-io")


def host_write(path: PathLike, offset: int, data: bytes) -> None:
    """Write bytes into a disk image from the host (``qemu-io``), at a guest-visible
    offset: what a guest writing to the disk would do. The VM must be off."""
    p = _existing(path)
    if not isinstance(offset, int) or offset < 0:
        raise SpecError("offset", f"{offset!r} is not a byte offset", fix="e.g. 0 or 4096")
    if not data:
        raise SpecError("data", "nothing to write", fix="give some bytes")
    fmt = info(p)["format"]
    with tempfile.NamedTemporaryFile(prefix="vmlab-io-") as src:
        src.write(bytes(data))
        src.flush()
        _run([_qemu_io(), "-f", fmt, "-c", f"write -s {src.name} {offset} {len(data)}", str(p)],
             f"qemu-io write to {p.name}", fix="shut the VM that uses this disk down first")


def host_read(path: PathLike, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at a guest-visible offset of an image (``qemu-io -r -U``)."""
    p = _existing(path)
    if not isinstance(length, int) or not 0 < length <= 1 << 20:
        raise SpecError("length", f"{length!r} is out of range", fix="read 1 byte to 1 MiB")
    fmt = info(p)["format"]
    out = _run([_qemu_io(), "-r", "-U", "-f", fmt, "-c", f"read -v {offset} {length}", str(p)],
               f"qemu-io read from {p.name}").stdout
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} )+)", line)
        if m:
            data += bytes.fromhex(m.group(1).replace(" ", ""))
    return bytes(data[:length])


# -------------------------------------------------------------- snapshots
def _need_qcow2(p: Path, doing: str) -> None:
    if info(p)["format"] != "qcow2":
        raise SpecError("path", f"{p.name} is not qcow2, so it cannot {doing}",
                        fix="internal snapshots need qcow2: convert it (vmlab.disks.convert) "
                            "or use an overlay instead")


def snapshot_create(path: PathLike, name: str) -> None:
    """Take an internal snapshot (``qemu-img snapshot -c``). The VM must be off."""
    p = _existing(path)
    _snap_name(name)
    _need_qcow2(p, "hold snapshots")
    _run([qemu_img(), "snapshot", "-c", name, str(p)], f"qemu-img snapshot -c {name}",
         fix="shut the VM that uses this disk down first (qemu-img needs the write lock)")


def snapshot_apply(path: PathLike, name: str) -> None:
    """Revert the disk to a snapshot (``qemu-img snapshot -a``). The VM must be off."""
    p = _existing(path)
    _snap_name(name)
    if name not in snapshot_list(p):
        raise SpecError("name", f"{p.name} has no snapshot {name!r}",
                        fix=f"one of: {', '.join(snapshot_list(p)) or '(none yet)'}")
    _run([qemu_img(), "snapshot", "-a", name, str(p)], f"qemu-img snapshot -a {name}",
         fix="shut the VM that uses this disk down first")


def snapshot_delete(path: PathLike, name: str) -> None:
    p = _existing(path)
    _snap_name(name)
    _run([qemu_img(), "snapshot", "-d", name, str(p)], f"qemu-img snapshot -d {name}")


def snapshot_list(path: PathLike) -> List[str]:
    """Names of a qcow2 image's internal snapshots, oldest first."""
    return list(info(path)["snapshots"])


def _snap_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise SpecError("name", f"{name!r} is not a usable snapshot name", fix='e.g. "clean-install"')


def snapshot_live(vm: Any, name: str, device: str = "disk0") -> None:
    """Internal snapshot of a running VM's qcow2 disk (QMP ``blockdev-snapshot-internal-sync``).

    ``device`` is the drive id (``disk0`` for the first disk of a spec).
    Only the disk is saved; memory is not (that would be ``savevm``).
    """
    _snap_name(name)
    vm.qmp("blockdev-snapshot-internal-sync", device=device, name=name)


# ------------------------------------------------------------------ checks
def check(path: PathLike) -> Dict[str, Any]:
    """``qemu-img check`` of a qcow2 image: ``{"ok", "clean", "corruptions", "leaks", ...}``.

    ``ok``: no corruption (the image is consistent; leaked clusters only waste
    space); ``clean``: no leaks either.

    Raw images have no metadata to check: the result says so (``ok`` is None);
    check the file system in them with :func:`fsck_ext4`.
    """
    p = _existing(path)
    if info(p)["format"] != "qcow2":
        return {"ok": None, "clean": None, "format": "raw", "corruptions": 0, "leaks": 0,
                "note": "raw images have no image metadata; check the file system instead (fsck_ext4)"}
    # exit 0 clean, 2 corruptions, 3 leaks only
    res = _run([qemu_img(), "check", "--output=json", str(p)], f"qemu-img check {p.name}", ok=(0, 2, 3))
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {"raw_output": res.stdout}
    out.setdefault("corruptions", 0)
    out.setdefault("leaks", 0)
    # leaked clusters are allocated but unused: they waste space, lose no data ("harmless" in qemu-img's words)
    out["ok"] = res.returncode in (0, 3) and not out.get("corruptions") and not out.get("check-errors")
    out["clean"] = out["ok"] and not out.get("leaks")
    out["exit_status"] = res.returncode
    return out


def fsck_ext4(path: PathLike) -> Dict[str, Any]:
    """``e2fsck -n -f`` on an ext4 image from the host (read-only: nothing is fixed).

    Returns ``{"ok": bool, "exit_status": int, "output": str}``. Exit status 0
    means clean; 4 means errors were found (and left alone, because of ``-n``).
    Run it only while no VM is using the image.
    """
    p = _existing(path)
    res = _run([need_tool("e2fsck"), "-n", "-f", str(p)], f"e2fsck {p.name}", ok=range(0, 9))
    return {"ok": res.returncode == 0, "exit_status": res.returncode,
            "output": (res.stdout + res.stderr).strip()}


def ext4_read(path: PathLike, guest_path: str) -> Optional[bytes]:
    """Read a file from an (unmounted) ext4 image on the host with ``debugfs``;
    None if the file does not exist. No root needed, the image is not changed."""
    p = _existing(path)
    if not guest_path.startswith("/") or any(c in guest_path for c in "\n\"'"):
        raise SpecError("guest_path", f"{guest_path!r} is not an absolute path", fix='e.g. "/data.txt"')
    dbg = need_tool("debugfs")
    st = _run([dbg, "-R", f"stat \"{guest_path}\"", str(p)], f"debugfs stat {guest_path}", ok=range(256))
    if "File not found" in st.stderr or "File not found" in st.stdout or st.returncode:
        return None
    return run_tool([dbg, "-R", f"cat \"{guest_path}\"", str(p)], what=f"debugfs cat {guest_path}",
                    error=DiskError).stdout


def make_ext4(path: PathLike, size: Union[int, str] = "64M", *, source_dir: Optional[PathLike] = None,
              label: str = "vmlab", overwrite: bool = False) -> Path:
    """An ext4 file system in a raw image file, without root (``mke2fs -t ext4 [-d DIR]``).

    With ``source_dir`` the file system is filled with that directory's tree
    (modes kept; files end up owned by root in the image). Mode 0600.
    """
    p = Path(path).expanduser()
    nbytes = parse_size(size, "size")
    if nbytes < 8 * MiB:
        raise SpecError("size", "an ext4 image needs at least 8 MiB", fix='e.g. size="64M"')
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,16}", label):
        raise SpecError("label", f"{label!r} is not a usable file-system label", fix="at most 16 letters/digits")
    _new_private_file(p, overwrite)
    argv = [need_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", label,
            "-E", "root_owner=0:0"]
    if source_dir is not None:
        d = Path(source_dir)
        if not d.is_dir():
            raise SpecError("source_dir", f"{d} is not a directory", fix="unpack the tree first")
        argv += ["-d", str(d)]
    try:
        _run([*argv, str(p), f"{nbytes // 1024}k"], f"mke2fs {p.name}",
             fix="check free space; the tree must fit in the size given")
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    os.chmod(p, 0o600)
    return p
