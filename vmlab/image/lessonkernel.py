"""The lesson kernel: Linux built for the lesson guest from Debian's own source package, cached.

Debian's generic kernel probes and initialises much that the lesson guest never has (docs/boot.md
measures it: a cold boot of vmlab's guest on it costs about 0.85 of a plain QEMU boot of the same
kernel). The lesson kernel is the same source (``linux-source-<major.minor>`` at the version of
the ``linux-image`` package :mod:`.debian` picks), configured with ``make tinyconfig`` plus the
fragment ``guest/lesson-kernel.config`` (every driver, file system and feature a lesson uses;
the drivers of ``modules.txt`` stay modules, as in Debian's kernel), and built once:

    apt-get download linux-source-6.1=<ver>  (139 MB)  ->  tar -xJ  ->  make tinyconfig
    -> merge_config.sh -m .config lesson-kernel.config -> make olddefconfig (every line checked)
    -> make -jN vmlinux modules -> make modules_install

into ``cache_dir()/kernels/<key>/`` (``vmlinux``, ``lib/modules/<release>/``, ``config``,
``build.json``; the build tree, ~1.6 GB, is removed). The key hashes the source package and
version, the fragment, gcc and :data:`KERNEL_BUILDER`, so resolving it (:func:`lesson_kernel`)
builds nothing. A build takes about 8 minutes on two cores (docs/boot.md); ``make`` writes its
output to ``cache_dir()/kernels/build-<key>.log``, named in any error. ``VMLAB_GUEST_KERNEL=debian``
boots Debian's packaged kernel instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional

from .. import config
from ..errors import ImageError
from ..tools import need_tool, run_tool, tail
from .debian import download_deb, find_deb
from .guesttools import gcc_version
from .util import (
    DEFAULT_GUEST_DIR,
    Progress,
    exclusive_lock,
    prune_builds,
    resolve_guest_dir,
    rmtree,
    say,
    umask,
    write_json,
)

#: Bump when the build recipe changes what it produces; part of the key.
KERNEL_BUILDER = "vmlab-kernel-1"
#: the fragment, in the guest sources dir
FRAGMENT = "lesson-kernel.config"
#: what ``uname -r`` ends with in a lesson guest
LOCALVERSION = "-vmlab"
#: the build's programs and the Debian packages that have them (``make setup`` installs them)
BUILD_TOOLS = {"make": "make", "flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl", "tar": "tar",
               "xz": "xz-utils", "depmod": "kmod"}
#: lesson kernels kept in the cache (a changed configuration builds a new one; ~25 MB each)
KEEP_KERNELS = 2
#: free space the build needs in the cache (source tree and objects; removed afterwards)
BUILD_SPACE = 2 << 30
_FIX_DEBIAN = "or boot Debian's packaged kernel instead: export VMLAB_GUEST_KERNEL=debian"
_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


@dataclass
class LessonKernel:
    """What identifies a lesson kernel (cheap to know) and where it is built."""

    source_package: str        # linux-source-6.1
    source_version: str        # 6.1.192-3 (Debian's version, the same as the linux-image package's)
    release: str               # 6.1.192-vmlab (``uname -r``)
    key: str
    fragment: Path

    @property
    def dir(self) -> Path:
        return config.cache_subdir("kernels") / self.key

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.dir / "lib" / "modules" / self.release

    def built(self) -> bool:
        return (self.dir / "build.json").is_file() and self.vmlinux.is_file() and self.modules_dir.is_dir()


def fragment_options(path: Path) -> Dict[str, str]:
    """The fragment's options, the last line of each winning (``n`` for ``=n``)."""
    out: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _OPTION.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def config_options(path: Path) -> Dict[str, str]:
    """A kernel ``.config``'s options (``n`` for ``# CONFIG_X is not set``)."""
    return parse_config(path.read_text())


def parse_config(text: str) -> Dict[str, str]:
    """The options of a kconfig ``.config`` text (the kernel's or busybox's; ``n`` for ``# CONFIG_X is not set``)."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        m = _OPTION.match(line) or _UNSET.match(line)
        if m:
            out[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return out


def missing_options(fragment: Dict[str, str], final: Dict[str, str]) -> List[str]:
    """Lines of the fragment the final configuration does not have (a dependency is missing, or a typo)."""
    return [f"{k}={v} (got {final.get(k, 'n')})" for k, v in fragment.items() if final.get(k, "n") != v]


def lesson_kernel(package_version: str, guest_dir: Optional[Path] = None) -> LessonKernel:
    """The lesson kernel of Debian's kernel version *package_version* (e.g. ``6.1.192-3``); builds nothing."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", package_version)
    if not m:
        raise ImageError(f"cannot tell the Linux version of Debian's kernel package version {package_version!r}",
                         fix=_FIX_DEBIAN)
    fragment = resolve_guest_dir(guest_dir) / FRAGMENT
    if not fragment.is_file() and guest_dir is not None:      # a guest dir of one's own may leave the kernel to vmlab's
        fragment = DEFAULT_GUEST_DIR / FRAGMENT
    if not fragment.is_file():
        raise ImageError(f"the lesson kernel's configuration {fragment} is missing",
                         fix="restore it from vmlab's source (git checkout vmlab/guest), " + _FIX_DEBIAN)
    package = f"linux-source-{m.group(1)}.{m.group(2)}"
    h = hashlib.sha256(json.dumps([KERNEL_BUILDER, package, package_version, gcc_version()]).encode())
    h.update(fragment.read_bytes())
    return LessonKernel(package, package_version, f"{m.group(0)}{LOCALVERSION}", h.hexdigest()[:16], fragment)


def ensure_lesson_kernel(k: LessonKernel, progress: Progress) -> LessonKernel:
    """Build *k* unless it is in the cache (one build at a time; a second caller waits)."""
    if k.built():
        return k
    kernels = config.cache_subdir("kernels")
    with exclusive_lock(kernels, progress, "the lesson kernel"):
        if not k.built():
            with umask(0o077):
                _build(k, kernels, progress)
    return k


def _tools() -> Dict[str, str]:
    return {name: need_tool(name, pkg, needed_for="to build the lesson kernel (or set VMLAB_GUEST_KERNEL=debian)")
            for name, pkg in BUILD_TOOLS.items()}


def _build(k: LessonKernel, kernels: Path, progress: Progress) -> None:
    tools = _tools()
    for stale in kernels.glob(".build-*"):          # builders that died (we hold the lock)
        rmtree(stale)
    st = os.statvfs(kernels)
    if st.f_bavail * st.f_frsize < BUILD_SPACE:
        raise ImageError(f"less than {BUILD_SPACE >> 30} GB free in {kernels}: the lesson kernel's build tree "
                         "needs about 1.6 GB (removed afterwards)",
                         fix="free some space or set VMLAB_CACHE to a directory on a bigger disk, " + _FIX_DEBIAN)
    t0 = time.monotonic()
    downloads = config.cache_subdir("downloads")
    deb = find_deb(downloads, k.source_package, k.source_version, arch="all") or download_deb(
        downloads, k.source_package, k.source_version, progress, arch="all", size="about 140 MB")
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{k.key}-", dir=kernels))
    log_path = kernels / f"build-{k.key}.log"
    try:
        say(progress, f"unpacking {deb.name} (the lesson kernel's source)")
        run_tool([need_tool("dpkg-deb"), "-x", deb, tmp / "deb"], what=f"extracting {deb.name}", error=ImageError,
                 timeout=900)
        tarballs = sorted((tmp / "deb" / "usr" / "src").glob("linux-source-*.tar.xz"))
        if not tarballs:
            raise ImageError(f"{deb.name} holds no usr/src/linux-source-*.tar.xz", fix=_FIX_DEBIAN)
        run_tool([tools["tar"], "-xJf", tarballs[0], "-C", tmp], what=f"unpacking {tarballs[0].name}",
                 error=ImageError, timeout=1800)
        rmtree(tmp / "deb")
        src = tmp / tarballs[0].name[: -len(".tar.xz")]
        with open(log_path, "w") as log:
            _configure(k, src, tools, log, progress)
            jobs = os.cpu_count() or 1
            say(progress, f"compiling the lesson kernel {k.release} (make -j{jobs}; about 8 min on 2 cores; "
                          f"log: {log_path})")
            _make(src, tools, ["vmlinux", "modules"], log, log_path, progress, jobs)
            out = tmp / "out"
            out.mkdir()
            _make(src, tools, [f"INSTALL_MOD_PATH={out}", "modules_install"], log, log_path, None, 1)
        release = (src / "include" / "config" / "kernel.release").read_text().strip()
        if release != k.release:
            raise ImageError(f"the lesson kernel built as {release}, not {k.release}", fix=_FIX_DEBIAN)
        shutil.copy2(src / "vmlinux", out / "vmlinux")
        shutil.copy2(src / ".config", out / "config")
        for link in ("build", "source"):                        # they point into the build tree
            (out / "lib" / "modules" / release / link).unlink(missing_ok=True)
        write_json(out / "build.json", {"builder": KERNEL_BUILDER, "package": k.source_package,
                                        "version": k.source_version, "release": release, "jobs": jobs,
                                        "build_seconds": round(time.monotonic() - t0, 1), "gcc": gcc_version()})
        os.replace(out, k.dir)
        say(progress, f"lesson kernel {release} built in {time.monotonic() - t0:.0f} s: {k.dir}")
    finally:
        rmtree(tmp)
    prune_builds(kernels, keep=KEEP_KERNELS)     # an image holds its own copy of what it boots


def _configure(k: LessonKernel, src: Path, tools: Dict[str, str], log: IO[str], progress: Progress) -> None:
    say(progress, f"configuring it: make tinyconfig + {k.fragment.name}")
    _make(src, tools, ["tinyconfig"], log, None, None, 1)
    frag = src / "vmlab.config"
    shutil.copy(k.fragment, frag)
    run_tool(["bash", "scripts/kconfig/merge_config.sh", "-m", ".config", str(frag)], cwd=src,
             what="merging the lesson kernel's configuration", error=ImageError, timeout=300)
    _make(src, tools, ["olddefconfig"], log, None, None, 1)
    missing = missing_options(fragment_options(k.fragment), config_options(src / ".config"))
    if missing:
        raise ImageError(f"the lesson kernel's configuration lost {len(missing)} line(s) of {k.fragment}: "
                         + ", ".join(missing[:8]),
                         fix="add the options they depend on to the fragment, " + _FIX_DEBIAN)


def _make(src: Path, tools: Dict[str, str], targets: List[str], log: IO[str], log_path: Optional[Path],
          progress: Progress, jobs: int) -> None:
    """``make`` in *src*, output to *log*; with *progress*, a line every 30 s (files compiled so far)."""
    argv = [tools["make"], f"-j{jobs}", "LOCALVERSION=", "KBUILD_BUILD_USER=vmlab", "KBUILD_BUILD_HOST=vmlab",
            *targets]
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    start = log.tell()
    proc = subprocess.Popen(argv, cwd=src, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    t0 = last = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if progress is not None and log_path is not None and time.monotonic() - last >= 30:
                last = time.monotonic()
                with open(log_path, "rb") as f:
                    f.seek(start)
                    done = f.read().count(b"  CC ")
                say(progress, f"  {done} files compiled ({last - t0:.0f} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        log.flush()
        text = Path(log.name).read_text(errors="replace")
        raise ImageError(f"make {' '.join(targets)} failed for the lesson kernel (exit status {proc.returncode}):\n    "
                         + tail(text, 12).replace("\n", "\n    ") + f"\n    (the whole log: {log.name})",
                         fix="install what it names (`make setup`), " + _FIX_DEBIAN)
