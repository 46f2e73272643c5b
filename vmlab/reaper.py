"""Making sure no QEMU outlives the Python process that started it.

Three layers, like testcontainers' reaper:

1. the kernel: every QEMU is started with a parent-death signal (SIGKILL), so
   it dies with its parent even when the parent is killed with SIGKILL or a
   Jupyter kernel is restarted;
2. the interpreter: an ``atexit`` hook kills every VM still registered;
3. the garbage collector: each VM carries a ``weakref.finalize`` that kills its
   process and removes its private directory if the object is dropped while
   running.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import threading
import weakref
from pathlib import Path
from typing import Dict, List, Optional

_PR_SET_PDEATHSIG = 1
_lock = threading.Lock()
_live: Dict[int, Optional[str]] = {}   # pid -> private dir


def pdeathsig_prefix() -> List[str]:
    """An argv prefix that makes the child die with its parent (util-linux setpriv)."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def pdeathsig_preexec():
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


def register(pid: int, private_dir: Optional[Path]) -> None:
    with _lock:
        _live[pid] = str(private_dir) if private_dir else None


def unregister(pid: int) -> None:
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
    fin = weakref.finalize(owner, kill_pid, pid, str(private_dir) if private_dir else None)
    fin.atexit = True
    return fin


def live_pids() -> List[int]:
    with _lock:
        return list(_live)


@atexit.register
def _reap_all() -> None:
    with _lock:
        items = list(_live.items())
    for pid, d in items:
        kill_pid(pid, d)
