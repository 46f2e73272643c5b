"""vmlab's private asyncio event loop, on a daemon thread.

vmlab is written async once. Its synchronous names hand their coroutines to
:func:`block_on`, which runs them on this loop, the way jupyter_client does: a
Jupyter kernel already runs an event loop in the main thread, so
``asyncio.run`` and ``run_until_complete`` fail there, while a loop of our own
on another thread works everywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Optional, TypeVar

__all__ = ["block_on", "get_loop", "in_loop_thread", "running_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None
_thread: Optional[threading.Thread] = None


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the private loop, starting its thread on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=main, name="vmlab-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def running_loop() -> Optional[asyncio.AbstractEventLoop]:
    """The private loop if its thread runs (never starts one): for clean-up at interpreter exit."""
    with _lock:
        return _loop if _thread is not None and _thread.is_alive() and _loop is not None else None


def in_loop_thread() -> bool:
    """True when called from the private loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def block_on(coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
    """Run *coro* on the private loop and block this thread until it is done; its result.

    A KeyboardInterrupt while waiting (a notebook cell interrupted) cancels the
    coroutine before it propagates, so no half-done operation keeps running.
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError("vmlab's synchronous API was called from its own event loop; "
                           "use the async API (AsyncVM) inside coroutines")
    fut = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise
    except KeyboardInterrupt:
        fut.cancel()
        raise
