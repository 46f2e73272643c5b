"""Talking to the guest through its agent: readiness, commands, files, ping.

The agent (``vmagent``, PID 1 in the guest) says hello when the guest is up;
:meth:`GuestMixin.run` runs a shell command there and returns a
:class:`~vmlab.vm.agent.RunResult` with the exit status and durations measured
in the guest. Every wait races QEMU's exit and a guest kernel panic, so a dead
VM fails at once with the reason rather than at the timeout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from .. import config, procfs
from ..errors import GuestError, SpecError, StateError, VMDied, VMTimeout
from .agent import AgentClient, RunResult
from .core import VMCore, check_timeout
from .qemu import launch_fix
from .state import LIVE, RunState, require

__all__ = ["GuestMixin"]

# every state but PAUSED in which QEMU may run, and the ends (where waits fail with the reason)
_NOT_PAUSED = (LIVE | {RunState.OFF, RunState.FAILED}) - {RunState.PAUSED}


class GuestMixin(VMCore):
    """The guest side of a VM, through its agent."""

    def _default_boot_timeout(self) -> float:
        if self.boot_timeout:
            return float(self.boot_timeout)
        return 30.0 if self.accel == "kvm" and not config.slow_kvm() else 90.0

    @require(*_NOT_PAUSED, doing="wait for the guest to become ready")
    async def wait_ready(self, timeout: Optional[float] = None) -> str:
        """Wait until the guest agent says hello; returns the guest kernel release."""
        agent = self._agent_or_fail("wait for the guest")
        t = timeout or self._default_boot_timeout()
        release = await self._race(agent.wait_hello(), t, "the guest agent (boot)")
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._events.t0
        # QEMU's CPU time to here: the boot's work, whatever the host's load (benchmarks/boot.py)
        cpu = procfs.process_cpu_seconds(self.pid) if self.pid else None
        self._record_event("READY", {"kernel": release, "qemu_cpu_s": cpu}, source="agent")
        return release

    def _agent_or_fail(self, doing: str) -> AgentClient:
        if self._agent is None:
            raise StateError(f"cannot {doing}: the VM is {self.state.value}", fix="start() a VM first",
                             **self._err_kw())
        return self._agent

    @require(RunState.RUNNING, doing="run {command!r}")
    async def run(self, command: str, *, timeout: Optional[float] = 60.0, check: bool = True) -> RunResult:
        """Run a shell command in the guest; returns stdout, stderr, status and durations.

        The command gets what ``/bin/sh -c COMMAND`` would give it: a fresh process in its own session, stdin
        ``/dev/null``. A plain command (words of letters, digits and ``_./+,:=%@-`` only, e.g. ``uname -r``)
        is exec'd by the guest agent as the shell would exec it, without starting the shell: the same answers,
        0.3-1 ms sooner on the AMD test machine (docs/boot.md, "Plain commands without the shell").
        With ``check=True`` (the default) a non-zero exit raises GuestError.
        """
        if not isinstance(command, str) or not command.strip():
            raise SpecError("command", f"{command!r} is not a shell command", fix='e.g. vm.run("uname -r")')
        check_timeout(timeout, allow_none=True)
        agent = self._agent_or_fail(f"run {command!r}")
        if not agent.ready:
            await self.wait_ready()
        try:
            res = await self._race(agent.run(command, timeout=timeout),
                                   (timeout or 1e9) + 15, f"command {command!r}")
        except GuestError as exc:
            if agent.closed_reason and await self._wait_exit(1.0):    # the channel closed because QEMU died
                raise VMDied(f"QEMU exited (status {self.exit_code}) while running {command!r}",
                             exit_code=self.exit_code, fix=launch_fix(self._stderr_text()),
                             **self._err_kw()) from exc
            raise GuestError(str(exc.message), **self._err_kw()) from exc
        except VMTimeout:
            raise
        except TimeoutError as exc:     # the agent never answered (a hung or stopped guest)
            raise VMTimeout(f"command {command!r} in the guest (the guest agent did not answer)",
                            timeout or 0, **self._err_kw()) from exc
        if res.status == -1:
            raise VMTimeout(f"command {command!r} in the guest", timeout or 0, **self._err_kw())
        if check and res.status != 0:
            raise GuestError(f"{command!r} exited with status {res.status}: {res.stderr.strip()[-300:]}",
                             result=res, fix="pass check=False to get the result instead", **self._err_kw())
        return res

    @require(RunState.RUNNING, doing="write {path}")
    async def write_file(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
        """Write a (small) file in the guest, atomically."""
        agent = self._agent_or_fail(f"write {path}")
        if isinstance(data, str):
            data = data.encode()
        await self._race(agent.put(path, data, mode), 120, f"writing {path}")

    @require(RunState.RUNNING, doing="read {path}")
    async def read_file(self, path: str) -> bytes:
        """Read a (small) file from the guest."""
        agent = self._agent_or_fail(f"read {path}")
        return await self._race(agent.get(path), 120, f"reading {path}")

    async def copy_in(self, local: Union[str, Path], guest_path: str, mode: Optional[int] = None) -> None:
        """Copy a host file into the guest (its mode too, unless *mode* is given)."""
        p = Path(local)
        await self.write_file(guest_path, p.read_bytes(), mode if mode is not None else p.stat().st_mode & 0o777)

    async def copy_out(self, guest_path: str, local: Union[str, Path]) -> Path:
        """Copy a guest file to the host; returns the host path."""
        p = Path(local)
        p.write_bytes(await self.read_file(guest_path))
        return p

    @require(RunState.RUNNING, doing="ping")
    async def ping(self) -> float:
        """Round trip to the guest agent, in seconds."""
        agent = self._agent_or_fail("ping")
        t = time.perf_counter()
        await self._race(agent.ping(), 15, "ping")
        return time.perf_counter() - t
