"""The host's view of a VM: a QEMU process with threads, CPU time and memory.

Seen from the host, a hosted (type-2) VM is an ordinary process:

    from vmlab import VM, hostview, procfs
    with VM(accel="tcg") as vm:
        procfs.threads(vm.pid)              # tid, name ("CPU 0/TCG"), CPU seconds, last core
        hostview.vcpu_threads(vm)           # QMP query-cpus-fast thread-id, matched to /proc
        hostview.memory_map(vm.pid, vm.spec.memory_mb)           # guest RAM vs TCG code vs files

It also compiles ``vmbench`` for the host (:func:`native_vmbench`, the
"no hypervisor" baseline), runs it (:func:`run_native`), and starts a
pinned CPU hog (:func:`cpu_hog`) for the noisy-neighbour lesson. Nothing
here needs root; every process started here is ended by the same code.
The plain ``/proc`` readers (threads, RSS, PSS, CPU seconds) are in :mod:`vmlab.procfs`;
the measurements built on them (CPU seconds per QEMU thread while the guest works,
RSS as the guest touches memory) in :mod:`vmlab.experiments.hosted`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

from .errors import SpecError, VMError
from .image import native_tool
from .procfs import process_cpu_seconds, threads


# --------------------------------------------------------------------------- threads
def vcpu_threads(vm: Any) -> List[Dict[str, Any]]:
    """The vCPU threads as QEMU reports them (QMP ``query-cpus-fast``), with their /proc names.

    Each row: cpu_index, thread_id, name (from /proc/PID/task/TID/comm, None if
    that thread is not in the QEMU process - it always is).
    """
    names = {t["tid"]: t["name"] for t in threads(vm.pid)}
    return [{"cpu_index": c["cpu-index"], "thread_id": c["thread-id"], "name": names.get(c["thread-id"])}
            for c in vm.qmp("query-cpus-fast")]


def vcpu_tid(vm: Any, index: int = 0) -> int:
    for c in vcpu_threads(vm):
        if c["cpu_index"] == index:
            return int(c["thread_id"])
    raise SpecError("index", f"the VM has no vCPU {index}", fix=f"use 0..{vm.spec.cpus - 1}")


# --------------------------------------------------------------------------- memory
_MAP_RX = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def memory_map(pid: int, guest_mb: Optional[int] = None) -> Dict[str, float]:
    """Where a QEMU process's resident memory is, in MiB, from /proc/PID/smaps.

    Keys: ``guest_ram`` (the anonymous mapping as large as the guest's memory),
    ``tcg_code`` (anonymous executable mappings: the TCG translation cache),
    ``files`` (QEMU, its libraries, the guest kernel file), ``other_anon``
    (heap, thread stacks, device buffers), ``total`` (= VmRSS), plus
    ``guest_ram_size`` (MiB mapped for guest RAM; lazily backed).
    """
    out = {"guest_ram": 0.0, "tcg_code": 0.0, "files": 0.0, "other_anon": 0.0, "total": 0.0,
           "guest_ram_size": 0.0}
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError as exc:
        raise VMError(f"cannot read /proc/{pid}/smaps: {exc.strerror}", fix="is the VM still running?") from exc
    target = guest_mb * 1024 if guest_mb else None
    cur: Optional[Dict[str, Any]] = None
    blocks: List[Dict[str, Any]] = []
    for line in text.splitlines():
        m = _MAP_RX.match(line)
        if m and not line.startswith(("Size:", "Rss:")):
            cur = {"perms": m.group(3), "path": m.group(4).strip(), "size": 0, "rss": 0}
            blocks.append(cur)
        elif cur is not None and line.startswith("Size:"):
            cur["size"] = int(line.split()[1])
        elif cur is not None and line.startswith("Rss:"):
            cur["rss"] = int(line.split()[1])
    for b in blocks:
        kb = b["rss"]
        out["total"] += kb
        anon = not b["path"] or b["path"].startswith("[")
        if not anon:
            out["files"] += kb
        elif target and b["size"] == target and "rw" in b["perms"] and out["guest_ram_size"] == 0:
            out["guest_ram"] += kb
            out["guest_ram_size"] = b["size"]
        elif "x" in b["perms"] and not b["path"]:
            out["tcg_code"] += kb
        else:
            out["other_anon"] += kb
    return {k: v / 1024 for k, v in out.items()}


# --------------------------------------------------------------------------- native vmbench
def native_vmbench(progress: Optional[Any] = None, force: bool = False) -> Path:
    """vmbench.c compiled for this host (``gcc -static -O2``), cached by source hash.

    The "no hypervisor" baseline: the same C code the guest runs, run directly.
    """
    return native_tool("vmbench", progress, force)


def run_native(*args: Any, timeout: float = 120, cpus: Optional[Iterable[int]] = None) -> Dict[str, Any]:
    """Run the host's vmbench with *args* and return its JSON result.

    ``cpus`` pins it (sched_setaffinity) to those cores.
    """
    exe = native_vmbench()
    argv = [str(exe), *map(str, args)]
    pre = None
    if cpus is not None:
        cores = set(cpus)
        pre = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise VMError(f"native vmbench {' '.join(map(str, args))} failed (status {p.returncode}): "
                      f"{(p.stderr or p.stdout).strip()[-300:]}", fix="run it by hand: " + " ".join(argv))
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- pinning, hogs
def pin(tid: int, cores: Iterable[int]) -> List[int]:
    """Pin a thread (or process) to *cores*; returns its previous affinity, for :func:`unpin`."""
    old = sorted(os.sched_getaffinity(tid))
    os.sched_setaffinity(tid, set(cores))
    return old


def unpin(tid: int, cores: Iterable[int]) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, set(cores))


@contextlib.contextmanager
def pinned(tid: int, cores: Iterable[int]) -> Iterator[int]:
    """``with pinned(vcpu_tid, {0}):`` - restores the old affinity afterwards."""
    old = pin(tid, cores)
    try:
        yield tid
    finally:
        unpin(tid, old)


class CpuHog:
    """A CPU-bound host process pinned on *core* (the native ``vmbench spin``).

    It ends by itself after *max_seconds* and is killed on :meth:`stop`, on
    leaving a ``with`` block, and (parent-death signal) if Python dies. It
    runs in its own session: with the scheduler's autogroups
    (``/proc/sys/kernel/sched_autogroup_enabled``) CPU time is shared between
    sessions first, and QEMU runs in a session of its own too.
    """

    def __init__(self, core: int, max_seconds: float = 120.0) -> None:
        if core not in os.sched_getaffinity(0):
            raise SpecError("core", f"core {core} is not available to this process",
                            fix=f"one of {sorted(os.sched_getaffinity(0))}")
        self.core = core
        self.max_seconds = max_seconds
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> CpuHog:
        from .vm import reaper
        exe = native_vmbench()
        core = self.core
        pdeath = reaper.pdeathsig_preexec()

        def pre() -> None:
            os.sched_setaffinity(0, {core})
            if pdeath:
                pdeath()
        self.proc = subprocess.Popen([*reaper.pdeathsig_prefix(), str(exe), "spin", "--seconds",
                                      str(self.max_seconds)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, preexec_fn=pre,
                                     # its own session, hence its own scheduler autogroup (like QEMU's):
                                     # with autogroups on, a hog in our session would compete only
                                     # within our group, not with the vCPU thread
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU seconds the hog has used so far (0 once it has been reaped)."""
        if self.proc is None:
            return 0.0
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def __enter__(self) -> CpuHog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
