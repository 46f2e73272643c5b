"""Readers of the host's ``/proc``: process and thread CPU time, memory, parents, names.

Layer 2: imports only :mod:`vmlab.errors`. Nothing here knows about VMs; the VM-oriented
views (vCPU threads, QEMU's memory map, pinning) are in :mod:`vmlab.hostview`.

``/proc/PID/stat`` is parsed in one place, :func:`stat_fields`: the command name in
parentheses may itself hold spaces and ``)``, so the fields are split after the *last* ``)``.
Index 0 of the result is field 3 of proc(5) (``state``); hence ``ppid`` is index 1,
``utime``/``stime`` 11/12, ``starttime`` 19 and ``processor`` 36.

Readers of a process that may have ended return a neutral value (0, None, "") rather than
raise, except :func:`stat_fields` and :func:`threads`, whose callers decide.
"""

from __future__ import annotations

import os
from typing import Optional, TypedDict, Union

from .errors import VMError

__all__ = [
    "CLK_TCK",
    "ThreadCPU",
    "ThreadInfo",
    "children",
    "comm",
    "descendants",
    "field_kb",
    "host_steal_ticks",
    "is_zombie",
    "parent_pid",
    "pinned_per_cpu",
    "process_cpu_seconds",
    "pss_bytes",
    "rss_bytes",
    "start_time",
    "stat_fields",
    "status_kb",
    "thread_cpu",
    "threads",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")

# indices into stat_fields() (proc(5) field number minus 3)
_PPID, _UTIME, _STIME, _STARTTIME, _PROCESSOR = 1, 11, 12, 19, 36


class ThreadCPU(TypedDict):
    """CPU use of one thread: seconds in user and kernel mode, the core it last ran on."""

    utime_s: float
    stime_s: float
    cpu_s: float
    last_core: int
    state: str


class ThreadInfo(ThreadCPU):
    """A thread of a process (:func:`threads`)."""

    tid: int
    name: str
    affinity: str


def _stat_path(pid: int, tid: Optional[int] = None) -> str:
    return f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"


def stat_fields(pid_or_path: Union[int, str], tid: Optional[int] = None) -> list[str]:
    """Fields of ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``, or a path) after ``(comm)``.

    Index 0 is field 3 (``state``). Raises OSError if the process is gone.
    """
    path = pid_or_path if isinstance(pid_or_path, str) else _stat_path(pid_or_path, tid)
    with open(path) as f:
        text = f.read()
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot), or None if it does not exist.

    With the pid it identifies a process for sure: a recycled pid has another start time.
    """
    try:
        return int(stat_fields(pid)[_STARTTIME])
    except (OSError, ValueError, IndexError):
        return None


def parent_pid(pid: int) -> Optional[int]:
    """The parent's pid, or None if the process is gone."""
    try:
        return int(stat_fields(pid)[_PPID])
    except (OSError, ValueError, IndexError):
        return None


def comm(pid: int, tid: Optional[int] = None) -> str:
    """The command name (``/proc/PID/comm``, or a thread's); "" if it is gone."""
    path = f"/proc/{pid}/comm" if tid is None else f"/proc/{pid}/task/{tid}/comm"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[_UTIME]) + int(fields[_STIME])) / CLK_TCK


def thread_cpu(pid: int, tid: int) -> ThreadCPU:
    """utime, stime (seconds) and the core it last ran on, from /proc/PID/task/TID/stat.

    Raises OSError if the thread is gone.
    """
    f = stat_fields(pid, tid)
    return {"utime_s": int(f[_UTIME]) / CLK_TCK, "stime_s": int(f[_STIME]) / CLK_TCK,
            "cpu_s": _cpu_of(f), "last_core": int(f[_PROCESSOR]), "state": f[0]}


def threads(pid: int) -> list[ThreadInfo]:
    """Every thread of process *pid*: tid, name (comm), utime/stime/cpu seconds, last core,
    affinity (e.g. ``"0,1"``).

    QEMU runs with ``-name ...,debug-threads=on``, so its vCPU threads are named
    "CPU 0/TCG" (or "CPU 0/KVM"), its I/O threads "IO ...", and so on. Raises VMError if
    the process is gone (it is a VM's QEMU, most of the time).
    """
    out: list[ThreadInfo] = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as exc:
        raise VMError(f"process {pid} is gone: {exc.strerror}", fix="is the VM still running?") from exc
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            cpu = thread_cpu(pid, tid)
            affinity = ",".join(str(c) for c in sorted(os.sched_getaffinity(tid)))
        except (OSError, IndexError, ValueError):
            continue  # the thread ended while we looked
        out.append({"tid": tid, "name": name, **cpu, "affinity": affinity})
    return out


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of process *pid* so far, all threads (0.0 if it is gone)."""
    try:
        return _cpu_of(stat_fields(pid))
    except (OSError, IndexError, ValueError):
        return 0.0


def field_kb(path: str, field: str) -> int:
    """The ``Field:  N kB`` value of a /proc status-like file, in kB (0 if absent or gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM, ...); 0 if the process is gone."""
    return field_kb(f"/proc/{pid}/status", field)


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes (0 if it is gone)."""
    return status_kb(pid, "VmRSS") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with shared pages split among their users."""
    return field_kb(f"/proc/{pid}/smaps_rollup", "Pss") * 1024


def is_zombie(pid: int) -> Optional[bool]:
    """True if the process has exited but not been reaped; None if it does not exist."""
    try:
        return stat_fields(pid)[0] == "Z"
    except (OSError, IndexError):
        return None


def pinned_per_cpu(name: str) -> dict[int, int]:
    """``{cpu: n}``: how many processes named ``name`` (``/proc/PID/comm``) may run on that one CPU only,
    from one pass over /proc (any user's: reading an affinity needs no privilege)."""
    n: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or comm(int(d)) != name:
            continue
        try:
            cpus = os.sched_getaffinity(int(d))
        except OSError:          # gone meanwhile
            continue
        if len(cpus) == 1:
            cpu = next(iter(cpus))
            n[cpu] = n.get(cpu, 0) + 1
    return n


def children() -> dict[int, list[int]]:
    """Every process's children: ``{ppid: [pid, ...]}`` from one pass over /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        ppid = parent_pid(int(d))
        if ppid is not None:
            kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of *pid* (not *pid* itself)."""
    kids = children()
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def host_steal_ticks() -> int:
    """The steal column of this host's /proc/stat "cpu" line (the host is itself a VM)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) if len(parts) > 8 else 0
