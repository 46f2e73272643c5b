"""Device profiles: full (emulated) vs para-virtualized disks, consoles and NICs.

One obvious place per contrast. A :class:`DeviceProfile` says what to plug into
the VM (a spec fragment), what the guest driver does and what the hypervisor
must intercept (a teaching description), how to find the device in the guest,
and *how to count its interventions*:

* **traps**: guest accesses to the device's registers that the hypervisor must
  intercept and emulate. Counted on the host from QEMU trace events:
  ``memory_region_ops_read/write`` filtered by the device's memory-region names
  (``ide``, ``ahci``, ``e1000-mmio``, ``serial``...), plus, for virtio devices,
  ``virtio_queue_notify`` (a "kick": the doorbell write that tells the host a
  shared ring has new requests) of that device only.
* **irqs**: interrupts the device raised, counted in the guest from
  ``/proc/interrupts`` (every line except the timer, keyboard, RTC, ACPI and the
  vmlab agent's own virtio-serial device).

``interventions = traps + irqs``. Both are properties of the device model and
the driver, not of the accelerator, so the count is the same under TCG and KVM
(under KVM each trap is a VM exit; ``kvm_exit_stats`` reads KVM's own counters).

Add a device: append a :class:`DeviceProfile` to ``PROFILES`` below (find its
region names with ``trace=("memory_region_ops_*",)`` and a look at
``vm.trace_log``); the experiments and notebooks pick it up. What the three
contrasts share on the experiment side (booting a profile into the rows, the
common columns, ratios beside published figures, the interventions plot) is in
:mod:`vmlab.experiments.contrasts`; the live widget in :mod:`vmlab.widgets.devices`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import GuestError, SpecError, VMError
from .spec import NIC, Disk, MachineSpec
from .vm import VM
from .vm.warm import warm_refusal

if TYPE_CHECKING:
    import pandas as pd

    from .image import GuestImage

KINDS = ("emulated", "paravirtual")
CONTRASTS = ("disk", "console", "net")

# memory_region_ops_* are QEMU's generic "a vCPU touched a device register" events
REGISTER_TRACE = ("memory_region_ops_read", "memory_region_ops_write")
KICK_TRACE = ("virtio_queue_notify",)

# the second virtio-serial controller for the console under test (vser0 carries the agent)
_TEST_VSER = ("-device", "virtio-serial-pci,id=vsertest",
              "-chardev", "null,id=contest",
              "-device", "virtconsole,bus=vsertest.0,chardev=contest,id=virtcontest")


@dataclass(frozen=True)
class DeviceProfile:
    """One device to contrast. See the module docstring for the counting rules."""

    name: str                       # short id: "ide-pio", "virtio-blk", ...
    contrast: str                   # "disk" | "console" | "net"
    kind: str                       # "emulated" | "paravirtual"
    title: str                      # one line for tables and legends
    description: str                # what the guest driver does, what the hypervisor intercepts
    disk_bus: Optional[str] = None  # Disk(bus=...) for disks
    nic_model: Optional[str] = None  # NIC(model=...) for NICs
    kernel_args: str = ""
    modules: Tuple[str, ...] = ()
    extra_args: Tuple[str, ...] = ()
    console: str = "serial"         # where the kernel log goes (not the device under test)
    regions: Tuple[str, ...] = ()   # QEMU memory-region names whose accesses are traps
    virtio: bool = False            # also count virtio_queue_notify kicks of this device
    guest_path: str = ""            # /dev/sda, /dev/vda, /dev/ttyS1, /dev/hvc0, eth0
    pci_ids: Tuple[str, ...] = ()   # vendor:device of the PCI function the guest sees ("" for ISA)
    check: str = ""                 # guest shell command that must succeed (proves the set-up)
    check_expect: str = ""          # ... and whose stdout must contain this
    notes: str = ""

    # -- the spec fragment --------------------------------------------------
    @property
    def trace(self) -> Tuple[str, ...]:
        return REGISTER_TRACE + (KICK_TRACE if self.virtio else ())

    def spec(self, *, accel: str = "tcg", disk_size: str = "64M", name: Optional[str] = None,
             nic_backend: str = "socket", memory: int = 128, trace: bool = True,
             host_cpu: Union[int, str, None] = "profile", null_disk: bool = True) -> MachineSpec:
        """The MachineSpec of a lesson VM carrying this device (validated).

        A disk profile's disk stores nothing (``Disk(null=True)``, QEMU's null-co driver: reads return zeros,
        writes are dropped), so what the guest times is the device path, not the host's storage; a scratch file
        put the host's file system and the cloud disk under every write (docs/devices.md, "Steady repeats").
        ``null_disk=False``: a sparse scratch file, opened with ``cache=none``.

        ``host_cpu="profile"``: a disk profile's QEMU runs all on one host CPU ("auto": the least used), the
        others' where the host's scheduler puts it (None). Each disk request passes between QEMU's vCPU thread
        and its main loop; on two host CPUs every such hand-off is a cross-CPU wake-up, which on this course's
        cloud machines (themselves VMs) made throughput wander: 20 repeats of virtio-scsi 64 KiB random reads gave
        a CV of 5.7 % free and 1.2 % pinned, and ran 40 % faster pinned. A console or NIC streams its data through
        the main loop to this process, which pinned has to share the vCPU's CPU: virtio-console moved 10.5-12.5 MB/s
        pinned, 15.9-22.5 free (docs/devices.md, "Steady repeats"). An int, "auto" or None overrides."""
        disks: Tuple[Disk, ...] = ()
        nics: Tuple[NIC, ...] = ()
        if self.disk_bus:
            disks = (Disk(bus=self.disk_bus, size=disk_size, null=null_disk),)
        if self.nic_model:
            nics = (NIC(model=self.nic_model, backend=nic_backend),)
        return MachineSpec(name=name or f"dev-{self.name}", accel=accel, memory=memory, disks=disks,
                           nics=nics, console=self.console, kernel_args=self.kernel_args,
                           modules=self.modules, extra_args=self.extra_args,
                           trace=self.trace if trace else (),
                           host_cpu=("auto" if self.disk_bus else None) if host_cpu == "profile" else host_cpu
                           ).validated()

    def row(self) -> Dict[str, Any]:
        return {"device": self.name, "contrast": self.contrast, "kind": self.kind, "title": self.title,
                "guest_path": self.guest_path, "regions": ", ".join(self.regions),
                "kicks": "virtio_queue_notify" if self.virtio else "", "description": self.description}


def _emulated_disk(name: str, bus: str, title: str, description: str, regions: Tuple[str, ...],
                   guest_path: str, pci: Tuple[str, ...], **kw: Any) -> DeviceProfile:
    return DeviceProfile(name=name, contrast="disk", kind="emulated", title=title, description=description,
                         disk_bus=bus, regions=regions, guest_path=guest_path, pci_ids=pci, **kw)


PROFILES: Dict[str, DeviceProfile] = {p.name: p for p in [
    # ------------------------------------------------------------------ disks
    _emulated_disk(
        "ide-pio", "ide", "IDE (PIIX), PIO mode",
        "The ata_piix driver moves every sector through the data port: 128 32-bit IN instructions per "
        "512-byte sector, each one trapped and emulated by the hypervisor, plus the task-file registers "
        "(sector count, LBA, command, status) for every command.",
        ("ide", "piix-bmdma", "bmdma"), "/dev/sda", ("8086:7010",),
        kernel_args="libata.dma=0", check="cat /sys/module/libata/parameters/dma", check_expect="0",
        notes="libata.dma=0 on the kernel command line; busybox modprobe applies it"),
    _emulated_disk(
        "ide-dma", "ide", "IDE (PIIX), bus-master DMA",
        "Same PIIX controller, but the driver programs the bus-master DMA engine: it writes a table of "
        "buffer addresses, then a few task-file and DMA registers per command (each a trap); the "
        "hypervisor copies the data into guest memory and raises an interrupt.",
        ("ide", "piix-bmdma", "bmdma"), "/dev/sda", ("8086:7010",)),
    _emulated_disk(
        "ahci", "ahci", "AHCI (ICH9 SATA)",
        "The ahci driver builds command tables in memory and writes a port's command-issue register "
        "(MMIO, trapped); the device DMAs the data and interrupts. Fewer traps per command than IDE, "
        "but several register reads and writes per request and per interrupt.",
        ("ahci",), "/dev/sda", ("8086:2922",)),
    _emulated_disk(
        "nvme", "nvme", "NVMe",
        "A real-hardware interface designed around shared rings: the driver queues a command in a "
        "submission queue in memory and writes one doorbell register (trapped); completion is posted "
        "to a completion queue and acknowledged with a second doorbell. Emulated, yet ring-based.",
        ("nvme",), "/dev/nvme0n1", ("1b36:0010",),
        notes="kind 'emulated' (QEMU emulates a real controller) with a para-virtual-like design"),
    DeviceProfile(
        name="virtio-blk", contrast="disk", kind="paravirtual", title="virtio-blk",
        description="The virtio_blk driver knows it runs in a VM: it puts request descriptors in a ring "
                    "shared with the hypervisor and 'kicks' it with one doorbell write per batch; the "
                    "host completes requests into the used ring and sends one interrupt (MSI-X). No "
                    "register emulation per sector.",
        disk_bus="virtio", regions=("virtio-pci-common-virtio-blk", "virtio-pci-isr-virtio-blk",
                                    "virtio-pci-device-virtio-blk"),
        virtio=True, guest_path="/dev/vda", pci_ids=("1af4:1001", "1af4:1042")),
    DeviceProfile(
        name="virtio-scsi", contrast="disk", kind="paravirtual", title="virtio-scsi",
        description="SCSI commands carried over virtio rings: same kick-and-interrupt protocol as "
                    "virtio-blk, with a SCSI layer (sd_mod) in the guest.",
        disk_bus="scsi", regions=("virtio-pci-common-virtio-scsi", "virtio-pci-isr-virtio-scsi",
                                  "virtio-pci-device-virtio-scsi"),
        virtio=True, guest_path="/dev/sda", pci_ids=("1af4:1004", "1af4:1048")),
    # --------------------------------------------------------------- consoles
    DeviceProfile(
        name="uart", contrast="console", kind="emulated", title="16550 UART",
        description="The 8250 driver writes one byte at a time to the transmit register (an OUT to an "
                    "I/O port, trapped) and reads the line-status register around it; a 16-byte FIFO "
                    "and 'transmitter empty' interrupts pace it.",
        extra_args=("-serial", "null"), regions=("serial",), guest_path="/dev/ttyS1",
        notes="second COM port (ttyS1, port 0x2f8) with a null back end; the kernel log stays on "
              "ttyS0 (quiet). Both UARTs are named 'serial' in QEMU, so kernel messages during a run "
              "would be counted too."),
    DeviceProfile(
        name="virtio-console", contrast="console", kind="paravirtual", title="virtio-console",
        description="The virtio_console driver hands whole buffers to the host through a shared ring "
                    "and kicks once per buffer; the host signals completion with an interrupt.",
        extra_args=_TEST_VSER, virtio=True, guest_path="/dev/hvc0", pci_ids=("1af4:1003", "1af4:1043"),
        notes="its own virtio-serial controller (vsertest), separate from the agent's vser0"),
    # --------------------------------------------------------------- NICs
    DeviceProfile(
        name="rtl8139", contrast="net", kind="emulated", title="Realtek RTL8139",
        description="The 8139cp driver writes each frame's descriptor and pokes transmit registers "
                    "(trapped I/O); receive interrupts are acknowledged by reading and writing the "
                    "interrupt status register.",
        nic_model="rtl8139", regions=("rtl8139",), guest_path="eth0", pci_ids=("10ec:8139",)),
    DeviceProfile(
        name="e1000", contrast="net", kind="emulated", title="Intel e1000 (82540EM)",
        description="The e1000 driver keeps descriptor rings in memory (like real hardware) but must "
                    "write the tail register (MMIO, trapped) to transmit, and read the interrupt cause "
                    "register on every interrupt.",
        nic_model="e1000", regions=("e1000-mmio", "e1000-io"), guest_path="eth0", pci_ids=("8086:100e",)),
    DeviceProfile(
        name="virtio-net", contrast="net", kind="paravirtual", title="virtio-net",
        description="The virtio_net driver shares transmit and receive rings with the host, kicks only "
                    "when the host asks for it (event index), and takes few interrupts (NAPI polling).",
        nic_model="virtio", regions=("virtio-pci-common-virtio-net", "virtio-pci-isr-virtio-net",
                                     "virtio-pci-device-virtio-net"),
        virtio=True, guest_path="eth0", pci_ids=("1af4:1000", "1af4:1041")),
]}

QUICK_DEVICES = {"disk": ("ide-pio", "ide-dma", "ahci", "virtio-blk"),
                 "console": ("uart", "virtio-console"),
                 "net": ("e1000", "virtio-net")}


def profiles(contrast: Optional[str] = None) -> List[DeviceProfile]:
    """All profiles, or those of one contrast ("disk", "console", "net")."""
    if contrast is not None and contrast not in CONTRASTS:
        raise SpecError("contrast", f"unknown contrast {contrast!r}", fix=f"one of: {', '.join(CONTRASTS)}")
    return [p for p in PROFILES.values() if contrast is None or p.contrast == contrast]


def get(name: str, contrast: Optional[str] = None) -> DeviceProfile:
    p = PROFILES.get(name)
    if p is None or (contrast and p.contrast != contrast):
        names = [q.name for q in profiles(contrast)]
        raise SpecError("devices", f"unknown {contrast or 'device'} profile {name!r}",
                        fix=f"one of: {', '.join(names)}")
    return p


def resolve(names: Optional[Iterable[str]], contrast: str, quick: bool) -> List[DeviceProfile]:
    """Profiles named by the caller (validated), or the contrast's default set."""
    if names is None:
        if quick:
            return [get(n, contrast) for n in QUICK_DEVICES[contrast]]
        return profiles(contrast)
    if isinstance(names, str):
        names = [names]
    out = [get(n, contrast) for n in names]
    if not out:
        raise SpecError("devices", "no device named", fix=f"e.g. devices={list(QUICK_DEVICES[contrast])}")
    return out


def table(contrast: Optional[str] = None) -> pd.DataFrame:
    """The profiles as a DataFrame (for notebooks)."""
    import pandas as pd
    return pd.DataFrame([p.row() for p in profiles(contrast)])


# ---------------------------------------------------------------------------
# What the guest sees: an lspci from /sys/bus/pci/devices
# ---------------------------------------------------------------------------
PCI_NAMES = {
    "8086:1237": "Intel 440FX host bridge", "8086:7000": "Intel PIIX3 ISA bridge",
    "8086:7010": "Intel PIIX3 IDE controller", "8086:7113": "Intel PIIX4 ACPI",
    "8086:2922": "Intel ICH9 AHCI SATA controller", "8086:100e": "Intel 82540EM Gigabit Ethernet (e1000)",
    "10ec:8139": "Realtek RTL-8139 Fast Ethernet", "1b36:0010": "QEMU NVM Express controller",
    "1234:1111": "QEMU standard VGA",
    "1af4:1000": "virtio network (legacy id)", "1af4:1001": "virtio block (legacy id)",
    "1af4:1002": "virtio balloon (legacy id)", "1af4:1003": "virtio console (legacy id)",
    "1af4:1004": "virtio SCSI (legacy id)", "1af4:1005": "virtio RNG (legacy id)",
    "1af4:1041": "virtio network", "1af4:1042": "virtio block", "1af4:1043": "virtio console",
    "1af4:1048": "virtio SCSI",
}
PCI_CLASSES = {"0100": "SCSI storage", "0101": "IDE interface", "0106": "SATA controller",
               "0108": "NVMe controller", "0200": "Ethernet controller", "0600": "Host bridge",
               "0601": "ISA bridge", "0680": "Bridge", "0780": "Communication controller",
               "0300": "VGA", "00ff": "Unclassified"}

_LSPCI = ("for d in /sys/bus/pci/devices/*; do "
          "drv=$(readlink $d/driver 2>/dev/null); "
          "echo \"$(basename $d) $(cat $d/vendor) $(cat $d/device) $(cat $d/class) "
          "$(cat $d/subsystem_device 2>/dev/null || echo -) ${drv##*/}\"; done")


def parse_lspci(text: str) -> List[Dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        slot, ven, dev, cls = parts[:4]
        drv = parts[5] if len(parts) > 5 else ""
        vid = f"{ven[2:]}:{dev[2:]}".lower()
        klass = cls[2:6].lower()
        rows.append({"slot": slot, "id": vid, "name": PCI_NAMES.get(vid, "?"),
                     "class": PCI_CLASSES.get(klass, klass), "driver": drv or "(none)",
                     "paravirtual": vid.startswith("1af4:")})
    return rows


def lspci(vm: VM) -> pd.DataFrame:
    """What the guest sees on its PCI bus (vendor:device, class, bound driver) as a DataFrame."""
    import pandas as pd
    return pd.DataFrame(parse_lspci(vm.run(_LSPCI, timeout=30).stdout))


# ---------------------------------------------------------------------------
# Counting interventions
# ---------------------------------------------------------------------------
_SPLIT = "@@vmlab-split@@"
_IRQ_SKIP = re.compile(r"\b(timer|i8042|rtc0|acpi|cascade)\b")
_VDEV = re.compile(rb"^(?:\d+@[\d.]+:)?virtio_queue_notify vdev (0x[0-9a-f]+)", re.M)


def parse_interrupts(text: str) -> Dict[str, Tuple[int, str]]:
    """``/proc/interrupts`` -> {"14": (count, "IO-APIC 14-edge ata_piix"), ...} for numbered lines.

    Keyed by IRQ number: a driver that frees its IRQ on close (the 8250 UART
    does) drops its name from the line, the number stays.
    """
    out: Dict[str, Tuple[int, str]] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+):\s+(.*)$", line)
        if not m:
            continue
        counts: List[int] = []
        rest: List[str] = []
        for f in m.group(2).split():
            if not rest and f.isdigit():
                counts.append(int(f))
            else:
                rest.append(f)
        out[m.group(1)] = (sum(counts), " ".join(rest))
    return out


def irq_delta(before: Dict[str, Tuple[int, str]], after: Dict[str, Tuple[int, str]],
              skip_virtio: Sequence[str] = ()) -> Dict[str, int]:
    """Interrupts raised between two readings, minus the timer/keyboard/RTC/ACPI and the agent's lines.

    Returns {"14 ata_piix": count, ...} (IRQ number and the driver's name for it).
    """
    out = {}
    for k, (v, name) in after.items():
        b, bname = before.get(k, (0, ""))
        label = name if len(name.split()) > 2 else bname
        if _IRQ_SKIP.search(label) or any(re.search(rf"\b{re.escape(s)}-", label) for s in skip_virtio):
            continue
        d = v - b
        if d > 0:
            words = label.split()
            out[f"{k} {' '.join(words[2:])}" if len(words) > 2 else f"irq{k}"] = d
    return out


def count_traps(data: bytes, profile: DeviceProfile, vdevs: Sequence[str] = ()) -> Dict[str, int]:
    """Register accesses per region (and virtio kicks of ``vdevs``) in a chunk of QEMU's trace log."""
    out: Dict[str, int] = {}
    for r in profile.regions:
        n = data.count(b" name '" + r.encode() + b"'")
        if n:
            out[r] = n
    if profile.virtio:
        kicks = 0
        for m in _VDEV.finditer(data):
            if m.group(1).decode() in vdevs:
                kicks += 1
        out["virtio_queue_notify"] = kicks
    return out


def kvm_exit_stats(vm: VM) -> Tuple[Optional[Dict[str, int]], str]:
    """KVM's exit counters summed over vCPUs (QMP query-stats, QEMU >= 7.1), or (None, reason)."""
    if getattr(vm, "accel", None) != "kvm":
        return None, f"KVM exit counters exist only under KVM; this VM runs under {vm.accel or 'no'} accel"
    try:
        res = vm.qmp("query-stats", target="vcpu")
    except VMError as exc:
        return None, f"query-stats failed: {exc.message}"
    totals: Dict[str, int] = {}
    for entry in res:
        for s in entry.get("stats", []):
            if isinstance(s.get("value"), int) and ("exit" in s["name"] or s["name"] in ("io_exits", "mmio_exits")):
                totals[s["name"]] = totals.get(s["name"], 0) + s["value"]
    return totals, ""


class Probe:
    """Counts one device's interventions around guest commands in a booted VM.

        probe = Probe(vm, profile)          # finds the agent's virtio device, verifies the set-up
        probe.calibrate(warm_up_command)    # learns which virtio device is ours (virtio profiles)
        m = probe.measure("vmbench ...", count=True)   # -> Measurement
    """

    def __init__(self, vm: VM, profile: DeviceProfile) -> None:
        self.vm = vm
        self.profile = profile
        self.vdevs: List[str] = []
        self.tracing = bool(vm.spec.trace)
        out = vm.run("for p in /sys/class/virtio-ports/*; do "
                     "[ \"$(cat $p/name 2>/dev/null)\" = org.vmlab.agent ] && "
                     "basename $(readlink -f $p/device); done; true", timeout=30).stdout
        self.agent_virtio = [w for w in out.split() if w.startswith("virtio")]
        if profile.check:
            res = vm.run(profile.check, timeout=30, check=False)
            if res.status != 0 or profile.check_expect not in res.stdout:
                raise GuestError(f"{profile.name}: the set-up check {profile.check!r} gave "
                                 f"{res.stdout.strip()!r} (expected {profile.check_expect!r})",
                                 fix="the guest did not apply the profile's kernel arguments")

    def set_tracing(self, on: bool) -> None:
        """Switch the profile's trace events on or off (QMP trace-event-set-state)."""
        self.vm.set_tracing(on)
        self.tracing = on

    def calibrate(self, command: str, timeout: float = 120) -> List[str]:
        """Run a warm-up command with tracing on and keep the virtio device that was kicked most."""
        if not self.profile.virtio:
            self.vm.run(command, timeout=timeout)
            return []
        self.set_tracing(True)
        off = self.vm.trace_mark()
        self.vm.run(command, timeout=timeout)
        time.sleep(0.05)
        counts: Dict[str, int] = {}
        for m in _VDEV.finditer(self.vm.trace_since(off)):
            k = m.group(1).decode()
            counts[k] = counts.get(k, 0) + 1
        if not counts:
            raise VMError(f"{self.profile.name}: the warm-up {command!r} kicked no virtio queue",
                          fix="is the device present in the guest? see devices.lspci(vm)")
        self.vdevs = [max(counts, key=lambda k: counts[k])]
        return self.vdevs

    def measure(self, command: str, *, count: bool, timeout: float = 300) -> Measurement:
        """Run ``command`` (one JSON line on stdout); with ``count`` trace it and count interventions."""
        self.set_tracing(count)
        wrapped = (f"head -1 /proc/stat; cat /proc/interrupts; echo {_SPLIT}; {command}; echo {_SPLIT}; "
                   "head -1 /proc/stat; cat /proc/interrupts")
        off = self.vm.trace_mark()
        kvm0, why = kvm_exit_stats(self.vm)
        cpu0 = self.vm.qemu_cpu_seconds()
        t0 = time.monotonic()
        res = self.vm.run(wrapped, timeout=timeout)
        wall = time.monotonic() - t0
        cpu1 = self.vm.qemu_cpu_seconds()
        kvm1, _ = kvm_exit_stats(self.vm)
        parts = res.stdout.split(_SPLIT)
        if len(parts) != 3:
            raise GuestError(f"unexpected output from {command!r}: {res.stdout[-300:]!r}")
        result = _last_json(parts[1], command)
        m = Measurement(result=result, wall_s=wall, host_cpu_s=cpu1 - cpu0, counted=count,
                        guest_busy_s=_busy(parts[2]) - _busy(parts[0]))
        if count:
            time.sleep(0.02)
            data = self.vm.trace_since(off)
            m.traps = count_traps(data, self.profile, self.vdevs)
            m.irqs = irq_delta(parse_interrupts(parts[0]), parse_interrupts(parts[2]), self.agent_virtio)
            m.trace_bytes = len(data)
        if kvm0 is not None and kvm1 is not None:
            m.kvm_exit_counts = {k: v - kvm0.get(k, 0) for k, v in kvm1.items()}
            key = "exits" if "exits" in kvm1 else None    # KVM's total; else io + mmio exits
            if key:
                m.kvm_exits = kvm1[key] - kvm0.get(key, 0)
            else:
                m.kvm_exits = sum(kvm1.get(k, 0) - kvm0.get(k, 0) for k in ("io_exits", "mmio_exits"))
        else:
            m.kvm_note = why
        return m


@dataclass
class Measurement:
    result: Dict[str, Any]
    wall_s: float
    host_cpu_s: float
    counted: bool
    traps: Dict[str, int] = field(default_factory=dict)
    irqs: Dict[str, int] = field(default_factory=dict)
    trace_bytes: int = 0
    kvm_exits: Optional[int] = None         # VM exits of any reason during the run (KVM's "exits")
    kvm_note: str = ""
    kvm_exit_counts: Dict[str, int] = field(default_factory=dict)   # per KVM counter: io_exits, mmio_exits...
    guest_busy_s: Optional[float] = None   # whole guest, /proc/stat (user+nice+system+irq+softirq)

    @property
    def n_traps(self) -> int:
        return sum(self.traps.values())

    @property
    def n_irqs(self) -> int:
        return sum(self.irqs.values())

    @property
    def interventions(self) -> int:
        return self.n_traps + self.n_irqs

    @property
    def guest_cpu_s(self) -> Optional[float]:
        r = self.result
        if "user_s" in r and "sys_s" in r:
            return float(r["user_s"]) + float(r["sys_s"])
        return None

    def breakdown(self) -> str:
        items = [f"{k}={v}" for k, v in sorted(self.traps.items())] + \
                [f"irq[{k}]={v}" for k, v in sorted(self.irqs.items())]
        return "; ".join(items)


def _busy(text: str) -> float:
    """Busy CPU seconds of the whole guest from the ``cpu`` line of /proc/stat (USER_HZ=100)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:8]]
            return (f[0] + f[1] + f[2] + f[5] + f[6]) / 100.0
    return float("nan")


def _last_json(text: str, command: str) -> Dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                break
            if "error" in result:     # vmbench says what failed (and exits non-zero)
                raise GuestError(f"{command!r} failed in the guest: {result['error']}")
            return result
    raise GuestError(f"{command!r} printed no JSON result: {text[-300:]!r}")


def boot(profile: DeviceProfile, *, accel: str = "tcg", image: Optional[GuestImage] = None, warm: bool = True,
         **spec_kw: Any) -> VM:
    """A started VM carrying ``profile`` (use it in ``with``).

    Restored from a warm snapshot where QEMU can save the device (all but NVMe; ``warm=False`` boots cold): a
    restored guest has the same devices, drivers and blank scratch disk as a booted one, and what the
    experiments measure starts after the start either way (docs/boot.md, "Warm restores of guests with disks and socket NICs").
    """
    spec = profile.spec(accel=accel, **spec_kw)
    vm = VM(spec, image=image, warm=warm and not warm_refusal(spec))
    vm.start()
    return vm
