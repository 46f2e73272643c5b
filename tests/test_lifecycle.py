"""Booting and shutting down from both sides; the control panel driven without a browser."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from vmlab import VM, RunState
from vmlab.errors import SpecError
from vmlab.experiments import lifecycle as L

# the events each path must show, in this order (others may come between)
EXPECTED = {
    "paused_boot": ["LAUNCH", "ACTION", "RESUME", "READY"],
    "guest_reboot": ["ACTION", "GUEST_BYE", "RESET", "READY"],
    "power_button": ["ACTION", "POWERDOWN", "GUEST_BYE", "SHUTDOWN", "EXIT"],
    "guest_poweroff": ["ACTION", "GUEST_BYE", "SHUTDOWN", "EXIT"],
    "quit": ["ACTION", "SHUTDOWN", "EXIT"],
    "kill": ["ACTION", "EXIT"],
}
REASON = {"power_button": "guest-shutdown", "guest_poweroff": "guest-shutdown", "quit": "host-qmp-quit"}


def in_order(names, wanted):
    it = iter(names)
    return all(any(n == w for n in it) for w in wanted)


@pytest.mark.integration
@pytest.mark.parametrize("action", L.ACTIONS)
def test_each_path_events_and_data(action, image, tmp_path):
    verify = action in ("quit", "power_button")
    row = L.run_action(action, image=image, workdir=tmp_path, verify_in_vm=verify)
    names = L.event_names(row["events"])
    assert in_order(names, EXPECTED[action]), row["events"]
    if action in ("quit", "kill"):
        assert "GUEST_BYE" not in names and "POWERDOWN" not in names   # the guest never knew
    if action in REASON:
        assert row["shutdown_reason"] == REASON[action]
    if action == "kill":
        assert row["exit_code"] == -9 and "SHUTDOWN" not in names
    assert row["seconds"] > 0
    tl = json.loads(row["timeline"])
    assert [e["event"] for e in tl if e["event"] != "RESET"] == [n for n in names if n != "RESET"]
    assert all(b["t_s"] >= a["t_s"] for a, b in itertools.pairwise(tl))
    if action == "paused_boot":
        assert row["status_before"] == "prelaunch" or row["status_before"] == "paused"
        assert row["status_after"] == "running"
        return
    # unsynced data: kept by every graceful path, lost when the plug is pulled
    assert row["data_kept"] is (action in L.GRACEFUL), row
    assert row["qcow2_ok"] is True                     # qcow2 metadata consistent either way
    if action in ("power_button", "guest_poweroff"):
        assert row["fs_after"] == "clean"
    if action in ("quit", "kill"):
        assert row["fs_after"] == "journal needs replay"   # consistent, but not cleanly unmounted
    if verify:
        assert row["data_kept_vm"] is (action in L.GRACEFUL)   # a new VM sees the same
        assert row["fs_after_replay"] == "clean"
    if action == "guest_reboot":
        assert row["data_kept_vm"] is True


def test_bad_arguments():
    with pytest.raises(SpecError):
        L.run(quick=True, actions=["explode"])
    with pytest.raises(SpecError):
        L.run(quick=True, repeats=0)


def test_views_from_rows():
    import pandas as pd
    tl = [{"event": "ACTION", "t_s": 0.0, "source": "vmlab", "detail": "quit"},
          {"event": "EXIT", "t_s": 0.01, "source": "vmlab", "detail": "exit status 0"}]
    df = pd.DataFrame([{"action": "quit", "repeat": 0, "events": "ACTION > EXIT", "seconds": 0.01,
                        "data_kept": False, "timeline": json.dumps(tl), "accel": "tcg"}])
    ev = L.events_frame(df)
    assert list(ev["event"]) == ["ACTION", "EXIT"]
    s = L.summary(df)
    assert s.loc[0, "data_kept"] == "0/1"
    import matplotlib
    matplotlib.use("Agg")
    assert L.plot_timeline(df) is not None
    assert L.plot_durations(df) is not None


# ------------------------------------------------------------ control panel
def _wait(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_control_panel_buttons_follow_state_without_vm():
    from vmlab.widgets.control_panel import ControlPanel
    p = ControlPanel(VM(accel="tcg", name="panel-idle"), poll=False)
    try:
        p.refresh()
        assert p.state_name == "created"
        assert not p.buttons["start"].disabled
        for b in ("pause", "resume", "power", "reset", "quit", "kill"):
            assert p.buttons[b].disabled, b
        assert "vmlab-start" in p.buttons["start"]._dom_classes
        assert "vmlab-state" in p.state_label._dom_classes
    finally:
        p.close()


@pytest.mark.integration
def test_control_panel_drives_a_vm(image):
    from vmlab.widgets.control_panel import ControlPanel
    vm = VM(accel="tcg", name="panel", image=image)
    p = ControlPanel(vm)
    try:
        p.on_start()
        assert p.buttons["start"].disabled                 # busy starting: only kill stays enabled
        assert p.wait_state("running", ready=True) == "running", p.error_text
        assert p.buttons["start"].disabled and not p.buttons["pause"].disabled
        assert p.buttons["resume"].disabled
        p.on_pause()
        assert p.wait_state("paused", timeout=10) == "paused"
        assert p.buttons["pause"].disabled and not p.buttons["resume"].disabled
        p.on_pause()                                   # not allowed now: shown, not raised
        assert "cannot pause" in p.error_text
        p.on_resume()
        assert p.wait_state("running", timeout=10) == "running"
        assert "RESUME" in p.event_log.value and "STOP" in p.event_log.value
        p.on_power()
        assert p.wait_state("off", timeout=60) == "off"
        for b in ("pause", "resume", "power", "reset", "quit", "kill"):
            assert p.buttons[b].disabled, b
        assert "SHUTDOWN" in p.event_log.value
        assert _wait(lambda: not p.polling, 5)         # the poller stops when the VM is off
        seen = [h["state"] for h in p.history]
        assert seen.index("running") < seen.index("paused") < len(seen) - 1 - seen[::-1].index("running")
    finally:
        p.close()
        vm.shutdown()
    assert vm.state is RunState.OFF
