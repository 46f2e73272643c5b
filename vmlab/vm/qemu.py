"""QEMU itself: finding the binary, its version, the command line for a spec, and what its
errors mean (:func:`launch_fix`).

The command line is locked down by default: ``-nodefaults``, no display,
``-sandbox on``, QMP and every chardev on file descriptors the library hands
over (socketpairs), user networking with ``restrict=on``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..image import GuestImage
from ..spec import NIC_MODELS, MachineSpec, parse_size
from ..tools import qemu_binary

AGENT_PORT = "org.vmlab.agent"
BASE_KERNEL_ARGS = "console={console} quiet panic=-1 tsc=reliable no_timer_check"
#: built-in initcalls the lesson guest never needs, skipped (each 20-900 ms under TCG, docs/boot.md):
#: self-tests of kdf108 and blake2s, kprobe trace events, the kernel's X.509 keys (they check module
#: signatures, and the image's modules carry none), the "encrypted" key type, and the tracefs files
#: (/sys/kernel/tracing: ~9,700 inodes and dentries, 8.6 MiB of the guest's slab; no lesson traces inside
#: the guest, QEMU's trace events are on the host)
SKIPPED_INITCALLS = ("crypto_kdf108_init", "blake2s_mod_init", "init_kprobe_trace",
                     "load_system_certificate_list", "init_encrypted", "tracer_init_tracefs")
#: kernel settings that only make the lesson guest boot faster (docs/boot.md has the measurements):
#: no crypto self-tests at boot, no patching of every LOCK prefix for one CPU (the kernel and each
#: module), no zeroing of every allocated page (a hardening the throw-away lesson guest does not
#: need), kernel memory left writable (rodata=off: no splitting of the kernel's large pages to
#: protect its text and no W+X walk at boot, 18 % less QEMU CPU to ready in an A/B of 4+4 boots),
#: the initcalls above skipped. (Not ipv6.disable=1: busybox nc -l listens on IPv6.)
FAST_KERNEL_ARGS = ("cryptomgr.notests noreplace-smp init_on_alloc=0 rodata=off "
                    "initcall_blacklist=" + ",".join(SKIPPED_INITCALLS))
#: on ``pc``, PCI interrupts routed by SeaBIOS's tables (MP table, $PIR) instead of ACPI's
#: interrupt-link methods, which the AML interpreter runs slowly under TCG (0.13-0.5 s for the first
#: PCI device). ACPI itself stays (the power button, PCI resources); ``pci=noacpi`` would lose the
#: legacy IDE ports.
PC_KERNEL_ARGS = "acpi=noirq"
#: TCG's translated-code buffer (MiB). QEMU's default (1 GiB, filled as code is translated) lets a
#: booted guest hold ~50 MiB of it; a small buffer is flushed and refilled instead.
TCG_TB_MIB = 32
#: the virtual CPU of a nested guest (spec.nested) under TCG: qemu64 with AMD-V and nested paging,
#: emulated by TCG; under KVM the host's CPU is passed through ("host": nested virtualization)
TCG_NESTED_CPU = "qemu64,+svm,+npt"
#: the mount tag of the host's root in a ``host_root`` guest (vmlab.vm.inner mounts it read-only on /host)
HOST_ROOT_TAG = "hostroot"
#: the host's / for a nested guest that runs vmlab itself (spec.host_root): read-only at QEMU's end
#: (``readonly=on``: no write reaches the host whatever the guest does), no credentials mapped
#: (``security_model=none``: the files keep the host's owners, QEMU opens them as its own user),
#: inode numbers remapped so files of different host file systems never collide
HOST_ROOT_VIRTFS = (f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,"
                    "multidevs=remap")


#: cache modes that open the image with O_DIRECT (QEMU's cache.direct=on)
DIRECT_CACHE_MODES = ("none", "directsync")


def disk_aio(cache: str) -> str:
    """QEMU's ``aio=`` for a disk in cache mode ``cache``. With O_DIRECT, Linux native AIO: QEMU's main loop
    submits each request to the host kernel and takes its completion from an eventfd. Otherwise (the host
    page cache in the path, where native AIO would block) a pool of worker threads, each request handed to one.
    The hand-offs between the vCPU, the main loop and the workers on a 2-core host made repeats of one disk
    workload differ by up to 16 % (CV, 20 repeats of AHCI 256 KiB reads; 2.9 % with native AIO): docs/devices.md."""
    return "native" if cache in DIRECT_CACHE_MODES else "threads"


def nested_cpu_model(accel: str) -> str:
    """``-cpu`` of a nested guest that names no ``cpu_model``."""
    return "host" if accel == "kvm" else TCG_NESTED_CPU


def accel_args(accel: str) -> List[str]:
    """``-accel`` for the resolved accelerator (TCG with a bounded code buffer)."""
    return ["-accel", f"tcg,tb-size={TCG_TB_MIB}" if accel == "tcg" else accel]


@dataclass
class Launch:
    """The pieces of one QEMU launch: its argv and the fds it inherits."""

    argv: List[str]
    pass_fds: Tuple[int, ...]
    kernel_cmdline: str
    # Name -> QEMU id of things the driver talks to later.
    ids: Dict[str, str] = field(default_factory=dict)


def spec_modules(spec: MachineSpec) -> List[str]:
    """The modules /init loads for *spec* beyond the base ones (``vmlab.modules=``), in order."""
    mods = list(spec.modules)
    for d in spec.disks:
        mods += {"virtio": ["virtio_blk"], "ide": ["ata_piix", "sd_mod"], "ahci": ["ahci", "sd_mod"],
                 "scsi": ["virtio_scsi", "sd_mod"], "nvme": ["nvme"]}[d.bus]
    for n in spec.nics:
        mods += {"virtio": ["virtio_net"], "e1000": ["e1000"], "rtl8139": ["8139cp"]}[n.model]
        mods.append("af_packet")
    if spec.balloon:
        mods.append("virtio_balloon")
    if spec.host_root:
        mods += ["9pnet_virtio", "9p"]
    seen: List[str] = []
    for m in mods:
        if m not in seen:
            seen.append(m)
    return seen


def boot_initrd(spec: MachineSpec, image: GuestImage) -> Path:
    """The initramfs *spec* boots: the image's base one unless the guest loads other modules
    (``vmlab.modules=``, KVM for ``nested``, a disk root's ``virtio_blk`` and ``ext4``)."""
    mods = spec_modules(spec)
    if spec.nested:
        mods.append("kvm")
    if "vmlab.root=" in spec.kernel_args:
        mods += ["virtio_blk", "ext4"]
    return image.initrd_for(mods)


def kernel_cmdline(spec: MachineSpec) -> str:
    """The guest kernel's command line for *spec*: console, the modules /init loads, extras."""
    console = "hvc0" if spec.console == "virtio" else "ttyS0"
    words = [BASE_KERNEL_ARGS.format(console=console), FAST_KERNEL_ARGS]
    if spec.machine == "pc":
        words.append(PC_KERNEL_ARGS)
    seen = spec_modules(spec)
    if seen:
        words.append("vmlab.modules=" + ",".join(seen))
    if spec.nested:
        words.append("vmlab.nested=1")      # /init loads kvm_amd or kvm_intel
    if spec.kernel_args.strip():
        words.append(spec.kernel_args.strip())
    return " ".join(words)


def build_launch(spec: MachineSpec, *, accel: str, kernel: Path, initrd: Path,
                 qmp_fd: int, agent_fd: int, console_fd: int, private_dir: Path,
                 disk_paths: List[Path], nic_fds: List[Optional[int]],
                 paused: bool = False, incoming_fd: Optional[int] = None,
                 trace_file: Optional[Path] = None) -> Launch:
    """The QEMU argv for a validated spec. ``accel`` is the resolved one (tcg|kvm)."""
    cmdline = kernel_cmdline(spec)
    a: List[str] = [qemu_binary(),
                    "-name", f"vmlab-{spec.name},debug-threads=on",
                    "-nodefaults", "-no-user-config", "-display", "none",
                    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                    "-machine", spec.machine, *accel_args(accel),
                    "-m", str(spec.memory_mb), "-smp", str(spec.cpus),
                    "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
                    "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
                    "-chardev", f"socket,id=con0,fd={console_fd}",
                    "-device", "virtio-serial-pci,id=vser0",
                    "-chardev", f"socket,id=agent,fd={agent_fd}",
                    "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}"]
    if spec.cpu_model:
        a += ["-cpu", spec.cpu_model]
    elif spec.nested:
        a += ["-cpu", nested_cpu_model(accel)]
    if spec.console == "virtio":
        a += ["-device", "virtconsole,bus=vser0.0,chardev=con0"]
    else:
        a += ["-serial", "chardev:con0"]
    if not spec.reboot:
        a += ["-no-reboot"]
    fds = [qmp_fd, agent_fd, console_fd]
    ids: Dict[str, str] = {}
    scsi = False
    ide_unit = 0
    for i, (d, path) in enumerate(zip(spec.disks, disk_paths, strict=False)):
        node = f"disk{i}"
        if d.null:      # no file, so no cache mode nor AIO: requests complete in QEMU's block layer
            opts = ["driver=null-co", f"size={parse_size(d.size or 0, f'disks[{i}].size')}", "read-zeroes=on",
                    "if=none", f"id={node}"]
        else:
            opts = [f"file={path}", f"format={d.format}", "if=none", f"id={node}", f"cache={d.cache}",
                    f"aio={disk_aio(d.cache)}"]
        if d.readonly:
            opts.append("readonly=on")
        if d.snapshot:
            opts.append("snapshot=on")
        a += ["-drive", ",".join(opts)]
        serial = f",serial={d.serial}" if d.serial else f",serial=vmlab{i}"
        if d.bus == "virtio":
            dev = f"virtio-blk-pci,drive={node},id=dev{node}{serial}"
        elif d.bus == "ide":
            dev = f"ide-hd,drive={node},id=dev{node},bus=ide.{ide_unit // 2},unit={ide_unit % 2}{serial}"
            ide_unit += 1
        elif d.bus == "ahci":
            a += ["-device", f"ahci,id=ahci{i}"]
            dev = f"ide-hd,drive={node},id=dev{node},bus=ahci{i}.0{serial}"
        elif d.bus == "scsi":
            if not scsi:
                a += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            dev = f"scsi-hd,drive={node},id=dev{node},bus=scsi0.0{serial}"
        else:  # nvme
            dev = f"nvme,drive={node},id=dev{node},serial={d.serial or f'vmlab{i}'}"
        a += ["-device", dev]
        ids[f"disk{i}"] = node
    for i, (n, fd) in enumerate(zip(spec.nics, nic_fds, strict=False)):
        net = f"net{i}"
        if n.backend == "user":
            opts = [f"user,id={net}", "restrict=on", "ipv6=off"]
            opts += [f"hostfwd=tcp:127.0.0.1:{hp}-:{gp}" for hp, gp in n.forwards]
            a += ["-netdev", ",".join(opts)]
        elif n.backend == "socket":
            assert fd is not None
            a += ["-netdev", f"socket,id={net},fd={fd}"]
            fds.append(fd)
        else:
            a += ["-netdev", f"hubport,id={net},hubid={100 + i}"]
        mac = n.mac or f"52:54:00:12:34:{0x56 + i:02x}"
        a += ["-device", f"{NIC_MODELS[n.model]},netdev={net},mac={mac},id=nic{i}"]
    if spec.balloon:
        a += ["-device", "virtio-balloon-pci,id=balloon0"]
    if spec.host_root:
        a += ["-virtfs", HOST_ROOT_VIRTFS]
    if spec.trace and trace_file is not None:
        for pattern in spec.trace:
            a += ["-trace", f"enable={pattern}"]
        a += ["-D", str(trace_file)]
    if paused:
        a.append("-S")
    if incoming_fd is not None:
        a += ["-incoming", f"fd:{incoming_fd}"]
        fds.append(incoming_fd)
    a += list(spec.extra_args)
    return Launch(argv=a, pass_fds=tuple(fds), kernel_cmdline=cmdline, ids=ids)


def launch_fix(stderr: str) -> str:
    """The fix to suggest for a QEMU that failed with *stderr*."""
    s = stderr.lower()
    if "kvm" in s and ("permission" in s or "could not access" in s):
        return "add yourself to the kvm group, or use accel='tcg'"
    if "failed to set msr" in s or "kvm_buf_set_msrs" in s:
        return "this host's KVM cannot run this guest (a PVM or nested host?); use accel='tcg'"
    if "could not open" in s or "no such file" in s:
        return "a file named on the command line is missing: check disk paths and the guest image"
    if "address already in use" in s:
        return "a forwarded host port is taken: pick another host port"
    if "load of migration failed" in s or "incoming" in s:
        return "the warm snapshot does not match; it will be rebuilt (delete ~/.cache/vmlab/warm)"
    return "read QEMU's stderr below; `python -m vmlab doctor` checks the set-up"
