"""Warm starts: save a booted guest's memory once, restore it instead of booting.

``AsyncVM(warm=True)`` looks for a snapshot made by the same QEMU command line
(the VM's name, its disks' files and its socket NICs' descriptors aside; each
disk's size is in the key instead), guest image and QEMU version in ``cache_dir()/warm``;
if there is one it starts QEMU with ``-incoming`` from it, otherwise it boots
cold and saves one (QMP ``stop``, ``migrate`` to a file, ``cont``). The
:data:`WARM_KEEP` most recently used snapshots (at most :data:`WARM_BYTES`) are kept. A damaged snapshot is
deleted and the VM boots cold; a snapshot that cannot be saved (a full disk)
is skipped with the reason in ``accel_reason``.

Before saving, the guest is left to settle (:data:`SETTLE_COMMAND`, then
:data:`QUIET_S` of nothing): work the guest still has in hand when it is saved
is done again by every restored guest right after its restore, in code that
QEMU, freshly started, has to translate first (docs/boot.md, "Warm restore").

A guest with disks is saved with the disks it booted with and restored with
others of the same size, bus and format: right after the restore it drops
what it read from its disks and reads their partition tables again
(:data:`DISKS_REREAD`), so it sees the new disks' contents. Refused (see
:func:`warm_refusal`): an NVMe disk (QEMU cannot save its state) and a guest
whose root file system is on a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import procfs
from ..config import cache_subdir
from ..errors import SpecError, VMError, VMTimeout
from ..image import GuestImage
from ..spec import QCOW2_MAGIC, MachineSpec, parse_size
from ..tools import qemu_version
from .core import VMCore
from .qemu import boot_initrd, build_launch
from .state import Trigger

__all__ = ["DISKS_REREAD", "QUIET_S", "SETTLE_COMMAND", "WARM_BYTES", "WARM_KEEP", "WarmMixin", "prune_snapshots",
           "snapshot_path", "warm_refusal"]

#: warm snapshots kept in cache_dir()/warm (least recently used go first): the lessons restore ~20 kinds of guest
WARM_KEEP = 32
#: and at most this many bytes of them (a default guest's snapshot is ~30 MB, a nested one ~100 MB)
WARM_BYTES = 2 << 30
#: run in the guest before a warm snapshot is saved: wait (at most ~5 s) until the kernel has finished the
#: refined TSC calibration it schedules a second after boot (``tsc-early`` leaves the clocksources; under KVM
#: kvm-clock makes it leave at once), so a restored guest does not do it again and reads the clock it will keep
#: (``tsc``). Prints how many 50 ms waits it took.
SETTLE_COMMAND = ("i=0; while [ $i -lt 100 ]; do "
                  "read -r cs </sys/devices/system/clocksource/clocksource0/available_clocksource; "
                  'case " $cs " in *" tsc-early "*) sleep 0.05; i=$((i+1)) ;; *) break ;; esac; done; echo $i')
#: then the host waits this long before it stops the guest: the settle command's own exit (its process torn
#: down, freed memory handed back) is finished, not left for each restored guest
QUIET_S = 0.3
#: run in a restored guest with disks: forget every block read from the disks it was saved with (BLKFLSBUF)
#: and read each partition table again (BLKRRPART), so it sees the disks it was restored with. Busybox
#: ``blockdev``; a failure fails the restore (the VM then boots cold).
DISKS_REREAD = ("for b in /sys/block/*; do n=${b##*/}; case $n in sd*|vd*|hd*) "
                "blockdev --flushbufs /dev/$n && blockdev --rereadpt /dev/$n || exit 1 ;; esac; done")


def warm_refusal(spec: MachineSpec) -> str:
    """Why *spec* cannot start warm ('' when it can)."""
    if any(d.bus == "nvme" for d in spec.disks):
        return "QEMU cannot save an NVMe controller's state (its device is marked unmigratable)"
    if "vmlab.root=" in spec.kernel_args:
        return "this guest runs from a file system on its disk, which a memory snapshot cannot bring along"
    return ""


def _disk_bytes(path: Path, fmt: Optional[str]) -> int:
    """The size the guest sees of the image at *path* (format validated): a qcow2 header's size field, or the
    file's size (raw). ``vmlab.disks.virtual_bytes`` says the same through ``qemu-img``, a process per call."""
    if fmt != "qcow2":
        return path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] != QCOW2_MAGIC:
        raise OSError(0, "not a qcow2 image")
    return int.from_bytes(head[24:32], "big")


def _disks_key(spec: MachineSpec) -> List[Any]:
    """What a restored guest's disks must match besides the command line: each one's size."""
    out: List[Any] = []
    for d in spec.disks:
        try:
            if d.path is None:
                out.append(parse_size(d.size if d.size is not None else 0, "disks"))
            else:
                out.append(_disk_bytes(Path(d.path), d.format))
        except OSError as exc:
            raise SpecError("disks", f"cannot read the disk image {d.path}: {exc.strerror}",
                            fix="check the path") from exc
    return out


def snapshot_path(spec: MachineSpec, accel: str, image: GuestImage) -> Path:
    """Where the warm snapshot for *spec* under *accel* with *image* is (or would be)."""
    # the VM's name, its disks' files and its NICs' descriptors do not change the guest's state: placeholders
    argv = build_launch(spec, accel=accel, kernel=image.kernel, initrd=boot_initrd(spec, image),
                        qmp_fd=3, agent_fd=4, console_fd=5, private_dir=Path("/"),
                        disk_paths=[Path(f"/disk{i}") for i in range(len(spec.disks))],
                        nic_fds=[100 + i for i in range(len(spec.nics))], trace_file=Path("/trace")).argv
    i = argv.index("-name")
    argv = argv[:i] + argv[i + 2:]
    # the last item is the snapshot format's version: 4 since snapshots are saved settled
    key = hashlib.sha256(json.dumps([argv, _disks_key(spec), image.key, qemu_version(), 4]).encode()).hexdigest()[:20]
    return cache_subdir("warm") / f"{key}.state"


def prune_snapshots(keep: Path, most: int = WARM_KEEP, most_bytes: int = WARM_BYTES) -> None:
    """Keep *keep* and the most recently used other snapshots, at most *most* of them and *most_bytes* in all."""
    def used(p: Path) -> float:
        with contextlib.suppress(OSError):
            return p.stat().st_mtime
        return 0.0
    snaps = sorted((p for p in keep.parent.glob("*.state") if p != keep), key=used, reverse=True)
    total = keep.stat().st_size if keep.exists() else 0
    for n, p in enumerate(snaps, start=1):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
        if n >= most or total > most_bytes:
            p.unlink(missing_ok=True)


class WarmMixin(VMCore):
    """Save and restore a booted guest."""

    async def _settle(self) -> float:
        """Let the booted guest finish its late boot work (:data:`SETTLE_COMMAND`); returns the seconds it took."""
        assert self._agent is not None
        t0 = time.monotonic()
        res = await self._race(self._agent.run(SETTLE_COMMAND, timeout=10), 20, "the guest to settle")
        if res.status != 0:
            raise VMError(f"the guest could not settle before its warm snapshot: {res.stderr.strip()[-200:]}",
                          **self._err_kw())
        await asyncio.sleep(QUIET_S)
        return time.monotonic() - t0

    async def _save_warm(self, path: Path) -> None:
        """Save this booted guest (settle, stop, migrate to a file, continue) for next time."""
        assert self._qmp is not None
        settle_s = await self._settle()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await self.qmp("stop")
            self._qmp.send_fd_scm(fd)
            await self.qmp("getfd", fdname="warm")
            await self.qmp("migrate", uri="fd:warm")
            deadline = time.monotonic() + 60
            while True:
                st: Dict[str, Any] = await self.qmp("query-migrate")
                status = st.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise VMError(f"saving the warm snapshot failed: {st}", **self._err_kw())
                await asyncio.sleep(0.02)
            os.fsync(fd)
            os.replace(tmp, path)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            await self.qmp("cont")
        self._record_event("WARM_SAVED", {"path": str(path), "settle_s": round(settle_s, 3)}, source="vmlab")

    async def _finish_restore(self, paused: bool) -> None:
        """Wait for QEMU to load the snapshot, then for the restored agent to answer."""
        deadline = time.monotonic() + 30
        while True:
            asked = time.monotonic()
            st = await self.qmp("query-status")
            if st["status"] not in ("inmigrate",):
                break
            if time.monotonic() > deadline:
                raise VMTimeout("the warm snapshot to load", 30, **self._err_kw())
            # QEMU loads a snapshot from a file without yielding its main loop: a slow answer means the
            # load has just ended, and the state changes as soon as the bottom half that ends it has run
            # (asking again at once saved ~5 ms of a ~110 ms restore, docs/boot.md)
            await asyncio.sleep(0 if time.monotonic() - asked > 0.002 else 0.005)
        if st["status"] not in ("running", "paused", "prelaunch"):
            raise VMError(f"restoring the warm snapshot ended in state {st['status']!r}", **self._err_kw())
        self._record_event("RESTORED", {"status": st["status"]}, source="vmlab")
        assert self._agent is not None
        kernel_version = self._image.kernel_version if self._image is not None else None
        if paused:
            self._advance(Trigger.RESTORED_PAUSED)
            self._agent.mark_reconnected()
            self._agent.kernel_release = kernel_version
            return
        if st["status"] != "running":
            await self.qmp("cont")
        self._advance(Trigger.RESTORED)
        await self._race(self._agent.ping(timeout=10), 15, "the restored guest agent")
        self._agent.mark_reconnected()
        if self.spec.disks:
            res = await self._race(self._agent.run(DISKS_REREAD, timeout=30), 45, "the restored guest's disks")
            if res.status != 0:
                raise VMError("the restored guest could not read its disks again "
                              f"(status {res.status}): {res.stderr.strip()[-200:]}", **self._err_kw())
            self._record_event("DISKS_REREAD", {"disks": len(self.spec.disks)}, source="vmlab")
        self._agent.kernel_release = self._agent.kernel_release or kernel_version
        self.boot_seconds = time.monotonic() - self._events.t0
        cpu = procfs.process_cpu_seconds(self.pid) if self.pid else None
        self._record_event("READY", {"kernel": self._agent.kernel_release, "warm": True, "qemu_cpu_s": cpu},
                           source="agent")
