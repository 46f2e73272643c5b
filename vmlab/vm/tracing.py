"""QEMU's trace events for a VM: the log, positions in it, counts by event, switching live.

A spec's ``trace`` patterns (``trace=("ide_*",)``) start QEMU with
``-trace enable=PATTERN -D trace.log`` (the log backend) in the VM's private
directory. Each line starts with the event name (after a ``PID@TIME:`` stamp
when QEMU adds one), so counting lines by name counts the device's work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

from .core import VMCore

__all__ = ["TracingMixin", "count_trace_events"]

_LINE = re.compile(rb"^(?:\d+@[\d.]+:)?([a-z0-9_]+) ", re.M)


def count_trace_events(data: bytes) -> Dict[str, int]:
    """How many lines of each trace event *data* (trace log lines) holds."""
    counts: Dict[str, int] = {}
    for m in _LINE.finditer(data):
        name = m.group(1).decode()
        counts[name] = counts.get(name, 0) + 1
    return counts


class TracingMixin(VMCore):
    """The trace log of a VM started with ``spec.trace``."""

    _trace_offset = 0

    @property
    def trace_log(self) -> Optional[Path]:
        return self.private_dir / "trace.log" if self.private_dir else None

    def trace_mark(self) -> int:
        """A position in the trace log (``spec.trace`` events); pass it to :meth:`trace_since`."""
        try:
            return self.trace_log.stat().st_size if self.trace_log else 0
        except OSError:
            return 0

    def trace_since(self, mark: int = 0) -> bytes:
        """The trace log lines written after *mark*."""
        path = self.trace_log
        if not path or not path.exists():
            return b""
        with open(path, "rb") as f:
            f.seek(mark)
            return f.read()

    def trace_counts(self, reset: bool = False) -> Dict[str, int]:
        """Count trace events logged so far (``spec.trace`` patterns), by event name.

        With ``reset=True`` the next call counts only what comes after this one.
        """
        offset = self._trace_offset
        data = self.trace_since(offset)
        if reset:
            self._trace_offset = offset + len(data)
        return count_trace_events(data)

    async def set_tracing(self, on: bool) -> None:
        """Switch the ``spec.trace`` events on or off while the VM runs (tracing slows QEMU)."""
        for pattern in self.spec.trace:
            await self.qmp("trace-event-set-state", name=pattern, enable=bool(on))
