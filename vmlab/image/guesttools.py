"""The programs inside the guest: busybox (static; :mod:`.busybox` builds the guest's) and vmlab's own C tools.

Every C tool of the guest is a row of :data:`GUEST_TOOLS`: its source is ``guest/<source>``,
it is compiled with ``gcc -static`` (the guest has no C library) and installed as
``/bin/<name>``. To add one, put the C file in ``vmlab/guest/`` and add a row; the image key
changes with the guest directory's contents, so the next ``ensure_image()`` rebuilds.
A tool with ``programs`` also has guest programs of its own: every ``guest/<programs>/NAME.S``
is assembled into a flat binary (:data:`FLAT_CFLAGS`) installed as ``/lib/<name>/NAME.bin``
(the hypervisor ``hv`` runs them as the code of its VMs).

:func:`native_tool` compiles a tool for the host instead (cached by source hash in
``cache_dir()/native``): the "no hypervisor" baseline of the CPU and hosted lessons.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import config
from ..errors import ImageError, SetupError
from ..tools import need_tool, run_tool, tail
from .elf import elf_info
from .util import Progress, resolve_guest_dir, say

STATIC_CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall", "-s")   # -s: no symbol tables (~90 kB each, in every guest's RAM)


@dataclass(frozen=True)
class GuestTool:
    """A C program compiled into the guest image as ``/bin/<name>``."""

    name: str                                     # installed as /bin/<name>
    source: str                                   # file name in the guest sources dir
    cflags: tuple[str, ...] = STATIC_CFLAGS
    programs: str = ""                            # dir of NAME.S flat programs -> /lib/<name>/NAME.bin


#: vmlab's C tools in the guest image, in build order
GUEST_TOOLS: tuple[GuestTool, ...] = (
    GuestTool("vmagent", "vmagent.c"),     # the guest agent (commands, files, over virtio-serial)
    GuestTool("vmbench", "vmbench.c"),     # the benchmark program (CPU, memory, I/O, timers)
    GuestTool("hv", "hv.c", programs="hvprogs"),   # a hypervisor in 200 lines on /dev/kvm, its guest programs
)

#: a flat binary (no headers) of 32-bit code linked to run at guest-physical 0x10000,
#: where hv loads it (HV_LOAD in guest/hvprogs/hvdefs.h); entry point at its first byte
FLAT_CFLAGS: tuple[str, ...] = ("-nostdlib", "-static", "-Wl,--build-id=none", "-Wl,-Ttext=0x10000",
                                "-Wl,-e,_start", "-Wl,--oformat=binary")

#: every file a guest sources dir must have
GUEST_SOURCES: tuple[str, ...] = ("init", "modules.txt", *(t.source for t in GUEST_TOOLS))

_STATIC_LIBC_MISSING = re.compile(r"cannot find -lc\b|crt1\.o|stdio\.h: No such file")
_BUSYBOX_FIX = "apt-get install busybox-static"


def guest_tool(name: str) -> GuestTool:
    """The row of :data:`GUEST_TOOLS` called ``name``."""
    for t in GUEST_TOOLS:
        if t.name == name:
            return t
    raise KeyError(f"{name!r} is not a guest tool (one of: {', '.join(t.name for t in GUEST_TOOLS)})")


def check_guest_dir(gdir: Path) -> None:
    """ImageError unless ``gdir`` has every file of :data:`GUEST_SOURCES`."""
    missing = [n for n in GUEST_SOURCES if not (gdir / n).is_file()]
    if missing:
        raise ImageError(f"the guest sources directory {gdir} lacks {', '.join(missing)}",
                         fix="reinstall vmlab (or pass guest_dir= a directory with "
                             + ", ".join(GUEST_SOURCES[:-1]) + f" and {GUEST_SOURCES[-1]})")


# --------------------------------------------------------------------------- busybox
def find_busybox() -> Path:
    """A static busybox: ``$VMLAB_BUSYBOX`` when it is a path, else the system's ``busybox-static`` (the guest gets
    vmlab's musl build of the same source unless ``$VMLAB_BUSYBOX`` says otherwise: :mod:`.busybox`)."""
    env = config.busybox_override()
    if env == "debian":
        env = None
    candidates = [env] if env else ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")]
    for c in candidates:
        if c and os.path.isfile(c):
            path = Path(c)
            check_static(path)
            return path
    raise SetupError("busybox is not installed (the guest's shell and tools)", fix=_BUSYBOX_FIX)


def check_static(path: Path) -> None:
    """SetupError unless ``path`` is a statically linked ELF program."""
    info = elf_info(path)
    if not info["elf"]:
        raise SetupError(f"{path} is not an ELF executable", fix=_BUSYBOX_FIX)
    if info["interp"]:
        raise SetupError(f"{path} is dynamically linked; the guest has no C library, so it "
                         "needs the statically linked busybox", fix=_BUSYBOX_FIX)


def busybox_applets(busybox: Path) -> list[str]:
    """The applet names ``busybox --list`` prints, sorted."""
    proc = run_tool([busybox, "--list"], what="busybox --list", fix=_BUSYBOX_FIX,
                    error=SetupError, timeout=60)
    return sorted({a.strip() for a in proc.stdout.decode().split() if a.strip() and "/" not in a})


# --------------------------------------------------------------------------- gcc
_GCC_SEEN: dict[tuple[str, int, int], str] = {}


def gcc_version() -> str:
    """First line of ``gcc --version`` (part of the image key); asked once per gcc binary (path, size, mtime),
    since every VM start computes the key (a process costs ~2 ms)."""
    gcc = need_tool("gcc", needed_for="to build the guest image")
    st = os.stat(gcc)
    ident = (os.path.realpath(gcc), st.st_size, st.st_mtime_ns)
    if ident not in _GCC_SEEN:
        proc = run_tool([gcc, "--version"], what="gcc --version", fix="apt-get install gcc libc6-dev",
                        error=SetupError, timeout=60)
        _GCC_SEEN[ident] = proc.stdout.decode(errors="replace").splitlines()[0].strip()
    return _GCC_SEEN[ident]


def compile_tool(src: Path, out: Path, cflags: tuple[str, ...] = STATIC_CFLAGS) -> None:
    """``gcc <cflags> -o out src``; a missing static C library is a SetupError with the fix,
    any other compile error an ImageError with gcc's messages."""
    gcc = need_tool("gcc", needed_for="to build the guest image")
    try:
        run_tool([gcc, *cflags, "-o", out, src], what=f"compiling {src.name}",
                 fix=f"fix the compile error in {src}", error=ImageError)
    except ImageError as exc:
        if _STATIC_LIBC_MISSING.search(exc.message):
            raise SetupError(f"cannot build static programs: the static C library is missing "
                             f"(compiling {src.name})\n    {tail(exc.message, 3)}",
                             fix="apt-get install gcc libc6-dev") from exc
        if "No space left on device" in exc.message:      # the disk filled, not the source: say so
            raise ImageError(f"compiling {src.name} failed: No space left on device ({out.parent})",
                             fix="free some space (the build needs ~600 MB) or set VMLAB_CACHE to a "
                                 "directory on a bigger disk") from exc
        raise
    os.chmod(out, 0o755)


def install_guest_tools(gdir: Path, bindir: Path, progress: Progress) -> None:
    """Compile every tool of :data:`GUEST_TOOLS` from ``gdir`` into ``bindir`` (and its guest
    programs into ``bindir/../lib/<name>/``)."""
    for tool in GUEST_TOOLS:
        say(progress, f"compiling {tool.source} (gcc -static)")
        compile_tool(gdir / tool.source, bindir / tool.name, tool.cflags)
        if tool.programs:
            compile_programs(gdir / tool.programs, bindir.parent / "lib" / tool.name)


def compile_programs(src_dir: Path, out_dir: Path) -> list[str]:
    """Assemble every ``src_dir/NAME.S`` into the flat binary ``out_dir/NAME.bin``; their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for src in sorted(src_dir.glob("*.S")):
        compile_tool(src, out_dir / f"{src.stem}.bin", FLAT_CFLAGS)
        os.chmod(out_dir / f"{src.stem}.bin", 0o644)
        names.append(src.stem)
    return names


def native_programs(name: str, progress: Progress = None, guest_dir: Optional[Path] = None) -> Path:
    """The guest programs of tool ``name`` assembled on the host, cached by source hash
    (``cache_dir()/native/<name>-programs-<hash>/NAME.bin``): what ``native_tool(name)`` runs."""
    tool = guest_tool(name)
    src_dir = resolve_guest_dir(guest_dir) / tool.programs
    h = hashlib.sha256(" ".join(FLAT_CFLAGS).encode())
    for p in sorted(src_dir.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    d = config.cache_subdir("native") / f"{name}-programs-{h.hexdigest()[:16]}"
    if not d.is_dir():
        say(progress, f"assembling the guest programs of {name} for the host")
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        compile_programs(src_dir, tmp)
        os.replace(tmp, d)
    return d


def native_tool(name: str, progress: Progress = None, force: bool = False,
                guest_dir: Optional[Path] = None) -> Path:
    """Guest tool ``name`` compiled for the host, cached by source hash in
    ``cache_dir()/native/<name>-<hash>`` (the same C code, run without a hypervisor)."""
    tool = guest_tool(name)
    src = resolve_guest_dir(guest_dir) / tool.source
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    d = config.cache_subdir("native")
    exe = d / f"{name}-{digest}"
    if exe.exists() and os.access(exe, os.X_OK) and not force:
        return exe
    if not shutil.which("gcc"):
        raise SetupError(f"gcc is not installed, so {tool.source} cannot be compiled for the host "
                         "(the native baseline of the CPU and hosted lessons)",
                         fix="apt-get install gcc libc6-dev (or run `make setup`)")
    say(progress, f"compiling {tool.source} for the host (gcc -static -O2)")
    tmp = d / f".{name}-{digest}.tmp{os.getpid()}"
    try:
        compile_tool(src, tmp, tool.cflags)
        os.replace(tmp, exe)
    finally:
        tmp.unlink(missing_ok=True)
    return exe
