"""Disks opened with O_DIRECT (cache=none, the default) on a file system that refuses it.

A desktop's $XDG_RUNTIME_DIR is a tmpfs, and tmpfs refuses O_DIRECT before Linux 6.6 (Debian 12 runs 6.1):
QEMU would fail to open a scratch disk made there. ramfs refuses O_DIRECT on every kernel, so it stands in for
that tmpfs here (mounting needs root, as CI has).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import qemu_children

from vmlab import VM, Disk
from vmlab.config import private_root, takes_direct_io
from vmlab.errors import LaunchError
from vmlab.vm.qemu import disk_aio

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a ramfs needs root")


@pytest.fixture
def ramfs(tmp_path):
    d = tmp_path / "ramfs"
    d.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "vmlab-test", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_ramfs_refuses_direct_io_and_the_disk_dir_takes_it(ramfs, tmp_path):
    (ramfs / "f").write_bytes(b"x" * 4096)
    (tmp_path / "f").write_bytes(b"x" * 4096)
    assert takes_direct_io(ramfs / "f") is False
    assert takes_direct_io(tmp_path / "f") is True


def test_a_runtime_dir_without_direct_io_is_passed_over(ramfs, monkeypatch, image):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ramfs))
    assert private_root() != ramfs
    with VM(accel="tcg", image=image, name="directio", disks=[Disk(size="8M", bus="virtio")]) as vm:
        assert vm.private_dir is not None and ramfs not in vm.private_dir.parents
        drive = next(a for a in vm.launch.argv if a.startswith("file="))
        assert "cache=none" in drive and "aio=native" in drive
        out = vm.run("vmbench disk --dev /dev/vda --mode write --pattern seq --bs 65536 --total 1048576 --direct")
        assert re.search(r'"bytes": *1048576', out.stdout), out.stdout
    assert list(ramfs.iterdir()) == []


def test_an_image_without_direct_io_fails_before_qemu_starts(ramfs, image):
    img = ramfs / "disk.raw"
    img.write_bytes(b"\0" * (1 << 20))
    vm = VM(accel="tcg", image=image, name="directio", disks=[Disk(path=img, format="raw")])
    with pytest.raises(LaunchError) as ei:
        vm.start()
    msg = str(ei.value)
    assert "disks[0]" in msg and "O_DIRECT" in msg and str(img) in msg
    assert "cache='writethrough'" in (ei.value.fix or "")
    assert qemu_children() == []
    assert vm.private_dir is None or not Path(vm.private_dir).exists()
    # the same image with the host's page cache in the path boots, with QEMU's thread pool for its requests
    with VM(accel="tcg", image=image, name="directio",
            disks=[Disk(path=img, format="raw", cache="writethrough")]) as vm2:
        drive = next(a for a in vm2.launch.argv if a.startswith("file="))
        assert "cache=writethrough" in drive and "aio=threads" in drive
        assert vm2.run("head -c 512 /dev/vda | wc -c").stdout.strip() == "512"


def test_aio_follows_the_cache_mode():
    assert [disk_aio(c) for c in ("none", "directsync", "writeback", "writethrough", "unsafe")] == \
        ["native", "native", "threads", "threads", "threads"]
