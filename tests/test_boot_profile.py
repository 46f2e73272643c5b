"""The boot profile's arithmetic (vmlab.vm.profile) on a recorded dmesg: no VM, no wall-clock assertions."""

from __future__ import annotations

from vmlab.vm.profile import COLD_PHASES, WARM_PHASES, _dmesg_times, format_profile

DMESG = """\
[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)
[    2.631944] Run /init as init process
[    2.700000] vmlab-init: start
[    2.900000] vmlab-init: modules loaded
[    2.950000] vmlab-init: starting agent
[    9.000000] vmlab-profile: mark
[    9.500000] vmlab-profile: mark
"""


def test_marks_are_read_from_dmesg_first_one_wins():
    t = _dmesg_times(DMESG)
    assert t == {"run_init": 2.631944, "init_start": 2.7, "modules_loaded": 2.9, "agent_exec": 2.95, "mark": 9.0}


def test_the_profile_prints_every_phase_of_both_kinds():
    phase = {"median": 0.1, "min": 0.05, "max": 0.2}
    prof = {"repeats": 3, "load_avg": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0], "clock_uncertainty_s": 0.002,
            "cold": {k: phase for k in (*COLD_PHASES, "total")}, "warm": {k: phase for k in (*WARM_PHASES, "total")},
            "initcalls": {"builtin_total_ms": 1234.0, "slowest": [{"initcall": "acpi_init", "ms": 132.0}],
                          "modules": [{"initcall": "virtio_init", "module": "virtio", "ms": 0.3}]}}
    text = format_profile(prof)
    for k in (*COLD_PHASES, *WARM_PHASES):
        assert f"  {k} " in text
    assert "acpi_init" in text and "virtio (virtio_init)" in text and "+-2.0 ms" in text
