"""A container made by hand: the kernel's namespaces (``unshare``) and cgroup limits, no engine.

    with Container(memory_mb=64, pids=64) as c:
        c.run(["/bin/vmbench", "sysinfo"])            # a CompletedProcess; JSON on stdout
        c.usage()                                      # what the memory cgroup saw

What it is: a private root directory (0700, under vmlab's private runtime root)
holding a static busybox and the host's static vmbench, and every process
started by ``unshare --fork --kill-child --pid --mount --uts --ipc --net
--root=DIR --mount-proc``: its own PID numbers (it is PID 1), its own mount table (only
its /proc), its own hostname, IPC and network (only a loopback, down), in a
cgroup with a memory and a process-count limit. The kernel is the host's: the
same ``uname -r``, the same boot id.

Cgroups: on a pure cgroup v2 host the limits go in a child of this process's
cgroup (``memory.max``, ``pids.max``); where the controllers are bound to v1
hierarchies (cgroup v2 mounted but with no controllers) the v1 ``memory`` and
``pids`` hierarchies are used; if neither is writable the container runs
without limits and :attr:`Container.cgroup_mode` says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import private_root
from ..errors import SetupError
from ..tools import find_tool

__all__ = ["Container", "cgroup_setup"]

CGROOT = Path("/sys/fs/cgroup")


def _own_cgroup(controller: str) -> Optional[str]:
    """This process's cgroup path in the hierarchy of *controller* ("" = the v2 unified one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if (controller == "" and ctrls == "") or controller in ctrls.split(","):
            return path
    return None


def cgroup_setup() -> Dict[str, Any]:
    """Which cgroup limits a container can get here: mode v2 | v1 | none, and why."""
    if (CGROOT / "cgroup.controllers").exists():
        ctrls = (CGROOT / "cgroup.controllers").read_text().split()
        if {"memory", "pids"} <= set(ctrls):
            return {"mode": "v2", "why": "cgroup v2 with the memory and pids controllers"}
        return {"mode": "none", "why": f"cgroup v2 without the memory/pids controllers ({' '.join(ctrls) or 'none'})"}
    unified = CGROOT / "unified" / "cgroup.controllers"
    v2_note = ""
    if unified.exists():
        ctrls = unified.read_text().split()
        v2_note = (f"cgroup v2 is mounted at {unified.parent} but offers no controllers "
                   f"({' '.join(ctrls) or 'none'}: they are bound to v1 hierarchies), so v2 limits cannot be set; ")
    if (CGROOT / "memory").is_dir() and (CGROOT / "pids").is_dir():
        return {"mode": "v1", "why": v2_note + "using the v1 memory and pids hierarchies"}
    return {"mode": "none", "why": v2_note + "no writable memory/pids cgroup: the container runs without limits"}


class Container:
    """A throw-away container (see the module docstring); a context manager."""

    def __init__(self, memory_mb: int = 64, pids: int = 64, vmbench: Optional[Path] = None,
                 name: str = "vmlab-ctr") -> None:
        self.memory_mb, self.pids, self.name = memory_mb, pids, name
        self._vmbench = vmbench
        self.root: Optional[Path] = None
        self.cgroups: List[Path] = []
        setup = cgroup_setup()
        self.cgroup_mode: str = setup["mode"]
        self.cgroup_why: str = setup["why"]
        self.unshare = find_tool("unshare")
        self.busybox = find_tool("busybox")
        if not self.unshare:
            raise SetupError("the container needs `unshare`", fix="apt-get install util-linux")
        if not self.busybox:
            raise SetupError("the container needs a static busybox for its root", fix="apt-get install busybox-static")
        if os.geteuid() != 0:
            raise SetupError("making namespaces and cgroups this way needs root",
                             fix="run as root (the lab's container is), or skip the container rows")

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> Container:
        root = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=private_root()))
        os.chmod(root, 0o700)
        self.root = root
        for d in ("bin", "proc", "tmp"):
            (root / d).mkdir()
        shutil.copy2(str(self.busybox), root / "bin" / "busybox")
        for applet in ("sh", "cat", "ls", "wc", "grep", "sleep", "uname", "hostname", "echo"):
            (root / "bin" / applet).symlink_to("busybox")
        if self._vmbench is not None:
            shutil.copy2(self._vmbench, root / "bin" / "vmbench")
        self._make_cgroups()
        return self

    def _make_cgroups(self) -> None:
        tag = f"{self.name}-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        try:
            if self.cgroup_mode == "v2":
                d = CGROOT / (_own_cgroup("") or "/").lstrip("/") / tag
                d.mkdir()
                self.cgroups.append(d)
                (d / "memory.max").write_text(str(self.memory_mb << 20))
                (d / "pids.max").write_text(str(self.pids))
            elif self.cgroup_mode == "v1":
                mem = CGROOT / "memory" / (_own_cgroup("memory") or "/").lstrip("/") / tag
                pid = CGROOT / "pids" / (_own_cgroup("pids") or "/").lstrip("/") / tag
                for d in (mem, pid):
                    d.mkdir()
                    self.cgroups.append(d)
                (mem / "memory.limit_in_bytes").write_text(str(self.memory_mb << 20))
                (pid / "pids.max").write_text(str(self.pids))
        except OSError as exc:
            self._remove_cgroups()
            self.cgroup_why += f"; creating the cgroup failed ({exc.strerror}), so no limits are set"
            self.cgroup_mode = "none"

    def _join(self) -> None:        # in the child, before exec
        for d in self.cgroups:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def argv(self, command: Sequence[str]) -> List[str]:
        """The host command line that runs *command* (a path inside the container) in it."""
        assert self.root is not None, "use the Container in a with block"
        # --kill-child: the container's PID 1 (and with it the namespace) dies with unshare
        return [str(self.unshare), "--fork", "--kill-child", "--pid", "--mount", "--uts", "--ipc", "--net",
                f"--root={self.root}", "--mount-proc", *command]

    # ---------------------------------------------------------------- running
    def run(self, command: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run *command* in the container to the end; its CompletedProcess (text)."""
        return subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout,
                              preexec_fn=self._join)

    def popen(self, command: Sequence[str]) -> subprocess.Popen[str]:
        """Start *command* in the container; the Popen is of ``unshare`` (its child runs the command)."""
        return subprocess.Popen(self.argv(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=self._join)

    def path(self, inside: str) -> Path:
        """Where a path inside the container is on the host."""
        assert self.root is not None
        return self.root / inside.lstrip("/")

    def usage(self) -> Dict[str, Optional[float]]:
        """The memory cgroup's view, MiB: ``memory_mb`` now and ``memory_peak_mb`` (None without a cgroup)."""
        out: Dict[str, Optional[float]] = {"memory_mb": None, "memory_peak_mb": None}
        for d in self.cgroups:
            for now, peak in (("memory.current", "memory.peak"), ("memory.usage_in_bytes", "memory.max_usage_in_bytes")):
                with contextlib.suppress(OSError, ValueError):
                    out["memory_mb"] = int((d / now).read_text()) / 2**20
                with contextlib.suppress(OSError, ValueError):
                    out["memory_peak_mb"] = int((d / peak).read_text()) / 2**20
        return out

    # ---------------------------------------------------------------- cleanup
    def _remove_cgroups(self) -> None:
        for d in reversed(self.cgroups):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:             # a process is still leaving
                    time.sleep(0.02)
        self.cgroups = []

    def processes(self) -> List[int]:
        """Host PIDs of the processes running in this container (their root is its directory)."""
        if self.root is None:
            return []
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(d / "root") == str(self.root):
                        found.append(int(d.name))
        return found

    def __exit__(self, *exc: object) -> None:
        # a namespace's PID 1 ignores signals it has no handler for (SIGTERM): whatever is left gets SIGKILL
        for pid in self.processes():
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        self._remove_cgroups()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
