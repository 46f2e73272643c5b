"""Live migration between two QEMU processes on this host.

    dst = await incoming_vm(src)                 # same machine, QEMU waiting with -incoming defer
    result = await migrate(src, dst, max_bandwidth=32 << 20, downtime_limit_ms=300)
    # src is now paused (QEMU's "postmigrate"); dst runs the guest: shut src down

The stream goes over a unix socket in the destination's private 0700
directory (``migrate-incoming unix:...``): never TCP. The destination is the
same :class:`~vmlab.spec.MachineSpec` (same devices, same guest image) started
with ``-incoming defer``; its guest agent is already running when the guest
arrives, so no HELLO comes and the agent channel is marked reconnected.

While the migration runs, :func:`migrate` polls ``query-migrate`` and keeps
the samples (``MigrationResult.samples``): pre-copy rounds, bytes sent and
left, QEMU's dirty-page rate and expected downtime, the CPU throttle of
auto-converge. It stops at ``completed``, ``failed``, or at ``timeout``
(then ``migrate_cancel``: the source keeps running, the destination is
useless and should be shut down).

**TCG before QEMU 9.0 loses guest writes during live pre-copy.** QEMU's fast
path for syncing the dirty bitmap of a RAM block whose size is a multiple of
64 pages (256 KiB: every whole number of MiB) clears the bits without putting
TLB_NOTDIRTY back into the vCPUs' TLB entries, so later stores through those
entries mark nothing dirty and never reach the destination (QEMU commit
03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory
access", in 9.0; the bug came with aa8dc044772, 2.x). The guest kernel's hot
pages stay in the TLB, so it is the kernel that arrives corrupted
(docs/migration.md has the counts). :func:`migratable_args` gives a source the
work-around: 8 KiB more memory, so the block is not a multiple of 256 KiB and
QEMU takes the per-page path, which does reset the TLB entries.
:func:`migrate` refuses a live TCG migration of a source without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import SpecError, VMError
from ..tools import qemu_version
from .machine import AsyncVM
from .state import RunState

__all__ = ["CAPABILITIES", "MigrationResult", "incoming_vm", "migratable_args", "migrate"]

#: the first QEMU whose TCG keeps the dirty log right in live pre-copy (commit 03bfc2188f)
TCG_DIRTY_SYNC_FIXED = (9, 0)
#: memory added to a TCG source so that its RAM block is not a multiple of 64 pages (see the module doc)
ODD_MEMORY_KIB = 8

#: seconds between two ``staged`` parameter changes
STAGE_GAP_S = 0.5
#: the capabilities :func:`migrate` lets a caller switch on
CAPABILITIES = ("auto-converge", "postcopy-ram", "xbzrle")


@dataclasses.dataclass
class MigrationResult:
    """What one migration did, from QEMU's ``query-migrate`` and the host's clock."""

    status: str                          # completed | failed | cancelled
    converged: bool                      # completed (pre-copy reached the downtime limit, or post-copy finished)
    wall_s: float                        # host time from the migrate command to the end
    total_time_ms: Optional[float]       # QEMU's total-time
    downtime_ms: Optional[float]         # QEMU's downtime (source stopped -> done)
    setup_time_ms: Optional[float]
    rounds: Optional[int]                # dirty-sync-count: passes over the dirty bitmap
    transferred_bytes: Optional[int]
    precopy_bytes: Optional[int]
    downtime_bytes: Optional[int]
    postcopy_bytes: Optional[int]
    dirty_pages_rate: Optional[float]    # pages/s, the last one QEMU reported while running
    max_dirty_pages_rate: Optional[float]
    mbps: Optional[float]                # QEMU's last reported throughput (megabits/s)
    max_throttle_pct: int                # auto-converge's highest CPU throttle (0 when off)
    postcopy: bool                       # switched to post-copy
    error: str = ""
    samples: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def row(self) -> Dict[str, Any]:
        """The scalar fields, for a table row."""
        d = dataclasses.asdict(self)
        d.pop("samples")
        return d


async def incoming_vm(src: AsyncVM, name: Optional[str] = None) -> AsyncVM:
    """A destination for *src*: the same spec and image, QEMU started with ``-incoming defer``.

    Its state is STARTING until :func:`migrate` brings a guest in.
    """
    if src.state not in (RunState.RUNNING, RunState.PAUSED):
        raise VMError(f"cannot migrate {src.spec.name!r}: it is {src.state.value}",
                      fix="start the source VM first", **src._err_kw())
    if src.accel is None or src._image is None:
        raise VMError("the source VM has no accelerator or image yet", fix="start it first", **src._err_kw())
    extra = tuple(src.spec.extra_args)
    if extra[-2:] == ("-incoming", "defer"):      # the source was itself a destination
        extra = extra[:-2]
    spec = dataclasses.replace(src.spec, extra_args=extra).with_(name=name or f"{src.spec.name}-in")
    dst = AsyncVM(spec, image=src._image, boot_timeout=src.boot_timeout)
    dst.accel, dst.accel_reason = src.accel, src.accel_reason + " (migration destination)"
    await dst.start(incoming="defer")
    return dst


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def needs_odd_memory(version: Optional[str] = None) -> bool:
    """Whether this QEMU (default: the one vmlab runs) has the TCG dirty-log bug of live pre-copy."""
    return _version_tuple(version or qemu_version()) < TCG_DIRTY_SYNC_FIXED


def migratable_args(memory_mb: int, version: Optional[str] = None) -> Tuple[str, ...]:
    """``extra_args`` for a VM that will be live-migrated: on QEMU before 9.0, ``-m`` again with 8 KiB
    more than *memory_mb* (QEMU merges the two ``-m``; the later wins), else nothing.

    The odd size makes QEMU sync the dirty bitmap page by page, resetting TCG's TLB entries as it
    clears bits (the module doc). Harmless under KVM."""
    if not needs_odd_memory(version):
        return ()
    return ("-m", f"{memory_mb * 1024 + ODD_MEMORY_KIB}K")


def _has_odd_memory(vm: AsyncVM) -> bool:
    """The VM's last ``-m`` in extra_args is in KiB and not a multiple of 256 KiB."""
    extra = list(vm.spec.extra_args)
    sizes = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "-m"]
    if not sizes or not sizes[-1].endswith("K") or not sizes[-1][:-1].isdigit():
        return False
    return int(sizes[-1][:-1]) % 256 != 0


def _caps(names: Mapping[str, bool]) -> List[Dict[str, Any]]:
    for n in names:
        if n not in CAPABILITIES:
            raise SpecError("capabilities", f"unknown migration capability {n!r}",
                            fix="one of: " + ", ".join(CAPABILITIES))
    return [{"capability": n, "state": bool(v)} for n, v in names.items()]


def _sample(st: Dict[str, Any], t: float) -> Dict[str, Any]:
    ram = st.get("ram") or {}
    return {"t": t, "status": st.get("status"), "rounds": ram.get("dirty-sync-count"),
            "transferred": ram.get("transferred"), "remaining": ram.get("remaining"),
            "dirty_pages_rate": ram.get("dirty-pages-rate"), "mbps": ram.get("mbps"),
            "expected_downtime_ms": st.get("expected-downtime"),
            "throttle_pct": st.get("cpu-throttle-percentage", 0)}


async def migrate(src: AsyncVM, dst: AsyncVM, *, max_bandwidth: Optional[int] = None,
                  downtime_limit_ms: Optional[int] = None, capabilities: Optional[Mapping[str, bool]] = None,
                  postcopy_after_s: Optional[float] = None, timeout: float = 120.0,
                  parameters: Optional[Mapping[str, Any]] = None,
                  staged: Sequence[Tuple[int, Mapping[str, Any]]] = (), poll_s: float = 0.05) -> MigrationResult:
    """Live-migrate the guest of *src* into *dst* (from :func:`incoming_vm`).

    A paused source gives stop-and-copy: the destination is started once everything has arrived.
    ``max_bandwidth`` in bytes/s, ``downtime_limit_ms`` the pause pre-copy may
    end with (0: QEMU 7.2 then stops syncing the dirty log and ends after the first pass); ``capabilities`` e.g. ``{"auto-converge": True}``; with
    ``postcopy_after_s`` (needs ``"postcopy-ram"``) the migration switches to
    post-copy after that many seconds of pre-copy; ``parameters`` are more of
    ``migrate-set-parameters`` (e.g. ``{"cpu-throttle-initial": 40}``). After ``timeout`` seconds
    the migration is cancelled (``status="cancelled"``, ``converged=False``).
    """
    if dst.state is not RunState.STARTING or dst.private_dir is None:
        raise VMError(f"{dst.spec.name!r} is not waiting for a migration ({dst.state.value})",
                      fix="make the destination with incoming_vm(src)", **dst._err_kw())
    caps = _caps(capabilities or {})
    postcopy = bool((capabilities or {}).get("postcopy-ram"))
    if postcopy_after_s is not None and not postcopy:
        raise SpecError("postcopy_after_s", "switching to post-copy needs the postcopy-ram capability",
                        fix='pass capabilities={"postcopy-ram": True}')
    params: Dict[str, Any] = {}
    if max_bandwidth is not None:
        if not isinstance(max_bandwidth, int) or max_bandwidth <= 0:
            raise SpecError("max_bandwidth", f"{max_bandwidth!r} is not a positive number of bytes/s",
                            fix="e.g. max_bandwidth=32 << 20 (32 MiB/s)")
        params["max-bandwidth"] = max_bandwidth
    if downtime_limit_ms is not None:
        if isinstance(downtime_limit_ms, bool) or not isinstance(downtime_limit_ms, int) \
                or not 0 <= downtime_limit_ms <= 2000000:
            raise SpecError("downtime_limit_ms", f"{downtime_limit_ms!r} is not a downtime limit in ms",
                            fix="e.g. downtime_limit_ms=300 (QEMU's default)")
        params["downtime-limit"] = downtime_limit_ms
    params.update(parameters or {})
    if caps:
        await src.qmp("migrate-set-capabilities", capabilities=caps)
        if postcopy:
            await dst.qmp("migrate-set-capabilities", capabilities=[c for c in caps
                                                                    if c["capability"] == "postcopy-ram"])
    if params:
        await src.qmp("migrate-set-parameters", **params)
    was_running = await src.status() == "running"
    if was_running and src.accel == "tcg" and needs_odd_memory() and not _has_odd_memory(src):
        raise VMError(f"live migration of {src.spec.name!r} under TCG with QEMU {qemu_version()} would lose guest "
                      "writes (QEMU's dirty-log bug before 9.0, commit 03bfc2188f)",
                      fix="start the source with extra_args=vmlab.vm.migrate.migratable_args(memory_mb), "
                          "or pause it first (stop-and-copy)", **src._err_kw())
    sock = dst.private_dir / "migrate.sock"
    await dst.qmp("migrate-incoming", uri=f"unix:{sock}")
    t0 = time.monotonic()
    await src.qmp("migrate", uri=f"unix:{sock}")
    samples: List[Dict[str, Any]] = []
    switched = False
    stages = sorted(staged, key=lambda x: x[0])
    staged_at = -STAGE_GAP_S
    max_rate = 0.0
    rate: Optional[float] = None
    st: Dict[str, Any] = {}
    while True:
        st = await src.qmp("query-migrate")
        now = time.monotonic() - t0
        s = _sample(st, now)
        samples.append(s)
        if s["dirty_pages_rate"]:
            rate = float(s["dirty_pages_rate"])
            max_rate = max(max_rate, rate)
        status = st.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        # one stage at a time, at least STAGE_GAP_S apart: QEMU judges convergence by the bandwidth it measured
        # over its last 100 ms window, which must be the new one before the next stage applies
        if stages and (s["rounds"] or 0) >= stages[0][0] and status == "active" and now >= staged_at + STAGE_GAP_S:
            await src.qmp("migrate-set-parameters", **dict(stages.pop(0)[1]))
            staged_at = now
            s["parameters_changed"] = True
        if postcopy_after_s is not None and not switched and now >= postcopy_after_s and status == "active":
            await src.qmp("migrate-start-postcopy")
            switched = True
        if now > timeout and status != "cancelling":
            await src.qmp("migrate_cancel")
        await asyncio.sleep(poll_s)
    wall = time.monotonic() - t0
    ram = st.get("ram") or {}
    if not ram:     # cancelled or failed: what was done, from the last sample that said
        last: Dict[str, Any] = next((x for x in reversed(samples) if x.get("rounds") is not None), {})
        ram = {"dirty-sync-count": last.get("rounds"), "transferred": last.get("transferred")}
    result = MigrationResult(
        status=str(st.get("status")), converged=st.get("status") == "completed", wall_s=wall,
        total_time_ms=st.get("total-time"), downtime_ms=st.get("downtime"), setup_time_ms=st.get("setup-time"),
        rounds=ram.get("dirty-sync-count"), transferred_bytes=ram.get("transferred"),
        precopy_bytes=ram.get("precopy-bytes"), downtime_bytes=ram.get("downtime-bytes"),
        postcopy_bytes=ram.get("postcopy-bytes"), dirty_pages_rate=rate,
        max_dirty_pages_rate=max_rate or None, mbps=ram.get("mbps"),
        max_throttle_pct=max(int(x.get("throttle_pct") or 0) for x in samples), postcopy=switched,
        error=str(st.get("error-desc", "")), samples=samples)
    if result.converged:
        await _arrived(src, dst, resume=not was_running)
    return result


async def _arrived(src: AsyncVM, dst: AsyncVM, resume: bool, timeout: float = 30.0) -> None:
    """After a completed migration: wait for the destination to run (start it if the source was
    paused: stop-and-copy), take over the agent channel."""
    deadline = time.monotonic() + timeout
    while True:
        status = await dst.status()
        if status == "running":
            break
        if status == "paused" and resume:
            await dst.qmp("cont")
            continue
        if status not in ("inmigrate", "postmigrate", "prelaunch", "finish-migrate") or time.monotonic() > deadline:
            raise VMError(f"the migrated guest did not start on the destination (QEMU status {status!r})",
                          fix="read the destination's qemu.stderr", **dst._err_kw())
        await asyncio.sleep(0.01)
    dst.migrated_from(src)
