"""Sharing: 1, 2, 4, 8 VMs running the same CPU-bound job on the host's cores.

Each step starts N VMs (the first one boots and saves a warm snapshot, the
others are restored from it concurrently), runs ``vmbench spin --seconds S``
in all of them at the same moment, records what each VM reports and what the
host saw, and shuts them all down. One summary row per N:

    vms, per_vm_ops_s (median over the VMs), per_vm_min_ops_s, per_vm_max_ops_s,
    total_ops_s (sum), host_rss_mb (sum of QEMU RSS), host_pss_mb (sum of PSS:
    shared pages such as the kernel file counted once), guest_mem_mb (N x the
    guest's memory), vcpu_cpu_s (host CPU seconds the vCPU threads got),
    cores_used (vcpu_cpu_s / wall), start_s (all N started), steal_ticks (sum),
    ops_per_cpu_s (ops per second of host CPU the vCPU threads got: what a
    whole core would give), vms_left_running (after shutdown; 0), plus the
    where-it-ran columns.

``on_row`` gets every per-VM row (``kind="vm"``) as the VM reports and every
summary row (``kind="step"``), in the caller's thread:
:class:`vmlab.widgets.sharing.LivePlot` is such a callback for notebooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from .. import plots
from ..errors import SpecError
from ..guestinfo import qemu_pid
from ..hostinfo import where
from ..image import ensure_image
from ..measure import Progress, Rows, advance, plan, say
from ..plots import OKABE_ITO, style, where_label
from ..procfs import pss_bytes, rss_bytes, thread_cpu
from ..vm import AsyncVM, runner

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

NAME = "sharing"
QUICK_COUNTS = (1, 2, 4)
FULL_COUNTS = (1, 2, 4, 8)
MAX_VMS = 16


def _check(counts: Sequence[int], seconds: float, memory: int) -> None:
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_VMS
                             for n in counts):
        raise SpecError("counts", f"{counts!r} is not a list of VM counts between 1 and {MAX_VMS}",
                        fix="e.g. counts=(1, 2, 4, 8)")
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= 600:
        raise SpecError("seconds", f"{seconds!r} is not a job length in seconds (0 < s <= 600)",
                        fix="e.g. seconds=3")
    if not isinstance(memory, int) or memory < 128:
        raise SpecError("memory", f"{memory!r} MiB is too little for the lesson guest", fix="memory=128 or more")


def _proc_cpu(pid: int, tid: int) -> float:
    try:
        return thread_cpu(pid, tid)["cpu_s"]
    except (OSError, IndexError, ValueError):
        return 0.0


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


async def _step(n: int, seconds: float, *, image: Optional[GuestImage], memory: int, accel: str, warm: bool,
                emit: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Start n VMs, run the job in all at once, shut all down; per-VM rows go to ``emit``."""
    vms = [AsyncVM(accel=accel, memory=memory, name="share", image=image, warm=warm) for _ in range(n)]
    t0 = time.monotonic()
    result: Dict[str, Any] = {"vms": n}
    try:
        emit({"kind": "status", "message": f"{n} VM(s): starting"})
        # the first one boots (and saves the warm snapshot if there is none); the rest start together
        await vms[0].start()
        if n > 1:
            await asyncio.gather(*(v.start() for v in vms[1:]))
        result["start_s"] = time.monotonic() - t0
        result["warm_restored"] = sum(v.warm_restored for v in vms)
        result.update(await _job(vms, seconds, emit))
    finally:
        pids = [v.pid for v in vms]
        await asyncio.gather(*(v.shutdown(timeout=10) for v in vms), return_exceptions=True)
        result["vms_left_running"] = sum(_alive(p) for p in pids)
    return result


async def _job(vms: Sequence[AsyncVM], seconds: float, emit: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Run ``vmbench spin`` in all the (started) VMs at the same moment: the step's measurement."""
    n = len(vms)
    result: Dict[str, Any] = {}
    result["kernel"] = vms[0].kernel_release or (await vms[0].run("uname -r")).stdout.strip()
    result["accel_used"] = vms[0].accel
    qpids = [qemu_pid(v) for v in vms]
    vcpu = []
    for v in vms:
        cpus = await v.qmp("query-cpus-fast")
        vcpu.append(int(cpus[0]["thread-id"]))
    cpu0 = [_proc_cpu(p, t) for p, t in zip(qpids, vcpu, strict=False)]
    emit({"kind": "status", "message": f"{n} VM(s): running vmbench spin --seconds {seconds:g} in all"})
    go = time.monotonic()

    async def job(i: int, v: AsyncVM) -> Dict[str, Any]:
        started = time.monotonic() - go
        res = await v.run(f"vmbench spin --seconds {seconds}", timeout=seconds * 10 + 60)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        row = {"kind": "vm", "vms": n, "vm": i, "pid": v.pid, "started": started,
               "ops_per_s": out["ops_per_s"], "guest_user_s": out["user_s"],
               "steal_ticks": out.get("steal_ticks"), "wall_s": res.wall_s,
               "vcpu_host_cpu_s": _proc_cpu(qpids[i], vcpu[i]) - cpu0[i],
               "rss_mb": rss_bytes(qpids[i]) / 2**20, "boot_s": v.boot_seconds,
               "warm": v.warm_restored}
        emit(row)
        return row

    rows = await asyncio.gather(*(job(i, v) for i, v in enumerate(vms)))
    wall = time.monotonic() - go
    ops = [r["ops_per_s"] for r in rows]
    rss = sum(rss_bytes(p) for p in qpids) / 2**20
    pss = sum(pss_bytes(p) for p in qpids) / 2**20
    cpu = sum(r["vcpu_host_cpu_s"] for r in rows)
    done = sum(r["ops_per_s"] * seconds for r in rows)
    result.update({"per_vm_ops_s": statistics.median(ops), "per_vm_min_ops_s": min(ops),
                   "per_vm_max_ops_s": max(ops), "total_ops_s": sum(ops),
                   "host_rss_mb": rss, "host_pss_mb": pss,
                   "guest_mem_mb": sum(int(v.spec.memory_mb) for v in vms),
                   "vcpu_cpu_s": cpu, "cores_used": cpu / wall if wall > 0 else float("nan"),
                   "ops_per_cpu_s": done / cpu if cpu > 0 else float("nan"),
                   "job_wall_s": wall,
                   "steal_ticks": sum(r["steal_ticks"] or 0 for r in rows)})
    return result


def _drive(coro: Any, on_item: Callable[[Dict[str, Any]], None], q: queue.Queue) -> Any:
    """Run *coro* on vmlab's loop; hand what it queues to *on_item* in this thread meanwhile."""
    fut = asyncio.run_coroutine_threadsafe(coro, runner.get_loop())
    finished = False
    try:
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                if fut.done():
                    break
                continue
            on_item(item)
        while not q.empty():
            on_item(q.get_nowait())
        finished = True
        return fut.result()
    finally:
        if not finished and not fut.done():
            # interrupted or a callback failed: stop the step; its finally shuts the VMs down
            fut.cancel()
            with contextlib.suppress(BaseException):
                fut.result(60)


def run(quick: bool = False, progress: Progress = None, *, counts: Optional[Sequence[int]] = None,
        seconds: Optional[float] = None, memory: int = 128, accel: str = "tcg", warm: bool = True,
        image: Optional[GuestImage] = None, on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> pd.DataFrame:
    """N VMs (quick: 1, 2, 4; else 1, 2, 4, 8) run ``vmbench spin`` at once; one row per N."""
    counts = tuple(counts) if counts is not None else (QUICK_COUNTS if quick else FULL_COUNTS)
    seconds = seconds if seconds is not None else (1.0 if quick else 5.0)
    _check(counts, seconds, memory)
    if accel not in ("tcg", "kvm", "auto"):
        raise SpecError("accel", f"{accel!r} is not tcg, kvm or auto", fix='accel="tcg"')
    if image is None:
        image = ensure_image()
    rows = Rows(NAME)
    q: queue.Queue = queue.Queue()

    def on_item(item: Dict[str, Any]) -> None:
        if item.get("kind") == "status":
            say(progress, item["message"])
            return
        if on_row:
            on_row(item)

    plan(progress, len(counts))                # one step per number of VMs
    with rows.guard():
        for n in counts:
            res = _drive(_step(n, seconds, image=image, memory=memory, accel=accel, warm=warm,
                               emit=q.put), on_item, q)
            _add_row(rows, res, seconds, memory, progress, on_row)
            advance(progress)
    return rows.frame()


def run_on(vms: Sequence[Any], seconds: float = 2.0, progress: Progress = None, *,
           on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> pd.DataFrame:
    """The step's measurement on VMs already running (``VM`` or ``AsyncVM``), which stay running: one row.

    For a row where every boot is dear (vmlab inside a nested guest, where a KVM boot takes 20 s): the
    same job and columns as :func:`run`, but ``start_s`` is the slowest VM's boot and there is no
    ``vms_left_running`` (the caller shuts them down).
    """
    avms = [getattr(v, "_avm", v) for v in vms]
    if not avms or not all(isinstance(v, AsyncVM) and v.agent_ready for v in avms):
        raise SpecError("vms", f"{vms!r} is not a list of started VMs", fix="vm.start() each VM first")
    memory = avms[0].spec.memory_mb
    _check([len(avms)], seconds, memory)
    rows = Rows(NAME)
    q: queue.Queue = queue.Queue()

    def on_item(item: Dict[str, Any]) -> None:
        if item.get("kind") == "status":
            say(progress, item["message"])
        elif on_row:
            on_row(item)

    async def step() -> Dict[str, Any]:
        res = {"vms": len(avms), "start_s": max(v.boot_seconds or 0.0 for v in avms),
               "warm_restored": sum(v.warm_restored for v in avms)}
        res.update(await _job(avms, seconds, q.put))
        return res

    with rows.guard():
        _add_row(rows, _drive(step(), on_item, q), seconds, memory, progress, on_row)
    return rows.frame()


def _add_row(rows: Rows, res: Dict[str, Any], seconds: float, memory: int, progress: Progress,
             on_row: Optional[Callable[[Dict[str, Any]], None]]) -> None:
    """The step's summary row: where it ran, then the step's figures."""
    if not rows.where:
        rows.where = where(res.pop("accel_used"), res.get("kernel"))
    res.pop("accel_used", None)
    res.pop("kernel", None)
    first = {k: res.pop(k) for k in ("vms", "per_vm_ops_s", "total_ops_s", "host_rss_mb")}
    row = rows.add(**first, **res, seconds=seconds, memory_mb=memory, host_cores=len(os.sched_getaffinity(0)))
    say(progress, f"{first['vms']} VM(s): {row['per_vm_ops_s'] / 1e6:.0f} M ops/s each, "
                  f"{row['total_ops_s'] / 1e6:.0f} M ops/s in total, "
                  f"{row['host_rss_mb']:.0f} MiB RSS (started in {row['start_s']:.2f} s)")
    if on_row:
        on_row({"kind": "step", **row})


# --------------------------------------------------------------------------- plots
def plot(df: Any, axes: Any = None, per_vm: Optional[List[Dict[str, Any]]] = None) -> Any:
    """Per-VM and total throughput vs N, and the host's memory footprint vs N."""
    axes = plots.axes(axes, figsize=(10, 3.8), ncols=2)
    ax1, ax2 = axes
    ax1.clear()
    ax2.clear()
    if per_vm:
        ax1.scatter([r["vms"] for r in per_vm], [r["ops_per_s"] / 1e6 for r in per_vm], s=14,
                    color=OKABE_ITO[1], alpha=0.7, label="each VM (as it reports)")
    if df is not None and len(df):
        d = df.sort_values("vms")
        ax1.plot(d["vms"], d["total_ops_s"] / 1e6, "o-", color=OKABE_ITO[5], label="total (sum)")
        ax1.plot(d["vms"], d["per_vm_ops_s"] / 1e6, "s--", color=OKABE_ITO[4], label="per VM (median)")
        cores = int(d["host_cores"].iloc[0]) if "host_cores" in d else (os.cpu_count() or 1)
        per_core = d["ops_per_cpu_s"].median() if "ops_per_cpu_s" in d else float("nan")
        ns = list(d["vms"])
        if per_core == per_core:
            ax1.plot(ns, [min(n, cores) * per_core / 1e6 for n in ns], ":", color="#555555",
                     label=f"if the VMs had all {cores} cores to themselves")
        ax2.plot(d["vms"], d["host_rss_mb"], "o-", color=OKABE_ITO[0], label="sum of QEMU RSS")
        if "host_pss_mb" in d:
            ax2.plot(d["vms"], d["host_pss_mb"], "^-", color=OKABE_ITO[2], label="sum of PSS (shared counted once)")
        ax2.plot(d["vms"], d["guest_mem_mb"], ":", color="#555555", label="guest memory configured")
    src = where_label(df) if df is not None and len(df) else ""
    style(ax1, title="CPU-bound job in N VMs at once", xlabel="VMs running (N)",
          ylabel="vmbench spin (million ops/s)", source=src)
    style(ax2, title="Host memory for N VMs", xlabel="VMs running (N)", ylabel="MiB", source=src)
    ticks = sorted(set(int(n) for n in df["vms"])) if df is not None and len(df) else [1, 2, 4, 8]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlim(0.8, max(ticks) * 1.25)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return axes
