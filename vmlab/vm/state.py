"""A VM's run state: the states, the one function that moves between them, and the guard.

In the style of ``qemu.qmp``'s ``Runstate`` and ``@require``: every change of
:class:`RunState` goes through :func:`transition` (a table: what happened ->
where the VM goes from each state), and a method that only makes sense in some
states says so with ``@require(...)`` instead of a hand-written check::

    @require(RunState.RUNNING, doing="pause")
    async def pause(self) -> None: ...

A trigger the table does not list for the current state leaves the state as
it is: a QMP ``STOP`` event for a VM that is already paused changes nothing.
"""

from __future__ import annotations

import enum
import functools
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, TypedDict, TypeVar, cast

from ..errors import StateError

__all__ = ["LIVE", "ErrorContext", "RunState", "Trigger", "require", "transition"]


class RunState(enum.Enum):
    """Where a VM is in its life (the host's view; ``status()`` asks QEMU)."""

    CREATED = "created"          # not started yet
    STARTING = "starting"        # QEMU launched, guest not ready yet
    RUNNING = "running"          # guest running (agent may still be booting after a reset)
    PAUSED = "paused"            # vCPUs stopped (pause(), start(paused=True), or a STOP event)
    SHUTTING_DOWN = "shutting-down"  # SHUTDOWN seen, QEMU on its way out
    OFF = "off"                  # QEMU has exited
    FAILED = "failed"            # QEMU exited unexpectedly or never became ready


class Trigger(enum.Enum):
    """What happened to a VM; :func:`transition` says where that takes it."""

    START = "start"                  # start() was called
    LAUNCHED = "launched"            # QEMU is up and its monitor answers; vCPUs run
    LAUNCHED_PAUSED = "launched-paused"  # ... with the vCPUs stopped (-S)
    RESTORING = "restoring"          # QEMU is up, loading a warm snapshot
    RESTORED = "restored"            # the snapshot is loaded and the vCPUs run
    RESTORED_PAUSED = "restored-paused"  # ... with the vCPUs stopped
    RETRY = "retry"                  # an unusable warm snapshot: boot cold instead
    STOP = "STOP"                    # QMP event, or pause()
    RESUME = "RESUME"                # QMP event, or resume()
    SHUTDOWN = "SHUTDOWN"            # QMP event: QEMU is on its way out
    EXITED = "exited"                # QEMU exited when asked to, or with status 0
    CRASHED = "crashed"              # QEMU exited with an error nobody asked for
    START_FAILED = "start-failed"    # start() raised
    STOPPED = "stopped"              # shutdown() finished


S = RunState
#: States in which QEMU is (or may still be) running.
LIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.SHUTTING_DOWN})
_ALL = frozenset(RunState)


def _from(states: frozenset[RunState], to: RunState) -> Dict[RunState, RunState]:
    return dict.fromkeys(states, to)


#: trigger -> {state before: state after}; anything missing leaves the state alone.
_TABLE: Mapping[Trigger, Mapping[RunState, RunState]] = {
    Trigger.START: {S.CREATED: S.STARTING},
    Trigger.LAUNCHED: _from(LIVE, S.RUNNING),
    Trigger.LAUNCHED_PAUSED: _from(LIVE, S.PAUSED),
    Trigger.RESTORING: _from(LIVE, S.STARTING),
    Trigger.RESTORED: _from(LIVE, S.RUNNING),
    Trigger.RESTORED_PAUSED: _from(LIVE, S.PAUSED),
    Trigger.RETRY: _from(_ALL, S.STARTING),
    Trigger.STOP: {S.RUNNING: S.PAUSED, S.STARTING: S.PAUSED},
    Trigger.RESUME: {S.PAUSED: S.RUNNING, S.STARTING: S.RUNNING},
    # a SHUTDOWN event may be read after QEMU's exit was: it does not revive the VM
    Trigger.SHUTDOWN: _from(LIVE | {S.CREATED}, S.SHUTTING_DOWN),
    Trigger.EXITED: _from(_ALL, S.OFF),
    # an error exit after SHUTDOWN is still the orderly end the guest asked for
    Trigger.CRASHED: {**_from(_ALL, S.FAILED), S.SHUTTING_DOWN: S.OFF},
    Trigger.START_FAILED: {**_from(_ALL, S.FAILED), S.OFF: S.OFF},
    Trigger.STOPPED: {**_from(_ALL, S.OFF), S.FAILED: S.FAILED},
}


def transition(state: RunState, trigger: Trigger) -> RunState:
    """The state a VM in *state* is in after *trigger*: the only place states change."""
    return _TABLE[trigger].get(state, state)


# --------------------------------------------------------------------------- the guard

#: What to do about a VM that is in the wrong state, by the state it is in.
_FIX = {
    S.CREATED: "start() the VM first",
    S.STARTING: "wait for start() to finish",
    S.RUNNING: "check vm.state",
    S.PAUSED: "resume() it first",
    S.SHUTTING_DOWN: "the VM is shutting down: start() a new VM",
    S.OFF: "the VM is off: start() a new VM",
    S.FAILED: "the VM failed: start() a new VM (the error said why)",
}


class ErrorContext(TypedDict):
    """What every VMError of a VM carries (the keyword arguments of :class:`~vmlab.errors.VMError`)."""

    command: List[str]
    stderr: str
    console_tail: str
    vm_name: str


class Guarded(Protocol):
    """What ``@require`` needs of the object whose method it guards."""

    state: RunState

    def _err_kw(self) -> ErrorContext: ...


F = TypeVar("F", bound=Callable[..., Any])


def require(*states: RunState, doing: str, fix: Optional[str] = None) -> Callable[[F], F]:
    """Decorator: the method may run only while the VM is in one of *states*.

    Otherwise it raises :class:`~vmlab.errors.StateError` naming the operation
    (``doing``, formatted with the call's arguments, e.g. ``"run {command!r}"``),
    the state the VM is in, the states it needs, and a fix (``fix``, or one
    that suits the state the VM is in).
    """
    allowed = frozenset(states)
    needs = " or ".join(s.value for s in states)

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        def check(vm: Guarded, args: tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if vm.state in allowed:
                return
            try:
                bound = signature.bind(vm, *args, **kwargs)
                bound.apply_defaults()
                what = doing.format(**bound.arguments)
            except (TypeError, KeyError, IndexError):
                what = doing
            raise StateError(f"cannot {what}: the VM is {vm.state.value} (needs {needs})",
                             fix=fix or _FIX[vm.state], **vm._err_kw())

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def guarded_async(vm: Guarded, *args: Any, **kwargs: Any) -> Any:
                check(vm, args, kwargs)
                return await func(vm, *args, **kwargs)
            return cast(F, guarded_async)

        @functools.wraps(func)
        def guarded(vm: Guarded, *args: Any, **kwargs: Any) -> Any:
            check(vm, args, kwargs)
            return func(vm, *args, **kwargs)
        return cast(F, guarded)

    return decorate
