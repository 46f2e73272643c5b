"""Live migration (vmlab.vm.migrate, vmlab.experiments.liveguest / migration): real TCG guests moved
between QEMU processes on this host. The tests check what must hold -- the guest's file and counter
survive, the old process is gone, a migration that cannot converge leaves the guest where it was --
never how long anything took.
"""

from __future__ import annotations

import math

import pytest

from vmlab import SpecError
from vmlab.experiments import REGISTRY
from vmlab.experiments.liveguest import Heartbeat, LiveGuest, check_rate
from vmlab.procfs import is_zombie
from vmlab.vm.migrate import _caps


def alive(pid) -> bool:
    return bool(pid) and is_zombie(pid) is False


# ------------------------------------------------------------------ no VM needed
def test_registered():
    assert REGISTRY["migration"] == "vmlab.experiments.migration"


def test_bad_input_is_named():
    with pytest.raises(SpecError, match="dirty_rate_mbs"):
        check_rate(-1)
    with pytest.raises(SpecError, match="capabilit"):
        _caps({"x-teleport": True})
    g = LiveGuest(memory=256)
    with pytest.raises(SpecError, match="bandwidth_mbs"):
        g.migrate(bandwidth_mbs=0)
    with pytest.raises(SpecError, match="working_set"):
        LiveGuest(memory=256, working_set=500)


def test_heartbeat_gap_finds_the_switch_and_the_counter():
    hb = Heartbeat()
    # host time, VM, counter, guest ns, pages: 3 beats on the source, a pause, 2 on the destination
    hb.beats = [(1.000, "a", 10, 100, 0), (1.005, "a", 11, 105, 0), (1.010, "a", 12, 110, 0),
                (1.210, "b", 13, 130, 0), (1.215, "b", 14, 135, 0)]
    g = hb.gap(0, 2, "a", "b")
    assert g["beats_seen"] == 5 and g["beats_lost"] == 0 and g["counter_kept"]
    assert math.isclose(g["guest_gap_ms"], 200, rel_tol=1e-6)
    assert math.isclose(g["guest_clock_gap_ms"], 20 / 1e6, rel_tol=1e-6)
    hb.beats.insert(3, (1.1, "b", 15, 0, 0))        # a counter that jumps: beats lost, not kept
    assert not hb.gap(0, 2, "a", "b")["counter_kept"]


# ------------------------------------------------------------------ real guests
@pytest.mark.integration
def test_state_survives_two_migrations(image):
    with LiveGuest(memory=256, image=image) as g:
        first_pid = g.vm.pid
        rows = []
        for bw in (128, 64):
            before = g.read_state()
            row = g.migrate(bandwidth_mbs=bw, dirty_rate_mbs=0)
            rows.append(row)
            assert row["status"] == "completed" and row["converged"]
            assert row["guest_ok"], row["guest_failure"]
            assert row["file_kept"] and row["counter_kept"]          # the file and the counter went on
            assert row["counter_after"] > before["counter_file"]
            assert row["beats_lost"] == 0
            assert row["rounds"] >= 1 and row["transferred_mb"] > 0
            assert not alive(row["src_pid"]) and alive(row["dst_pid"])
        assert rows[0]["dst_pid"] == rows[1]["src_pid"] != first_pid  # moved on, then moved again
        assert g.migrations == 2 and g.read_state()["file"] == g.token


@pytest.mark.integration
def test_unreachable_pause_limit_is_cancelled_and_the_guest_stays(image):
    with LiveGuest(memory=256, image=image) as g:
        where = g.vm.spec.name
        row = g.migrate(bandwidth_mbs=32, dirty_rate_mbs=16, downtime_limit_ms=1, timeout=5, fresh=True)
        assert row["status"] == "cancelled" and not row["converged"]
        assert row["now_in"] == where and alive(row["src_pid"]) and not alive(row["dst_pid"])
        assert row["guest_ok"] and row["file_kept"]
        assert row["stale_pages"] == 0                  # the source's memory is the guest's: nothing lost
