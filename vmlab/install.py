"""Install the lesson guest OS onto a virtual disk, and configure it from the host.

"Installing" here is what an installer does, in three host-side steps and
without root privileges:

1. take the guest's root file system (the lesson image's initramfs, unpacked
   with :func:`vmlab.image.unpack_rootfs`) as a directory tree;
2. add the configuration: ``/etc/hostname``, ``/etc/vmlab/rc.local`` (the
   guest ``/init`` runs it at every boot), a web root ``/www`` for busybox
   ``httpd``;
3. turn the tree into an ext4 disk image with ``mke2fs -t ext4 -d DIR``.

The VM then boots *from the disk*: ``kernel_args="vmlab.root=/dev/vda"`` makes
the initramfs mount the disk and ``switch_root`` into it, so everything the
guest changes from then on is on the disk and survives a reboot.

    from vmlab import install, VM
    cfg = install.GuestConfig(hostname="web1", http_port=8080)
    disk = install.install_guest("/tmp/web1.ext4", cfg)
    with VM(install.boot_spec(disk, cfg)) as vm:
        print(vm.run("hostname").stdout, install.http_get(8080))
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .errors import DiskError, SpecError, VMLabError
from .spec import NIC, Disk, MachineSpec, parse_size
from .tools import need_tool

PathLike = Union[str, Path]
GUEST_ADDRESS = "10.0.2.15/24"   # QEMU user networking: the guest's usual address
ROOT_DEVICE = "/dev/vda"         # the first virtio disk


@dataclass(frozen=True)
class GuestConfig:
    """What the host writes onto the disk before the first boot.

    ``http_port`` is the *host* port forwarded to the guest's port 80 (None:
    no network, no web server). ``files`` adds more files, guest path -> text
    or bytes (executable if the path is under ``/etc/vmlab/`` or ends in .sh).
    """

    hostname: str = "vmlab-disk"
    address: str = GUEST_ADDRESS
    http_port: Optional[int] = None
    index_html: str = "<h1>Hello from {hostname}</h1>\n"
    files: Mapping[str, Union[str, bytes]] = field(default_factory=dict)

    def validated(self) -> GuestConfig:
        if not isinstance(self.hostname, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
                                                                  self.hostname):
            raise SpecError("hostname", f"{self.hostname!r} is not a valid host name",
                            fix="lower-case letters, digits and '-', e.g. 'web1'")
        try:
            ipaddress.ip_interface(self.address)
        except ValueError:
            raise SpecError("address", f"{self.address!r} is not an address/prefix",
                            fix=f"e.g. {GUEST_ADDRESS!r} (QEMU user networking)") from None
        if self.http_port is not None and (isinstance(self.http_port, bool) or
                                           not isinstance(self.http_port, int) or
                                           not 1024 <= self.http_port <= 65535):
            raise SpecError("http_port", f"{self.http_port!r} is not a usable host port",
                            fix="a port from 1024 to 65535; vmlab.install.free_port() picks one")
        for p in self.files:
            if not isinstance(p, str) or not p.startswith("/") or ".." in p.split("/"):
                raise SpecError("files", f"{p!r} is not an absolute guest path", fix='e.g. "/etc/motd"')
        return self


def rc_local(cfg: GuestConfig) -> str:
    """The boot script the disk's /init runs (``/etc/vmlab/rc.local``)."""
    lines = ["#!/bin/sh",
             "# written by vmlab.install on the host; run by /init at every boot",
             "hostname -F /etc/hostname",
             "mkdir -p /var/log",
             "echo \"boot $(cat /proc/sys/kernel/random/boot_id)\" >> /var/log/boots"]
    if cfg.http_port is not None:
        lines += [f"ip addr add {cfg.address} dev eth0 2>/dev/null",
                  "ip link set eth0 up",
                  "ip route add default via 10.0.2.2 2>/dev/null",
                  "httpd -p 80 -h /www"]
    return "\n".join(lines) + "\n"


def config_files(cfg: GuestConfig) -> Dict[str, bytes]:
    """Guest path -> content of every file the configuration writes."""
    cfg = cfg.validated()
    files: Dict[str, bytes] = {
        "/etc/hostname": (cfg.hostname + "\n").encode(),
        "/etc/vmlab/rc.local": rc_local(cfg).encode(),
        "/etc/vmlab/installed-by": b"vmlab.install\n",
    }
    if cfg.http_port is not None:
        files["/www/index.html"] = cfg.index_html.format(hostname=cfg.hostname).encode()
    for p, data in cfg.files.items():
        files[p] = data.encode() if isinstance(data, str) else bytes(data)
    return files


def _is_exec(guest_path: str) -> bool:
    return (guest_path.startswith("/etc/vmlab/") and not guest_path.endswith("installed-by")) \
        or guest_path.endswith(".sh") or guest_path.startswith("/www/cgi-bin/")


def write_tree(root: PathLike, files: Mapping[str, bytes]) -> None:
    """Write guest files into an unpacked root tree (host side)."""
    r = Path(root)
    for gp, data in files.items():
        p = r / gp.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            p.unlink()
        p.write_bytes(data)
        os.chmod(p, 0o755 if _is_exec(gp) else 0o644)


def install_guest(path: PathLike, cfg: Optional[GuestConfig] = None, *, size: Union[int, str] = "96M",
                  image: Any = None, overwrite: bool = False, progress: Any = None) -> Path:
    """Install the lesson guest onto a new ext4 disk image at ``path`` (raw, mode 0600).

    No root needed: the root tree is unpacked into a private temporary
    directory, configured, and packed with ``mke2fs -d``.
    """
    from .disks import make_ext4
    from .image import ensure_image, unpack_rootfs
    from .measure import say
    cfg = (cfg or GuestConfig()).validated()
    if parse_size(size, "size") < 32 << 20:
        raise SpecError("size", "the lesson root file system needs at least 32 MiB", fix='e.g. size="96M"')
    image = image or ensure_image()
    work = Path(tempfile.mkdtemp(prefix="vmlab-install-"))
    os.chmod(work, 0o700)
    try:
        root = work / "root"
        say(progress, "unpacking the guest root file system")
        unpack_rootfs(image, root)
        if not (root / "init").exists():
            raise VMLabError("the unpacked root file system has no /init",
                             fix="rebuild the guest image: python -m vmlab image build --force")
        for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "var/log", "www"):
            (root / d).mkdir(parents=True, exist_ok=True)
        write_tree(root, config_files(cfg))
        say(progress, f"making an ext4 file system from the tree ({size})")
        return make_ext4(path, size, source_dir=root, label=cfg.hostname[:16], overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def configure_disk(path: PathLike, files: Mapping[str, Union[str, bytes]]) -> None:
    """Change files on an installed (and unused) ext4 disk from the host, with
    ``debugfs -w``: no root, no mount. Use it to reconfigure a powered-off VM."""
    import subprocess

    from .disks import _existing
    p = _existing(path)
    dbg = need_tool("debugfs")
    with tempfile.TemporaryDirectory(prefix="vmlab-cfg-") as tmp:
        cmds = []
        made: set = set()
        for k, (gp, data) in enumerate(files.items()):
            if not gp.startswith("/") or any(c in gp for c in " \n\"'"):
                raise SpecError("files", f"{gp!r} is not a plain absolute guest path", fix='e.g. "/etc/hostname"')
            local = Path(tmp) / f"f{k}"
            local.write_bytes(data.encode() if isinstance(data, str) else data)
            parts = gp.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):   # debugfs mkdir of an existing name corrupts it
                d = "/" + "/".join(parts[:i])
                if d not in made and not _debugfs_exists(dbg, p, d):
                    cmds.append(f"mkdir {d}")
                made.add(d)
            if _debugfs_exists(dbg, p, gp):
                cmds.append(f"rm {gp}")
            cmds += [f"write {local} {gp}",
                     f"sif {gp} mode 0{0o100755 if _is_exec(gp) else 0o100644:o}"]
        script = Path(tmp) / "cmds"
        script.write_text("\n".join(cmds) + "\n")
        res = subprocess.run([dbg, "-w", "-f", str(script), str(p)], capture_output=True, text=True)
        if res.returncode:
            raise DiskError("debugfs could not write the files", stderr=res.stderr)


def _debugfs_exists(dbg: str, image: Path, guest_path: str) -> bool:
    import subprocess
    res = subprocess.run([dbg, "-R", f"stat {guest_path}", str(image)], capture_output=True, text=True)
    return res.returncode == 0 and "File not found" not in res.stderr + res.stdout


def boot_spec(disk: PathLike, cfg: Optional[GuestConfig] = None, *, name: str = "installed",
              accel: str = "tcg", memory: Union[int, str] = 128, cache: str = "none",
              **fields: Any) -> MachineSpec:
    """A spec that boots from the installed disk (``vmlab.root=/dev/vda``), with
    the web server's port forwarded when the config has one."""
    cfg = (cfg or GuestConfig()).validated()
    nics = (NIC(model="virtio", backend="user", forwards=((cfg.http_port, 80),)),) \
        if cfg.http_port is not None else ()
    return MachineSpec(name=name, accel=accel, memory=memory,
                       disks=(Disk(path=Path(disk), bus="virtio", format="raw", cache=cache),),
                       nics=nics, kernel_args=f"vmlab.root={ROOT_DEVICE}", **fields)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a forward)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", *, timeout: float = 20.0) -> str:
    """Fetch ``http://127.0.0.1:PORT/path`` (through the VM's forward), retrying
    while the guest's server is still starting; returns the body."""
    url = f"http://127.0.0.1:{int(port)}{path}"
    deadline = time.monotonic() + timeout
    last: Exception = OSError("no attempt")
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode(errors="replace")
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            last = exc
            time.sleep(0.3)
    raise VMLabError(f"no answer from {url} in {timeout:g} s: {last}",
                     fix="is the guest web server running (vm.run('ps'))? is the forward in the spec?")


def guest_state(vm: Any, port: Optional[int] = None) -> Dict[str, Any]:
    """What the configured guest looks like now: host name, root device,
    address, boots so far, and the web page through the forward."""
    out: Dict[str, Any] = {
        "hostname": vm.run("hostname").stdout.strip(),
        "root": vm.run("awk '$2==\"/\"{print $1\" \"$3}' /proc/mounts | tail -1").stdout.strip(),
        "boots": int(vm.run("wc -l < /var/log/boots", check=False).stdout.strip() or 0),
    }
    if port is not None:
        out["address"] = vm.run("ip -4 -o addr show dev eth0 | awk '{print $4}'", check=False).stdout.strip()
        out["http"] = http_get(port).strip()
    return out


def reboot_from_inside(vm: Any, timeout: float = 90.0) -> float:
    """``reboot`` in the guest, wait for the reset and the agent's hello; returns seconds."""
    from .errors import GuestError, VMError
    since = len(vm.events)
    t = time.monotonic()
    with contextlib.suppress(GuestError, VMError):
        vm.run("reboot", check=False, timeout=10)
    vm.wait_event("RESET", since=since, timeout=timeout)
    vm.wait_ready(timeout)
    return time.monotonic() - t
