"""vmlab's KVM path for real, where the host's KVM cannot run guests: vmlab inside vmlab.

ONE nested guest (TCG here, AMD-V emulated) boots with the host's root shared read-only
(vmlab.vm.inner.run_inside); in a chroot of it the host's Python runs
tests/helpers/kvm_inner_checks.py under VMLAB_ACCEL=kvm, which boots lesson guests under the
nested guest's real KVM and prints one JSON report. Each test asserts a part of it, so a
broken accelerator probe, query-stats parsing, exit counting or KVM experiment row fails
here. Counts and verdicts, never times.

The tests without a VM check what the nested run is made of (the read-only share, the
spec flag, the chroot command) and the recorded nested-KVM device rows.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest

from vmlab import MachineSpec
from vmlab.errors import SpecError
from vmlab.vm.inner import (
    HOST,
    INNER,
    TCG_INNER_CPU,
    host_tmp_dirs,
    inner_command,
    inner_env,
    inner_spec,
    run_inside,
    setup_script,
)
from vmlab.vm.qemu import build_launch, kernel_cmdline

CHECKS = Path(__file__).resolve().parent / "helpers" / "kvm_inner_checks.py"


def launch_argv(spec: MachineSpec) -> list:
    return build_launch(spec.validated(), accel="tcg", kernel=Path("/k"), initrd=Path("/i"), qmp_fd=3, agent_fd=4,
                        console_fd=5, private_dir=Path("/"), disk_paths=[], nic_fds=[]).argv


# ------------------------------------------------------------------ no VM
def test_host_root_is_only_for_nested_guests():
    with pytest.raises(SpecError) as e:
        MachineSpec(host_root=True).validated()
    assert e.value.field == "host_root" and "nested=True" in e.value.fix
    with pytest.raises(SpecError):
        MachineSpec(nested=True, host_root="yes").validated()


def test_the_host_root_is_shared_read_only_and_sandboxed():
    argv = launch_argv(inner_spec())
    share = argv[argv.index("-virtfs") + 1]
    assert share.startswith("local,path=/,") and "readonly=on" in share.split(",")
    assert "security_model=none" in share
    assert "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" in argv   # -sandbox on
    assert argv[argv.index("-cpu") + 1] == TCG_INNER_CPU
    assert "9pnet_virtio" in kernel_cmdline(inner_spec().validated())
    # never in a lesson guest, nested or not
    for spec in (MachineSpec(), MachineSpec(nested=True)):
        assert "-virtfs" not in launch_argv(spec) and "9p" not in kernel_cmdline(spec.validated())


def test_the_inner_run_mounts_the_host_read_only_and_writes_only_to_its_own_disk():
    from vmlab.image import ensure_image
    script = setup_script(ensure_image())
    mount9p = [line for line in script.splitlines() if "-t 9p" in line]
    assert len(mount9p) == 1 and ",ro " in mount9p[0]
    assert f"mount -t ext4 /dev/vda {HOST}/tmp" in script          # the nested guest's scratch disk
    assert [d.bus for d in inner_spec().validated().disks] == ["virtio"] and not inner_spec().disks[0].path
    env = inner_env()
    assert env["VMLAB_ACCEL"] == "kvm" and env["VMLAB_CACHE"].startswith(INNER + "/")
    words = shlex.split(inner_command(["-m", "vmlab", "doctor"], env).split("&&", 1)[1])
    assert words[:4] == ["chroot", HOST, "/usr/bin/env", "-i"] and words[-3:] == ["-m", "vmlab", "doctor"]


def test_what_the_run_needs_from_the_hosts_tmp_is_bound_back_over_the_scratch_disk():
    # a clone or a venv under /tmp (as CI's clean clone) is hidden by the chroot's scratch /tmp: bound back
    assert host_tmp_dirs(["/tmp/ci5/.venv", "/tmp/ci5", "/root/.cache/vmlab", "/tmp", "/tmpx/a"]) == ["/tmp/ci5"]
    from vmlab.image import ensure_image
    lines = setup_script(ensure_image(), ["/tmp/ci5"]).splitlines()
    scratch = next(i for i, line in enumerate(lines) if f"mount -t ext4 /dev/vda {HOST}/tmp" in line)
    keep = next(i for i, line in enumerate(lines) if f"mount -o bind {HOST}/tmp /hosttmp" in line)
    bind = next(i for i, line in enumerate(lines) if f"mount -o bind /hosttmp/ci5 {HOST}/tmp/ci5" in line)
    assert keep < scratch < bind         # the host's /tmp kept aside, then hidden, then the clone bound back


def test_sharing_run_on_needs_started_vms():
    # the sharing row inside the nested guest reuses a running guest; a VM not started is a clear error
    from vmlab import VM
    from vmlab.experiments import sharing
    for vms in ([], [VM()]):
        with pytest.raises(SpecError) as e:
            sharing.run_on(vms)
        assert e.value.field == "vms" and "start()" in e.value.fix


def test_recorded_nested_kvm_device_rows():
    from vmlab.experiments.inside import EXIT_COLUMNS, device_exits_table, nested_kvm_device_rows
    df = nested_kvm_device_rows()
    assert set(df.contrast) == {"disk", "console"}
    assert (df.accel == "kvm").all() and (df.outer_accel == "tcg").all() and (df.kvm_note == "").all()
    assert df["kvm_exits"].map(lambda x: isinstance(x, (int, float)) and x > 0).all(), df
    for contrast, where in df.attrs["where"].items():
        assert where["inner_accel"] == "kvm" and where["qemu"] and where["date"] and where["load_before"], contrast
    t = device_exits_table(df)
    assert list(t.columns) == EXIT_COLUMNS
    by = t.set_index(["device", "workload"])
    for mode in ("read", "write"):
        ide, virtio = by.loc[("ide-pio", f"{mode} seq 64 KiB")], by.loc[("virtio-blk", f"{mode} seq 64 KiB")]
        # IDE in PIO mode moves data through I/O ports: VM exits; virtio-blk's kicks are ioeventfds, no I/O exit
        assert ide["kvm_io_exits_per_mb"] > 1000 and virtio["kvm_io_exits_per_mb"] + virtio["kvm_mmio_exits_per_mb"] < 100
        assert ide["kvm_exits_per_mb"] > 4 * virtio["kvm_exits_per_mb"]
    # string I/O: a read (rep insl) fetches up to 1,024 bytes per exit, QEMU replays it element by element into
    # the device model; a write (rep outsl) exits once per 4-byte element, one device call each
    read, write = by.loc[("ide-pio", "read seq 64 KiB")], by.loc[("ide-pio", "write seq 64 KiB")]
    assert read["device_calls_per_mb"] > 10 * read["kvm_io_exits_per_mb"]
    assert write["kvm_io_exits_per_mb"] == pytest.approx(write["device_calls_per_mb"], rel=0.1)
    con = t[t.contrast == "console"].set_index("device")
    assert con.loc["uart", "kvm_io_exits_per_mb"] > 1e5          # an outb per byte written: at least one exit each
    assert con.loc["virtio-console", "kvm_io_exits_per_mb"] < 100


# ------------------------------------------------------------------ inside the nested guest
@pytest.fixture(scope="module")
def report(image):
    run = run_inside([str(CHECKS)], timeout=900, image=image)
    assert run.ok, (run.rc, run.stderr[-3000:])
    data = json.loads(run.stdout.strip().splitlines()[-1])
    data["_run"] = {"phases": run.phases, "where": run.where}
    if os.environ.get("VMLAB_KVM_INNER_REPORT"):           # keep the whole report (docs/kvm.md quotes it)
        Path(os.environ["VMLAB_KVM_INNER_REPORT"]).write_text(json.dumps(data, indent=1, default=str))
    return data


def part(report, name):
    got = report[name]
    assert "error" not in got, got.get("traceback", got)
    return got


@pytest.mark.integration
def test_the_uncached_probe_proves_kvm_inside(report):
    probe = part(report, "probe")
    assert probe["usable"] is True and probe["cached"] is False, probe
    assert probe["accel"] == "kvm" and probe["reason"].startswith("a guest booted under KVM in "), probe
    assert probe["fix"] == ""
    assert report["_run"]["where"]["outer_accel"] in ("tcg", "kvm")


@pytest.mark.integration
def test_the_inner_guest_runs_under_kvm_on_kvm_clock(report):
    assert part(report, "vm")["accel"] == "kvm"
    clock = part(report, "clock")
    assert clock["current"] == "kvm-clock" and "kvm-clock" in clock["available"], clock


@pytest.mark.integration
@pytest.mark.parametrize("kind, small, big", [("reads", 2048, 8192), ("writes", 1024, 4096)])
def test_query_stats_io_exits_count_port_io(report, kind, small, big):
    ex = part(report, "exits")
    assert {"exits", "io_exits", "mmio_exits", "halt_exits"} <= set(ex["names"]), ex["names"]
    # one inb (outb) per byte read from (written to) /dev/port, to ports with no device: one I/O exit each,
    # and the agent's round trip adds none (idle: a handful at most)
    for n in (small, big):
        got = ex[f"{kind}_{n}"]
        assert n <= got["io_exits"] < n + 20, (n, got)
        assert got["exits"] >= got["io_exits"], (n, got)
    assert ex[f"{kind}_{big}"]["io_exits"] - ex[f"{kind}_{small}"]["io_exits"] >= (big - small) * 0.99, ex


@pytest.mark.integration
def test_query_stats_io_exits_stay_still_while_the_guest_idles(report):
    ex = part(report, "exits")
    idle = ex["idle"]
    # the same agent round trip, no port reads: a handful of I/O exits, not thousands
    assert idle["io_exits"] < 100 < ex["reads_2048"]["io_exits"], ex
    assert idle["halt_exits"] > 0, ex            # idle is spent halted, each halt an exit KVM counts


@pytest.mark.integration
def test_cpu_experiment_kvm_rows(report):
    rows = part(report, "cpu")["rows"]
    assert {r["benchmark"] for r in rows} == {"null_syscall", "rdtsc"}
    for r in rows:
        assert r["platform"] == "kvm" and r["accel"] == "kvm", r
        assert isinstance(r["ns_per_op"], (int, float)) and math.isfinite(r["ns_per_op"]) and r["ns_per_op"] > 0, r


@pytest.mark.integration
def test_steal_time_is_reported_when_the_vcpu_core_is_contended(report):
    steal = part(report, "steal")
    # a hog pinned on the vCPU thread's core: the KVM guest sees the stolen time (TCG guests never do)
    assert steal["hog"]["steal_ticks"] > 0, steal
    assert steal["hog"]["steal_ticks"] > steal["alone"]["steal_ticks"], steal


@pytest.mark.integration
def test_sharing_experiment_kvm_row(report):
    # the sharing experiment's step (vmbench spin, what the host saw of the vCPU thread) on the inner guest
    [r] = part(report, "sharing")["rows"]
    assert r["accel"] == "kvm" and r["vms"] == 1, r
    assert r["per_vm_ops_s"] > 0 and r["total_ops_s"] == r["per_vm_ops_s"], r
    assert r["vcpu_cpu_s"] > 0 and r["host_rss_mb"] > 0 and r["guest_mem_mb"] == r["memory_mb"], r
    assert 0 < r["cores_used"] <= 1.0, r              # one vCPU thread: at most one core's worth of the job
    assert isinstance(r["steal_ticks"], int) and r["steal_ticks"] >= 0, r
    assert r["start_s"] == pytest.approx(part(report, "vm")["boot_seconds"]), r


@pytest.mark.integration
def test_disk_row_under_kvm_has_exits_and_device_calls(report):
    dev = part(report, "device")
    assert part(report, "vm")["accel"] == "kvm"
    [r] = dev["rows"]
    assert r["device"] == "ide-pio" and r["bytes"] == 256 << 10, r
    assert r["kvm_note"] == "" and r["kvm_exits"] == dev["exit_counts"]["exits"], r
    assert r["kvm_io_exits"] == dev["exit_counts"]["io_exits"], r
    assert r["kvm_exits_per_mb"] == pytest.approx(r["kvm_exits"] / (r["bytes"] / 1e6)), r
    # PIO reads are string I/O (rep insl): KVM fetches up to 1,024 bytes per exit, so 256 KiB need at least
    # 256 I/O exits; QEMU replays each exit into the device model one 4-byte element at a time, so the
    # trace counts a call per element: 65,536 for 256 KiB, far more than the exits
    assert r["kvm_io_exits"] >= 256, r
    assert r["device_calls"] >= (256 << 10) // 4, r
    assert r["device_calls"] > 10 * r["kvm_io_exits"], r
