"""Containers vs VMs (vmlab.experiments.nscontainer / containers): a hand-made container (namespaces +
cgroups, no engine) and a real TCG guest. Checks what each one sees and what survives a kernel fault,
counts and order, never how long anything took.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from vmlab.experiments import REGISTRY, containers
from vmlab.experiments.nscontainer import Container, cgroup_setup
from vmlab.hostview import native_vmbench

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making namespaces and cgroups needs root")


def container_processes() -> list[int]:
    """Processes whose root is a vmlab container directory (there must be none after a run)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if "vmlab-ctr-" in os.readlink(d / "root"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def test_registered():
    assert REGISTRY["containers"] == "vmlab.experiments.containers"


def test_container_sees_its_own_pids_mounts_and_network_but_the_host_kernel():
    with Container(vmbench=native_vmbench()) as c:
        out = c.run(["/bin/sh", "-c", containers.PROBE]).stdout
    seen = containers._probe_lines(out)
    assert seen["pid"] == "1"                                # its own PID namespace
    assert int(seen["processes"]) < 10                       # sees only itself
    assert seen["mounts"] == "1"                             # only its /proc
    assert seen["interfaces"].split() == ["lo"]              # its own network namespace
    assert seen["kernel"] == platform.release()              # ... on the host's kernel
    assert seen["boot_id"] == boot_id()


def test_memory_limit_is_enforced_where_cgroups_allow():
    if cgroup_setup()["mode"] == "none":
        pytest.skip(cgroup_setup()["why"])
    with Container(memory_mb=32, vmbench=native_vmbench()) as c:
        assert c.cgroup_mode in ("v1", "v2") and c.cgroups
        small = c.run(["/bin/vmbench", "touch", "--mb", "8"])
        big = c.run(["/bin/vmbench", "touch", "--mb", "128"])
    assert small.returncode == 0
    assert big.returncode != 0                               # the kernel killed it at the limit


@pytest.mark.integration
def test_experiment_rows_and_the_fault_stays_in_the_vm(image):
    df = containers.run(quick=True, image=image, spawns=3)
    assert list(df["kind"].drop_duplicates()) == ["startup", "memory", "nanobench", "isolation", "fault"]
    st = df[df["kind"] == "startup"]
    assert list(st["platform"]) == ["host", "container", "vm", "vm"]
    nb = df[df["kind"] == "nanobench"]
    assert sorted(zip(nb["platform"], nb["benchmark"], strict=True)) == sorted(
        (p, b) for p in containers.PLATFORMS for b in ("null_syscall", "page_fault"))
    iso = containers.isolation_table(df)
    assert iso.loc["kernel", "container"] == iso.loc["kernel", "host"] != iso.loc["kernel", "vm"]
    assert iso.loc["boot_id", "container"] == iso.loc["boot_id", "host"] != iso.loc["boot_id", "vm"]
    assert iso.loc["pid", "container"] == "1"
    fault = df[df["kind"] == "fault"].set_index("platform")
    assert not fault.loc["vm", "kept_running"] and "Kernel panic" in fault.loc["vm", "evidence"]
    assert fault.loc["container", "kept_running"] and fault.loc["host", "kept_running"]
    assert {"accel", "qemu", "host_kernel", "measured_at", "cgroup_mode"} <= set(df.columns)
    assert container_processes() == []                       # the container's counter died with it
