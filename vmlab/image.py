"""Build (and cache) the tiny guest image vmlab boots: a kernel and an initramfs.

What it makes, in ``cache_dir()/images/<key>/``:

``vmlinux``
    the uncompressed kernel (an ELF with a PVH note), so QEMU can boot it with
    ``-kernel`` directly (no firmware decompression step: ~3 s instead of ~12 s).
``initrd.cpio``
    an uncompressed "newc" cpio written by this module (deterministic: sorted
    entries, mtime 0, uid/gid 0, sequential inode numbers) holding busybox, the
    guest ``/init``, ``/bin/vmagent``, ``/bin/vmbench`` and the kernel modules of
    ``guest/modules.txt`` with their dependency closure (plus a ``modules.dep`` so
    busybox ``modprobe`` resolves dependencies in the guest).
``manifest.json``
    what went in (kernel package and version, busybox, modules included and
    missing, gcc, sizes and sha256 of the outputs, build seconds).

The kernel is Debian's generic ``linux-image-<ver>-amd64`` package (downloaded with
``apt-get download``, no root needed) unless ``VMLAB_KERNEL`` names a kernel file
(``VMLAB_KERNEL_MODULES`` optionally names its ``/lib/modules/<ver>`` directory).

The key is a hash of every input, so a second call only hashes a few small files
and returns the cached image (well under a second).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from .errors import ImageError, SetupError

__all__ = [
    "GuestImage", "cache_dir", "ensure_image", "image_status", "build_image_cli",
    "build_rootfs", "unpack_rootfs", "extract_vmlinux", "write_cpio", "read_cpio",
    "CpioEntry", "BUILDER_VERSION",
]

#: Bump when the builder changes what it produces; it is part of every key.
BUILDER_VERSION = "vmlab-image-1"

DEFAULT_GUEST_DIR = Path(__file__).resolve().parent / "guest"
KEEP_IMAGES = 3        # images kept in the cache; a VM already running keeps its open files
GUEST_SOURCES = ("init", "modules.txt", "vmagent.c", "vmbench.c")
KERNEL_META_PACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
INSTALL_HINT = "apt-get install busybox-static kmod gcc libc6-dev qemu-system-x86"

Progress = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class GuestImage:
    """A built guest image (kernel + initramfs) in the cache."""

    kernel: Path          # uncompressed vmlinux (ELF with PVH note) for -kernel
    initrd: Path          # uncompressed newc cpio
    kernel_version: str   # e.g. "6.1.0-56-amd64"
    key: str              # hex digest of all inputs (16 chars)
    root: Path            # the cache directory of this build
    manifest: dict = field(compare=False, hash=False, repr=False)


@dataclass
class _Kernel:
    """Where the kernel comes from (resolved cheaply, before any build)."""

    kind: str                      # "debian" or "file"
    version: str                   # e.g. "6.1.0-56-amd64"
    key_parts: dict                # goes into the image key and the manifest
    kernel_file: Optional[Path] = None     # VMLAB_KERNEL
    modules_dir: Optional[Path] = None     # VMLAB_KERNEL_MODULES
    package: Optional[str] = None          # linux-image-6.1.0-56-amd64
    package_version: Optional[str] = None  # 6.1.192-2
    deb: Optional[Path] = None


# --------------------------------------------------------------------------- helpers


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def _find_tool(name: str) -> Optional[str]:
    """shutil.which, also looking in the sbin dirs a normal user's PATH lacks."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _need_tool(name: str, package: str) -> str:
    path = _find_tool(name)
    if not path:
        raise SetupError(f"the tool {name!r} is not installed (needed to build the guest image)",
                         fix=f"apt-get install {package}")
    return path


def _run(cmd: Sequence[str], *, what: str, fix: str, cwd: Optional[Path] = None,
         timeout: float = 600, error: type = ImageError,
         input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Run a command; wrap every failure in ``error`` with the stderr tail."""
    try:
        proc = subprocess.run(list(map(str, cmd)), cwd=cwd, input=input, capture_output=True,
                              timeout=timeout, check=True)
    except FileNotFoundError as exc:
        raise SetupError(f"{what}: the program {cmd[0]!r} is not installed", fix=fix) from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: {os.path.basename(str(cmd[0]))} did not finish in {timeout:g} s",
                    fix=fix) from exc
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if exc.stderr else ""
        out = exc.stdout.decode(errors="replace") if exc.stdout else ""
        detail = _tail(err or out)
        msg = f"{what} failed (exit {exc.returncode}): {' '.join(map(str, cmd))}"
        if detail:
            msg += "\n    " + detail.replace("\n", "\n    ")
        raise error(msg, fix=fix) from exc
    except OSError as exc:
        raise error(f"{what}: cannot run {cmd[0]}: {exc}", fix=fix) from exc
    return proc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", opener=lambda p, fl: os.open(p, fl, 0o600)) as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _cached_sha256(path: Path, cache_file: Path) -> str:
    """sha256 of ``path``, remembered in ``cache_file`` keyed by (size, mtime)."""
    st = path.stat()
    ident = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(ident)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
        return entry["sha256"]
    digest = _sha256_file(path)
    cache[ident] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(OSError):
        _write_json_atomic(cache_file, cache)
    return digest


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc_info):  # read-only dirs from extracted packages
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- cache dir


def cache_dir() -> Path:
    """$VMLAB_CACHE, else $XDG_CACHE_HOME/vmlab, else ~/.cache/vmlab (created 0700)."""
    env = os.environ.get("VMLAB_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) \
            else Path.home() / ".cache"
        path = base / "vmlab"
    fix = ("set VMLAB_CACHE to a directory you can write, e.g. "
           "export VMLAB_CACHE=/tmp/$USER-vmlab")
    if not path.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                raise ImageError(f"the vmlab cache path {path} exists but is not a directory",
                                 fix=fix) from None
        except OSError as exc:
            raise ImageError(f"cannot create the vmlab cache directory {path}: {exc.strerror}",
                             fix=fix) from exc
    return path


def _check_writable(path: Path, need_bytes: int = 0) -> None:
    fix = ("set VMLAB_CACHE to a directory you can write, e.g. "
           "export VMLAB_CACHE=/tmp/$USER-vmlab")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ImageError(f"the vmlab cache directory {path} is not writable: {exc.strerror}",
                         fix=fix) from exc
    try:
        st = os.statvfs(path)
        if st.f_bavail * st.f_frsize < need_bytes:
            raise ImageError(
                f"less than {need_bytes >> 20} MB free in {path} (the build unpacks a "
                "~400 MB kernel package)",
                fix="free some space or set VMLAB_CACHE to a directory on a bigger disk")
    except OSError:
        pass


def _images_dir() -> Path:
    d = cache_dir() / "images"
    if not d.is_dir():
        with _umask(0o077):
            d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- ELF


def _elf_info(path: Path) -> dict:
    """Parse just enough ELF: is it one, does it have PT_INTERP, a PVH note."""
    info = {"elf": False, "interp": False, "pvh": False, "dynamic": False}
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != ELF_MAGIC:
                return info
            info["elf"] = True
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
                if p_type == 3:
                    info["interp"] = True
                elif p_type == 2:
                    info["dynamic"] = True
                elif p_type == 4 and 0 < p_filesz < (1 << 20):
                    f.seek(p_offset)
                    notes = f.read(p_filesz)
                    if _has_pvh_note(notes, end):
                        info["pvh"] = True
    except OSError:
        pass
    return info


def _has_pvh_note(notes: bytes, end: str) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(end + "III", notes, pos)
        pos += 12
        name = notes[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
        if name == b"Xen" and ntype == 18:   # XEN_ELFNOTE_PHYS32_ENTRY
            return True
    return False


# --------------------------------------------------------------------------- kernel


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
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        ok = False
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
                ok = dec.eof and first[:4] == ELF_MAGIC
        except (lzma.LZMAError, EOFError):
            ok = False
        if ok:
            return
        pos = data.find(XZ_MAGIC, pos + 1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    raise ImageError(
        f"{src} is neither an ELF vmlinux nor a bzImage with an xz-compressed ELF kernel "
        f"({tried} xz stream(s) tried)",
        fix="use Debian's kernel (unset VMLAB_KERNEL) or point VMLAB_KERNEL to an "
            "uncompressed vmlinux built with CONFIG_PVH=y")


_VERSION_RE = re.compile(rb"Linux version (\S+)")


def _kernel_version_of(path: Path) -> Optional[str]:
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


# -- Debian version comparison (for picking the newest linux-image-amd64 stanza)

def _deb_order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _deb_cmp_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"\D*", a).group()
        nb = re.match(r"\D*", b).group()
        a, b = a[len(na):], b[len(nb):]
        for i in range(max(len(na), len(nb))):
            oa = _deb_order(na[i]) if i < len(na) else 0
            ob = _deb_order(nb[i]) if i < len(nb) else 0
            if oa != ob:
                return -1 if oa < ob else 1
        da = re.match(r"\d*", a).group()
        db = re.match(r"\d*", b).group()
        a, b = a[len(da):], b[len(db):]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return -1 if ia < ib else 1
    return 0


def _deb_cmp(a: str, b: str) -> int:
    def split(v: str) -> tuple:
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _deb_cmp_part(ua, ub) or _deb_cmp_part(ra, rb)


def _apt_stamp() -> list:
    """Cheap fingerprint of apt's package lists (changes after apt-get update)."""
    stamp = []
    for d in ("/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        try:
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                if e.is_file():
                    st = e.stat()
                    stamp.append([e.path, st.st_size, st.st_mtime_ns])
        except OSError:
            pass
    for f in ("/etc/apt/sources.list", "/etc/apt/preferences"):
        with contextlib.suppress(OSError):
            st = os.stat(f)
            stamp.append([f, st.st_size, st.st_mtime_ns])
    return stamp


def _resolve_debian_package(downloads: Path) -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 depends on; cached."""
    cache_file = downloads / "apt-resolve.json"
    stamp = _apt_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        c = json.loads(cache_file.read_text())
        if c["stamp"] == stamp and c["package"] and c["version"]:
            return c["package"], c["version"]
    fix = ("run `apt-get update` (as root) so apt knows the kernel packages, or set "
           "VMLAB_KERNEL to a kernel file (and VMLAB_KERNEL_MODULES to its modules dir)")
    if not _find_tool("apt-cache"):
        raise SetupError("apt-cache is not available, so the Debian kernel cannot be found",
                         fix="set VMLAB_KERNEL to a kernel file (vmlinuz or vmlinux) and "
                             "VMLAB_KERNEL_MODULES to its /lib/modules/<version> directory")
    try:
        proc = subprocess.run([_find_tool("apt-cache"), "show", KERNEL_META_PACKAGE],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"apt-cache show {KERNEL_META_PACKAGE} failed: {exc}", fix=fix) from exc
    text = proc.stdout.decode(errors="replace")
    best: Optional[tuple[str, str]] = None
    best_meta = ""
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+):\s*(.*)$", stanza, re.M))
        dep = fields.get("Depends", "")
        m = re.search(r"(linux-image-[0-9][^\s,(]*-amd64)\s*\(\s*=\s*([^)\s]+)\s*\)", dep)
        if not m or "-cloud-" in m.group(1) or "-rt-" in m.group(1):
            continue
        meta = fields.get("Version", "0")
        if best is None or _deb_cmp(meta, best_meta) > 0:
            best, best_meta = (m.group(1), m.group(2)), meta
    if best is None:
        err = _tail(proc.stderr.decode(errors="replace"), 3)
        raise ImageError(
            f"apt knows no {KERNEL_META_PACKAGE} package depending on a generic "
            f"linux-image-<version>-amd64 kernel" + (f" ({err})" if err else ""), fix=fix)
    with contextlib.suppress(OSError):
        _write_json_atomic(cache_file, {"stamp": stamp, "package": best[0], "version": best[1]})
    return best


def _find_deb(downloads: Path, package: str, version: str) -> Optional[Path]:
    ver = version.replace(":", "%3a")
    p = downloads / f"{package}_{ver}_amd64.deb"
    return p if p.is_file() else None


def _download_deb(downloads: Path, package: str, version: str, progress: Progress) -> Path:
    existing = _find_deb(downloads, package, version)
    if existing:
        return existing
    apt_get = _need_tool("apt-get", "apt")
    _say(progress, f"downloading {package} {version} (about 70 MB) into {downloads}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))
    try:
        _run([apt_get, "download", f"{package}={version}"], cwd=tmp,
             what=f"downloading {package}",
             fix="check the network and run `apt-get update` (as root); or set VMLAB_KERNEL "
                 "to a kernel file you already have", timeout=1800)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} produced no .deb file",
                             fix="run `apt-get update` (as root) and try again")
        final = downloads / debs[0].name
        os.chmod(debs[0], 0o600)
        os.replace(debs[0], final)
        return final
    finally:
        _rmtree(tmp)


def _resolve_kernel(progress: Progress, *, download: bool = True) -> _Kernel:
    """Find the kernel inputs and what identifies them (for the key)."""
    env_kernel = os.environ.get("VMLAB_KERNEL")
    if env_kernel:
        kfile = Path(env_kernel).expanduser()
        if not kfile.is_file():
            raise ImageError(f"VMLAB_KERNEL={env_kernel} is not a file",
                             fix="point VMLAB_KERNEL to a kernel (vmlinuz or vmlinux), "
                                 "or unset it to use Debian's kernel package")
        parts: dict = {"kernel_file": str(kfile.resolve()),
                       "kernel_sha256": _cached_sha256(kfile, cache_dir() / "hashes.json")}
        mods_env = os.environ.get("VMLAB_KERNEL_MODULES")
        mdir = None
        if mods_env:
            mdir = Path(mods_env).expanduser()
            if not mdir.is_dir():
                raise ImageError(f"VMLAB_KERNEL_MODULES={mods_env} is not a directory",
                                 fix="point it at the kernel's /lib/modules/<version> "
                                     "directory, or unset it to build an image without modules")
            listing = []
            for dirpath, dirnames, filenames in os.walk(mdir, followlinks=True):
                dirnames.sort()
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        st = os.stat(p)
                        listing.append(f"{os.path.relpath(p, mdir)}\0{st.st_size}\0"
                                       f"{st.st_mtime_ns}")
            parts["modules_dir"] = str(mdir.resolve())
            parts["modules_listing_sha256"] = hashlib.sha256(
                "\n".join(listing).encode()).hexdigest()
            version = mdir.resolve().name
        else:
            version = _kernel_version_of(kfile) or "unknown"
        parts["version"] = version
        return _Kernel("file", version, parts, kernel_file=kfile, modules_dir=mdir)

    downloads = cache_dir() / "downloads"
    with _umask(0o077):
        downloads.mkdir(exist_ok=True)
    package, pkg_version = _resolve_debian_package(downloads)
    version = package[len("linux-image-"):]
    deb = _find_deb(downloads, package, pkg_version)
    if deb is None and download:
        with _umask(0o077):
            deb = _download_deb(downloads, package, pkg_version, progress)
    parts = {"package": package, "package_version": pkg_version, "version": version}
    if deb is not None:
        parts["deb_sha256"] = _cached_sha256(deb, deb.with_name(deb.name + ".sha256.json"))
    return _Kernel("debian", version, parts, package=package, package_version=pkg_version,
                   deb=deb)


# --------------------------------------------------------------------------- busybox, gcc


def _find_busybox() -> Path:
    env = os.environ.get("VMLAB_BUSYBOX")
    candidates = [env] if env else ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")]
    for c in candidates:
        if c and os.path.isfile(c):
            path = Path(c)
            _check_static(path)
            return path
    raise SetupError("busybox is not installed (the guest's shell and tools)",
                     fix="apt-get install busybox-static")


def _check_static(path: Path) -> None:
    info = _elf_info(path)
    if not info["elf"]:
        raise SetupError(f"{path} is not an ELF executable",
                         fix="apt-get install busybox-static")
    if info["interp"]:
        raise SetupError(f"{path} is dynamically linked; the guest has no C library, so it "
                         "needs the statically linked busybox",
                         fix="apt-get install busybox-static")


def _gcc_version() -> str:
    gcc = _need_tool("gcc", "gcc libc6-dev")
    proc = _run([gcc, "--version"], what="gcc --version", fix="apt-get install gcc libc6-dev",
                error=SetupError, timeout=60)
    return proc.stdout.decode(errors="replace").splitlines()[0].strip()


def _compile(src: Path, out: Path) -> None:
    gcc = _need_tool("gcc", "gcc libc6-dev")
    try:
        _run([gcc, "-static", "-O2", "-Wall", "-o", out, src], what=f"compiling {src.name}",
             fix=f"fix the compile error in {src}")
    except ImageError as exc:
        if re.search(r"cannot find -lc\b|crt1\.o|stdio\.h: No such file", exc.message):
            raise SetupError(f"cannot build static programs: the static C library is missing "
                             f"(compiling {src.name})\n    {_tail(exc.message, 3)}",
                             fix="apt-get install gcc libc6-dev") from exc
        raise
    os.chmod(out, 0o755)


# --------------------------------------------------------------------------- modules


def _modname(path_or_name: str) -> str:
    base = os.path.basename(path_or_name)
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def _parse_modules_txt(path: Path) -> list[tuple[str, bool]]:
    wanted = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        wanted.append((line[0], "required" in line[1:]))
    return wanted


def _rel_module_path(p: str, moddir: Path) -> str:
    if not os.path.isabs(p):
        return p
    with contextlib.suppress(ValueError):
        return str(Path(p).relative_to(moddir))
    m = re.search(r"/lib/modules/[^/]+/(.*)$", p)
    return m.group(1) if m else p.lstrip("/")


def _module_closure(moddir: Path, wanted: Sequence[tuple[str, bool]]) -> dict:
    """Dependency closure of ``wanted`` in ``moddir`` (which has a modules.dep).

    Raises ImageError if a required module is neither a module nor built in.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        mod = _rel_module_path(mod.strip(), moddir)
        deps[mod] = [_rel_module_path(d, moddir) for d in rest.split()]
        by_name[_modname(mod)] = mod
    builtin = set()
    with contextlib.suppress(OSError):
        builtin = {_modname(line.strip()) for line in
                   (moddir / "modules.builtin").read_text().splitlines() if line.strip()}
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.alias").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias" and not any(c in parts[1] for c in "*?["):
                aliases.setdefault(parts[1], []).append(parts[2])
    softdeps: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.softdep").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "softdep":
                softdeps[_modname(parts[1])] = [p for p in parts[2:] if not p.endswith(":")]

    included: list[str] = []
    seen: set[str] = set()

    def add(rel: str) -> None:
        stack = [rel]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            included.append(r)
            stack.extend(deps.get(r, []))
            for soft in softdeps.get(_modname(r), []):   # best effort (e.g. ext4 -> crc32c)
                for target in [soft] + aliases.get(soft, []):
                    t = by_name.get(_modname(target))
                    if t:
                        stack.append(t)

    missing, required_missing, present_builtin = [], [], []
    for name, required in wanted:
        n = _modname(name)
        rel = by_name.get(n)
        if rel is None:
            targets = [by_name[_modname(t)] for t in aliases.get(name, []) if _modname(t) in by_name]
            if targets:
                for t in targets:
                    add(t)
                continue
        if rel is not None:
            add(rel)
        elif n in builtin:
            present_builtin.append(name)
        else:
            missing.append(name)
            if required:
                required_missing.append(name)
    if required_missing:
        raise ImageError(
            f"the kernel modules directory {moddir} lacks required module(s) "
            f"{', '.join(required_missing)} (needed by the guest image; see modules.txt)",
            fix="use Debian's generic -amd64 kernel (unset VMLAB_KERNEL and "
                "VMLAB_KERNEL_MODULES), or a kernel built with these drivers "
                "(CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_CONSOLE)")
    return {"paths": sorted(included),
            "names": sorted({_modname(r) for r in included}),
            "missing": missing,
            "builtin": present_builtin}


def _copy_module(src: Path, dst_no_ext: Path) -> None:
    """Copy a module, decompressing .ko.xz/.ko.zst/.ko.gz to a plain .ko."""
    name = src.name
    dst_no_ext.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".ko"):
        shutil.copyfile(src, dst_no_ext)
    elif name.endswith(".ko.xz"):
        with lzma.open(src, "rb") as f, open(dst_no_ext, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    elif name.endswith(".ko.gz"):
        import gzip
        with gzip.open(src, "rb") as f, open(dst_no_ext, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    elif name.endswith(".ko.zst"):
        zstd = _need_tool("zstd", "zstd")
        _run([zstd, "-q", "-d", "-f", "-o", dst_no_ext, src], what=f"decompressing {name}",
             fix="apt-get install zstd")
    else:
        raise ImageError(f"unknown kernel module format: {src}",
                         fix="use modules ending in .ko, .ko.xz, .ko.zst or .ko.gz")


def _depmod(root: Path, version: str) -> None:
    depmod = _need_tool("depmod", "kmod")
    _run([depmod, "-b", root, version], what=f"depmod for kernel {version}",
         fix="apt-get install kmod (and check the modules directory is intact)")


def _prepare_modules_dir(mdir: Path, version: str, work: Path, progress: Progress) -> Path:
    """A modules dir with a modules.dep; builds one (symlink tree + depmod) if needed."""
    if (mdir / "modules.dep").is_file():
        return mdir
    _say(progress, f"running depmod on {mdir}")
    root = work / "modroot"
    target = root / "lib" / "modules" / version
    target.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(mdir, followlinks=True):
        rel = os.path.relpath(dirpath, mdir)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            os.symlink(os.path.join(os.path.abspath(dirpath), name), target / rel / name)
    _depmod(root, version)
    return target


# --------------------------------------------------------------------------- rootfs


def build_rootfs(dest_dir: Path, *, kernel_version: str, guest_dir: Optional[Path] = None,
                 modules_dir: Optional[Path] = None, busybox: Optional[Path] = None,
                 manifest: Optional[dict] = None, progress: Progress = None) -> dict:
    """Build the guest's root file system as a directory tree in ``dest_dir``.

    This is the staging step of the image build; the initramfs is this tree
    plus the device nodes /dev/console and /dev/null (which need root to create
    as files; devtmpfs provides them at boot anyway). ``modules_dir`` is the
    kernel's ``/lib/modules/<version>`` directory with a ``modules.dep`` (None:
    no modules). ``manifest`` (if given) is completed with what went in and
    written to ``/etc/vmlab/manifest.json``. Returns the module/busybox/gcc
    facts (also merged into ``manifest``).
    """
    dest = Path(dest_dir)
    gdir = Path(guest_dir) if guest_dir else DEFAULT_GUEST_DIR
    _check_guest_dir(gdir)
    dest.mkdir(parents=True, exist_ok=True)
    info: dict = {}

    # Modules first: a missing required module should fail fast.
    wanted = _parse_modules_txt(gdir / "modules.txt")
    info["modules_requested"] = [n for n, _ in wanted]
    if modules_dir is not None:
        closure = _module_closure(Path(modules_dir), wanted)
        _say(progress, f"copying {len(closure['paths'])} kernel modules "
                       f"({len(wanted)} asked for, with dependencies)")
        mdest = dest / "lib" / "modules" / kernel_version
        mdest.mkdir(parents=True, exist_ok=True)
        for rel in closure["paths"]:
            out_rel = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", rel)
            _copy_module(Path(modules_dir) / rel, mdest / out_rel)
        if (Path(modules_dir) / "modules.builtin").is_file():
            shutil.copyfile(Path(modules_dir) / "modules.builtin", mdest / "modules.builtin")
        order = Path(modules_dir) / "modules.order"
        if order.is_file():   # only the lines of the modules we carry (160 kB otherwise)
            keep = {_modname(r) for r in closure["paths"]}
            (mdest / "modules.order").write_text("".join(
                line + "\n" for line in order.read_text().splitlines()
                if _modname(line.strip()) in keep))
        if closure["paths"]:
            _depmod(dest, kernel_version)
        info["modules"] = closure["names"]
        info["modules_missing"] = closure["missing"]
        info["modules_builtin"] = closure["builtin"]
        info["modules_note"] = ""
    else:
        info["modules"] = []
        info["modules_missing"] = [n for n, _ in wanted]
        info["modules_builtin"] = []
        info["modules_note"] = ("no modules: VMLAB_KERNEL_MODULES was not set, so the image "
                                "carries no kernel modules")

    # busybox and its applets
    bb = Path(busybox) if busybox else _find_busybox()
    _check_static(bb)
    for d in ("bin", "dev", "etc/vmlab", "lib", "mnt", "proc", "root", "run", "sys", "tmp",
              "var", "usr"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bb, dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    proc = _run([bb, "--list"], what="busybox --list", fix="apt-get install busybox-static",
                error=SetupError, timeout=60)
    applets = sorted({a.strip() for a in proc.stdout.decode().split()
                      if a.strip() and "/" not in a})
    reserved = {"busybox", "vmagent", "vmbench"}
    linked = 0
    for a in applets:
        if a in reserved or os.path.lexists(dest / "bin" / a):
            continue
        os.symlink("busybox", dest / "bin" / a)
        linked += 1
    for link, target in (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin")):
        if not os.path.lexists(dest / link):
            os.symlink(target, dest / link)
    info["busybox"] = {"path": str(bb), "sha256": _sha256_file(bb), "applets": linked}

    # /init and /etc
    shutil.copyfile(gdir / "init", dest / "init")
    os.chmod(dest / "init", 0o755)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    (dest / "etc" / "hostname").write_text("vmlab\n")

    # the agent and the benchmark program
    info["gcc"] = _gcc_version()
    for prog in ("vmagent", "vmbench"):
        _say(progress, f"compiling {prog}.c (gcc -static)")
        _compile(gdir / f"{prog}.c", dest / "bin" / prog)

    if manifest is not None:
        manifest.update(info)
        guest_manifest = {k: v for k, v in manifest.items()
                          if k not in ("outputs", "build_seconds")}
        (dest / "etc" / "vmlab" / "manifest.json").write_text(
            json.dumps(guest_manifest, indent=2, sort_keys=True) + "\n")

    _normalize_modes(dest)
    return info


def _normalize_modes(root: Path) -> None:
    """Modes independent of the umask: 0755 dirs/executables, 0644 files."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o755 if st.st_mode & 0o100 else 0o644)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)


def _check_guest_dir(gdir: Path) -> None:
    missing = [n for n in GUEST_SOURCES if not (gdir / n).is_file()]
    if missing:
        raise ImageError(f"the guest sources directory {gdir} lacks {', '.join(missing)}",
                         fix="reinstall vmlab (or pass guest_dir= a directory with init, "
                             "modules.txt, vmagent.c and vmbench.c)")


# --------------------------------------------------------------------------- cpio


@dataclass
class CpioEntry:
    name: str               # without leading "/", e.g. "bin/busybox"
    mode: int               # full st_mode (type + permissions)
    data: bytes = b""       # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)
    source: Optional[Path] = None  # regular file to stream instead of data
    size: int = 0


def _cpio_header(ino: int, e: CpioEntry, size: int, nlink: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (ino, e.mode, 0, 0, nlink, 0, size, 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    hdr = b"070701" + b"".join(b"%08X" % v for v in fields) + name
    return hdr + b"\0" * (-len(hdr) % 4)


def write_cpio(src_dir: Optional[Path], out: Path,
               extra: Iterable[CpioEntry] = ()) -> int:
    """Write ``src_dir`` (plus ``extra`` entries) as a deterministic newc cpio.

    Entries are sorted by path, with mtime 0, uid/gid 0 and sequential inode
    numbers; hard links are not preserved. Returns the number of entries.
    """
    entries: dict[str, CpioEntry] = {}
    if src_dir is not None:
        src = Path(src_dir)
        for dirpath, dirnames, filenames in os.walk(src):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                rel = os.path.relpath(p, src)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    entries[rel] = CpioEntry(rel, stat.S_IFLNK | 0o777,
                                             data=os.readlink(p).encode())
                elif stat.S_ISDIR(st.st_mode):
                    entries[rel] = CpioEntry(rel, st.st_mode)
                elif stat.S_ISREG(st.st_mode):
                    entries[rel] = CpioEntry(rel, st.st_mode, source=Path(p), size=st.st_size)
                else:
                    entries[rel] = CpioEntry(rel, st.st_mode, rdev=(os.major(st.st_rdev),
                                                                    os.minor(st.st_rdev)))
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
                f.write(_cpio_header(ino, e, size, nlink))
                with open(e.source, "rb") as s:
                    shutil.copyfileobj(s, f, 1 << 20)
            else:
                size = len(e.data)
                f.write(_cpio_header(ino, e, size, nlink))
                f.write(e.data)
            f.write(b"\0" * (-size % 4))
        trailer = CpioEntry("TRAILER!!!", 0)
        f.write(_cpio_header(0, trailer, 0, 1))
        pos = f.tell()
        f.write(b"\0" * (-pos % 512))
    return len(ordered)


def read_cpio(path: Path) -> list[dict]:
    """Parse a newc cpio: a list of {name, mode, ino, uid, gid, mtime, nlink, rdev, data}."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
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
        if name == "TRAILER!!!":
            break
        out.append({"name": name, "mode": mode, "ino": ino, "uid": uid, "gid": gid,
                    "mtime": mtime, "nlink": nlink, "rdev": (rmaj, rmin), "data": body})
    return out


def unpack_rootfs(image: GuestImage, dest_dir: Path) -> Path:
    """Unpack a built image's initramfs into ``dest_dir`` (device nodes skipped:
    they need root, and devtmpfs provides them at boot). Returns ``dest_dir``."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for e in read_cpio(image.initrd):
        p = dest / e["name"]
        kind = stat.S_IFMT(e["mode"])
        if kind == stat.S_IFDIR:
            p.mkdir(parents=True, exist_ok=True)
        elif kind == stat.S_IFLNK:
            os.symlink(e["data"].decode(), p)
        elif kind == stat.S_IFREG:
            p.write_bytes(e["data"])
        else:
            continue
        if kind != stat.S_IFLNK:
            os.chmod(p, stat.S_IMODE(e["mode"]))
    return dest


# --------------------------------------------------------------------------- key, cache


def _guest_files_digest(gdir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(gdir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            rel = p.relative_to(gdir).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _inputs(kernel: _Kernel, busybox: Path, gdir: Path, gcc: str) -> dict:
    return {
        "builder": BUILDER_VERSION,
        "kernel": kernel.key_parts,
        "busybox_sha256": _cached_sha256(busybox, cache_dir() / "hashes.json"),
        "guest_files_sha256": _guest_files_digest(gdir),
        "gcc": gcc,
    }


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _check_cached(root: Path, key: str, verify: bool) -> tuple[Optional[dict], str]:
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
    for name in ("vmlinux", "initrd.cpio"):
        p = root / name
        want = outputs.get(name) or {}
        try:
            size = p.stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if size != want.get("size"):
            return None, f"{name} is {size} bytes, the manifest says {want.get('size')}"
        if verify and _sha256_file(p) != want.get("sha256"):
            return None, f"{name} does not match its sha256 in the manifest"
    with open(root / "vmlinux", "rb") as f:
        if f.read(4) != ELF_MAGIC:
            return None, "vmlinux is not an ELF file"
    with open(root / "initrd.cpio", "rb") as f:
        if f.read(6) != b"070701":
            return None, "initrd.cpio is not a newc cpio"
    return manifest, ""


def _image_from(root: Path, manifest: dict) -> GuestImage:
    return GuestImage(kernel=root / "vmlinux", initrd=root / "initrd.cpio",
                      kernel_version=manifest["kernel_version"], key=manifest["key"],
                      root=root, manifest=manifest)


@contextlib.contextmanager
def _build_lock(images: Path, progress: Progress) -> Iterator[None]:
    fd = os.open(images / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is building the image; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock


def ensure_image(force: bool = False, progress: Callable[[str], None] | None = None, *,
                 guest_dir: Path | None = None) -> GuestImage:
    """Return the guest image for the current inputs, building it if needed.

    Cheap when the image is cached (sizes are checked; sha256 too when
    ``VMLAB_VERIFY_IMAGE=1`` or ``force``). A damaged cached image is rebuilt.
    """
    with _umask(0o077):
        return _ensure_image(force, progress, guest_dir)


def _ensure_image(force: bool, progress: Progress, guest_dir: Optional[Path]) -> GuestImage:
    gdir = Path(guest_dir) if guest_dir else DEFAULT_GUEST_DIR
    _check_guest_dir(gdir)
    cache = cache_dir()
    images = _images_dir()
    busybox = _find_busybox()
    gcc = _gcc_version()
    kernel = _resolve_kernel(progress)
    inputs = _inputs(kernel, busybox, gdir, gcc)
    key = _key(inputs)
    final = images / key
    verify = os.environ.get("VMLAB_VERIFY_IMAGE", "") not in ("", "0")

    if not force:
        manifest, why = _check_cached(final, key, verify)
        if manifest is not None:
            return _image_from(final, manifest)

    _check_writable(cache, 600 << 20 if kernel.kind == "debian" else 0)
    with _umask(0o077), _build_lock(images, progress):
        manifest, why = _check_cached(final, key, verify or force)
        if manifest is not None and not force:
            return _image_from(final, manifest)     # someone else just built it
        if final.exists() and not force:
            _say(progress, f"cached image {key} is damaged ({why}); rebuilding it")
        # we hold the lock: leftovers of builders that died are garbage
        for stale in images.glob(".build-*"):
            _rmtree(stale)
        for stale in images.glob(".old-*"):
            _rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=images))
        try:
            try:
                manifest = _build(tmp, kernel, busybox, gdir, inputs, key, progress)
            except OSError as exc:      # ENOSPC, EDQUOT, EACCES... while writing the build
                raise ImageError(f"building the guest image in {images} failed: {exc.strerror or exc}"
                                 + (f" ({exc.filename2 or exc.filename})" if exc.filename else ""),
                                 fix="free some space (the build needs ~600 MB) or set VMLAB_CACHE to a "
                                     "directory on a bigger disk") from exc
            out = tmp / "out"
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=images))
                os.replace(final, old / "image")
                os.replace(out, final)
                _rmtree(old)
            else:
                os.replace(out, final)
        finally:
            _rmtree(tmp)
        _prune_images(images, keep=final)
    _say(progress, f"image ready: {final} (kernel {manifest['kernel_version']}, "
                   f"{manifest['build_seconds']:.1f} s)")
    return _image_from(final, manifest)


def _prune_images(images: Path, keep: Path, most: int = KEEP_IMAGES) -> None:
    """Keep the *most* newest images (about 76 MB each); older ones are from other inputs."""
    built = sorted((d for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for old in [d for d in built if d != keep][max(0, most - 1):]:
        _rmtree(old)


def _build(tmp: Path, kernel: _Kernel, busybox: Path, gdir: Path, inputs: dict, key: str,
           progress: Progress) -> dict:
    t0 = time.monotonic()
    work = tmp / "work"
    out = tmp / "out"
    work.mkdir()
    out.mkdir()
    version = kernel.version
    manifest: dict = {"builder": BUILDER_VERSION, "key": key, "inputs": inputs,
                      "kernel_version": version}
    if kernel.kind == "debian":
        assert kernel.deb is not None
        manifest["kernel"] = {"source": "debian", "package": kernel.package,
                              "package_version": kernel.package_version,
                              "deb": str(kernel.deb), "deb_sha256": inputs["kernel"]["deb_sha256"]}
        dpkg_deb = _need_tool("dpkg-deb", "dpkg")
        ext = work / "extract"
        ext.mkdir()
        _say(progress, f"extracting {kernel.deb.name}")
        try:
            _run([dpkg_deb, "-x", kernel.deb, ext], what=f"extracting {kernel.deb.name}",
                 fix="the download was damaged and has been removed; run the build again")
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
        _say(progress, f"running depmod for {version}")
        _depmod(ext, version)
    else:
        assert kernel.kernel_file is not None
        kfile = kernel.kernel_file
        manifest["kernel"] = {"source": "file", "path": str(kfile),
                              "sha256": inputs["kernel"]["kernel_sha256"],
                              "modules_dir": str(kernel.modules_dir) if kernel.modules_dir
                              else None}
        mdir = None
        if kernel.modules_dir is not None:
            mdir = _prepare_modules_dir(kernel.modules_dir, version, work, progress)

    # the root file system first: it fails fast on a missing required module
    rootfs = work / "rootfs"
    _say(progress, "building the root file system")
    build_rootfs(rootfs, kernel_version=version, guest_dir=gdir, modules_dir=mdir,
                 busybox=busybox, manifest=manifest, progress=progress)

    _say(progress, "decompressing the kernel to vmlinux")
    vmlinux = out / "vmlinux"
    extract_vmlinux(kfile, vmlinux)
    info = _elf_info(vmlinux)
    if not info["pvh"]:
        raise ImageError(f"the kernel {kfile} has no PVH ELF note, so QEMU cannot boot it "
                         "with -kernel",
                         fix="use Debian's kernel (unset VMLAB_KERNEL) or build the kernel "
                             "with CONFIG_PVH=y")

    _say(progress, "writing initrd.cpio")
    initrd = out / "initrd.cpio"
    n = write_cpio(rootfs, initrd, extra=[
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
    ])
    for p in (vmlinux, initrd):
        os.chmod(p, 0o600)
    manifest["initrd_entries"] = n
    manifest["outputs"] = {p.name: {"size": p.stat().st_size, "sha256": _sha256_file(p)}
                           for p in (vmlinux, initrd)}
    manifest["build_seconds"] = round(time.monotonic() - t0, 2)
    _write_json_atomic(out / "manifest.json", manifest)
    os.chmod(out / "manifest.json", 0o600)
    os.chmod(out, 0o700)
    return manifest


# --------------------------------------------------------------------------- status, CLI


def image_status(*, guest_dir: Path | None = None) -> dict:
    """What a ``doctor`` command shows; never builds or downloads anything."""
    with _umask(0o077):
        return _image_status(guest_dir)


def _image_status(guest_dir: Optional[Path]) -> dict:
    status: dict = {"built": False, "path": None, "kernel_version": None, "key": None,
                    "problems": []}
    problems = status["problems"]

    def problem(exc: Exception, default_fix: str = "") -> None:
        problems.append({"problem": getattr(exc, "message", str(exc)),
                         "fix": getattr(exc, "fix", None) or default_fix})

    gdir = Path(guest_dir) if guest_dir else DEFAULT_GUEST_DIR
    try:
        status["cache_dir"] = str(cache_dir())
        _check_writable(Path(status["cache_dir"]))
    except ImageError as exc:
        problem(exc)
    ok = True
    for fn in (lambda: _check_guest_dir(gdir), _find_busybox, _gcc_version,
               lambda: _need_tool("depmod", "kmod")):
        try:
            fn()
        except SetupError as exc:
            problem(exc)
            ok = False
    if ok and not os.environ.get("VMLAB_KERNEL"):
        try:
            _need_tool("dpkg-deb", "dpkg")
            _need_tool("apt-get", "apt")
        except SetupError as exc:
            problem(exc)
            ok = False
    if ok and not problems:
        libc = subprocess.run([_find_tool("gcc"), "-print-file-name=libc.a"],
                              capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(libc):
            problems.append({"problem": "the static C library (libc.a) is missing",
                             "fix": "apt-get install gcc libc6-dev"})
            ok = False
    if not ok or problems:
        return status
    try:
        kernel = _resolve_kernel(None, download=False)
        status["kernel_version"] = kernel.version
        if kernel.kind == "debian":
            status["kernel_package"] = f"{kernel.package} {kernel.package_version}"
            if kernel.deb is None:
                status["note"] = (f"{kernel.package} is not downloaded yet; "
                                  "`python -m vmlab image build` will fetch it (~70 MB)")
                return status
        inputs = _inputs(kernel, _find_busybox(), gdir, _gcc_version())
        key = _key(inputs)
        status["key"] = key
        root = _images_dir() / key
        manifest, why = _check_cached(root, key,
                                      os.environ.get("VMLAB_VERIFY_IMAGE", "") not in ("", "0"))
        if manifest is not None:
            status.update(built=True, path=str(root),
                          sizes={k: v["size"] for k, v in manifest["outputs"].items()},
                          modules_missing=manifest.get("modules_missing", []))
        elif root.exists():
            problems.append({"problem": f"the cached image {root} is damaged ({why})",
                             "fix": "python -m vmlab image build --force"})
    except SetupError as exc:
        problem(exc)
    return status


def build_image_cli(argv: Sequence[str] | None = None) -> int:
    """``python -m vmlab image build [--force] [--json]`` / ``image status [--json]``."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "image":
        args_in = args_in[1:]
    parser = argparse.ArgumentParser(prog="python -m vmlab image",
                                     description="build or inspect the vmlab guest image")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image (or reuse the cached one)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    s = sub.add_parser("status", help="show whether the image is built and what is missing")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exc:
        return int(exc.code or 0)

    stream = sys.stderr if args.json else sys.stdout

    def progress(msg: str) -> None:
        print(f"vmlab: {msg}", file=stream, flush=True)

    if args.cmd == "status":
        st = image_status()
        if args.json:
            print(json.dumps(st, indent=2, sort_keys=True))
        else:
            if st["built"]:
                print(f"guest image: built, kernel {st['kernel_version']}, key {st['key']}")
                print(f"  {st['path']}")
            else:
                print("guest image: not built" + (f" ({st['note']})" if st.get("note") else ""))
            for p in st["problems"]:
                print(f"problem: {p['problem']}\n  fix: {p['fix']}")
        return 0 if not st["problems"] else 1

    t0 = time.monotonic()
    try:
        img = ensure_image(force=args.force, progress=progress)
    except SetupError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": exc.message, "fix": exc.fix}, indent=2))
        print(f"vmlab: error: {exc}", file=sys.stderr)
        return 1
    result = {"ok": True, "kernel": str(img.kernel), "initrd": str(img.initrd),
              "kernel_version": img.kernel_version, "key": img.key, "root": str(img.root),
              "sizes": {k: v["size"] for k, v in img.manifest["outputs"].items()},
              "modules_missing": img.manifest.get("modules_missing", []),
              "seconds": round(time.monotonic() - t0, 2)}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"kernel  {img.kernel}  ({result['sizes']['vmlinux']} bytes)")
        print(f"initrd  {img.initrd}  ({result['sizes']['initrd.cpio']} bytes)")
        print(f"version {img.kernel_version}  key {img.key}")
        if result["modules_missing"]:
            print(f"modules missing from this kernel: {', '.join(result['modules_missing'])}")
    return 0
