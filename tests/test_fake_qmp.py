"""Error paths against a fake QEMU (tests/helpers/fake_qemu.py), no guest involved.

Only for what a real QEMU cannot be made to do on demand: exit at once with a given
message, abort like KVM on a PVM host, never speak QMP, die right after the QMP
greeting, or answer a command with an error. Real behaviour is tested with real
QEMU elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import qemu_children

from vmlab import VM, LaunchError, VMDied, VMError, VMTimeout
from vmlab.vm import reaper

FAKE = Path(__file__).resolve().parent / "helpers" / "fake_qemu.py"


@pytest.fixture
def fake(monkeypatch, image):
    monkeypatch.setenv("VMLAB_QEMU", str(FAKE))

    def use(mode: str) -> None:
        monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    return use


def _no_leftovers(vm) -> None:
    assert vm.state.value in ("failed", "off")
    assert vm.private_dir is None or not vm.private_dir.exists()
    assert vm.pid is None or vm.pid not in reaper.live_pids()
    assert qemu_children() == []


def test_qemu_exiting_at_once_is_a_launch_error_with_stderr_and_fix(fake, image):
    fake("exit-nofile")
    vm = VM(accel="tcg", image=image, name="fake")
    with pytest.raises(LaunchError) as ei:
        vm.start()
    exc = ei.value
    assert exc.exit_code == 1
    assert "Could not open" in exc.stderr and "Could not open" in str(exc)
    assert "missing" in exc.fix
    assert exc.command and exc.command[0] == str(FAKE)
    _no_leftovers(vm)


def test_kvm_msr_abort_suggests_tcg(fake, image):
    fake("abort-msr")
    vm = VM(accel="tcg", image=image, name="fake")
    with pytest.raises(LaunchError) as ei:
        vm.start()
    assert "tcg" in ei.value.fix and "PVM" in ei.value.fix
    assert ei.value.exit_code is not None and ei.value.exit_code != 0
    _no_leftovers(vm)


def test_qemu_dying_after_the_greeting_is_vmdied_naming_the_phase(fake, image):
    fake("qmp-then-die")
    vm = VM(accel="tcg", image=image, name="fake", boot_timeout=30)
    with pytest.raises(VMDied) as ei:          # noticed from QEMU's exit (VMDied), not the boot timeout (VMTimeout)
        vm.start()
    assert ei.value.exit_code == 3 and "boot" in ei.value.message
    assert "dying on purpose" in ei.value.stderr
    _no_leftovers(vm)


def test_guest_never_saying_hello_is_a_boot_timeout(fake, image):
    fake("qmp-forever")
    vm = VM(accel="tcg", image=image, name="fake", boot_timeout=2)
    with pytest.raises(VMTimeout) as ei:
        vm.start()
    assert "boot" in ei.value.phase and ei.value.seconds == 2
    _no_leftovers(vm)


def test_qmp_error_reply_is_a_vm_error_quoting_qemu(fake, image):
    fake("qmp-forever")
    vm = VM(accel="tcg", image=image, name="fake")
    vm.start(wait=False)
    try:
        with pytest.raises(VMError) as ei:
            vm.qmp("no-such-command")
        assert "has not been found" in str(ei.value)
    finally:
        vm.shutdown()
    _no_leftovers(vm)


def test_shutdown_of_a_fake_that_ignores_nothing_is_clean(fake, image):
    fake("qmp-forever")
    vm = VM(accel="tcg", image=image, name="fake")
    vm.start(wait=False)
    assert vm.status() == "running"
    pid = vm.pid
    vm.shutdown(timeout=5)
    _no_leftovers(vm)
    assert pid not in reaper.live_pids()
