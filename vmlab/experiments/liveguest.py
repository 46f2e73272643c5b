"""A guest that can be live-migrated again and again, with a heartbeat the host listens to.

    g = LiveGuest(memory=256).start()          # boots; an e1000 NIC carries the heartbeat
    g.workload(dirty_rate_mbs=8)               # vmbench dirty in the guest, a beat every 5 ms
    row = g.migrate(bandwidth_mbs=32)          # a fresh destination QEMU; the guest moves there
    g.counter                                  # the last heartbeat counter the host received
    g.close()                                  # every QEMU it started is stopped

Used by :mod:`vmlab.experiments.migration` and the live widget
(:mod:`vmlab.widgets.migration`). The heartbeat: ``vmbench dirty --dst
10.0.0.1 --port 7777`` sends 28-byte UDP datagrams ("VMHB", counter, the
guest's CLOCK_MONOTONIC in ns, pages written) through the NIC; a host thread
reads every VM's NIC socket and stamps each datagram with the host's
monotonic clock, so a gap in arrivals is what the guest's users would see.

Every guest is booted with :func:`vmlab.vm.migrate.migratable_args` (8 KiB
more memory on QEMU < 9.0): without it QEMU's TCG lost guest writes during live
pre-copy and 5 of 8 busy guests arrived broken (docs/migration.md, "Guests
lost"). Every move is still checked and a lost guest replaced. The NIC is an
e1000: with a virtio-net NIC the destination's guest once reported
``virtio_net virtio1: output.0:id 0 is not a head!``, before that fix (most
likely the same lost writes; not re-measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import cache_dir
from ..errors import SpecError, VMLabError
from ..image import GuestImage, ensure_image
from ..netsink import HOST_IP, HOST_MAC, FrameReader, arp_reply, guest_setup, parse_udp
from ..spec import NIC
from ..vm import AsyncVM, runner
from ..vm.migrate import incoming_vm, migratable_args, migrate

__all__ = ["HEARTBEAT_PORT", "Heartbeat", "LiveGuest", "check_rate"]

HEARTBEAT_PORT = 7777
BEAT_MS = 5
STATE_FILE = "/tmp/vmlab-state"          # tmpfs: guest RAM, so it moves with the guest
MAX_RATE = 4096.0
#: auto-converge's CPU throttle: 99 % at once (QEMU's default starts at 20 % and adds 10 % a round: too slow to
#: watch). The workload is paced, not CPU-bound: at 95 % its vCPU still runs 5 slices of 10 ms a second, and in
#: each it catches up on the writes it missed (then up to 50 ms of them), so the dirty rate hardly fell (~1000
#: pages/s at 0 % and at 95 %, measured); at 99 % (one slice a second) it does. ``vmbench dirty`` now catches up
#: on at most 10 ms of writes: with 50, a throttled round still left 1.3-2.5 MB at some syncs and the
#: auto-converge case was cancelled in 5 of 14 trials on a faster machine; with 10 it completed in 8 of 8
#: (docs/migration.md)
THROTTLE = {"cpu-throttle-initial": 99, "cpu-throttle-increment": 1}
CHECK_TIMEOUT = 10.0
#: what a guest kernel prints when something went wrong (the console carries only the kernel's log)
KERNEL_TROUBLE = re.compile(r"(Kernel panic[^\n]*|BUG:[^\n]*|Oops[^\n]*|general protection[^\n]*|"
                            r"stack-protector[^\n]*|not a head[^\n]*|segfault[^\n]*)")                   # s the guest gets to answer after a migration
NAN = float("nan")


def check_rate(rate: Any) -> float:
    """A dirty rate in MiB/s (0 = heartbeat only); SpecError otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= MAX_RATE:
        raise SpecError("dirty_rate_mbs", f"{rate!r} is not a dirty rate in MiB/s (0 to {MAX_RATE:g})",
                        fix="e.g. dirty_rate_mbs=8")
    return float(rate)


Beat = Tuple[float, str, int, int, int]      # host time, VM name, counter, guest ns, pages written


class Heartbeat:
    """Reads the guest's heartbeat datagrams from the NIC sockets of the VMs it lives in (a thread)."""

    def __init__(self, port: int = HEARTBEAT_PORT) -> None:
        self.port = port
        self.beats: List[Beat] = []
        self._socks: Dict[socket.socket, Tuple[str, FrameReader]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, sock: socket.socket, name: str) -> None:
        with self._lock:
            self._socks[sock] = (name, FrameReader())

    def unwatch(self, sock: Optional[socket.socket]) -> None:
        with self._lock:
            self._socks.pop(sock, None)  # type: ignore[arg-type]

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._loop, name="vmlab-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    @property
    def last(self) -> Optional[Beat]:
        with self._lock:
            return self.beats[-1] if self.beats else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks = list(self._socks)
            if not socks:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):       # a socket closed under us: its VM is gone
                with self._lock:
                    for s in [s for s in self._socks if s.fileno() < 0]:
                        self._socks.pop(s, None)
                continue
            now = time.monotonic()
            for s in ready:
                with self._lock:
                    entry = self._socks.get(s)
                if entry is None:
                    continue
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self.unwatch(s)
                    continue
                for frame in entry[1].feed(data):
                    self._frame(s, entry[0], frame, now)

    def _frame(self, sock: socket.socket, name: str, frame: bytes, now: float) -> None:
        reply = arp_reply(frame, HOST_MAC, HOST_IP)
        if reply is not None:
            with contextlib.suppress(OSError):
                sock.sendall(struct.pack("!I", len(reply)) + reply)
            return
        u = parse_udp(frame)
        if u is None or u.dport != self.port or len(u.payload) < 28 or u.payload[:4] != b"VMHB":
            return
        seq, gns, pages = struct.unpack("!QQQ", u.payload[4:28])
        with self._lock:
            self.beats.append((now, name, seq, gns, pages))

    def gap(self, t0: float, t1: float, src: str, dst: str) -> Dict[str, Any]:
        """The heartbeats that arrived between host times t0 and t1 as the guest moved from *src* to *dst*.

        ``guest_gap_ms``: the last beat from the source to the first from the destination (the switch-over
        as an outside observer sees it); ``guest_clock_gap_ms``: the same two beats on the guest's own clock;
        ``worst_gap_ms``: the longest gap between any two beats in the window.
        """
        with self._lock:
            bs = [b for b in self.beats if t0 <= b[0] <= t1]
        out: Dict[str, Any] = {"guest_gap_ms": float("nan"), "guest_clock_gap_ms": float("nan"),
                               "worst_gap_ms": float("nan"), "beats_lost": 0, "counter_kept": False,
                               "beats_seen": len(bs)}
        if len(bs) < 2:
            return out
        lost, kept = 0, True
        worst = 0.0
        for a, b in itertools.pairwise(bs):
            if b[2] != a[2] + 1:
                kept = kept and b[2] > a[2]
                lost += max(0, b[2] - a[2] - 1)
            worst = max(worst, b[0] - a[0])
        out.update(worst_gap_ms=worst * 1e3, beats_lost=lost)
        last_src = [b for b in bs if b[1] == src]
        first_dst = [b for b in bs if b[1] == dst]
        if last_src and first_dst:
            a, b = last_src[-1], first_dst[0]
            out.update(guest_gap_ms=(b[0] - a[0]) * 1e3, guest_clock_gap_ms=(b[3] - a[3]) / 1e6,
                       counter_kept=kept and b[2] == a[2] + 1, counter_at_switch=b[2])
        return out


def sweep_pinned() -> None:
    """Remove pinned image directories whose process is gone (a kernel killed before close())."""
    for d in cache_dir().glob("pinned-image-*"):
        pid = d.name.split("-")[2]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def pin_image(image: GuestImage) -> Tuple[GuestImage, Path]:
    """The image's kernel and initramfs hard-linked (or copied) into a directory of our own.

    Every destination QEMU opens them again; a rebuild of the image cache must not take them away
    while the guest is alive. Remove the directory when done.
    """
    sweep_pinned()
    d = Path(tempfile.mkdtemp(prefix=f"pinned-image-{os.getpid()}-", dir=cache_dir()))
    srcs = [image.kernel, image.initrd] + ([image.initrd_all] if image.initrd_all else [])
    for src in srcs:
        try:
            os.link(src, d / src.name)
        except OSError:
            shutil.copy2(src, d / src.name)
    return dataclasses.replace(image, kernel=d / image.kernel.name, initrd=d / image.initrd.name,
                               initrd_all=d / image.initrd_all.name if image.initrd_all else None), d


class LiveGuest:
    """One guest, migrated between QEMU processes on this host (synchronous API)."""

    def __init__(self, memory: int = 256, *, image: Optional[GuestImage] = None, working_set: int = 32,
                 accel: str = "tcg", name: str = "live", nic_model: str = "e1000") -> None:
        if not isinstance(working_set, int) or not 1 <= working_set <= memory // 2:
            raise SpecError("working_set", f"{working_set!r} MiB: must be 1 to memory/2",
                            fix="e.g. working_set=32")
        self.memory, self.working_set, self.accel = memory, working_set, accel
        self._image, self._name, self.nic_model = image, name, nic_model
        self.vm: Optional[AsyncVM] = None
        self.heartbeat = Heartbeat()
        self.migrations = 0
        self.token = ""
        self.rate: Optional[float] = None
        self.running_set: Optional[int] = None    # MiB the running workload dirties
        self._leftover: List[AsyncVM] = []
        self._pinned: Optional[Path] = None
        self.boots = 0          # guests booted (1, plus one for each guest a migration lost)
        self.lost = 0           # guests that did not survive a migration
        self.last_workload: Dict[str, Any] = {}   # vmbench dirty's JSON when it stopped
        self.beats_since = 0.0  # host time the running workload started: its heartbeats are the ones after it

    # ------------------------------------------------------------ sync face
    def start(self) -> LiveGuest:
        runner.block_on(self._start())
        return self

    def workload(self, dirty_rate_mbs: float) -> None:
        """(Re)start ``vmbench dirty`` in the guest at this rate (MiB/s of pages written)."""
        runner.block_on(self._workload(check_rate(dirty_rate_mbs)))

    def migrate(self, bandwidth_mbs: int = 32, dirty_rate_mbs: Optional[float] = None, *,
                downtime_limit_ms: int = 300, timeout: float = 20.0,
                capabilities: Optional[Mapping[str, bool]] = None,
                postcopy_after_s: Optional[float] = None, fresh: bool = False,
                stop_first: bool = False, later_bandwidth_mbs: Optional[int] = None,
                working_set: Optional[int] = None) -> Dict[str, Any]:
        """Move the guest to a new QEMU process; a row of what it took (see the experiment's columns).

        ``fresh``: restart the guest's workload just before and stop it just after, so its
        check of the pages it wrote (``stale_pages``) covers this migration alone. ``stop_first``:
        pause the guest, then copy (stop-and-copy: the downtime is the whole copy). ``later_bandwidth_mbs``:
        the link's limit once the first pass over memory is done (the first pass at ``bandwidth_mbs``; until
        QEMU has measured a round at that speed the pause limit is 1 ms). ``working_set``: MiB the workload
        dirties for this migration (default: the guest's ``working_set``).
        """
        if isinstance(bandwidth_mbs, bool) or not isinstance(bandwidth_mbs, int) or not 1 <= bandwidth_mbs <= 100000:
            raise SpecError("bandwidth_mbs", f"{bandwidth_mbs!r} is not a bandwidth limit in MiB/s",
                            fix="e.g. bandwidth_mbs=32")
        if dirty_rate_mbs is not None:
            check_rate(dirty_rate_mbs)
        ws = self.working_set if working_set is None else working_set
        if isinstance(ws, bool) or not isinstance(ws, int) or not 1 <= ws <= self.memory // 2:
            raise SpecError("working_set", f"{ws!r} MiB: must be 1 to memory/2", fix="e.g. working_set=4")
        return runner.block_on(self._migrate(bandwidth_mbs, dirty_rate_mbs, downtime_limit_ms, timeout,
                                             dict(capabilities or {}), postcopy_after_s, fresh, stop_first,
                                             later_bandwidth_mbs, ws))

    def read_state(self) -> Dict[str, Any]:
        """The guest's state file and counter file, read through the agent."""
        return runner.block_on(self._read_state())

    @property
    def counter(self) -> Optional[int]:
        last = self.heartbeat.last
        return last[2] if last else None

    @property
    def where_now(self) -> str:
        """The QEMU process the guest runs in now."""
        return f"{self.vm.spec.name} (pid {self.vm.pid})" if self.vm else "nowhere"

    @property
    def kernel_release(self) -> Optional[str]:
        return self.vm.kernel_release if self.vm else None

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            runner.block_on(self._close())
        self.heartbeat.stop()

    def __enter__(self) -> LiveGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ async body
    async def _start(self) -> None:
        image = self._image
        if image is None:
            image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
        self._image, self._pinned = pin_image(image)
        self.heartbeat.start()
        await self._boot()

    async def _boot(self) -> None:
        """Boot a fresh guest (the first, or after one was lost), network and state file set up."""
        self.boots += 1
        # migratable_args: 8 KiB more memory on QEMU < 9.0, else TCG loses guest writes in live pre-copy
        vm = AsyncVM(name=f"{self._name}{self.boots}-0", accel=self.accel, memory=self.memory, image=self._image,
                     nics=(NIC(model=self.nic_model, backend="socket"),),
                     extra_args=migratable_args(self.memory))
        self.vm = vm
        try:
            await vm.start()
            self.accel = vm.accel or self.accel
            self._watch(vm)
            await vm.run(guest_setup(), timeout=60)
            self.token = secrets.token_hex(8)
            await vm.write_file(STATE_FILE, self.token)
        except BaseException:
            await self._drop(vm)
            self.vm = None
            raise
        self.rate = None

    def _watch(self, vm: AsyncVM) -> None:
        sock = vm.nic_sockets[0] if vm.nic_sockets else None
        if sock is not None:
            self.heartbeat.watch(sock, self._label(vm))

    @staticmethod
    def _label(vm: AsyncVM) -> str:
        return f"{vm.spec.name}#{vm.pid}"

    async def _stop_workload(self) -> Dict[str, Any]:
        """Stop vmbench dirty (SIGTERM); its final JSON (with the stale-page check), {} if none ran."""
        assert self.vm is not None
        if self.rate is None:
            return {}
        res = await self.vm.run("killall -q vmbench; i=0; while pidof vmbench >/dev/null && [ $i -lt 200 ]; do "
                                "sleep 0.02; i=$((i+1)); done; cat /tmp/vmlab-dirty.json 2>/dev/null",
                                timeout=30, check=False)
        self.rate = None
        try:
            self.last_workload = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.last_workload = {}
        return self.last_workload

    async def _workload(self, rate: float, working_set: Optional[int] = None) -> None:
        assert self.vm is not None
        await self._stop_workload()
        ws = working_set or self.working_set
        # beats before this instant are the stopped workload's (its counter ended high; the new one starts at 1)
        self.beats_since = time.monotonic()
        await self.vm.run(f"vmbench dirty --mb {ws} --rate-mbs {rate:g} --beat-ms {BEAT_MS} "
                          f"--dst {HOST_IP} --port {HEARTBEAT_PORT} --counter /tmp/vmlab-beats "
                          "> /tmp/vmlab-dirty.json 2>&1 &", timeout=30)
        self.rate, self.running_set = rate, ws
        await self._wait_beats(3)

    async def _wait_beats(self, n: int, timeout: float = 15.0) -> None:
        start = len(self.heartbeat.beats)
        deadline = time.monotonic() + timeout
        while len(self.heartbeat.beats) < start + n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _read_state(self, timeout: float = 30.0) -> Dict[str, Any]:
        assert self.vm is not None
        res = await self.vm.run(f"cat {STATE_FILE}; echo; cat /tmp/vmlab-beats 2>/dev/null || echo -1",
                                timeout=timeout)
        lines = res.stdout.split("\n")
        return {"file": lines[0].strip(), "counter_file": int(lines[1].strip() or -1)}

    async def _healthy(self, stop: bool, since: int) -> Tuple[Optional[Dict[str, Any]], str]:
        """The guest's state (and, with *stop*, the workload's final JSON as ``workload``) if it answers
        within CHECK_TIMEOUT s and its kernel reported no trouble on the console after offset *since*;
        else None and why not."""
        assert self.vm is not None
        had_workload = self.rate is not None
        try:
            state = await self._read_state(timeout=CHECK_TIMEOUT)
            state["workload"] = await self._stop_workload() if stop else {}
        except VMLabError as exc:
            return None, exc.message.splitlines()[0][:200]
        if state["file"] != self.token:
            return None, "the guest rebooted (its state file is gone)"
        bad = KERNEL_TROUBLE.search(self.vm.console_text(), since)
        if bad:
            return None, f"the guest kernel reported: {bad.group(0).strip()[:160]}"
        if stop and had_workload and not state["workload"]:
            return None, "the guest's workload died (no result from vmbench dirty)"
        return state, ""

    async def _migrate(self, bw: int, rate: Optional[float], downtime_limit_ms: int, timeout: float,
                       caps: Dict[str, bool], postcopy_after_s: Optional[float], fresh: bool,
                       stop_first: bool, later_bw: Optional[int] = None,
                       working_set: Optional[int] = None) -> Dict[str, Any]:
        src = self.vm
        assert src is not None
        rate = rate if rate is not None else (self.rate if self.rate is not None else 0.0)
        ws = working_set or self.working_set
        if fresh or rate != self.rate or ws != self.running_set:
            await self._workload(rate, ws)
        before = await self._read_state()
        self.migrations += 1
        dst = await incoming_vm(src, name=f"{self._name}{self.boots}-{self.migrations}")
        self._watch(dst)
        console_at = len(src.console_text())
        t0 = time.monotonic()
        params = THROTTLE if caps.get("auto-converge") else {}
        try:
            if stop_first:
                await src.pause()
            # a slower link after the first pass; until QEMU has measured a round at that speed the pause
            # limit is 1 ms (else it would judge the rest by the fast first pass and stop at once). Not 0:
            # QEMU 7.2 then never syncs the dirty log again and ends right after the first pass.
            stages: List[Tuple[int, Dict[str, Any]]] = [] if not later_bw else [
                (2, {"max-bandwidth": later_bw << 20}), (3, {"downtime-limit": downtime_limit_ms})]
            res = await migrate(src, dst, max_bandwidth=bw << 20,
                                downtime_limit_ms=1 if later_bw else downtime_limit_ms,
                                capabilities={"auto-converge": False, "postcopy-ram": False, **caps},
                                postcopy_after_s=postcopy_after_s, timeout=timeout, parameters=params,
                                staged=stages)
        except BaseException:
            await self._drop(dst)
            raise
        r = res.row()
        row: Dict[str, Any] = {
            "bandwidth_mbs": bw, "later_bandwidth_mbs": later_bw, "dirty_rate_mbs": rate, "working_set_mb": ws,
            "downtime_limit_ms": downtime_limit_ms, "memory_mb": self.memory, "status": r["status"],
            "converged": r["converged"], "wall_s": r["wall_s"], "total_time_s": (r["total_time_ms"] or NAN) / 1e3,
            "downtime_ms": (r["total_time_ms"] if stop_first else r["downtime_ms"]) if r["converged"] else NAN, "setup_time_ms": r["setup_time_ms"],
            "rounds": r["rounds"], "transferred_mb": (r["transferred_bytes"] or 0) / 2**20,
            "precopy_mb": (r["precopy_bytes"] or 0) / 2**20, "downtime_mb": (r["downtime_bytes"] or 0) / 2**20,
            "postcopy_mb": (r["postcopy_bytes"] or 0) / 2**20,
            "achieved_dirty_mbs": (r["dirty_pages_rate"] or 0) * 4096 / 2**20,
            "max_throttle_pct": r["max_throttle_pct"], "postcopy": r["postcopy"], "error": r["error"],
            "samples": res.samples, "src_pid": src.pid, "dst_pid": dst.pid,
            "guest_gap_ms": NAN, "guest_clock_gap_ms": NAN, "file_kept": None, "counter_kept": None,
            "stale_pages": None, "guest_ok": None, "guest_failure": ""}
        if res.converged:
            self.vm = dst
            await self._wait_beats(5, timeout=5)
            row.update(self.heartbeat.gap(max(t0 - 0.2, self.beats_since), time.monotonic(), self._label(src),
                                          self._label(dst)))
            await self._drop(src)
        else:
            # the source never stopped: the guest is where it was; the destination got nothing usable
            await self._drop(dst)
            row.update(self.heartbeat.gap(max(t0, self.beats_since), time.monotonic(), self._label(src),
                                          self._label(dst)))
            row.update(guest_gap_ms=NAN, guest_clock_gap_ms=NAN, counter_kept=None)
        after, why = await self._healthy(stop=fresh, since=0 if res.converged else console_at)
        row.update(guest_ok=after is not None, guest_failure=why)
        if after is not None:
            row.update(file_kept=after["file"] == self.token == before["file"],
                       counter_before=before["counter_file"], counter_after=after["counter_file"])
            if res.converged:
                row["counter_kept"] = bool(row.get("counter_kept")) and after["counter_file"] > before["counter_file"]
            done = after["workload"]
            if done:
                row.update(stale_pages=done.get("stale_pages"), pages_checked=done.get("pages_checked"),
                           guest_clock_max_gap_ms=done.get("max_gap_ms"))
        else:
            self.lost += 1
            # a corrupted guest's heartbeats (and clock) say nothing about the migration
            row.update(guest_gap_ms=NAN, guest_clock_gap_ms=NAN, worst_gap_ms=NAN)
            with contextlib.suppress(VMLabError):
                row["console_tail"] = self.vm.console_text(tail=3) if self.vm else ""
            await self._drop(self.vm)
            await self._boot()
        row["now_in"] = self.vm.spec.name if self.vm else ""
        return row

    async def _drop(self, vm: Optional[AsyncVM]) -> None:
        if vm is None:
            return
        self.heartbeat.unwatch(vm.nic_sockets[0] if vm.nic_sockets else None)
        try:
            await vm.shutdown(timeout=10)
        except VMLabError:
            self._leftover.append(vm)

    async def _close(self) -> None:
        if self.vm is not None:
            with contextlib.suppress(VMLabError):
                await self._stop_workload()
            await self._drop(self.vm)
            self.vm = None
        for vm in self._leftover:
            with contextlib.suppress(VMLabError):
                await vm.shutdown(timeout=5)
        self._leftover.clear()
        if self._pinned is not None:
            shutil.rmtree(self._pinned, ignore_errors=True)
            self._pinned = None


