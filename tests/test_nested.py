"""Nested guests: KVM inside a guest (MachineSpec(nested=True)), and hv's exit counts there.

One nested guest boots (warm: later starts restore its snapshot) and runs hv's guest
programs; the tests check the exact exit counts. Counts, never times.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vmlab import VM, MachineSpec
from vmlab.errors import SpecError
from vmlab.experiments.exits import parse_hv
from vmlab.vm.qemu import build_launch, kernel_cmdline, nested_cpu_model

PROGRAMS = [("nothing", 1), ("out", 10), ("out", 1000), ("outs", 100), ("ins", 1000), ("ins", 1025),
            ("ins", 10000), ("mmio", 100), ("cpuid", 1000), ("hlt", 100), ("rdtsc", 1000),
            ("priv", 1000), ("cr3", 1000), ("sgdt", 1000), ("pf", 100)]


def test_nested_must_be_true_or_false():
    with pytest.raises(SpecError) as e:
        MachineSpec(nested="yes").validated()
    assert e.value.field == "nested" and "True or False" in e.value.fix


def test_nested_launch_has_a_cpu_with_virtualization():
    spec = MachineSpec(nested=True).validated()
    assert "vmlab.nested=1" in kernel_cmdline(spec)
    assert "vmlab.nested" not in kernel_cmdline(MachineSpec().validated())
    assert nested_cpu_model("tcg") == "qemu64,+svm,+npt" and nested_cpu_model("kvm") == "host"
    argv = build_launch(spec, accel="tcg", kernel=Path("/k"), initrd=Path("/i"), qmp_fd=3, agent_fd=4,
                        console_fd=5, private_dir=Path("/"), disk_paths=[], nic_fds=[]).argv
    assert argv[argv.index("-cpu") + 1] == "qemu64,+svm,+npt"
    assert "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" in argv   # still sandboxed
    own = build_launch(spec.with_(cpu_model="EPYC"), accel="tcg", kernel=Path("/k"), initrd=Path("/i"),
                       qmp_fd=3, agent_fd=4, console_fd=5, private_dir=Path("/"), disk_paths=[], nic_fds=[]).argv
    assert own[own.index("-cpu") + 1] == "EPYC"


@pytest.fixture(scope="module")
def nested(image):
    spec = MachineSpec(name="t-nested", nested=True)
    out = {}
    with VM(spec, image=image, warm=True) as vm:
        out["state"] = dict(vm.nested_kvm)
        out["accel"] = vm.accel
        out["modules"] = vm.run("cat /proc/modules").stdout
        out["cpuinfo"] = vm.run("grep -m1 '^flags' /proc/cpuinfo").stdout
        out["hv"] = {(p, n): parse_hv(vm.run(f"hv {p} {n}", check=False).stdout) for p, n in PROGRAMS}
    # a second start restores the warm snapshot the first one saved (or restored)
    with VM(spec, image=image, warm=True) as vm:
        out["second"] = {"restored": vm.warm_restored, "state": dict(vm.nested_kvm),
                         "hv": parse_hv(vm.run("hv out 10").stdout)}
    return out


def user(result, reason):
    return result["exits"].get(reason, 0)


@pytest.mark.integration
def test_kvm_works_inside(nested):
    state = nested["state"]
    assert state["works"] is True, state
    assert state["seconds"] > 0
    if nested["accel"] == "tcg":
        assert " svm" in nested["cpuinfo"] and " npt" in nested["cpuinfo"]
        assert "kvm_amd " in nested["modules"] and state["module"] == "kvm_amd"
    assert "kvm " in nested["modules"]


@pytest.mark.integration
def test_every_program_ran_to_the_done_port(nested):
    for (p, n), r in nested["hv"].items():
        assert r["ok"] is True and r["done_exits"] == 1, (p, n, r.get("error"), r["exits"])
        assert r["kvm_stats"]["exits"] >= sum(r["exits"].values()), (p, n)


@pytest.mark.integration
def test_fixed_overhead_is_one_io_exit(nested):
    r = nested["hv"][("nothing", 1)]
    assert r["exits"] == {"IO": 1}


@pytest.mark.integration
@pytest.mark.parametrize("n", [10, 1000])
def test_n_outs_are_n_io_exits(nested, n):
    r = nested["hv"][("out", n)]
    assert r["exits"] == {"IO": n + 1}          # + the done port
    assert r["serial_out_bytes"] == n and r["result"] == n
    assert r["kvm_stats"]["io_exits"] == n + 1


@pytest.mark.integration
def test_rep_outsb_is_one_exit_per_byte(nested):
    r = nested["hv"][("outs", 100)]
    assert r["exits"] == {"IO": 101} and r["serial_out_bytes"] == 100


@pytest.mark.integration
@pytest.mark.parametrize("n", [1000, 1025, 10000])
def test_rep_insb_is_batched(nested, n):
    r = nested["hv"][("ins", n)]
    io = user(r, "IO") - 1                       # without the done port
    assert r["serial_in_bytes"] == n and r["result"] == n
    assert 1 <= io <= max(1, n // 100), (n, io)
    assert io == math.ceil(n / 1024), (n, io)    # KVM reads ahead at most 1 KiB per exit


@pytest.mark.integration
def test_mmio_is_one_exit_per_access(nested):
    r = nested["hv"][("mmio", 100)]
    assert user(r, "MMIO") == 200 and user(r, "IO") == 1
    assert r["kvm_stats"]["mmio_exits"] == 200
    # the device answers the last value written + 1: sum over k=1..100 of (k + 1)
    assert r["result"] == sum(k + 1 for k in range(1, 101))


@pytest.mark.integration
def test_hlt_exits_to_user_space_each_time(nested):
    r = nested["hv"][("hlt", 100)]
    assert user(r, "HLT") == 100 and user(r, "IO") == 1
    assert r["kvm_stats"]["halt_exits"] == 100


@pytest.mark.integration
@pytest.mark.parametrize("program", ["cpuid", "priv"])
def test_intercepted_and_handled_in_the_kernel(nested, program):
    r = nested["hv"][(program, 1000)]
    base = nested["hv"][("nothing", 1)]["kvm_stats"]["exits"]
    assert r["exits"] == {"IO": 1}               # nothing reaches user space but the done port
    assert r["kvm_stats"]["exits"] - base >= 1000


@pytest.mark.integration
@pytest.mark.parametrize("program", ["rdtsc", "cr3", "sgdt"])
def test_not_intercepted(nested, program):
    r = nested["hv"][(program, 1000)]
    assert r["exits"] == {"IO": 1} and r["result"] == 1000
    assert r["kvm_stats"]["exits"] < 100         # 1000 instructions, a handful of exits (timer, first touches)


@pytest.mark.integration
def test_guest_page_faults_stay_in_the_guest(nested):
    r = nested["hv"][("pf", 100)]
    assert r["result"] == 100                    # the guest's handler ran 100 times
    assert r["exits"] == {"IO": 1} and r["kvm_stats"]["exits"] < 50


@pytest.mark.integration
def test_warm_restore_keeps_kvm_working(nested):
    second = nested["second"]
    assert second["restored"] is True
    assert second["state"]["works"] is True
    assert second["hv"]["exits"] == {"IO": 11}


@pytest.mark.integration
def test_doctor_reports_nested_kvm_apart_from_host_kvm():
    import subprocess
    import sys

    from vmlab.vm import nested_verdict
    fresh = nested_verdict(use_cache=False)          # boots a nested guest under TCG now
    assert fresh["works"] is True and fresh["cached"] is False, fresh
    assert "works, slow" in fresh["reason"]
    out = subprocess.run([sys.executable, "-m", "vmlab", "doctor"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "host KVM" in lines and "nested KVM" in lines, out
    assert "inside a TCG guest: works, slow" in lines["nested KVM"]


@pytest.mark.integration
def test_a_cpu_without_svm_gives_a_verdict_with_the_reason(image):
    with VM(MachineSpec(name="t-nested-nosvm", nested=True, cpu_model="qemu64,-svm"), image=image) as vm:
        state = vm.nested_kvm
    assert state is not None and state["works"] is False and state["module"] == ""
    assert "neither kvm_amd nor kvm_intel" in state["reason"], state
