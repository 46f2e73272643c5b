"""Progress reporting (vmlab.measure): one bar per experiment, plan/advance/say, the quick default.

No VMs and no wall-clock assertions: the bar is driven by hand and its text is checked.
"""

from __future__ import annotations

import io
import logging
import sys

import pytest

from vmlab import config
from vmlab.measure import ProgressBar, advance, plan, say


def test_bar_counts_steps_shows_the_current_step_and_ends_done():
    out = io.StringIO()
    with ProgressBar("disk", stream=out) as bar:
        plan(bar, 4)
        say(bar, "disk: booting a VM with IDE")
        advance(bar)
        assert bar.done == 1 and bar.total == 4
        assert bar.status().startswith("1/4, ") and "left: disk: booting a VM with IDE" in bar.status()
        say(bar, "disk: ide-pio read seq bs=4096")
        advance(bar, 2)
    assert bar.closed and bar.done == 4
    lines = out.getvalue().split("\r")
    assert "ide-pio read seq" in lines[-2] and lines[-1].rstrip().endswith("done") and out.getvalue().endswith("\n")


def test_a_failing_experiment_leaves_the_bar_marked_failed():
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"), ProgressBar("net", 4, stream=out) as bar:   # never swallowed
        bar.advance()
        raise RuntimeError("boom")
    assert out.getvalue().rstrip().endswith("failed")
    assert bar.failed and bar.done == 1, "a failed bar stays where it stopped (not filled)"
    assert "1/4" in out.getvalue().splitlines()[-1]


def test_plain_callables_still_work_and_every_message_is_logged(caplog):
    seen = []
    plan(seen.append, 3)       # ignored by a plain callable
    advance(seen.append)
    with caplog.at_level(logging.INFO, logger="vmlab.progress"):
        say(seen.append, "console: uart 65536 bytes")
        say(None, "nobody listens")
    assert seen == ["console: uart 65536 bytes"]
    assert [r.getMessage() for r in caplog.records] == ["console: uart 65536 bytes", "nobody listens"]


def test_quick_default_follows_the_variable_else_the_session(monkeypatch):
    monkeypatch.setenv("VMLAB_QUICK", "1")
    assert config.quick()
    monkeypatch.setenv("VMLAB_QUICK", "0")
    assert not config.quick()
    monkeypatch.delenv("VMLAB_QUICK")
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not config.quick()                  # a script or the CLI: full mode
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert config.quick()                      # a notebook kernel: quick mode
