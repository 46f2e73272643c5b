"""The run-state table and the @require guard (no QEMU needed)."""

from __future__ import annotations

import asyncio

import pytest

from vmlab import StateError
from vmlab.vm.state import ErrorContext, RunState, Trigger, require, transition

S, T = RunState, Trigger


@pytest.mark.parametrize("state,trigger,after", [
    (S.CREATED, T.START, S.STARTING),
    (S.RUNNING, T.START, S.RUNNING),            # not in the table for RUNNING: unchanged
    (S.STARTING, T.LAUNCHED_PAUSED, S.PAUSED),
    (S.PAUSED, T.STOP, S.PAUSED),               # a STOP event for a paused VM changes nothing
    (S.RUNNING, T.STOP, S.PAUSED),
    (S.OFF, T.SHUTDOWN, S.OFF),                 # a SHUTDOWN read after the exit does not revive it
    (S.SHUTTING_DOWN, T.CRASHED, S.OFF),        # an error exit after SHUTDOWN is still orderly
    (S.RUNNING, T.CRASHED, S.FAILED),
    (S.OFF, T.START_FAILED, S.OFF),
    (S.STARTING, T.START_FAILED, S.FAILED),
    (S.FAILED, T.STOPPED, S.FAILED),
    (S.RUNNING, T.STOPPED, S.OFF),
    (S.OFF, T.LAUNCHED, S.OFF),                 # QEMU already gone: launching does not revive it
])
def test_transition_table(state, trigger, after):
    assert transition(state, trigger) is after


class Toy:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def _err_kw(self) -> ErrorContext:
        return {"command": ["qemu"], "stderr": "", "console_tail": "", "vm_name": "toy"}

    @require(RunState.RUNNING, doing="run {command!r}")
    async def run(self, command: str) -> str:
        return command

    @require(RunState.RUNNING, RunState.PAUSED, doing="reset")
    def reset(self) -> str:
        return "done"


def test_require_passes_in_the_right_state_and_names_problem_and_fix_otherwise():
    assert asyncio.run(Toy(S.RUNNING).run("true")) == "true"
    assert Toy(S.PAUSED).reset() == "done"
    with pytest.raises(StateError) as ei:
        asyncio.run(Toy(S.PAUSED).run("uname -r"))
    assert ei.value.message == "cannot run 'uname -r': the VM is paused (needs running)"
    assert ei.value.fix == "resume() it first" and ei.value.vm_name == "toy"
    with pytest.raises(StateError) as ei:
        Toy(S.OFF).reset()
    assert "needs running or paused" in ei.value.message and "start() a new VM" in ei.value.fix
