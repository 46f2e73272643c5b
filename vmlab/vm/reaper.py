"""Making sure no QEMU outlives the Python process that started it.

Three layers, like testcontainers' reaper:

1. the kernel: every QEMU is started with a parent-death signal (SIGKILL), so
   it dies with its parent even when the parent is killed with SIGKILL or a
   Jupyter kernel is restarted;
2. the interpreter: an ``atexit`` hook kills every VM still registered;
3. the garbage collector: each VM carries a ``weakref.finalize`` that kills its
   process and removes its private directory if the object is dropped while
   running.

A process killed with SIGKILL runs none of its own clean-up, so its private
directory stays behind (its QEMU dies with it, layer 1). Every private
directory therefore holds an owner file (:data:`OWNER_FILE`: the owning Python
pid and its start time, and the QEMU pid once launched); :func:`sweep_stale`,
run when the next VM starts, removes the ``vmlab-*`` directories of the private
root whose owner is dead, and kills a QEMU still running for a dead owner (the
parent-death signal has a tiny window while ``setpriv`` starts).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import threading
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from ..config import private_root
from ..log import get_logger
from ..procfs import comm, pinned_per_cpu, start_time

__all__ = ["DIR_PREFIX", "MAIN_LOOP_NICE", "OWNER_FILE", "claim_dir", "finalizer", "kill_pid", "least_pinned_cpu",
           "live_pids", "pdeathsig_preexec", "pdeathsig_prefix", "private_root", "qemu_spawn", "register",
           "start_time", "sweep_stale", "unregister", "yield_main_loop"]

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41
_lock = threading.Lock()
_live: Dict[int, Optional[str]] = {}   # pid -> private dir


def pdeathsig_prefix() -> List[str]:
    """An argv prefix that makes the child die with its parent (util-linux setpriv)."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def pdeathsig_preexec() -> Optional[Callable[[], None]]:
    """A preexec_fn doing the same when setpriv is missing."""
    if shutil.which("setpriv"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


_thp_lock = threading.Lock()
_thp_disabled = False      # the PR_SET_THP_DISABLE setting this process has now


@contextlib.contextmanager
def qemu_spawn(huge_pages: bool = False, host_cpu: Union[int, str, None] = None,
               name: str = "qemu-system-x86") -> Iterator[Tuple[Optional[Callable[[], None]], Optional[int]]]:
    """Hold while spawning QEMU: it starts with transparent huge pages allowed or not, and on the host CPU
    *host_cpu* (None: any; "auto": :func:`least_pinned_cpu` for processes named *name*); yields the
    preexec_fn to spawn it with (None: none is needed) and the CPU it is pinned on (or None).

    QEMU asks for huge pages on guest RAM (``MADV_HUGEPAGE``), so on a host whose THP setting is
    ``madvise`` or ``always`` one byte the guest touches costs the host 2 MiB: the default guest
    held 92 MiB of its 128 MiB in huge pages, where 4 KiB pages hold ~8 MiB less, at no boot time
    measured (docs/boot.md). So a booting QEMU gets none. A QEMU that loads a warm snapshot
    (*huge_pages*) gets them: it writes the guest's ~30 MiB in one go, and in 4 KiB pages that was
    ~33,000 more page faults, ~25 ms of a ~70 ms restore (docs/boot.md, "Warm restore in huge pages").

    ``PR_SET_THP_DISABLE`` is inherited by children and kept across ``execve``, so it is set on this
    process (which asks for no huge pages itself) around the spawn, under a lock, and left set (disabled)
    for every other child. Not in a ``preexec_fn``: with one, Python forks instead of vforking, and copying
    the page tables of a notebook's kernel cost ~27 ms per QEMU launch with 300 MiB resident (docs/boot.md).
    Only without ``setpriv`` is :func:`pdeathsig_preexec` still needed.

    The CPU affinity works the same way: set on the spawning thread (``sched_setaffinity`` of pid 0 is the
    calling thread's), inherited by QEMU and by every thread QEMU starts, and put back after the spawn.
    Choosing an "auto" CPU under the same lock keeps two VMs started at once in this process apart.
    """
    with _thp_lock:
        cpu = least_pinned_cpu(name) if host_cpu == "auto" else host_cpu
        assert cpu is None or isinstance(cpu, int)
        before = os.sched_getaffinity(0) if cpu is not None else None
        _set_thp_disabled(not huge_pages)
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            yield pdeathsig_preexec(), cpu
        finally:
            _set_thp_disabled(True)      # what every other child of this process keeps seeing
            if before is not None:
                os.sched_setaffinity(0, before)


# How many nice levels a pinned QEMU's main loop runs below its vCPU threads (docs/devices.md, "One CPU, two
# threads: the main loop yields").
MAIN_LOOP_NICE = 10


def yield_main_loop(pid: int) -> int:
    """Lower the priority of the main loop of the QEMU *pid* (its first thread) by :data:`MAIN_LOOP_NICE`
    levels (at most to 19), leaving its vCPU threads as they are; returns the main loop's nice value.

    For a QEMU pinned on one host CPU (``host_cpu``): every disk request passes from the vCPU thread to the
    main loop and back, and the two threads take turns on that CPU. At equal priority the main loop, woken,
    often preempted the vCPU thread in the middle of guest work, and repeats of one workload fell into a slow and
    a fast mode (NVMe 4 KiB reads: 66-73 or 75-83 MB/s; the vCPU's involuntary context switches 1,174-2,855 per
    slow repeat, 373-984 per fast one). Ten levels lower, the main loop runs when the vCPU waits (the guest halts
    for its I/O): 14-64 involuntary switches per repeat, 77-84 MB/s, and the slow mode went.
    Call it once QEMU's vCPU threads exist (QMP has answered): a thread inherits its creator's nice value.
    Raising a nice value needs no privilege."""
    nice = min(19, os.getpriority(os.PRIO_PROCESS, pid) + MAIN_LOOP_NICE)
    os.setpriority(os.PRIO_PROCESS, pid, nice)      # PRIO_PROCESS on a thread id: that thread alone (Linux)
    return nice


def least_pinned_cpu(name: str) -> int:
    """The CPU this process may run on with the fewest processes named *name* pinned on it alone (any
    user's, so students of one machine spread out); of equals, the highest numbered (CPU 0 takes more of
    the host's interrupts)."""
    used = pinned_per_cpu(name)
    return min(sorted(os.sched_getaffinity(0)), key=lambda c: (used.get(c, 0), -c))


def _set_thp_disabled(disabled: bool) -> None:
    global _thp_disabled
    if _thp_disabled != disabled:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_THP_DISABLE, int(disabled), 0, 0, 0) == 0:
            _thp_disabled = disabled


def register(pid: int, private_dir: Optional[Path]) -> None:
    """Kill *pid* (and remove *private_dir*) at interpreter exit unless unregistered first."""
    with _lock:
        _live[pid] = str(private_dir) if private_dir else None
    if private_dir:
        claim_dir(private_dir, qemu_pid=pid)
    _sweep_once()


def unregister(pid: int) -> None:
    """*pid* has exited or been reaped: nothing left to kill at exit."""
    with _lock:
        _live.pop(pid, None)


def kill_pid(pid: int, private_dir: Optional[str] = None) -> None:
    """Kill and reap one QEMU (if it is still ours), remove its private dir."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    except OSError:
        pass
    if private_dir:
        shutil.rmtree(private_dir, ignore_errors=True)
    unregister(pid)


def finalizer(owner: object, pid: int, private_dir: Optional[Path]) -> weakref.finalize:
    """Kill *pid* and remove *private_dir* when *owner* is garbage-collected (or at exit)."""
    fin = weakref.finalize(owner, kill_pid, pid, str(private_dir) if private_dir else None)
    fin.atexit = True
    return fin


def live_pids() -> List[int]:
    """The QEMU pids registered (started and not yet seen exiting)."""
    with _lock:
        return list(_live)


@atexit.register
def _reap_all() -> None:
    with _lock:
        items = list(_live.items())
    for pid, d in items:
        kill_pid(pid, d)


# --------------------------------------------------------------------------
# Private directories left by a process that was SIGKILLed
# --------------------------------------------------------------------------
OWNER_FILE = "vmlab.owner"
DIR_PREFIX = "vmlab-"
_swept = False


def _alive(pid: Optional[int], started: Optional[int]) -> bool:
    if not pid:
        return False
    now = start_time(int(pid))
    return now is not None and (started is None or now == started)


def claim_dir(private_dir: Path, qemu_pid: Optional[int] = None) -> None:
    """Write the owner file into a private dir: this process owns it (and *qemu_pid*)."""
    me = os.getpid()
    info: Dict[str, Optional[int]] = {"owner": me, "owner_start": start_time(me)}
    if qemu_pid:
        info["qemu"] = qemu_pid
        info["qemu_start"] = start_time(qemu_pid)
    path = Path(private_dir) / OWNER_FILE
    tmp = path.with_name(OWNER_FILE + f".tmp{me}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except OSError as exc:
        # a vanished dir (VM already gone) or a full disk: the sweep then leaves it alone
        log.debug("could not write the owner file of %s: %s", private_dir, exc)


def _is_qemu(pid: int) -> bool:
    name = comm(pid)
    return name.startswith("qemu") or name == "setpriv"


def sweep_stale(root: Optional[Path] = None) -> List[Path]:
    """Remove private dirs whose owning process is dead; returns the dirs removed.

    Only directories named ``vmlab-*``, owned by this user and holding a
    readable owner file are considered, so other users' directories, dirs
    being created right now and unrelated ``vmlab-*`` paths are left alone.
    A QEMU still alive for a dead owner is killed first.
    """
    root = Path(root) if root else private_root()
    removed: List[Path] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(DIR_PREFIX):
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != uid:
                continue
            with open(os.path.join(e.path, OWNER_FILE)) as f:
                info = json.load(f)
            owner = int(info["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(owner, info.get("owner_start")):
            continue
        qemu = info.get("qemu")
        if qemu and _alive(qemu, info.get("qemu_start")) and _is_qemu(int(qemu)):
            try:
                os.kill(int(qemu), signal.SIGKILL)
            except OSError as exc:
                log.debug("could not kill stray QEMU %s: %s", qemu, exc)
        shutil.rmtree(e.path, ignore_errors=True)
        if not os.path.exists(e.path):
            removed.append(Path(e.path))
    return removed


def _sweep_once() -> None:
    """Sweep the private root the first time this process registers a VM."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        sweep_stale()
    except Exception as exc:   # never let clean-up of others' leftovers break a start
        log.debug("sweeping stale private dirs failed: %r", exc)
