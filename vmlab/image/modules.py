"""Kernel modules for the guest: ``modules.txt``, the dependency closure, copying, depmod.

``guest/modules.txt`` lists the modules the lessons need (one per line; ``required`` marks
those without which the image is useless, ``base`` those every guest loads at boot). :func:`module_closure` adds their dependencies
(``modules.dep``), aliases and soft dependencies; the copies are decompressed to plain
``.ko`` files and ``depmod`` writes a ``modules.dep`` so busybox ``modprobe`` resolves
dependencies in the guest.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import re
import shutil
from pathlib import Path
from typing import Sequence, TypedDict

from ..errors import ImageError
from ..tools import need_tool, run_tool
from .util import Progress, say

_NEEDED = "to build the guest image"


class ModuleClosure(TypedDict):
    """What :func:`module_closure` found."""

    paths: list[str]      # module files relative to the modules dir
    names: list[str]      # their module names (underscores)
    missing: list[str]    # asked for, neither a module nor built in
    builtin: list[str]    # asked for, built into the kernel


def modname(path_or_name: str) -> str:
    """``kernel/drivers/virtio/virtio-pci.ko.xz`` -> ``virtio_pci``."""
    base = os.path.basename(path_or_name)
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def _modules_txt_lines(path: Path) -> list[list[str]]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].split()
        if line:
            lines.append(line)
    return lines


def parse_modules_txt(path: Path) -> list[tuple[str, bool]]:
    """(name, required) per line of a modules.txt (``#`` comments, blank lines skipped)."""
    return [(line[0], "required" in line[1:]) for line in _modules_txt_lines(path)]


def base_modules_txt(path: Path) -> list[tuple[str, bool]]:
    """The lines of a modules.txt marked ``base`` (what every guest's ``/init`` loads), as (name, required)."""
    return [(line[0], "required" in line[1:]) for line in _modules_txt_lines(path) if "base" in line[1:]]


def _rel_module_path(p: str, moddir: Path) -> str:
    if not os.path.isabs(p):
        return p
    with contextlib.suppress(ValueError):
        return str(Path(p).relative_to(moddir))
    m = re.search(r"/lib/modules/[^/]+/(.*)$", p)
    return m.group(1) if m else p.lstrip("/")


class _Index:
    """modules.dep, .builtin, .alias and .softdep of a modules dir."""

    def __init__(self, moddir: Path) -> None:
        self.deps: dict[str, list[str]] = {}
        self.by_name: dict[str, str] = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            mod = _rel_module_path(mod.strip(), moddir)
            self.deps[mod] = [_rel_module_path(d, moddir) for d in rest.split()]
            self.by_name[modname(mod)] = mod
        self.builtin: set[str] = set()
        with contextlib.suppress(OSError):
            self.builtin = {modname(line.strip()) for line in
                            (moddir / "modules.builtin").read_text().splitlines() if line.strip()}
        self.aliases: dict[str, list[str]] = {}
        with contextlib.suppress(OSError):
            for line in (moddir / "modules.alias").read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias" and not any(c in parts[1] for c in "*?["):
                    self.aliases.setdefault(parts[1], []).append(parts[2])
        self.softdeps: dict[str, list[str]] = {}
        with contextlib.suppress(OSError):
            for line in (moddir / "modules.softdep").read_text().splitlines():
                parts = line.split()
                if len(parts) > 2 and parts[0] == "softdep":
                    self.softdeps[modname(parts[1])] = [p for p in parts[2:] if not p.endswith(":")]


def module_closure(moddir: Path, wanted: Sequence[tuple[str, bool]]) -> ModuleClosure:
    """Dependency closure of ``wanted`` in ``moddir`` (which has a modules.dep).

    Raises ImageError if a required module is neither a module nor built in.
    """
    idx = _Index(moddir)
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
            stack.extend(idx.deps.get(r, []))
            for soft in idx.softdeps.get(modname(r), []):   # best effort (e.g. ext4 -> crc32c)
                for target in [soft, *idx.aliases.get(soft, [])]:
                    t = idx.by_name.get(modname(target))
                    if t:
                        stack.append(t)

    out = ModuleClosure(paths=[], names=[], missing=[], builtin=[])
    required_missing = []
    for name, required in wanted:
        n = modname(name)
        rel = idx.by_name.get(n)
        if rel is None:
            targets = [idx.by_name[modname(t)] for t in idx.aliases.get(name, [])
                       if modname(t) in idx.by_name]
            if targets:
                for t in targets:
                    add(t)
                continue
        if rel is not None:
            add(rel)
        elif n in idx.builtin:
            out["builtin"].append(name)
        else:
            out["missing"].append(name)
            if required:
                required_missing.append(name)
    if required_missing:
        raise ImageError(
            f"the kernel modules directory {moddir} lacks required module(s) "
            f"{', '.join(required_missing)} (needed by the guest image; see modules.txt)",
            fix="use Debian's generic -amd64 kernel (unset VMLAB_KERNEL and "
                "VMLAB_KERNEL_MODULES), or a kernel built with these drivers "
                "(CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_CONSOLE)")
    out["paths"] = sorted(included)
    out["names"] = sorted({modname(r) for r in included})
    return out


def copy_module(src: Path, dst_no_ext: Path) -> None:
    """Copy a module, decompressing .ko.xz/.ko.zst/.ko.gz to a plain .ko."""
    name = src.name
    dst_no_ext.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".ko"):
        shutil.copyfile(src, dst_no_ext)
    elif name.endswith(".ko.xz"):
        with lzma.open(src, "rb") as f, open(dst_no_ext, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    elif name.endswith(".ko.gz"):
        with gzip.open(src, "rb") as f, open(dst_no_ext, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    elif name.endswith(".ko.zst"):
        zstd = need_tool("zstd", needed_for=_NEEDED)
        run_tool([zstd, "-q", "-d", "-f", "-o", dst_no_ext, src], what=f"decompressing {name}",
                 fix="apt-get install zstd", error=ImageError)
    else:
        raise ImageError(f"unknown kernel module format: {src}",
                         fix="use modules ending in .ko, .ko.xz, .ko.zst or .ko.gz")


SIGNATURE_MAGIC = b"~Module signature appended~\n"


def strip_signature(path: Path) -> bool:
    """Cut the appended signature off a module file; True if it had one.

    The guest kernel then skips a public-key check per module (tens of ms each
    under TCG, docs/boot.md) and marks itself tainted ("E", unsigned module).
    Only for kernels that do not enforce signatures (CONFIG_MODULE_SIG_FORCE unset).
    """
    data = path.read_bytes()
    if not data.endswith(SIGNATURE_MAGIC):
        return False
    # struct module_signature (12 bytes, sig_len big-endian at its end) precedes the magic
    end = len(data) - len(SIGNATURE_MAGIC)
    sig_len = int.from_bytes(data[end - 4:end], "big")
    start = end - 12 - sig_len
    if start <= 0:
        return False
    path.write_bytes(data[:start])
    return True


def signatures_enforced(config_file: Path | None) -> bool:
    """Does the kernel built with ``config_file`` refuse unsigned modules? (True if unknown.)"""
    if config_file is None or not config_file.is_file():
        return True
    return "CONFIG_MODULE_SIG_FORCE=y" in config_file.read_text(errors="replace").splitlines()


def depmod(root: Path, version: str) -> None:
    """``depmod -b root version``: write root/lib/modules/version/modules.dep and friends."""
    tool = need_tool("depmod", needed_for=_NEEDED)
    run_tool([tool, "-b", root, version], what=f"depmod for kernel {version}", error=ImageError,
             fix="apt-get install kmod (and check the modules directory is intact)")


def prepare_modules_dir(mdir: Path, version: str, work: Path, progress: Progress) -> Path:
    """A modules dir with a modules.dep; builds one (symlink tree + depmod) if needed."""
    if (mdir / "modules.dep").is_file():
        return mdir
    say(progress, f"running depmod on {mdir}")
    root = work / "modroot"
    target = root / "lib" / "modules" / version
    target.mkdir(parents=True)
    for dirpath, _dirnames, filenames in os.walk(mdir, followlinks=True):
        rel = os.path.relpath(dirpath, mdir)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            os.symlink(os.path.join(os.path.abspath(dirpath), name), target / rel / name)
    depmod(root, version)
    return target


def install_modules(moddir: Path, closure: ModuleClosure, dest: Path, version: str, *,
                    strip_signatures: bool = False) -> None:
    """Copy the closure's modules (decompressed; signatures cut off with ``strip_signatures``),
    modules.builtin and the matching lines of modules.order into ``dest/lib/modules/version``,
    then run depmod there."""
    mdest = dest / "lib" / "modules" / version
    mdest.mkdir(parents=True, exist_ok=True)
    for rel in closure["paths"]:
        out_rel = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", rel)
        copy_module(moddir / rel, mdest / out_rel)
        if strip_signatures:
            strip_signature(mdest / out_rel)
    if (moddir / "modules.builtin").is_file():
        shutil.copyfile(moddir / "modules.builtin", mdest / "modules.builtin")
    order = moddir / "modules.order"
    if order.is_file():   # only the lines of the modules we carry (160 kB otherwise)
        keep = {modname(r) for r in closure["paths"]}
        (mdest / "modules.order").write_text("".join(
            line + "\n" for line in order.read_text().splitlines()
            if modname(line.strip()) in keep))
    if closure["paths"]:
        depmod(dest, version)


def optional_module_files(rootfs: Path, version: str, base: Sequence[str]) -> set[str]:
    """The module files in ``rootfs`` (paths relative to it) that are not in ``base`` (module names):
    what ``initrd.lz4`` leaves out and ``initrd-all.lz4`` adds."""
    mdir = rootfs / "lib" / "modules" / version
    keep = {modname(n) for n in base}
    return {str(p.relative_to(rootfs)) for p in mdir.rglob("*.ko") if modname(p.name) not in keep}
