"""CPU and platform virtualization: nanobenchmarks native vs TCG (vmlab.experiments.cpu),
clocksources, the memory balloon and guest awareness (vmlab.experiments.clocks, balloon, awareness).

Direction and sanity only (ratios with wide margins); figures live in benchmarks/cpu.py.

KVM: where the host's KVM cannot boot guests (these machines: PVM), the tests assert the
documented fallback exactly -- the probe, run without its cache, says not usable and why, and
the experiments carry that reason instead of KVM rows. The KVM rows themselves (and kvm-clock)
are asserted where KVM is real, inside a nested guest: tests/test_kvm_inner.py.
"""

from __future__ import annotations

import math

import pytest

from vmlab.errors import SetupError, SpecError
from vmlab.experiments import cpu

ALL = set(cpu.BENCHMARKS)


def finite_positive(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def host_without_kvm():
    """The host's own (remembered) KVM verdict, where it is NOT usable; the fallback tests skip elsewhere."""
    from vmlab.vm import kvm_verdict
    verdict = kvm_verdict()
    if verdict["usable"]:
        pytest.skip("KVM boots guests on this host: its rows are real (tests/test_kvm_inner.py checks KVM rows)")
    return verdict


@pytest.mark.integration
def test_the_uncached_probe_says_why_host_kvm_is_not_usable(host_without_kvm):
    from vmlab.hostinfo import host_virtualization
    from vmlab.vm import kvm_device_problem, kvm_verdict
    v = kvm_verdict(use_cache=False)            # boots a guest under the host's KVM again (at most 12 s)
    assert v["accel"] == "kvm" and v["usable"] is False and v["cached"] is False, v
    problem = kvm_device_problem()
    if problem:                                 # no /dev/kvm at all: said without booting
        assert v["reason"] == problem and v["seconds"] == 0.0
    else:
        assert v["fix"] == "nothing to fix for the lessons: they run under TCG (slower, same lessons)"
        assert v["reason"] and v["seconds"] > 0, v
        if host_virtualization().get("pvm_host"):
            assert v["reason"].endswith("; the host KVM is PVM (kvm_pvm module), which runs only guests built "
                                        "for PVM, and this host is itself a VM"), v
    assert kvm_verdict()["reason"] == v["reason"]    # and it is what the next caller is told


# ------------------------------------------------------------------ no VM
def test_options_are_checked_before_anything_runs():
    with pytest.raises(SpecError) as e:
        cpu.check_options(["null_syscall", "warp_drive"])
    assert e.value.field == "benchmarks" and "warp_drive" in str(e.value)
    with pytest.raises(SpecError):
        cpu.check_options(None, repeats=0)
    with pytest.raises(SpecError):
        cpu.check_options(None, scale=-1)
    assert cpu.check_options("compute, rdtsc") == ["compute", "rdtsc"]


def test_missing_gcc_is_a_setup_error_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path))
    import vmlab.image.guesttools as guesttools
    monkeypatch.setattr(guesttools.shutil, "which", lambda name: None)
    with pytest.raises(SetupError) as e:
        cpu.native_vmbench()
    assert "gcc" in str(e.value) and "apt-get install gcc" in (e.value.fix or "")


def test_native_run_every_benchmark():
    data = cpu.run_native(repeats=3, scale=0.02)
    res = {r["benchmark"]: r for r in data["results"]}
    assert set(res) == ALL
    for name, r in res.items():
        if r.get("skipped"):
            # only port_io may be skipped natively (this host kernel lacks ioperm), with the reason
            assert name == "port_io" and r["skipped"].startswith("ioperm"), r
            continue
        assert finite_positive(r["ns_per_op"]), r
        assert r["ns_min"] <= r["ns_per_op"] <= r["ns_max"]


def test_ratios_and_tables_from_rows():
    import pandas as pd
    df = pd.DataFrame([
        {"benchmark": "null_syscall", "platform": "native", "ns_per_op": 100.0, "cycles_per_op": 260.0},
        {"benchmark": "null_syscall", "platform": "tcg", "ns_per_op": 300.0, "cycles_per_op": 780.0},
        {"benchmark": "port_io", "platform": "native", "ns_per_op": math.nan, "cycles_per_op": math.nan},
        {"benchmark": "port_io", "platform": "tcg", "ns_per_op": 40.0, "cycles_per_op": 100.0},
    ])
    df = cpu.add_ratios(df)
    assert df.loc[1, "ratio_to_native"] == pytest.approx(3.0)
    assert math.isnan(df.loc[3, "ratio_to_native"])     # no native figure: no invented ratio
    pt = cpu.paper_table(df)
    row = pt[pt.vmbench == "port_io"].iloc[0]
    assert row["paper"] == "in" and row["paper_native"] == "3209"
    assert row["paper_software_vmm"].endswith("times_faster_than_native")
    assert set(pt.paper_verified) <= {"secondary", "yes", ""}


def test_best_round_is_kept_per_benchmark():
    a = {"results": [{"benchmark": "compute", "ns_per_op": 2.0}, {"benchmark": "port_io", "skipped": "ioperm"}]}
    b = {"results": [{"benchmark": "compute", "ns_per_op": 1.5}, {"benchmark": "port_io", "skipped": "ioperm"}]}
    best = {r["benchmark"]: r for r in cpu._best_rounds([a, b])["results"]}
    assert best["compute"]["ns_per_op"] == 1.5 and best["compute"]["round"] == 2
    assert best["port_io"]["skipped"] == "ioperm"


# ------------------------------------------------------------------ real guests
@pytest.fixture(scope="module")
def cpu_df(image):
    return cpu.run(quick=True, image=image, repeats=7, scale=0.05, rounds=2)   # alternating rounds, many repeats


@pytest.mark.integration
def test_cpu_experiment_without_host_kvm_has_no_kvm_rows_and_says_why(cpu_df, host_without_kvm):
    assert set(cpu_df.platform) == {"native", "tcg"}
    assert cpu_df.attrs["kvm"]["usable"] is False
    assert cpu_df.attrs["kvm"]["reason"] == host_without_kvm["reason"]
    assert f"no KVM rows: KVM is not available on this host ({host_without_kvm['reason']})" in cpu_df.attrs["notes"]


@pytest.mark.integration
def test_cpu_experiment_native_vs_tcg(cpu_df):
    df = cpu_df
    for col in ("benchmark", "platform", "ns_per_op", "ratio_to_native", "ns_min", "ns_max", "ns_cv",
                "cycles_per_op", "ran_on", "accel", "qemu", "host_cpu"):
        assert col in df.columns, col
    tcg = df[df.platform == "tcg"].set_index("benchmark")
    assert set(tcg.index) == ALL
    # every nanobenchmark yields positive, finite values in the guest (port_io included)
    for b, r in tcg.iterrows():
        assert not r["skipped"], (b, r["skipped"])
        assert finite_positive(r["ns_per_op"]) and finite_positive(r["cycles_per_op"]), (b, r)
        assert r["ns_min"] <= r["ns_per_op"] <= r["ns_max"]
    # the native side ran every benchmark too, and the ratio column relates the two rows of one benchmark
    # (how much slower TCG is -- binary translation pays on privileged operations, Adams & Agesen -- is a
    # timing figure: benchmarks/cpu.py measures it against targets.toml, tcg_vs_native_*)
    nat = df[df.platform == "native"].set_index("benchmark")
    ran = nat[~nat["skipped"].astype(bool)]
    assert {"null_syscall", "page_fault", "fork_wait", "compute"} <= set(ran.index), nat["skipped"]
    for b in ran.index:
        assert finite_positive(ran.loc[b, "ns_per_op"]), (b, ran.loc[b])
        assert tcg.loc[b, "ratio_to_native"] == pytest.approx(tcg.loc[b, "ns_per_op"] / ran.loc[b, "ns_per_op"]), b


# ------------------------------------------------------------------ platform: no VM
def test_balloon_target_is_checked():
    from types import SimpleNamespace

    from vmlab import MachineSpec
    from vmlab.experiments.balloon import _check_target
    vm = SimpleNamespace(spec=MachineSpec(memory=256, balloon=True).validated())
    assert _check_target(vm, 128) == 128 << 20
    for bad in (300, 10, float("nan"), "128", True):
        with pytest.raises(SpecError):
            _check_target(vm, bad)
    with pytest.raises(SpecError) as e:
        _check_target(SimpleNamespace(spec=MachineSpec(memory=256).validated()), 128)
    assert "balloon=True" in e.value.fix


def test_dmesg_lines_pick_the_awareness_lines():
    from vmlab.experiments.awareness import _dmesg_lines
    text = ("[    0.000000] Hypervisor detected: KVM\n[    0.01] random line\n"
            "[    0.032411] Booting paravirtualized kernel on bare hardware\n")
    assert _dmesg_lines(text) == ["Hypervisor detected: KVM", "Booting paravirtualized kernel on bare hardware"]


# ------------------------------------------------------------------ platform: real guests
@pytest.mark.integration
def test_hpet_reads_cost_more_than_tsc_and_trap(image):
    from vmlab import VM
    from vmlab.experiments.clocks import CLOCK_TRACE, clock_costs, clocksources, quiet_trace
    with VM(accel="tcg", name="clocks", trace=CLOCK_TRACE, image=image) as vm:
        quiet_trace(vm, False)
        df = clock_costs(vm, sources=("tsc", "hpet", "acpi_pm", "kvm-clock"), repeats=3, scale=0.002)
        assert clocksources(vm)[0] in ("tsc", "tsc-early")        # restored afterwards
    d = df.set_index("clocksource")
    assert not d.loc["kvm-clock", "available"] and "TCG" in d.loc["kvm-clock", "note"]
    assert d.loc["hpet", "available"], d.loc["hpet", "offered"]
    hpet = d.loc["hpet", "ns_per_read"]
    if d.loc["tsc", "available"]:
        fast, fast_name = d.loc["tsc", "ns_per_read"], "tsc"
    else:   # the guest did not offer tsc: compare with the fastest clocksource it did offer
        avail = d[d.available & (d.index != "hpet")]
        fast_name = avail.ns_per_read.idxmin()
        fast = avail.ns_per_read.min()
        print(f"tsc not offered by the guest ({d.loc['tsc', 'note']}); comparing hpet with {fast_name}")
    assert finite_positive(hpet) and finite_positive(fast)
    # (how much slower an HPET read is, is a timing figure: benchmarks/cpu.py, hpet_vs_fastest_clock)
    # every HPET-based clock_gettime is (about) one emulated MMIO read; the TSC needs none: counted
    assert 0.9 <= d.loc["hpet", "traps_per_read"] <= 1.5, d.loc["hpet", "device_reads"]
    assert 0.9 <= d.loc["acpi_pm", "traps_per_read"] <= 1.5, d.loc["acpi_pm", "device_reads"]
    if fast_name == "tsc":
        assert d.loc["tsc", "traps_per_read"] < 0.01


@pytest.mark.integration
def test_balloon_changes_the_guests_memory(image):
    from vmlab.experiments.balloon import run as balloon_experiment
    from vmlab.experiments.balloon import summary as balloon_summary
    df = balloon_experiment(quick=True, memory=256, low_mb=128, touch_mb=100, image=image)
    s = balloon_summary(df).set_index("phase")
    before = s.loc["booted", "guest_total_mb"]
    inflated = s.loc["inflated to 128 MiB", "guest_total_mb"]
    deflated = s.loc["deflated to 256 MiB", "guest_total_mb"]
    assert s.loc["inflated to 128 MiB", "balloon_actual_mb"] == pytest.approx(128, abs=2)
    # the guest sees less memory after inflation (128 MiB taken by the balloon), and gets it back
    assert before - inflated > 100, (before, inflated)
    assert deflated > inflated + 100, (inflated, deflated)
    # the host gets memory back: QEMU discards the (touched) pages the guest handed over
    assert s.loc["touched 100 MiB", "qemu_rss_mb"] - s.loc["inflated to 128 MiB", "qemu_rss_mb"] > 50


@pytest.fixture(scope="module")
def aware_df(image):
    from vmlab.experiments.awareness import run as awareness_experiment
    return awareness_experiment(image=image)        # KVM rows where the probe proves KVM, else why not


@pytest.mark.integration
def test_guest_awareness_without_host_kvm_has_no_kvm_rows_and_says_why(aware_df, host_without_kvm):
    assert list(aware_df.accel) == ["none", "tcg", "tcg"]
    assert aware_df.attrs["notes"] == [f"no KVM rows: KVM is not available on this host ({host_without_kvm['reason']})"]


@pytest.mark.integration
def test_guest_awareness_tcg_default_and_hidden(aware_df):
    from vmlab.hostinfo import host_virtualization
    df = aware_df
    host, tcg, hidden = (df.iloc[i] for i in range(3))
    assert bool(host.hypervisor_bit) == bool(host_virtualization()["cpuid_hypervisor_flag"])
    # under TCG Linux recognises no hypervisor it knows: "bare hardware", no "Hypervisor detected"
    assert tcg.kernel_says.endswith("on bare hardware") and not tcg.hypervisor_detected
    assert tcg.hypervisor_bit and tcg.hypervisor_vendor == "TCGTCGTCGTCG"
    # with the bit hidden, the CPU says nothing at all
    assert not hidden.hypervisor_bit and not hidden.cpuinfo_hypervisor_flag
    assert hidden.kernel_says.endswith("on bare hardware")
