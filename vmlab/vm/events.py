"""A VM's event log: QEMU's QMP events and vmlab's own, in the order they happened.

Each event is a dict ``{"event", "data", "t" (seconds since launch), "wall",
"source": "qemu"|"vmlab"|"agent"}`` (plus ``qemu_time``, QEMU's own
timestamp, for QEMU's events). vmlab adds LAUNCH, READY, ACTION, EXIT,
GUEST_BYE, WARM_SAVED, WARM_SKIPPED and RESTORED (a warm snapshot loaded).

:meth:`EventLog.wait_for` looks from the last lifecycle action
(:meth:`EventLog.mark_action`) by default, so an event that came before the
caller asked is still found.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, Dict, List, Optional

from ..errors import VMTimeout
from .state import ErrorContext

__all__ = ["Event", "EventLog"]

Event = Dict[str, Any]


class EventLog:
    """The events of one VM, and a way to wait for one."""

    def __init__(self) -> None:
        self.items: List[Event] = []
        self.t0 = 0.0                   # time.monotonic() at launch
        self.mark = 0                   # index of the last lifecycle action
        self._changed: Optional[asyncio.Condition] = None

    def arm(self) -> None:
        """From now on (the VM is starting, on the event loop), wake waiters on each event."""
        if self._changed is None:
            self._changed = asyncio.Condition()

    def clear(self) -> None:
        self.items.clear()

    def record(self, name: str, data: Dict[str, Any], source: str = "qemu",
               qemu_time: Optional[float] = None) -> Event:
        """Append an event (stamped now) and wake whoever waits for one."""
        ev: Event = {"event": name, "data": data, "t": time.monotonic() - self.t0, "wall": time.time(),
                     "source": source}
        if qemu_time is not None:
            ev["qemu_time"] = qemu_time   # QEMU's own timestamp (wall clock) for its events
        self.items.append(ev)
        if self._changed is not None:
            asyncio.get_running_loop().create_task(self._notify(self._changed))
        return ev

    @staticmethod
    async def _notify(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()

    def mark_action(self, name: str) -> None:
        """A lifecycle action (pause, reset...): later waits look from here; logged as ACTION."""
        self.mark = len(self.items)
        self.record("ACTION", {"action": name}, source="vmlab")

    def find(self, name: str, match: Optional[Dict[str, Any]] = None, start: int = 0) -> Optional[Event]:
        """The first event *name* from index *start* whose data has the items of *match*."""
        for ev in self.items[start:]:
            if ev["event"] == name and all(ev["data"].get(k) == v for k, v in (match or {}).items()):
                return ev
        return None

    async def wait_for(self, name: str, *, match: Optional[Dict[str, Any]], timeout: float,
                       since: Optional[int], err_kw: Callable[[], ErrorContext]) -> Event:
        """Wait for an event; see :meth:`vmlab.vm.AsyncVM.wait_event`. ``err_kw`` for the VMTimeout."""
        self.arm()
        assert self._changed is not None
        start = self.mark if since is None else since
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                ev = self.find(name, match, start)
                if ev:
                    return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(f"event {name}" + (f" with {match}" if match else ""), timeout, **err_kw())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
