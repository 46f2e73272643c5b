"""Spec validation: bad input is refused before QEMU starts, naming the field and the fix."""

import pytest

from vmlab import NIC, Disk, MachineSpec, SpecError
from vmlab.spec import parse_size
from vmlab.vm.qemu import build_launch, kernel_cmdline


@pytest.mark.parametrize("value,mib", [(128, 128), ("128M", 128), ("1G", 1024), ("512MiB", 512), ("0.5G", 512)])
def test_sizes(value, mib):
    assert parse_size(value, "memory") == mib << 20


@pytest.mark.parametrize("fields,field", [
    ({"memory": "lots"}, "memory"), ({"memory": 0}, "memory"), ({"memory": 10**9}, "memory"),
    ({"memory": 32}, "memory"), ({"cpus": 0}, "cpus"), ({"cpus": "two"}, "cpus"),
    ({"accel": "vmware"}, "accel"), ({"machine": "microvm"}, "machine"), ({"console": "vga"}, "console"),
    ({"disks": [Disk(bus="sata", size="8M")]}, "disks[0].bus"), ({"disks": [Disk(path="/nonexistent.img")]}, "disks[0].path"),
    ({"disks": [Disk()]}, "disks[0].size"), ({"nics": [NIC(model="ne2k")]}, "nics[0].model"),
    ({"nics": [NIC(forwards=[(8080, 0)])]}, "nics[0].forwards[0]"), ({"name": "my vm"}, "name"),
    ({"extra_args": ["-vnc", ":0"]}, "extra_args"), ({"extra_args": ["-qmp", "tcp:127.0.0.1:4444"]}, "extra_args"),
    ({"kernel_args": "a\nb"}, "kernel_args"), ({"trace": ["ide *"]}, "trace"),
])
def test_bad_specs_name_field_and_fix(fields, field):
    with pytest.raises(SpecError) as info:
        MachineSpec(**fields).validated()
    assert info.value.field == field
    assert info.value.fix
    assert field.split("[")[0] in str(info.value)


def test_launch_is_locked_down(tmp_path):
    spec = MachineSpec(disks=(Disk(bus="ide", size="8M"),), nics=(NIC(model="e1000", forwards=((0, 80),)),)).validated()
    launch = build_launch(spec, accel="tcg", kernel=tmp_path / "k", initrd=tmp_path / "i", qmp_fd=3, agent_fd=4,
                          console_fd=5, private_dir=tmp_path, disk_paths=[tmp_path / "d.raw"], nic_fds=[None])
    argv = " ".join(launch.argv)
    assert "-sandbox on" in argv and "-display none" in argv and "-nodefaults" in argv
    assert "restrict=on" in argv and "hostfwd=tcp:127.0.0.1:0-:80" in argv
    assert "tcp:" not in argv.replace("hostfwd=tcp:127.0.0.1", "")
    assert "vnc" not in argv
    assert "vmlab.modules=ata_piix,sd_mod,e1000,af_packet" in kernel_cmdline(spec)
