"""What every part of a VM shares: its attributes, run state, error context, QMP and exit watch.

:class:`VMCore` is the base of :class:`vmlab.vm.AsyncVM`; the other rooms of
the driver (launch, guest, warm, tracing, metrics) are mixins on top of it,
each adding one group of methods. Nothing here starts a VM.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import Any, Awaitable, Dict, List, Optional, TypeVar

from qemu.qmp import EventListener, QMPClient
from qemu.qmp import ExecuteError as QMPExecuteError

from ..errors import SpecError, StateError, VMDied, VMError, VMTimeout
from ..image import GuestImage
from ..log import get_logger
from ..spec import MachineSpec
from .agent import AgentClient
from .console import Console
from .events import Event, EventLog
from .qemu import Launch, launch_fix
from .state import LIVE, ErrorContext, RunState, Trigger, require, transition

__all__ = ["VMCore", "check_timeout"]

log = get_logger(__name__)
T = TypeVar("T")

# QMP events that move the run state
_EVENT_TRIGGERS = {"STOP": Trigger.STOP, "RESUME": Trigger.RESUME, "SHUTDOWN": Trigger.SHUTDOWN}


def check_timeout(timeout: object, *, allow_none: bool) -> None:
    """Raise SpecError unless *timeout* is a positive number of seconds (or None if allowed)."""
    if timeout is None and allow_none:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7:
        raise SpecError("timeout", f"{timeout!r} is not a positive number of seconds",
                        fix="e.g. timeout=60" + (" (or None for no limit)" if allow_none else ""))


class VMCore:
    """The shared state of one QEMU virtual machine."""

    def __init__(self, spec: MachineSpec, *, image: Optional[GuestImage], warm: bool,
                 boot_timeout: Optional[float], keep_dir: bool) -> None:
        self.spec = spec
        self._image = image
        self.warm = warm
        self.boot_timeout = boot_timeout
        self.keep_dir = keep_dir
        self.state = RunState.CREATED
        self.accel: Optional[str] = None
        self.accel_reason: str = ""
        self.pid: Optional[int] = None
        self.host_cpu: Optional[int] = None     # the host CPU all of QEMU runs on (spec.host_cpu), or None
        self.main_loop_nice: Optional[int] = None   # a pinned QEMU's main loop's nice value (reaper.yield_main_loop)
        self.exit_code: Optional[int] = None
        self.private_dir: Optional[Path] = None
        self.launch: Optional[Launch] = None
        self.boot_seconds: Optional[float] = None
        self.warm_restored = False
        self.warm_snapshot: Optional[Path] = None   # the snapshot file a warm VM restores from / saves to
        self.nic_sockets: List[Optional[socket.socket]] = []
        self._events = EventLog()
        self._console = Console()
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._qmp: Optional[QMPClient] = None
        self._listener: Optional[EventListener] = None
        self._agent: Optional[AgentClient] = None
        self._tasks: List[asyncio.Task[Any]] = []
        self._exited: Optional[asyncio.Event] = None    # set once QEMU's exit is recorded
        self._finalizer: Optional[weakref.finalize] = None
        self._closing = False                           # we asked QEMU to go (its exit is no failure)
        self._socks: List[socket.socket] = []

    def __repr__(self) -> str:
        bits = [repr(self.spec.name), self.state.value]
        if self.accel:
            bits.append(self.accel)
        bits.append(f"{self.spec.memory_mb}MiB")
        if self.pid:
            bits.append(f"pid={self.pid}")
        if self.host_cpu is not None:
            bits.append(f"host-cpu={self.host_cpu}")
        return f"<{type(self).__name__} {' '.join(bits)}>"

    # ------------------------------------------------------------ what it shows
    @property
    def events(self) -> List[Event]:
        """Every event so far, oldest first (see :mod:`vmlab.vm.events`)."""
        return self._events.items

    @property
    def command(self) -> List[str]:
        """QEMU's argv ([] before the launch)."""
        return list(self.launch.argv) if self.launch else []

    @property
    def console_log(self) -> Optional[Path]:
        return self.private_dir / "console.log" if self.private_dir else None

    def console_text(self, tail: Optional[int] = None) -> str:
        """The console output so far (the last *tail* lines if given)."""
        return self._console.text(tail)

    @property
    def console_offset(self) -> int:
        """A position in the console output, for ``expect(..., since=)``."""
        return self._console.offset

    @property
    def agent_ready(self) -> bool:
        return bool(self._agent and self._agent.ready)

    @property
    def kernel_release(self) -> Optional[str]:
        return self._agent.kernel_release if self._agent else None

    # ------------------------------------------------------------- run state
    def _advance(self, trigger: Trigger) -> RunState:
        """Move the run state as *trigger* says (:func:`~vmlab.vm.state.transition`)."""
        new = transition(self.state, trigger)
        if new is not self.state:
            log.debug("%s: %s -> %s (%s)", self.spec.name, self.state.value, new.value, trigger.value)
            self.state = new
        return new

    def _record_event(self, name: str, data: Dict[str, Any], source: str = "qemu",
                      qemu_time: Optional[float] = None) -> None:
        self._events.record(name, data, source, qemu_time)
        trigger = _EVENT_TRIGGERS.get(name)
        if trigger is not None:
            self._advance(trigger)

    # --------------------------------------------------------- error context
    def _stderr_text(self) -> str:
        if not self.private_dir:
            return ""
        try:
            return (self.private_dir / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def _err_kw(self) -> ErrorContext:
        return {"command": self.command, "stderr": self._stderr_text(),
                "console_tail": self.console_text(tail=25), "vm_name": self.spec.name}

    # ----------------------------------------------------------------- exit
    def _gone(self) -> bool:
        """True once QEMU's exit has been recorded."""
        return self._exited is not None and self._exited.is_set()

    async def _wait_exit(self, timeout: float) -> bool:
        assert self._exited is not None
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _race(self, aw: Awaitable[T], timeout: float, phase: str) -> T:
        """Await *aw*, failing early if QEMU exits or the guest kernel panics."""
        assert self._exited is not None
        task = asyncio.ensure_future(aw)
        exit_task = asyncio.ensure_future(self._exited.wait())
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(phase, timeout, **self._err_kw())
                done, _ = await asyncio.wait({task, exit_task}, timeout=min(left, 0.5),
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if exit_task in done:
                    raise VMDied(f"QEMU exited (status {self.exit_code}) while waiting for {phase}",
                                 exit_code=self.exit_code, fix=launch_fix(self._stderr_text()),
                                 **self._err_kw())
                why = self._console.panic()
                if why is not None:
                    raise VMError(f"the guest kernel panicked while waiting for {phase}"
                                  + (f": {why}" if why else ""),
                                  fix="read the console tail; more memory (memory=256) often helps",
                                  **self._err_kw())
        finally:
            for t in (task, exit_task):
                if not t.done():
                    t.cancel()

    # ------------------------------------------------------------------ QMP
    @require(*LIVE, doing="run QMP {command!r}")
    async def qmp(self, command: str, **args: Any) -> Any:
        """Run any QMP command; returns its ``return`` value."""
        if self._qmp is None:
            raise StateError(f"cannot run QMP {command!r}: QEMU's monitor is not connected",
                             fix="start() the VM first", **self._err_kw())
        try:
            return await self._qmp.execute(command, args or None)
        except QMPExecuteError as exc:
            raise VMError(f"QMP {command} failed: {exc}", fix="see the QMP reference for its arguments",
                          **self._err_kw()) from exc
        except Exception as exc:
            if self.exit_code is not None or self._gone():
                raise VMDied(f"QEMU exited during QMP {command}", exit_code=self.exit_code,
                             **self._err_kw()) from exc
            raise VMError(f"QMP {command} failed: {exc!r}", **self._err_kw()) from exc

    async def hmp(self, command_line: str) -> str:
        """A human-monitor command (``info registers`` ...) through QMP."""
        return str(await self.qmp("human-monitor-command", **{"command-line": command_line}))

    async def status(self) -> str:
        """QEMU's own run state (``query-status``): running, paused, prelaunch, ..."""
        return str((await self.qmp("query-status"))["status"])
