"""The synchronous face: :class:`VM` for scripts and notebooks, ``kvm_verdict``, ``require_kvm``.

Each method of :class:`VM` runs the :class:`~vmlab.vm.machine.AsyncVM`
coroutine of the same name on vmlab's private event loop
(:func:`vmlab.vm.runner.block_on`), so it works inside a running Jupyter
kernel, where ``asyncio.run`` would fail. The table below lists every wrapped
method; the wrappers keep the async method's signature and docstring.

    with VM(memory="256M") as vm:          # boots; shutdown is guaranteed
        print(vm.run("uname -r").stdout)
        vm.pause(); vm.resume()
        vm.powerdown(); vm.wait_event("SHUTDOWN")
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Any, Callable, Concatenate, Coroutine, Generic, List, Optional, ParamSpec, TypeVar, overload

from ..errors import AccelUnavailable
from ..image import GuestImage
from ..spec import MachineSpec
from .accel import KvmVerdict, probe_kvm
from .events import Event
from .machine import AsyncVM, kvm_probe_vm, nested_probe_vm
from .nested import NestedKvm, NestedVerdict, probe_nested
from .qemu import Launch
from .runner import block_on
from .state import RunState

__all__ = ["VM", "kvm_verdict", "nested_verdict", "require_kvm"]

P = ParamSpec("P")
T = TypeVar("T")


def _sync(method: Callable[Concatenate[AsyncVM, P], Coroutine[Any, Any, T]]) -> Callable[Concatenate[VM, P], T]:
    """``VM.name(...)``: run ``AsyncVM.name(...)`` of the wrapped VM on the private loop."""
    @functools.wraps(method)
    def call(self: VM, *args: P.args, **kwargs: P.kwargs) -> T:
        return block_on(method(self._avm, *args, **kwargs))
    call.__qualname__ = f"VM.{method.__name__}"
    return call


class _Shown(Generic[T]):
    """``VM.name``: the attribute or property of the same name of the wrapped AsyncVM (read-only)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, vm: None, owner: type) -> _Shown[T]: ...

    @overload
    def __get__(self, vm: VM, owner: type) -> T: ...

    def __get__(self, vm: Optional[VM], owner: type) -> Any:
        if vm is None:
            return self
        return getattr(vm._avm, self.name)


class VM:
    """A lesson VM for synchronous code and Jupyter (see :class:`~vmlab.vm.machine.AsyncVM` for details).

    ``VM(spec)`` or ``VM(memory="256M", cpus=2, ...)``; ``start()`` boots it;
    ``with VM(...) as vm:`` boots it and guarantees shutdown.
    """

    def __init__(self, spec: Optional[MachineSpec] = None, *, image: Optional[GuestImage] = None,
                 warm: bool = False, boot_timeout: Optional[float] = None, keep_dir: bool = False,
                 **fields: Any) -> None:
        self._avm = AsyncVM(spec, image=image, warm=warm, boot_timeout=boot_timeout, keep_dir=keep_dir,
                            **fields)

    def __repr__(self) -> str:
        return repr(self._avm).replace("AsyncVM", "VM", 1)

    def __getattr__(self, item: str) -> Any:
        # anything not listed below (private state, for tests and widgets) comes from the AsyncVM
        if item.startswith("__") or item == "_avm":
            raise AttributeError(item)
        return getattr(self._avm, item)

    # ------------------------------------------------------------ what it shows
    spec: _Shown[MachineSpec] = _Shown()
    state: _Shown[RunState] = _Shown()
    events: _Shown[List[Event]] = _Shown()
    pid: _Shown[Optional[int]] = _Shown()
    exit_code: _Shown[Optional[int]] = _Shown()
    accel: _Shown[Optional[str]] = _Shown()
    accel_reason: _Shown[str] = _Shown()
    boot_seconds: _Shown[Optional[float]] = _Shown()
    kernel_release: _Shown[Optional[str]] = _Shown()
    agent_ready: _Shown[bool] = _Shown()
    private_dir: _Shown[Optional[Path]] = _Shown()
    command: _Shown[List[str]] = _Shown()
    launch: _Shown[Optional[Launch]] = _Shown()
    console_log: _Shown[Optional[Path]] = _Shown()
    console_offset: _Shown[int] = _Shown()
    trace_log: _Shown[Optional[Path]] = _Shown()
    nic_sockets: _Shown[List[Optional[socket.socket]]] = _Shown()
    warm: _Shown[bool] = _Shown()
    warm_restored: _Shown[bool] = _Shown()
    warm_snapshot: _Shown[Optional[Path]] = _Shown()
    boot_timeout: _Shown[Optional[float]] = _Shown()
    keep_dir: _Shown[bool] = _Shown()
    nested_kvm: _Shown[Optional[NestedKvm]] = _Shown()

    # not coroutines: called as they are
    def console_text(self, tail: Optional[int] = None) -> str:
        """The console output so far (the last *tail* lines if given)."""
        return self._avm.console_text(tail)

    def trace_mark(self) -> int:
        """A position in the trace log; pass it to :meth:`trace_since`."""
        return self._avm.trace_mark()

    def trace_since(self, mark: int = 0) -> bytes:
        """The trace log lines written after *mark*."""
        return self._avm.trace_since(mark)

    def trace_counts(self, reset: bool = False) -> dict[str, int]:
        """Count trace events logged so far, by event name (``reset=True``: restart the count)."""
        return self._avm.trace_counts(reset)

    def qemu_cpu_seconds(self) -> float:
        """User+system CPU seconds QEMU has used so far (all its threads)."""
        return self._avm.qemu_cpu_seconds()

    def qemu_rss_bytes(self) -> int:
        """Resident memory of the QEMU process now."""
        return self._avm.qemu_rss_bytes()

    # ------------------------------------------------- coroutines, run to the end
    def start(self, paused: bool = False, wait: bool = True) -> VM:
        """Launch QEMU; unless paused, wait for the guest to be ready."""
        block_on(self._avm.start(paused=paused, wait=wait))
        return self

    wait_ready = _sync(AsyncVM.wait_ready)
    qmp = _sync(AsyncVM.qmp)
    hmp = _sync(AsyncVM.hmp)
    status = _sync(AsyncVM.status)
    pause = _sync(AsyncVM.pause)
    resume = _sync(AsyncVM.resume)
    powerdown = _sync(AsyncVM.powerdown)
    reset = _sync(AsyncVM.reset)
    quit = _sync(AsyncVM.quit)
    kill = _sync(AsyncVM.kill)
    wait_exit = _sync(AsyncVM.wait_exit)
    wait_event = _sync(AsyncVM.wait_event)
    expect = _sync(AsyncVM.expect)
    run = _sync(AsyncVM.run)
    write_file = _sync(AsyncVM.write_file)
    read_file = _sync(AsyncVM.read_file)
    copy_in = _sync(AsyncVM.copy_in)
    copy_out = _sync(AsyncVM.copy_out)
    ping = _sync(AsyncVM.ping)
    set_tracing = _sync(AsyncVM.set_tracing)
    shutdown = _sync(AsyncVM.shutdown)
    close = _sync(AsyncVM.close)

    def __enter__(self) -> VM:
        if self._avm.state is RunState.CREATED:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# --------------------------------------------------------------------------- KVM, synchronously

def kvm_verdict(use_cache: bool = True) -> KvmVerdict:
    """Whether KVM boots lesson guests here (proven by booting one; remembered per host)."""
    return block_on(probe_kvm(kvm_probe_vm, use_cache=use_cache))


def nested_verdict(use_cache: bool = True) -> NestedVerdict:
    """Whether KVM works inside a nested guest under TCG here (proven by booting one; remembered)."""
    return block_on(probe_nested(nested_probe_vm, use_cache=use_cache))


def require_kvm() -> None:
    """Raise AccelUnavailable (with the reason) unless KVM is proven here.

    Notebooks call this in KVM-only cells and show the TCG picture instead.
    """
    v = kvm_verdict()
    if not v["usable"]:
        raise AccelUnavailable("kvm", v["reason"], fix=v.get("fix") or "use TCG")
