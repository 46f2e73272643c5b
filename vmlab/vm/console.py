"""A VM's console: what the guest printed, kept in memory and in ``console.log``, and ``expect``.

The console (ttyS0 or hvc0) carries the guest kernel's log. QEMU writes it to
a socketpair; :meth:`Console.pump` reads it into a buffer (the last
:data:`CONSOLE_KEEP` bytes, offsets counted from the start) and the VM's
private ``console.log``. :meth:`Console.expect` waits for a regex, like
pexpect: each search starts where the previous match ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from pathlib import Path
from typing import BinaryIO, Optional, Protocol, Union

from ..errors import SpecError, VMDied, VMTimeout
from ..log import get_logger
from .state import ErrorContext

__all__ = ["CONSOLE_KEEP", "Console", "Pattern", "user_only"]

log = get_logger(__name__)

CONSOLE_KEEP = 4 << 20
Pattern = Union[str, "re.Pattern[str]"]
#: the panic line, once it is whole (the console may hand it over in pieces)
_PANIC = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)[\r\n]")
_PANIC_START = b"Kernel panic - not syncing: "


def user_only(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that creates the file 0600."""
    return os.open(path, flags, 0o600)


class Watched(Protocol):
    """What :meth:`Console.expect` needs of its VM: whether QEMU is gone, and error context."""

    exit_code: Optional[int]

    def _gone(self) -> bool: ...

    def _err_kw(self) -> ErrorContext: ...


class Console:
    """The console output of one VM."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0                  # bytes dropped from the front of _buf
        self._file: Optional[BinaryIO] = None
        self._changed: Optional[asyncio.Condition] = None
        self._expect_pos = 0
        self.writer: Optional[asyncio.StreamWriter] = None

    def open(self, log_path: Path) -> None:
        """Start a new log (mode 0600) at *log_path*; waiters may wait from now on."""
        self._file = open(log_path, "wb", opener=user_only)   # noqa: SIM115 - closed in close()
        if self._changed is None:
            self._changed = asyncio.Condition()

    def clear(self) -> None:
        """Forget the output so far (a cold boot after a failed warm start)."""
        self._buf.clear()
        self._base = 0

    def close(self) -> None:
        """Close the socket's writer and the log file (idempotent)."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                log.debug("closing the console stream failed: %r", exc)
            self.writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---------------------------------------------------------------- reading
    async def pump(self, reader: asyncio.StreamReader) -> None:
        """Copy what QEMU sends into the buffer and the log until the stream ends."""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                self._buf += chunk
                if len(self._buf) > CONSOLE_KEEP:
                    drop = len(self._buf) - CONSOLE_KEEP // 2
                    del self._buf[:drop]
                    self._base += drop
                if self._file:
                    self._file.write(chunk)
                    self._file.flush()
                assert self._changed is not None
                async with self._changed:
                    self._changed.notify_all()
        except (ConnectionError, OSError) as exc:
            log.debug("console stream ended: %r", exc)

    def text(self, tail: Optional[int] = None) -> str:
        """The output kept so far (the last *tail* lines if given)."""
        text = self._buf.decode(errors="replace")
        if tail:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    @property
    def offset(self) -> int:
        """Bytes received so far: a position to pass to :meth:`expect` as ``since``."""
        return self._base + len(self._buf)

    def panic(self) -> Optional[str]:
        """None, or why the guest kernel panicked ("" if the console does not say).

        None too while the panic line is still arriving: a reason cut off mid-line ("Attempted t") was
        quoted once, when the check ran between two pieces of the console's output."""
        if b"Kernel panic" not in self._buf:
            return None
        why = _PANIC.search(self._buf)
        if why:
            return why.group(1).decode(errors="replace")
        return None if _PANIC_START in self._buf else ""

    # ----------------------------------------------------------------- expect
    async def expect(self, vm: Watched, pattern: Pattern, timeout: float, since: Optional[int]) -> re.Match[str]:
        """Wait until the output matches *pattern*; see :meth:`vmlab.vm.AsyncVM.expect`."""
        if self._changed is None:       # QEMU never started: only the "gone" check can answer
            self._changed = asyncio.Condition()
        try:
            rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        except re.error as exc:
            raise SpecError("pattern", f"{pattern!r} is not a regular expression: {exc}",
                            fix="escape special characters with re.escape(text)") from exc
        start = self._expect_pos if since is None else since
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                rel = max(0, start - self._base)
                text = self._buf[rel:].decode(errors="replace")
                m = rx.search(text)
                if m:
                    self._expect_pos = self._base + rel + len(text[:m.end()].encode())
                    return m
                if vm._gone():
                    raise VMDied(f"QEMU exited before the console showed {rx.pattern!r}",
                                 exit_code=vm.exit_code, **vm._err_kw())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(f"console output matching {rx.pattern!r}", timeout, **vm._err_kw())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
