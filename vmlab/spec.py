"""The declarative machine spec: what a VM is, validated before QEMU starts.

A :class:`MachineSpec` says what the learner wants (memory, vCPUs, disks and
their bus, NICs and their model, the console...). :func:`MachineSpec.validated`
checks every field and raises :class:`~vmlab.errors.SpecError` naming the field
and the fix, so bad input never reaches QEMU. Turning a spec into a QEMU
command line is :mod:`vmlab.vm.qemu`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from .errors import SpecError

ACCELS = ("auto", "tcg", "kvm")
MACHINES = ("pc", "q35")
DISK_BUSES = ("virtio", "ide", "ahci", "scsi", "nvme")
DISK_FORMATS = ("raw", "qcow2")
#: the first four bytes of a qcow2 image
QCOW2_MAGIC = b"QFI\xfb"
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
NIC_BACKENDS = ("user", "socket", "none")
CONSOLES = ("serial", "virtio")
MIN_MEMORY_MB = 96  # 64 MiB is too little for the lesson initramfs (measured)
MAX_CPUS = 32

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.I | re.ASCII)  # ASCII: no Kelvin sign for K
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 1 << 50   # 1 PiB: anything above is a typo, and huge numbers overflow float


def parse_size(value: Union[int, str], field_name: str, *, default_unit: str = "M") -> int:
    """Parse ``128``, ``"128M"``, ``"1G"``, ``"512MiB"`` into bytes.

    A bare number means MiB (as QEMU's ``-m`` does).
    """
    if isinstance(value, bool):
        raise SpecError(field_name, f"{value!r} is not a size", fix='give a size like 128 (MiB) or "1G"')
    if isinstance(value, int):
        if value <= 0:
            raise SpecError(field_name, f"{value} must be positive", fix='give a size like 128 (MiB) or "1G"')
        if value * _UNITS[default_unit] > MAX_SIZE:
            raise SpecError(field_name, f"{value} is far too large", fix='give a size like 128 (MiB) or "1G"')
        return value * _UNITS[default_unit]
    if not isinstance(value, str):
        raise SpecError(field_name, f"{value!r} is not a size", fix='give a size like 128 (MiB) or "1G"')
    m = _SIZE.match(value)
    if not m:
        raise SpecError(field_name, f"{value!r} is not a size",
                        fix='give a number with an optional unit K, M, G or T, e.g. "128M" or "1G"')
    num, unit = float(m.group(1)), (m.group(2) or default_unit).upper()
    if not math.isfinite(num) or num * _UNITS[unit] > MAX_SIZE:
        raise SpecError(field_name, f"{value!r} is far too large", fix='give a size like 128 (MiB) or "1G"')
    size = int(num * _UNITS[unit])
    if size <= 0:
        raise SpecError(field_name, f"{value!r} must be positive", fix='e.g. "128M"')
    return size


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError(field_name, f"{value!r} is not True or False", fix=f"{field_name.split('.')[-1]}=True or False")


def _check_text(field_name: str, value: Any, example: str) -> None:
    if not isinstance(value, str) or re.search(r"[\x00-\x1f\x7f]", value):
        raise SpecError(field_name, f"{value!r} is not one line of printable text", fix=f"e.g. {example}")


def _choice(field_name: str, value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        close = [c for c in choices if isinstance(value, str) and (c.startswith(value[:2].lower()))]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(field_name, f"unknown {what} {value!r}{hint}",
                        fix=f"use one of: {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Disk:
    """A virtual disk attached on a bus.

    ``path`` names an existing image; without it a blank scratch disk of
    ``size`` is created in the VM's private directory and removed with it.
    ``null=True`` (with ``size``, no path) is a disk that stores nothing, QEMU's
    ``null-co`` driver: reads return zeros, writes are dropped, no host file or
    storage is involved. The device experiments use it to time the virtual
    device path alone (docs/devices.md, "Steady repeats").
    """

    path: Optional[Union[str, Path]] = None
    bus: str = "virtio"
    size: Optional[Union[int, str]] = None
    format: Optional[str] = None
    readonly: bool = False
    snapshot: bool = False       # writes go to a throw-away overlay
    cache: str = "none"          # host page cache bypassed: what the guest measures is the device
    serial: Optional[str] = None
    null: bool = False           # stores nothing (reads zeros, drops writes): the device path alone

    def validated(self, index: int) -> Disk:
        f = f"disks[{index}]"
        _choice(f + ".bus", self.bus, DISK_BUSES, "disk bus")
        _check_bool(f + ".readonly", self.readonly)
        _check_bool(f + ".snapshot", self.snapshot)
        _check_bool(f + ".null", self.null)
        if self.null and (self.path is not None or self.format not in (None, "raw") or self.snapshot):
            raise SpecError(f + ".null", "a null disk has no file: no path, format or snapshot",
                            fix='Disk(size="64M", null=True), or leave null out for a disk that stores data')
        if self.serial is not None and not (isinstance(self.serial, str)
                                            and re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", self.serial)):
            raise SpecError(f + ".serial", f"{self.serial!r} is not a usable disk serial",
                            fix="letters, digits, '.', '_' or '-', at most 20 characters")
        if self.cache not in ("none", "writeback", "writethrough", "directsync", "unsafe"):
            raise SpecError(f + ".cache", f"unknown cache mode {self.cache!r}",
                            fix="use none, writeback, writethrough, directsync or unsafe")
        fmt = self.format
        if self.path is None:
            if self.size is None:
                raise SpecError(f + ".size", "a scratch disk needs a size",
                                fix='give size="64M", or path= to an existing image')
            parse_size(self.size, f + ".size")
            fmt = fmt or "raw"
        else:
            if not isinstance(self.path, (str, os.PathLike)) or "\0" in os.fspath(self.path):
                raise SpecError(f + ".path", f"{self.path!r} is not a file name",
                                fix='give the path of an image file, e.g. path="disk.qcow2"')
            p = Path(self.path).expanduser()
            if not p.exists():
                raise SpecError(f + ".path", f"no such image file: {p}",
                                fix="create it first (vmlab.disks.create_image or qemu-img create), "
                                    "or leave path out and give size= for a scratch disk")
            if p.is_dir():
                raise SpecError(f + ".path", f"{p} is a directory, not a disk image",
                                fix="name an image file")
            if not os.access(p, os.R_OK) or (not self.readonly and not self.snapshot
                                              and not os.access(p, os.W_OK)):
                raise SpecError(f + ".path", f"{p} is not readable/writable by this user",
                                fix="fix its permissions, or pass readonly=True / snapshot=True")
            if fmt is None:
                with open(p, "rb") as fh:
                    fmt = "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"
        _choice(f + ".format", fmt, DISK_FORMATS, "disk format")
        return dataclasses.replace(self, format=fmt,
                                   path=None if self.path is None else Path(self.path).expanduser())


@dataclass(frozen=True)
class NIC:
    """A network card: its model (emulated e1000/rtl8139 or paravirtual virtio)
    and its backend.

    ``backend="user"`` is QEMU's user-mode network, restricted: the guest reaches
    nothing but the ``forwards`` you list as ``(host_port, guest_port)`` pairs
    (host side bound to 127.0.0.1). ``backend="socket"`` hands the host one end
    of a socketpair carrying raw Ethernet frames (see ``VM.nic_socket``).
    """

    model: str = "virtio"
    backend: str = "user"
    forwards: Tuple[Tuple[int, int], ...] = ()
    mac: Optional[str] = None

    def validated(self, index: int) -> NIC:
        f = f"nics[{index}]"
        _choice(f + ".model", self.model, tuple(NIC_MODELS), "NIC model")
        _choice(f + ".backend", self.backend, NIC_BACKENDS, "NIC backend")
        fw = []
        for k, pair in enumerate(_as_tuple(self.forwards, f + ".forwards")):
            try:
                if any(isinstance(x, bool) for x in pair):
                    raise TypeError
                hp, gp = (operator.index(x) for x in pair)
            except (TypeError, ValueError):
                raise SpecError(f"{f}.forwards[{k}]", f"{pair!r} is not a (host_port, guest_port) pair",
                                fix="e.g. forwards=[(8080, 80)]") from None
            for port, side in ((hp, "host"), (gp, "guest")):
                if not 0 <= port <= 65535 or (side == "guest" and port == 0):
                    raise SpecError(f"{f}.forwards[{k}]", f"{side} port {port} is out of range",
                                    fix="ports are 1-65535 (host port 0 picks a free one)")
            fw.append((hp, gp))
        if fw and self.backend != "user":
            raise SpecError(f + ".forwards", "port forwards need backend='user'",
                            fix="use backend='user', or drop forwards")
        if self.mac is not None and not isinstance(self.mac, str):
            raise SpecError(f + ".mac", f"{self.mac!r} is not a MAC address", fix='e.g. "52:54:00:12:34:56"')
        if self.mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", self.mac):
            raise SpecError(f + ".mac", f"{self.mac!r} is not a MAC address", fix='e.g. "52:54:00:12:34:56"')
        return dataclasses.replace(self, forwards=tuple(fw))


def _as_tuple(value: Any, field_name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SpecError(field_name, f"expected a list, got {value!r}", fix=f"{field_name}=[...]")
    return tuple(value)


@dataclass(frozen=True)
class MachineSpec:
    """What a lesson VM is. Every field has a lesson-ready default."""

    name: str = "vm"
    accel: str = "auto"
    cpus: int = 1
    memory: Union[int, str] = 128           # MiB, or "256M", "1G"
    machine: str = "pc"
    cpu_model: Optional[str] = None         # default: QEMU's for the accelerator
    disks: Tuple[Disk, ...] = ()
    nics: Tuple[NIC, ...] = ()
    console: str = "serial"                 # where the kernel log goes: serial (16550) or virtio (hvc0)
    balloon: bool = False
    kernel_args: str = ""                   # appended to the kernel command line
    modules: Tuple[str, ...] = ()           # extra guest kernel modules to load at boot
    trace: Tuple[str, ...] = ()             # QEMU trace event patterns to count (e.g. "ide_*")
    extra_args: Tuple[str, ...] = ()        # raw QEMU arguments (checked for the few that would break vmlab)
    reboot: bool = True                     # a guest reboot resets the VM (False: QEMU exits instead)
    nested: bool = False                    # KVM inside the guest: a virtual CPU with svm/vmx, kvm loaded
    host_root: bool = False                 # nested only: the host's / shared READ-ONLY over virtio-9p
    host_cpu: Union[int, str, None] = None  # all of QEMU's threads on this host CPU ("auto": the least used),
                                            # its main loop 10 nice levels below the vCPU (reaper.yield_main_loop)

    @property
    def memory_mb(self) -> int:
        return parse_size(self.memory, "memory") >> 20

    def validated(self) -> MachineSpec:
        """Return a normalised copy, or raise SpecError naming the field and the fix."""
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", self.name):
            raise SpecError("name", f"{self.name!r} is not a usable VM name",
                            fix="letters, digits, '.', '_' or '-', at most 40 characters")
        _choice("accel", self.accel, ACCELS, "accelerator")
        _choice("machine", self.machine, MACHINES, "machine type")
        _choice("console", self.console, CONSOLES, "console kind")
        _check_bool("balloon", self.balloon)
        _check_bool("reboot", self.reboot)
        _check_bool("nested", self.nested)
        _check_bool("host_root", self.host_root)
        if self.host_root and not self.nested:
            raise SpecError("host_root", "sharing the host's files is only for nested runs (vmlab inside vmlab)",
                            fix="use MachineSpec(nested=True, host_root=True), or leave host_root out")
        if self.cpu_model is not None and not (isinstance(self.cpu_model, str)
                                               and re.fullmatch(r"[A-Za-z0-9_.,+=-]+", self.cpu_model)):
            raise SpecError("cpu_model", f"{self.cpu_model!r} is not a QEMU CPU model",
                            fix='e.g. cpu_model="qemu64" (see qemu-system-x86_64 -cpu help)')
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int):
            raise SpecError("cpus", f"{self.cpus!r} is not a whole number", fix="e.g. cpus=1")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise SpecError("cpus", f"{self.cpus} is out of range", fix=f"use 1 to {MAX_CPUS} vCPUs")
        mem = parse_size(self.memory, "memory")
        if mem < MIN_MEMORY_MB << 20:
            raise SpecError("memory", f"{mem >> 20} MiB is too little for the lesson guest",
                            fix=f"use at least {MIN_MEMORY_MB} MiB (128 is the default)")
        host = host_memory_bytes()
        if mem > host:
            raise SpecError("memory", f"{mem >> 20} MiB is more than this host has ({host >> 20} MiB)",
                            fix="ask for less memory; lesson guests need 128-512 MiB")
        if mem % (1 << 20):
            raise SpecError("memory", f"{mem} bytes is not a whole number of MiB", fix='e.g. "128M"')
        disks = tuple(_check_type(d, Disk, f"disks[{i}]").validated(i)
                      for i, d in enumerate(_as_tuple(self.disks, "disks")))
        nics = tuple(_check_type(n, NIC, f"nics[{i}]").validated(i)
                     for i, n in enumerate(_as_tuple(self.nics, "nics")))
        if sum(1 for d in disks if d.bus == "ide") > 4:
            raise SpecError("disks", "an IDE controller has at most 4 drives", fix="use virtio or ahci for more")
        modules = _as_tuple(self.modules, "modules")
        for m in modules:
            if not isinstance(m, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", m):
                raise SpecError("modules", f"{m!r} is not a module name", fix='e.g. modules=["e1000"]')
        trace = _as_tuple(self.trace, "trace")
        for t in trace:
            if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z0-9_*]+", t):
                raise SpecError("trace", f"{t!r} is not a trace event pattern", fix='e.g. trace=["ide_*"]')
        extra = _as_tuple(self.extra_args, "extra_args")
        for a in extra:
            if not isinstance(a, str) or "\0" in a:
                raise SpecError("extra_args", f"{a!r} is not a string", fix='e.g. extra_args=["-device", "..."]')
        _check_extra_args(extra)
        _check_host_cpu(self.host_cpu, self.cpus)
        _check_text("kernel_args", self.kernel_args, 'kernel_args="libata.dma=0"')
        return dataclasses.replace(self, memory=mem >> 20, disks=disks, nics=nics, modules=modules,
                                   trace=trace, extra_args=extra)

    def with_(self, **changes: Any) -> MachineSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_host_cpu(host_cpu: Any, cpus: int) -> None:
    """``host_cpu``: None, "auto" or a CPU this process may run on; only for a one-vCPU guest."""
    if host_cpu is None:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if host_cpu != "auto" and (isinstance(host_cpu, bool) or not isinstance(host_cpu, int)
                               or host_cpu not in allowed):
        raise SpecError("host_cpu", f"{host_cpu!r} is not a host CPU this process may run on",
                        fix=f'use "auto" or one of {allowed}, or leave host_cpu out')
    if cpus != 1:
        raise SpecError("host_cpu", f"{cpus} vCPUs on one host CPU would take turns on it",
                        fix="pin only a one-vCPU guest (cpus=1), or leave host_cpu out")


def _check_type(value: Any, cls: type, field_name: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as exc:
            raise SpecError(field_name, str(exc), fix=f"see help(vmlab.{cls.__name__}) for its fields") from exc
    raise SpecError(field_name, f"expected a {cls.__name__}, got {value!r}",
                    fix=f"use vmlab.{cls.__name__}(...)")


# Options vmlab sets itself; passing them again would break control or security.
_FORBIDDEN = {
    "-qmp": "vmlab owns the QMP monitor; use vm.qmp(...)",
    "-monitor": "vmlab owns the monitor; use vm.qmp(...) or vm.hmp(...)",
    "-vnc": "no display servers are opened; the console is captured (vm.console)",
    "-spice": "no display servers are opened",
    "-display": "vmlab runs without a display",
    "-daemonize": "vmlab must own the QEMU process to clean it up",
    "-kernel": "the kernel comes from the guest image",
    "-initrd": "the initramfs comes from the guest image",
    "-sandbox": "vmlab always runs QEMU with -sandbox on",
    "-incoming": "use warm=True for save/restore",
    "-s": "-s opens a GDB server on TCP port 1234 for anyone on the host; vmlab keeps QEMU off TCP",
    "-gdb": "a GDB server would listen on TCP or a reachable path; vmlab keeps QEMU off TCP",
    "-nic": "add network cards with nics=[vmlab.NIC(...)]: vmlab keeps user networking restricted",
    "-net": "add network cards with nics=[vmlab.NIC(...)]: vmlab keeps user networking restricted",
    "-netdev": "add network cards with nics=[vmlab.NIC(...)]: vmlab keeps user networking restricted",
}
# chardev/serial back-ends that reach the network: tcp:, telnet:, udp:, websocket, or a socket with host/port
_NET_CHARDEV = re.compile(r"(?:^|[,=])(?:tcp|telnet|udp|websocket)(?::|,|$)|(?:^|,)(?:host|port|to|websocket)=",
                          re.I)
_CHARDEV_OPTS = ("-chardev", "-serial", "-parallel", "-debugcon", "-virtioconsole", "-mon")


def _check_extra_args(args: Sequence[str]) -> None:
    for i, a in enumerate(args):
        key = a.split("=", 1)[0]
        if key.startswith("--"):
            key = key[1:]
        if key in _FORBIDDEN:
            raise SpecError("extra_args", f"{a!r} is not allowed", fix=_FORBIDDEN[key])
        if i and args[i - 1].lstrip("-") in {o.lstrip("-") for o in _CHARDEV_OPTS} and _NET_CHARDEV.search(a):
            raise SpecError("extra_args", f"{args[i - 1]} {a!r} would open a network socket",
                            fix="vmlab keeps QMP, consoles and chardevs off TCP; use files or the VM's sockets")
        if re.search(r"\btcp:|host=0\.0\.0\.0|,server(=on)?\b.*\b(host|port)=", a):
            raise SpecError("extra_args", f"{a!r} would open a TCP listener",
                            fix="vmlab keeps QMP, consoles and chardevs off TCP; use files or the VM's sockets")
