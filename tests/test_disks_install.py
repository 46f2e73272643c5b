"""Virtual disks (qemu-img helpers) and installing the guest onto an ext4 disk."""

from __future__ import annotations

import itertools
import os
import stat

import pytest

from vmlab import VM, disks, install
from vmlab.errors import SpecError
from vmlab.experiments import thin

MiB = 1 << 20


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# ------------------------------------------------------------ host side only
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_image_is_private_and_thin(tmp_path, fmt):
    old = os.umask(0o022)
    try:
        p = disks.create_image(tmp_path / f"d.{fmt}", "256M", fmt)
    finally:
        os.umask(old)
    assert mode(p) == 0o600
    i = disks.info(p)
    assert i["format"] == fmt
    assert i["virtual_size"] == 256 * MiB
    assert i["actual_size"] < 4 * MiB          # thin: nothing allocated yet


def test_create_image_refuses_to_clobber_and_bad_input(tmp_path):
    p = disks.create_image(tmp_path / "a.qcow2", 16)
    with pytest.raises(SpecError):
        disks.create_image(p, 16)
    disks.create_image(p, 32, overwrite=True)
    assert disks.virtual_bytes(p) == 32 * MiB
    with pytest.raises(SpecError):
        disks.create_image(tmp_path / "b.vmdk", 16, "vmdk")
    with pytest.raises(SpecError):
        disks.create_image(tmp_path / "c.raw", "lots")
    with pytest.raises(SpecError):
        disks.info(tmp_path / "missing.qcow2")


def test_overlay_and_snapshots_host_side(tmp_path):
    base = disks.create_image(tmp_path / "base.qcow2", "16M")
    disks.host_write(base, 0, b"GOLDEN")
    h = disks.sha256(base)
    top = disks.create_overlay(base, tmp_path / "top.qcow2")
    assert mode(top) == 0o600
    assert disks.info(top)["backing"].endswith("base.qcow2")
    assert disks.host_read(top, 0, 6) == b"GOLDEN"           # reads fall through
    disks.host_write(top, 0, b"CHANGE")
    assert disks.host_read(top, 0, 6) == b"CHANGE"
    assert disks.host_read(base, 0, 6) == b"GOLDEN"
    assert disks.sha256(base) == h
    # internal snapshot, change, revert
    disks.snapshot_create(base, "clean")
    disks.host_write(base, 0, b"BROKEN")
    assert disks.snapshot_list(base) == ["clean"]
    disks.snapshot_apply(base, "clean")
    assert disks.host_read(base, 0, 6) == b"GOLDEN"
    assert disks.check(base)["ok"] is True
    with pytest.raises(SpecError):
        disks.snapshot_apply(base, "nope")
    raw = disks.create_image(tmp_path / "r.raw", 16, "raw")
    with pytest.raises(SpecError):
        disks.snapshot_create(raw, "x")
    assert disks.check(raw)["ok"] is None


def test_install_tree_and_host_configuration(tmp_path, image):
    cfg = install.GuestConfig(hostname="web1", http_port=8088)
    d = install.install_guest(tmp_path / "root.ext4", cfg, image=image)
    assert mode(d) == 0o600
    assert disks.fsck_ext4(d)["ok"]
    assert disks.ext4_read(d, "/etc/hostname") == b"web1\n"
    assert b"httpd -p 80" in disks.ext4_read(d, "/etc/vmlab/rc.local")
    assert disks.ext4_read(d, "/init") is not None
    assert disks.ext4_read(d, "/no/such/file") is None
    install.configure_disk(d, {"/etc/hostname": "web2\n", "/opt/new/thing.txt": b"x"})
    assert disks.ext4_read(d, "/etc/hostname") == b"web2\n"
    assert disks.ext4_read(d, "/opt/new/thing.txt") == b"x"
    assert disks.fsck_ext4(d)["ok"]          # debugfs left the file system consistent
    with pytest.raises(SpecError):
        install.GuestConfig(hostname="Not Valid").validated()
    with pytest.raises(SpecError):
        install.GuestConfig(http_port=80).validated()


# ----------------------------------------------------------- with a guest
@pytest.mark.integration
def test_qcow2_allocation_grows_with_guest_writes(tmp_path, image):
    df = thin.measure_thin_provisioning(24, 8, virtual_size="128M", directory=tmp_path, image=image)
    alloc = df.sort_values("written_mib")["allocated_mib"].tolist()
    assert alloc[0] < 2                                       # empty image: metadata only
    assert all(b > a for a, b in itertools.pairwise(alloc))  # grows with every write
    assert alloc[-1] >= 24                                    # at least what was written
    assert alloc[-1] < df["virtual_mib"].iloc[0] / 2          # far below the virtual size
    assert (df["virtual_mib"] == 128).all()


@pytest.mark.integration
def test_overlay_leaves_base_unchanged(tmp_path, image):
    r = thin.measure_overlay(4, directory=tmp_path, image=image)
    assert r["guest_saw_base_data"] == "GOLDEN-BASE"
    assert r["guest_read_after_write"] == "CHANGED-BY-VM"
    assert r["base_unchanged"] and r["base_sha256_before"] == r["base_sha256_after"]
    assert r["overlay_bytes_after"] - r["overlay_bytes_before"] >= 4 * MiB
    assert r["overlay_check"] is True


@pytest.mark.integration
def test_installed_disk_boots_and_keeps_config_across_reboot(tmp_path, image):
    port = install.free_port()
    cfg = install.GuestConfig(hostname="web1", http_port=port)
    d = install.install_guest(tmp_path / "web1.ext4", cfg, image=image)
    with VM(install.boot_spec(d, cfg), image=image) as vm:
        s1 = install.guest_state(vm, port)
        assert s1["hostname"] == "web1"
        assert s1["root"] == "/dev/vda ext4"                  # running from the disk, not the initramfs
        assert s1["address"] == "10.0.2.15/24"
        assert "Hello from web1" in s1["http"]
        vm.run("echo kept > /etc/from-guest")
        install.reboot_from_inside(vm)
        s2 = install.guest_state(vm, port)
        assert s2["boots"] == s1["boots"] + 1                 # it really booted again
        assert s2["hostname"] == "web1" and "Hello from web1" in s2["http"]
        assert vm.run("cat /etc/from-guest").stdout == "kept\n"
        names = [e["event"] for e in vm.events]
        assert "RESET" in names and names.count("READY") >= 2
        vm.powerdown()
        vm.wait_exit(60)
    assert disks.fsck_ext4(d)["ok"]
    assert disks.ext4_read(d, "/etc/from-guest") == b"kept\n"
