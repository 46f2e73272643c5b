"""The guest's root file system as a directory tree (the staging step of the initramfs).

The tree holds busybox and its applet links, ``/init``, ``/etc``, the guest tools
(:data:`~vmlab.image.guesttools.GUEST_TOOLS`) and the kernel modules of ``modules.txt``
with their closure. :func:`unpack_rootfs` does the reverse for a built image (the
install lesson copies the tree onto an ext4 disk).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Optional

from .cache import GuestImage
from .cpio import read_cpio
from .guesttools import (
    GUEST_TOOLS,
    busybox_applets,
    check_guest_dir,
    check_static,
    find_busybox,
    gcc_version,
    install_guest_tools,
)
from .modules import base_modules_txt, install_modules, module_closure, parse_modules_txt
from .util import Progress, resolve_guest_dir, say, sha256_file

_DIRS = ("bin", "dev", "etc/vmlab", "lib", "mnt", "proc", "root", "run", "sys", "tmp", "var", "usr")
_LINKS = (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin"))


def build_rootfs(dest_dir: Path, *, kernel_version: str, guest_dir: Optional[Path] = None,
                 modules_dir: Optional[Path] = None, busybox: Optional[Path] = None,
                 manifest: Optional[dict[str, Any]] = None, progress: Progress = None,
                 strip_module_signatures: bool = False) -> dict[str, Any]:
    """Build the guest's root file system as a directory tree in ``dest_dir``.

    This is the staging step of the image build; the initramfs is this tree
    plus the device nodes /dev/console and /dev/null (which need root to create
    as files; devtmpfs provides them at boot anyway). ``modules_dir`` is the
    kernel's ``/lib/modules/<version>`` directory with a ``modules.dep`` (None:
    no modules). ``manifest`` (if given) is completed with what went in and
    written to ``/etc/vmlab/manifest.json``. ``strip_module_signatures`` cuts the
    modules' signatures off (faster loading; only for kernels that do not enforce
    them). Returns the module/busybox/gcc facts (also merged into ``manifest``).
    """
    dest = Path(dest_dir)
    gdir = resolve_guest_dir(guest_dir)
    check_guest_dir(gdir)
    dest.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}

    # Modules first: a missing required module should fail fast.
    wanted = parse_modules_txt(gdir / "modules.txt")
    info["modules_requested"] = [n for n, _ in wanted]
    if modules_dir is not None:
        closure = module_closure(Path(modules_dir), wanted)
        say(progress, f"copying {len(closure['paths'])} kernel modules "
                      f"({len(wanted)} asked for, with dependencies)")
        install_modules(Path(modules_dir), closure, dest, kernel_version,
                        strip_signatures=strip_module_signatures)
        info["modules"] = closure["names"]
        # what every guest loads: initrd.lz4 carries only these (build.py splits the archive)
        info["modules_base"] = module_closure(Path(modules_dir), base_modules_txt(gdir / "modules.txt"))["names"]
        info["modules_missing"] = closure["missing"]
        info["modules_builtin"] = closure["builtin"]
        info["modules_note"] = "signatures stripped" if strip_module_signatures else ""
    else:
        info["modules"] = []
        info["modules_base"] = []
        info["modules_missing"] = [n for n, _ in wanted]
        info["modules_builtin"] = []
        info["modules_note"] = ("no modules: VMLAB_KERNEL_MODULES was not set, so the image "
                                "carries no kernel modules")

    bb = Path(busybox) if busybox else find_busybox()
    info["busybox"] = _install_busybox(bb, dest)

    # /init and /etc
    shutil.copyfile(gdir / "init", dest / "init")
    os.chmod(dest / "init", 0o755)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    (dest / "etc" / "hostname").write_text("vmlab\n")

    info["gcc"] = gcc_version()
    install_guest_tools(gdir, dest / "bin", progress)

    if manifest is not None:
        manifest.update(info)
        guest_manifest = {k: v for k, v in manifest.items()
                          if k not in ("outputs", "build_seconds")}
        (dest / "etc" / "vmlab" / "manifest.json").write_text(
            json.dumps(guest_manifest, indent=2, sort_keys=True) + "\n")

    _normalize_modes(dest)
    return info


def _install_busybox(bb: Path, dest: Path) -> dict[str, Any]:
    """busybox as /bin/busybox, a link per applet (the guest tools' names left free), and the applet names in
    ``/etc/vmlab/applets``: the agent runs a plain command's applet as ash would, in preference to PATH."""
    check_static(bb)
    for d in _DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bb, dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    reserved = {"busybox", *(t.name for t in GUEST_TOOLS)}
    linked = 0
    applets = busybox_applets(bb)
    (dest / "etc" / "vmlab" / "applets").write_text("".join(a + "\n" for a in applets))
    for a in applets:
        if a in reserved or os.path.lexists(dest / "bin" / a):
            continue
        os.symlink("busybox", dest / "bin" / a)
        linked += 1
    for link, target in _LINKS:
        if not os.path.lexists(dest / link):
            os.symlink(target, dest / link)
    return {"path": str(bb), "sha256": sha256_file(bb), "applets": linked}


def _normalize_modes(root: Path) -> None:
    """Modes independent of the umask: 0755 dirs/executables, 0644 files."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o755 if st.st_mode & 0o100 else 0o644)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)


def unpack_rootfs(image: GuestImage, dest_dir: Path) -> Path:
    """Unpack a built image's initramfs into ``dest_dir`` (device nodes skipped:
    they need root, and devtmpfs provides them at boot). Returns ``dest_dir``."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for e in read_cpio(image.cpio):
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
