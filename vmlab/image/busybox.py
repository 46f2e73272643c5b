"""The guest's busybox: Debian's busybox source linked with musl instead of glibc, built once and cached.

Why (docs/boot.md, "A shell linked with musl"): under TCG a command costs what starting its process costs, and
every page a new process touches after the switch of address space is paid again. Debian's ``busybox-static`` is
linked with glibc, whose static start-up touches about 20 more pages than musl's: inside one guest a spawn of
``sh -c true`` took 1.19 ms and 43 page faults with Debian's binary and 0.84 ms and 23 faults with the same
source linked with musl; ``run("true")`` went from 1.85 to 1.50 ms (AMD EPYC machine, 2026-12-01).

What is built: the Debian source package of the busybox Debian ships (:data:`SOURCE_VERSION`, the same upstream
version and Debian patches as ``busybox-static``), configured as Debian's static flavour
(``debian/config/pkg/static``) less the options that need GNU regex extensions musl lacks (:data:`MUSL_OFF`),
compiled with ``musl-gcc`` (Debian's ``musl-tools``)::

    the two source files from the Debian archive (size and sha256 checked, :data:`SOURCE_FILES`) -> tar -x
    -> debian/patches/series applied -> .config = Debian's static configuration less MUSL_OFF -> make oldconfig
    (every other line kept, checked) -> make busybox CC=musl-gcc

into ``cache_dir()/busybox/<key>/`` (``busybox``, ``config``, ``build.json``; the log in
``cache_dir()/busybox/build-<key>.log``). The key hashes :data:`BUSYBOX_BUILDER`, the source files, the musl
library and gcc, so resolving it builds nothing. A build takes about 40 s on two cores (download included).

Which busybox a guest image gets (:func:`guest_busybox`): ``VMLAB_BUSYBOX=/path`` that file; ``VMLAB_BUSYBOX=debian``
the host's ``busybox-static``; otherwise this build. When it cannot be built (``musl-gcc`` missing, the source not
downloadable, a failed build) the image gets the host's ``busybox-static`` and says why (a warning, the image's
manifest, ``vmlab image status``): everything works, commands start more slowly. A failed download or build is
not tried again for :data:`RETRY_AFTER` seconds, except by ``python -m vmlab image build``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import config
from ..errors import ImageError, SetupError
from ..log import get_logger
from ..tools import need_tool, run_tool, tail
from .guesttools import check_static, find_busybox, gcc_version
from .lessonkernel import missing_options, parse_config
from .util import (
    Progress,
    cached_sha256,
    exclusive_lock,
    prune_builds,
    rmtree,
    say,
    sha256_file,
    umask,
    write_json,
)

log = get_logger(__name__)

#: Bump when the build recipe changes what it produces; part of the key.
BUSYBOX_BUILDER = "vmlab-busybox-1"
#: Debian's source version of the busybox Debian 12 ships (busybox-static 1:1.35.0-4+deb12u1+b1 is built from it)
SOURCE_VERSION = "1.35.0-4+deb12u1"


@dataclass(frozen=True)
class SourceFile:
    """One file of the source package, pinned: a download is checked against its size and sha256."""

    name: str
    size: int
    sha256: str
    sha1: str           # snapshot.debian.org serves a file by its sha1


SOURCE_FILES: Tuple[SourceFile, ...] = (
    SourceFile("busybox_1.35.0.orig.tar.bz2", 2480624,
               "faeeb244c35a348a334f4a59e44626ee870fb07b6884d68c10ae8bc19f83a694",
               "36a1766206c8148bc06aca4e1f134016d40912d0"),
    SourceFile("busybox_1.35.0-4+deb12u1.debian.tar.xz", 68028,
               "1cacbe095ef4880ea7879933c8e3c5075d1527cd6fbcb626a9b41e5daefd1a46",
               "b84e16f4477288383bfd5e03517337e72db7868f"),
)
#: the Debian archive (``VMLAB_DEBIAN_MIRROR`` overrides it) and the package's directory in it
DEFAULT_MIRROR = "http://deb.debian.org/debian"
POOL = "pool/main/b/busybox"
#: where a file is fetched from when the archive no longer has it (Debian keeps every file ever published there)
SNAPSHOT = "https://snapshot.debian.org/file/{sha1}"
#: options of Debian's static configuration that musl cannot build, and why
MUSL_OFF: Dict[str, str] = {
    "CONFIG_EXTRA_COMPAT": "grep -z and GNU regex matching use re_search/re_compile_pattern, glibc-only",
    "CONFIG_FEATURE_VI_REGEX_SEARCH": "vi's regex search uses GNU regex's re_search, glibc-only",
}
#: Debian's configuration of its static flavour, inside the unpacked source
DEBIAN_CONFIG = ("debian/config/os/linux", "debian/config/pkg/static")
#: musl's C library (its hash is part of the key) and compiler wrapper
MUSL_LIBC = Path("/usr/lib/x86_64-linux-musl/libc.a")
MUSL_FIX = "apt-get install musl-tools (`make setup` does)"
#: the build's programs and the Debian packages that have them (``make setup`` installs them)
BUILD_TOOLS = {"musl-gcc": "musl-tools", "make": "make", "tar": "tar", "bzip2": "bzip2", "xz": "xz-utils",
               "patch": "patch"}
#: the Linux headers busybox includes, from linux-libc-dev (musl's include directory has none)
KERNEL_HEADERS = {"linux": "/usr/include/linux", "asm-generic": "/usr/include/asm-generic",
                  "mtd": "/usr/include/mtd", "asm": "/usr/include/x86_64-linux-gnu/asm"}
#: a failed download or build is not tried again by VM starts for this long (``vmlab image build`` does)
RETRY_AFTER = 3600.0
#: builds kept in the cache (~1 MB each)
KEEP_BUILDS = 2


@dataclass(frozen=True)
class MuslBusybox:
    """What identifies the musl build (cheap to know) and where it is."""

    key: str

    @property
    def dir(self) -> Path:
        return config.cache_subdir("busybox") / self.key

    @property
    def path(self) -> Path:
        return self.dir / "busybox"

    @property
    def failed_marker(self) -> Path:
        return config.cache_subdir("busybox") / f"failed-{self.key}.json"

    @property
    def log_path(self) -> Path:
        return config.cache_subdir("busybox") / f"build-{self.key}.log"

    def built(self) -> bool:
        return (self.dir / "build.json").is_file() and self.path.is_file()


@dataclass(frozen=True)
class BusyboxChoice:
    """The busybox a guest image gets, and what it is (the image manifest's ``busybox_build``)."""

    path: Path
    libc: str                       # "musl" or "glibc" (or "unknown" for a file of one's own)
    source: str                     # "vmlab build", "debian package", "VMLAB_BUSYBOX"
    fallback: Optional[str] = None  # why the musl build is not used, when it should have been
    pending: bool = False           # the musl build is not made yet: the next image build makes it

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"path": str(self.path), "libc": self.libc, "source": self.source}
        if self.fallback:
            d["fallback"] = self.fallback
        return d


def musl_busybox() -> MuslBusybox:
    """The musl build for this machine (builds nothing); SetupError when musl-gcc is not installed."""
    need_tool("musl-gcc", "musl-tools", needed_for="to build the guest's busybox with musl (commands start faster)")
    if not MUSL_LIBC.is_file():
        raise SetupError(f"musl's C library {MUSL_LIBC} is missing", fix=MUSL_FIX)
    h = hashlib.sha256(json.dumps([BUSYBOX_BUILDER, SOURCE_VERSION, [f.sha256 for f in SOURCE_FILES],
                                   sorted(MUSL_OFF), gcc_version()]).encode())
    h.update(cached_sha256(MUSL_LIBC, config.cache_dir() / "hashes.json").encode())
    return MuslBusybox(h.hexdigest()[:16])


def guest_busybox(progress: Progress = None, *, build: bool = True, retry: bool = False) -> BusyboxChoice:
    """The busybox for the guest image (module docstring); with *build*, builds the musl one if it is missing.

    *retry* tries a download or build that failed less than :data:`RETRY_AFTER` seconds ago again."""
    override = config.busybox_override()
    if override and override != "debian":
        path = Path(override)
        if not path.is_file():
            raise SetupError(f"VMLAB_BUSYBOX={override} is not a file",
                             fix="set VMLAB_BUSYBOX to a static busybox, to `debian` (the host's busybox-static), "
                                 "or unset it (vmlab's musl build)")
        check_static(path)
        return BusyboxChoice(path, "unknown", "VMLAB_BUSYBOX")
    if override == "debian":
        return BusyboxChoice(find_busybox(), "glibc", "debian package")
    try:
        bb = musl_busybox()
    except SetupError as exc:
        return _fallback(f"{exc.message} (fix: {exc.fix})")
    if bb.built():
        return BusyboxChoice(bb.path, "musl", "vmlab build")
    failed = _recent_failure(bb)
    if failed and not retry:
        return _fallback(failed)
    if not build:
        return BusyboxChoice(find_busybox(), "glibc", "debian package", pending=True,
                             fallback="the musl busybox is not built yet (the next image build builds it, about 40 s)")
    try:
        ensure_musl_busybox(bb, progress)
    except (ImageError, SetupError, OSError, subprocess.TimeoutExpired) as exc:
        reason = (f"{exc.message} (fix: {exc.fix})" if exc.fix else exc.message) \
            if isinstance(exc, (ImageError, SetupError)) else f"building it failed: {exc}"
        try:
            write_json(bb.failed_marker, {"reason": reason, "time": time.time()})
        except OSError:
            pass
        return _fallback(reason)
    return BusyboxChoice(bb.path, "musl", "vmlab build")


_WARNED: set = set()     # reasons already warned of in this process (ensure_image runs at every VM start)


def _fallback(reason: str) -> BusyboxChoice:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("the guest gets Debian's glibc busybox (commands start about 0.3 ms slower): %s", reason)
    return BusyboxChoice(find_busybox(), "glibc", "debian package", fallback=reason)


def _recent_failure(bb: MuslBusybox) -> Optional[str]:
    try:
        data = json.loads(bb.failed_marker.read_text())
        if time.time() - float(data["time"]) < RETRY_AFTER:
            return f"{data['reason']} (it failed within the hour; `python -m vmlab image build` tries again)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def ensure_musl_busybox(bb: MuslBusybox, progress: Progress) -> MuslBusybox:
    """Build *bb* unless it is in the cache (one build at a time; a second caller waits)."""
    if bb.built():
        return bb
    root = config.cache_subdir("busybox")
    with exclusive_lock(root, progress, "the guest's busybox"):
        if not bb.built():
            with umask(0o077):
                _build(bb, root, progress)
    return bb


# --------------------------------------------------------------------------- the source
def source_urls(f: SourceFile) -> List[str]:
    """Where *f* is fetched from, in order: the Debian archive (``VMLAB_DEBIAN_MIRROR``), then snapshot.debian.org."""
    mirror = (config.debian_mirror() or DEFAULT_MIRROR).rstrip("/")
    return [f"{mirror}/{POOL}/{f.name}", SNAPSHOT.format(sha1=f.sha1)]


def fetch_source(f: SourceFile, downloads: Path, progress: Progress, timeout: float = 60.0) -> Path:
    """*f* in *downloads* (downloaded once, size and sha256 checked; 0600); ImageError naming every URL tried."""
    dest = downloads / f.name
    if dest.is_file() and dest.stat().st_size == f.size and sha256_file(dest) == f.sha256:
        return dest
    tried: List[str] = []
    for url in source_urls(f):
        say(progress, f"downloading {f.name} ({f.size / 1e6:.1f} MB) from {url}")
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=downloads)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            size, digest = tmp.stat().st_size, sha256_file(tmp)
            if size != f.size or digest != f.sha256:
                tried.append(f"{url}: {size} bytes, sha256 {digest[:12]}…, expected {f.size} bytes, "
                             f"{f.sha256[:12]}…")
                continue
            os.replace(tmp, dest)
            return dest
        except urllib.error.HTTPError as exc:
            tried.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            tried.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise ImageError(f"cannot download {f.name} (Debian's busybox source {SOURCE_VERSION}): " + "; ".join(tried),
                     fix="check the network, or set VMLAB_DEBIAN_MIRROR to a Debian mirror that has it; "
                         "meanwhile the guest uses the host's busybox-static")


# --------------------------------------------------------------------------- the build
def musl_config(debian: str) -> str:
    """Debian's configuration with :data:`MUSL_OFF` turned off (ImageError if one of them is not in it)."""
    lines = debian.splitlines()
    for opt in MUSL_OFF:
        at = [i for i, line in enumerate(lines) if line.startswith(f"{opt}=") or line == f"# {opt} is not set"]
        if not at:
            raise ImageError(f"Debian's busybox configuration has no {opt}",
                             fix=f"update MUSL_OFF in {__file__} for busybox {SOURCE_VERSION}")
        for i in at:
            lines[i] = f"# {opt} is not set"
    return "\n".join(lines) + "\n"


def _tools() -> Dict[str, str]:
    return {name: need_tool(name, pkg, needed_for="to build the guest's busybox with musl")
            for name, pkg in BUILD_TOOLS.items()}


def _build(bb: MuslBusybox, root: Path, progress: Progress) -> None:
    tools = _tools()
    for stale in root.glob(".build-*"):          # builders that died (we hold the lock)
        rmtree(stale)
    t0 = time.monotonic()
    downloads = config.cache_subdir("downloads")
    files = [fetch_source(f, downloads, progress) for f in SOURCE_FILES]
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{bb.key}-", dir=root))
    try:
        with open(bb.log_path, "w") as logf:
            src = _unpack(files, tmp, tools, logf)
            say(progress, f"configuring busybox {SOURCE_VERSION} as Debian's static flavour, less "
                          f"{', '.join(MUSL_OFF)} (GNU regex)")
            wanted = musl_config("".join((src / p).read_text() for p in DEBIAN_CONFIG))
            (src / ".config").write_text(wanted)
            _run(["make", "oldconfig"], src, tools, logf, stdin=b"\n" * 4096)
            drift = missing_options(parse_config(wanted), parse_config((src / ".config").read_text()))
            if drift:
                raise ImageError(f"busybox's configuration changed {len(drift)} option(s) under musl: "
                                 + ", ".join(drift[:8]), fix=f"update MUSL_OFF in {__file__}")
            kh = tmp / "kernel-headers"
            kh.mkdir()
            for name, target in KERNEL_HEADERS.items():
                if not Path(target).is_dir():
                    raise SetupError(f"the Linux headers {target} are missing (busybox includes them)",
                                     fix="apt-get install linux-libc-dev")
                os.symlink(target, kh / name)
            jobs = os.cpu_count() or 1
            say(progress, f"compiling busybox with musl (make -j{jobs}; about 30 s on 2 cores; log: {bb.log_path})")
            _run(["make", f"-j{jobs}", f"CC={tools['musl-gcc']}", f"EXTRA_CFLAGS=-isystem {kh}",
                  f"BB_EXTRA_VERSION=Debian {SOURCE_VERSION} source, musl, vmlab", "busybox"], src, tools, logf)
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(src / "busybox", out / "busybox")
        check_static(out / "busybox")
        shutil.copy2(src / ".config", out / "config")
        write_json(out / "build.json", {"builder": BUSYBOX_BUILDER, "source_version": SOURCE_VERSION,
                                        "musl_off": MUSL_OFF, "jobs": jobs, "gcc": gcc_version(),
                                        "build_seconds": round(time.monotonic() - t0, 1)})
        if bb.dir.exists():
            rmtree(bb.dir)
        os.replace(out, bb.dir)
        bb.failed_marker.unlink(missing_ok=True)
        say(progress, f"busybox built with musl in {time.monotonic() - t0:.0f} s: {bb.path}")
    finally:
        rmtree(tmp)
    prune_builds(root, keep=KEEP_BUILDS)     # an image holds its own copy of the busybox it got


def _unpack(files: List[Path], tmp: Path, tools: Dict[str, str], logf: Any) -> Path:
    orig, debian = files
    run_tool([tools["tar"], "-xjf", orig, "-C", tmp], what=f"unpacking {orig.name}", error=ImageError, timeout=600)
    srcs = [d for d in tmp.iterdir() if d.is_dir() and d.name.startswith("busybox-")]
    if len(srcs) != 1:
        raise ImageError(f"{orig.name} did not unpack to one busybox-* directory",
                         fix="remove it from the downloads directory and build again")
    src = srcs[0]
    run_tool([tools["tar"], "-xJf", debian, "-C", src], what=f"unpacking {debian.name}", error=ImageError,
             timeout=600)
    series = src / "debian" / "patches" / "series"
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            _run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-i", str(series.parent / name)],
                 src, tools, logf)
    return src


def _run(argv: List[str], cwd: Path, tools: Dict[str, str], logf: Any, stdin: bytes = b"") -> None:
    """Run one build step in *cwd*, output to the build log; ImageError with the log's end if it fails."""
    argv = [tools.get(argv[0], argv[0]), *argv[1:]]
    logf.write(f"$ {' '.join(argv)}\n")
    logf.flush()
    env = {**os.environ, "KCONFIG_NOTIMESTAMP": "1", "LC_ALL": "C"}
    proc = subprocess.run(argv, cwd=cwd, input=stdin, stdout=logf, stderr=subprocess.STDOUT, env=env,
                          timeout=1800)
    if proc.returncode:
        logf.flush()
        text = Path(logf.name).read_text(errors="replace")
        raise ImageError(f"{' '.join(argv[:2])} failed building the guest's busybox (exit status "
                         f"{proc.returncode}):\n    " + tail(text, 12).replace("\n", "\n    ")
                         + f"\n    (the whole log: {logf.name})",
                         fix="install what it names (`make setup`); meanwhile the guest uses the host's "
                             "busybox-static")

