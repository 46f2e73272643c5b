"""The host side of the guest agent channel (a virtio-serial port).

The guest runs ``vmagent`` (vmlab/guest/vmagent.c), which frames every message
as one header line ``TYPE ID A B LEN1 LEN2`` followed by LEN1+LEN2 bytes, so
output is exact and exit status and duration are measured in the guest.
This module speaks that protocol over an asyncio stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..errors import GuestError
from ..log import get_logger

__all__ = ["AgentClient", "RunResult"]

log = get_logger(__name__)


@dataclass
class RunResult:
    """What a command run in the guest returned."""

    command: str
    status: int                 # exit code; 128+N if killed by signal N; -1 if timed out
    stdout: str
    stderr: str
    guest_s: float              # fork to exit, measured in the guest (monotonic clock)
    wall_s: float               # request to answer, measured on the host

    @property
    def ok(self) -> bool:
        return self.status == 0

    def __repr__(self) -> str:
        out = self.stdout if len(self.stdout) < 60 else self.stdout[:57] + "..."
        return (f"<RunResult {self.command!r} status={self.status} guest={self.guest_s * 1e3:.1f}ms "
                f"wall={self.wall_s * 1e3:.1f}ms stdout={out!r}>")


@dataclass
class _Frame:
    type: str
    id: int
    a: int
    b: int
    p1: bytes
    p2: bytes


class AgentClient:
    """Talks to vmagent over a connected stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_bye: Optional[Callable[[str], None]] = None) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: Dict[int, asyncio.Future[_Frame]] = {}
        self._hello = asyncio.Event()
        self._on_bye = on_bye
        self.kernel_release: Optional[str] = None
        self.hellos = 0
        self.closed_reason: Optional[str] = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="vmlab-agent-reader")

    # -- reading -----------------------------------------------------------
    async def _read_frame(self) -> _Frame:
        line = await self._reader.readline()
        if not line:
            raise EOFError
        parts = line.decode("ascii", "replace").split()
        if len(parts) != 6:
            raise GuestError(f"garbled agent frame header: {line[:80]!r}")
        t, i, a, b, n1, n2 = parts[0], *map(int, parts[1:])
        p1 = await self._reader.readexactly(n1) if n1 else b""
        p2 = await self._reader.readexactly(n2) if n2 else b""
        return _Frame(t, i, a, b, p1, p2)

    async def _read_loop(self) -> None:
        reason = "agent channel closed"
        try:
            while True:
                f = await self._read_frame()
                if f.type == "HELLO":
                    self.kernel_release = f.p1.decode(errors="replace")
                    self.hellos += 1
                    if self.hellos > 1:  # the guest rebooted: earlier requests are lost
                        self._fail_all("the guest rebooted while the request was running")
                    self._hello.set()
                elif f.type == "BYE":
                    self._hello.clear()
                    self._fail_all("the guest is shutting down: " + f.p1.decode(errors="replace"))
                    if self._on_bye:
                        self._on_bye(f.p1.decode(errors="replace"))
                else:
                    fut = self._pending.pop(f.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(f)
        except (EOFError, asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = f"agent channel closed ({type(exc).__name__})"
        except GuestError as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            reason = "agent client closed"
            raise
        finally:
            self.closed_reason = reason
            self._hello.clear()
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(GuestError(reason))
        self._pending.clear()

    # -- requests ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._hello.is_set()

    async def wait_hello(self) -> str:
        await self._hello.wait()
        return self.kernel_release or ""

    def mark_reconnected(self) -> None:
        """After a restore the guest agent is already running: no HELLO comes."""
        self._hello.set()

    def forget_hello(self) -> None:
        """The guest is about to reboot (a reset): not ready until its next HELLO."""
        self._hello.clear()

    async def _request(self, type_: str, a: int = 0, p1: bytes = b"",
                       p2: bytes = b"") -> Tuple[int, asyncio.Future[_Frame]]:
        if self.closed_reason:
            raise GuestError(self.closed_reason)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(f"{type_} {rid} {a} 0 {len(p1)} {len(p2)}\n".encode() + p1 + p2)
        await self._writer.drain()
        return rid, fut

    async def _answer(self, rid: int, fut: asyncio.Future[_Frame], timeout: Optional[float], what: str) -> _Frame:
        try:
            f: _Frame = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise
        if f.type == "ERR":
            raise GuestError(f"{what}: {f.p1.decode(errors='replace')}")
        return f

    async def run(self, command: str, timeout: Optional[float] = 60.0) -> RunResult:
        t0 = time.perf_counter()
        timeout_ms = int(timeout * 1000) if timeout else 0
        rid, fut = await self._request("RUN", timeout_ms, command.encode())
        # the guest enforces the timeout; the host waits a little longer for the answer
        host_timeout = None if timeout is None else timeout + 10.0
        try:
            f = await self._answer(rid, fut, host_timeout, f"running {command!r}")
        except (TimeoutError, asyncio.CancelledError):
            try:
                self._writer.write(f"KILL {rid} 0 0 0 0\n".encode())
            except Exception as exc:    # the channel is gone: so is the command
                log.debug("could not send KILL for agent request %d: %r", rid, exc)
            raise
        return RunResult(command=command, status=f.a, stdout=f.p1.decode(errors="replace"),
                         stderr=f.p2.decode(errors="replace"), guest_s=f.b / 1e9,
                         wall_s=time.perf_counter() - t0)

    async def put(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 60.0) -> None:
        rid, fut = await self._request("PUT", mode, path.encode(), data)
        await self._answer(rid, fut, timeout, f"writing {path}")

    async def get(self, path: str, timeout: float = 60.0) -> bytes:
        rid, fut = await self._request("GET", 0, path.encode())
        return (await self._answer(rid, fut, timeout, f"reading {path}")).p1

    async def ping(self, timeout: float = 10.0) -> int:
        rid, fut = await self._request("PING")
        return (await self._answer(rid, fut, timeout, "ping")).a

    async def close(self) -> None:
        """Stop reading and close the channel (pending requests fail)."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.debug("agent reader ended with %r", exc)
        try:
            self._writer.close()
        except Exception as exc:
            log.debug("closing the agent channel failed: %r", exc)
