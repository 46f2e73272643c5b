"""Bad input: every wrong spec or argument gives an error naming the field and the fix,
before QEMU starts (no QEMU child, no new private directory).

The table has one row per bad input (a row whose last column names a known bug is
``xfail(strict=True)``, so it flips when the bug is fixed). Property-based tests (hypothesis) state the rules
(memory, cpus, name, disk size and bus, port forwards, the closed choices) and check that ``validated()``
accepts exactly the inputs the rule accepts, rejects the others with SpecError (never another exception),
and that an accepted spec turns into the QEMU command line it should (-m, -smp, -name, hostfwd, -no-reboot...).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import qemu_children
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmlab import NIC, VM, Disk, ImageError, MachineSpec, SetupError, SpecError, VMError, VMTimeout
from vmlab.spec import host_memory_bytes
from vmlab.vm import reaper
from vmlab.vm.qemu import build_launch

# (id, keyword arguments to VM(...), the field the error must name, a known bug (xfail reason) or None)
BAD = [
    ("memory-lots", dict(memory="lots"), "memory", None),
    ("memory-zero", dict(memory=0), "memory", None),
    ("memory-negative", dict(memory=-5), "memory", None),
    ("memory-unit-12Q", dict(memory="12Q"), "memory", None),
    ("memory-more-than-host", dict(memory="100T"), "memory", None),
    ("memory-too-little", dict(memory=64), "memory", None),
    ("memory-float", dict(memory=128.5), "memory", None),
    ("memory-not-whole-MiB", dict(memory="128.5M"), "memory", None),
    ("memory-list", dict(memory=[128]), "memory", None),
    ("memory-huge-digits", dict(memory="9" * 400), "memory", None),
    ("cpus-zero", dict(cpus=0), "cpus", None),
    ("cpus-99", dict(cpus=99), "cpus", None),
    ("cpus-two", dict(cpus="two"), "cpus", None),
    ("cpus-bool", dict(cpus=True), "cpus", None),
    ("accel-vmware", dict(accel="vmware"), "accel", None),
    ("machine-microvm", dict(machine="microvm"), "machine", None),
    ("console-vga", dict(console="vga"), "console", None),
    ("disk-bus-sata", dict(disks=[Disk(bus="sata", size="8M")]), "disks[0].bus", None),
    ("disk-bus-usb", dict(disks=[Disk(bus="usb", size="8M")]), "disks[0].bus", None),
    ("disk-path-missing", dict(disks=[Disk(path="/nonexistent/disk.img")]), "disks[0].path", None),
    ("disk-path-directory", dict(disks=[Disk(path="/tmp")]), "disks[0].path", None),
    ("disk-without-size", dict(disks=[Disk()]), "disks[0].size", None),
    ("disk-size-big", dict(disks=[Disk(size="big")]), "disks[0].size", None),
    ("disk-format-vmdk", dict(disks=[Disk(size="8M", format="vmdk")]), "disks[0].format", None),
    ("disk-cache-fast", dict(disks=[Disk(size="8M", cache="fast")]), "disks[0].cache", None),
    ("disks-not-a-list", dict(disks=Disk(size="8M")), "disks", None),
    ("disk-dict-typo", dict(disks=[{"bus": "virtio", "sise": "8M"}]), "disks[0]", None),
    ("five-ide-disks", dict(disks=[Disk(bus="ide", size="8M")] * 5), "disks", None),
    ("disk-path-int", dict(disks=[Disk(path=5)]), "disks[0].path", None),
    ("disk-readonly-str", dict(disks=[Disk(size="8M", readonly="no")]), "disks[0].readonly",
     None),
    ("disk-serial-comma", dict(disks=[Disk(size="8M", serial="x,drive=disk0")]), "disks[0].serial",
     None),
    ("nic-model-ne2k", dict(nics=[NIC(model="ne2k")]), "nics[0].model", None),
    ("nic-model-vmxnet3", dict(nics=[NIC(model="vmxnet3")]), "nics[0].model", None),
    ("nic-backend-tap", dict(nics=[NIC(backend="tap")]), "nics[0].backend", None),
    ("nic-mac-zz", dict(nics=[NIC(mac="zz")]), "nics[0].mac", None),
    ("nic-mac-int", dict(nics=[NIC(mac=5)]), "nics[0].mac", None),
    ("forward-port-70000", dict(nics=[NIC(forwards=((70000, 80),))]), "nics[0].forwards[0]", None),
    ("forward-port-negative", dict(nics=[NIC(forwards=((-1, 80),))]), "nics[0].forwards[0]", None),
    ("forward-port-name", dict(nics=[NIC(forwards=(("http", 80),))]), "nics[0].forwards[0]", None),
    ("forward-guest-port-0", dict(nics=[NIC(forwards=((8080, 0),))]), "nics[0].forwards[0]", None),
    ("forward-not-a-pair", dict(nics=[NIC(forwards=(8080,))]), "nics[0].forwards[0]", None),
    ("forward-on-socket-nic", dict(nics=[NIC(backend="socket", forwards=((8080, 80),))]),
     "nics[0].forwards", None),
    ("forward-float-port", dict(nics=[NIC(forwards=((8080.5, 80),))]), "nics[0].forwards[0]",
     None),
    ("forwards-int", dict(nics=[NIC(forwards=8080)]), "nics[0].forwards", None),
    ("trace-with-space", dict(trace=("ide *",)), "trace", None),
    ("trace-not-a-list", dict(trace="ide_*"), "trace", None),
    ("modules-shell", dict(modules=("e1000; rm -rf /",)), "modules", None),
    ("extra-vnc", dict(extra_args=("-vnc", ":0")), "extra_args", None),
    ("extra-qmp", dict(extra_args=("-qmp", "tcp:127.0.0.1:4444,server")), "extra_args", None),
    ("extra-monitor", dict(extra_args=("-monitor", "stdio")), "extra_args", None),
    ("extra-daemonize", dict(extra_args=("-daemonize",)), "extra_args", None),
    ("extra-tcp-chardev", dict(extra_args=("-chardev", "tcp:127.0.0.1:4444,server=on")), "extra_args", None),
    ("extra-serial-tcp", dict(extra_args=("-serial", "tcp::4444,server,nowait")), "extra_args", None),
    ("extra-socket-chardev-port", dict(extra_args=("-chardev", "socket,id=c,port=4444,server=on,wait=off")),
     "extra_args", None),
    ("extra-socket-chardev-host-first", dict(extra_args=("-chardev",
                                                        "socket,id=c,host=127.0.0.1,port=4444,server=on")),
     "extra_args", None),
    ("extra-gdb-s", dict(extra_args=("-s",)), "extra_args", None),
    ("extra-netdev-listen", dict(extra_args=("-netdev", "socket,id=n1,listen=:1234")), "extra_args",
     None),
    ("extra-nic-unrestricted", dict(extra_args=("-nic", "user")), "extra_args",
     None),
    ("extra-hostfwd-any-address", dict(extra_args=("-nic", "user,hostfwd=::2222-:22")), "extra_args",
     None),
    ("extra-not-a-list", dict(extra_args="-vnc :0"), "extra_args", None),
    ("extra-nul", dict(extra_args=("-device", "e1000\0")), "extra_args", None),
    ("name-with-space", dict(name="my vm"), "name", None),
    ("name-with-slash", dict(name="a/b"), "name", None),
    ("name-empty", dict(name=""), "name", None),
    ("name-too-long", dict(name="a" * 41), "name", None),
    ("kernel-args-newline", dict(kernel_args="quiet\ninit=/bin/sh"), "kernel_args", None),
    ("kernel-args-nul", dict(kernel_args="quiet\0"), "kernel_args", None),
    ("kernel-args-carriage-return", dict(kernel_args="a\rb"), "kernel_args", None),
    ("reboot-string", dict(reboot="no"), "reboot", None),
    ("cpu-model-int", dict(cpu_model=5), "cpu_model", None),
    ("boot-timeout-negative", dict(boot_timeout=-1), "boot_timeout", None),
    ("boot-timeout-zero", dict(boot_timeout=0), "boot_timeout", None),
    ("boot-timeout-string", dict(boot_timeout="60"), "boot_timeout", None),
    ("warm-with-nvme-disk", dict(warm=True, disks=[Disk(size="8M", bus="nvme")]), "warm", None),
    ("warm-with-root-on-disk", dict(warm=True, disks=[Disk(size="8M")], kernel_args="vmlab.root=/dev/vda"), "warm",
     None),
    ("host-cpu-not-allowed", dict(host_cpu=4096), "host_cpu", None),
    ("host-cpu-word", dict(host_cpu="fast"), "host_cpu", None),
    ("host-cpu-two-vcpus", dict(host_cpu="auto", cpus=2), "host_cpu", None),
    ("null-disk-with-a-path", dict(disks=[Disk(path="/etc/hostname", null=True)]), "disks[0].null", None),
    ("null-disk-qcow2", dict(disks=[Disk(size="8M", null=True, format="qcow2")]), "disks[0].null", None),
    ("unknown-setting-typo", dict(memroy=256), "memroy", None),
    ("image-not-an-image", dict(image="bogus"), "image", None),
]


NAME = "badinput"   # every VM here is named so, so other processes' VM dirs do not count


def _private_dirs() -> set:
    root = reaper.private_root()
    return {p.name for p in root.iterdir() if p.name.startswith(f"vmlab-{NAME}-")}


def _params():
    for ident, kw, field, bug in BAD:
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        yield pytest.param(kw, field, id=ident, marks=marks)


def test_the_table_is_big_enough():
    assert len(BAD) >= 30
    assert len({b[0] for b in BAD}) == len(BAD)


@pytest.mark.parametrize("kw,field", list(_params()))
def test_bad_spec_names_field_and_fix_before_qemu_starts(kw, field):
    before_dirs = _private_dirs()
    with pytest.raises(SpecError) as ei:
        VM(**({"accel": "tcg", "name": NAME} | kw))     # validation happens here, before anything starts
    exc = ei.value
    assert exc.field == field, (exc.field, str(exc))
    assert exc.fix, f"no fix given for {field}"
    assert field in str(exc)
    assert isinstance(exc, ValueError)
    assert qemu_children() == []
    assert _private_dirs() <= before_dirs


def test_spec_passed_positionally_must_be_a_spec():
    with pytest.raises(SpecError) as ei:
        VM("not a spec")
    assert ei.value.field == "spec" and ei.value.fix


def test_unknown_experiment_names_field_and_choices():
    import vmlab.experiments as ex
    with pytest.raises(SpecError) as ei:
        ex.run_experiment("no-such-experiment")
    assert ei.value.field == "experiment"
    assert "disk" in ei.value.fix


def test_missing_qemu_binary_is_a_setup_error_naming_vmlab_qemu(monkeypatch):
    monkeypatch.setenv("VMLAB_QEMU", "/nonexistent/qemu-system-x86_64")
    before_dirs = _private_dirs()
    vm = VM(accel="tcg", name=NAME)
    with pytest.raises(SetupError) as ei:
        vm.start()
    assert "/nonexistent" in ei.value.message
    assert "VMLAB_QEMU" in ei.value.fix
    assert qemu_children() == [] and _private_dirs() <= before_dirs
    assert vm.state.value in ("failed", "off")


def test_missing_kernel_is_an_image_error_naming_vmlab_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VMLAB_KERNEL", "/nonexistent/vmlinuz")
    before_dirs = _private_dirs()
    with pytest.raises(ImageError) as ei:
        VM(accel="tcg", name=NAME).start()
    assert "VMLAB_KERNEL" in ei.value.message and "VMLAB_KERNEL" in ei.value.fix
    assert qemu_children() == [] and _private_dirs() <= before_dirs


# ---------------------------------------------------------------- bad calls on a running VM
# (id, callable on a running VM, the field, xfail reason); a warm start makes each ~0.1 s
BAD_CALLS = [
    ("run-empty", lambda vm: vm.run(""), "command", None),
    ("run-none", lambda vm: vm.run(None), "command", None),
    ("run-blank", lambda vm: vm.run("   "), "command", None),
    ("run-timeout-negative", lambda vm: vm.run("true", timeout=-1), "timeout", None),
    ("run-timeout-zero", lambda vm: vm.run("sleep 1", timeout=0), "timeout",
     None),
    ("run-timeout-string", lambda vm: vm.run("true", timeout="5"), "timeout", None),
    ("wait-event-timeout-negative", lambda vm: vm.wait_event("SHUTDOWN", timeout=-1), "timeout",
     None),
    ("expect-bad-regex", lambda vm: vm.expect("(", timeout=1), "pattern", None),
]


def _call_params():
    for ident, call, field, bug in BAD_CALLS:
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        yield pytest.param(call, field, id=ident, marks=marks)


@pytest.mark.integration
@pytest.mark.parametrize("call,field", list(_call_params()))
def test_bad_call_names_field_and_vm_keeps_working(image, call, field):
    with VM(accel="tcg", image=image, warm=True, name="badwarm") as vm:
        with pytest.raises(SpecError) as ei:
            call(vm)
        assert ei.value.field == field and ei.value.fix and field in str(ei.value)
        assert vm.run("echo still-here", timeout=30).stdout.strip() == "still-here"


@pytest.mark.integration
def test_waiting_for_an_event_that_never_comes_is_a_timeout_naming_it(image):
    with VM(accel="tcg", image=image, warm=True, name="badwarm") as vm:
        with pytest.raises(VMTimeout) as ei:
            vm.wait_event("NO_SUCH_EVENT", timeout=0.5)
        assert "NO_SUCH_EVENT" in ei.value.phase and ei.value.fix
        assert isinstance(ei.value, TimeoutError)


@pytest.mark.integration
def test_unknown_qmp_command_is_a_vm_error_with_qemus_reason(image):
    with VM(accel="tcg", image=image, warm=True, name="badwarm") as vm:
        with pytest.raises(VMError) as ei:
            vm.qmp("no-such-command")
        assert "no-such-command" in str(ei.value) and "not been found" in str(ei.value)


# ---------------------------------------------------------------- properties (hypothesis)
# Each property states the rule (written out here, independently of vmlab/spec.py): which inputs must be accepted
# and which rejected, and, for the accepted ones, what the QEMU command line must say.
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.one_of(
    st.integers(min_value=-10 ** 12, max_value=10 ** 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.from_regex(r"\A\s?-?[0-9]{0,25}(\.[0-9]{0,6})?\s?[KMGTQkmgt]?(i?B)?\s?\Z"),
    st.text(max_size=20),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)

MiB, MAX_BYTES = 1 << 20, 1 << 50
UNIT = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}


def size_rule(value) -> int | None:
    """The documented size rule: a positive whole number (MiB), or a string: a decimal number with an optional
    K/M/G/T unit (any case, optional "B"/"iB"; no unit = MiB), at most 1 PiB. Bytes, or None if invalid."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    if isinstance(value, int):
        return value * MiB if 0 < value * MiB <= MAX_BYTES else None
    m = re.fullmatch(r"[ \t\n\r\f\v]*([0-9]+(?:\.[0-9]+)?)[ \t\n\r\f\v]*([KMGTkmgt]?)(?:[iI]?[bB])?[ \t\n\r\f\v]*",
                     value)
    if not m:
        return None
    exact = float(m.group(1)) * UNIT[m.group(2).upper()]
    if exact > MAX_BYTES:
        return None
    return int(exact) if int(exact) > 0 else None


def memory_rule(value) -> int | None:
    """Guest memory: a valid size, a whole number of MiB, at least 96 MiB, at most the host's memory. MiB or None."""
    b = size_rule(value)
    if b is None or b % MiB or b < 96 * MiB or b > host_memory_bytes():
        return None
    return b // MiB


def _outcome(spec: MachineSpec):
    """validated() either returns a MachineSpec or raises SpecError naming the field and a fix; nothing else."""
    try:
        out = spec.validated()
    except SpecError as exc:
        assert exc.field and exc.fix and exc.field in str(exc)
        return None
    assert isinstance(out, MachineSpec)
    return out


def _argv(spec: MachineSpec) -> list[str]:
    """The QEMU command line of an accepted spec: NUL-free strings."""
    launch = build_launch(spec, accel="tcg", kernel=Path("/k"), initrd=Path("/i"), qmp_fd=3, agent_fd=4,
                          console_fd=5, private_dir=Path("/p"),
                          disk_paths=[Path(f"/d{i}") for i in range(len(spec.disks))],
                          nic_fds=[7 if n.backend == "socket" else None for n in spec.nics],
                          trace_file=Path("/t"))
    for a in launch.argv:
        assert isinstance(a, str) and "\0" not in a, a
    return list(launch.argv)


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@PROPS
@given(memory=sizes)
@example(memory="131072\u212a")         # the Kelvin sign is not K (was a KeyError)
@example(memory="128.5M")
@example(memory="96")
@example(memory=96)
@example(memory="1G")
def test_memory_accepted_exactly_by_the_rule_and_passed_as_minus_m(memory):
    want = memory_rule(memory)
    out = _outcome(MachineSpec(memory=memory))
    assert (out is not None) == (want is not None), (memory, want)
    if out is not None:
        assert out.memory_mb == want and _after(_argv(out), "-m") == [str(want)]


@PROPS
@given(cpus=st.one_of(st.integers(min_value=-100, max_value=100), st.floats(), st.text(max_size=5),
                      st.booleans(), st.none()))
def test_cpus_accepted_exactly_from_1_to_32_and_passed_as_smp(cpus):
    want = cpus if isinstance(cpus, int) and not isinstance(cpus, bool) and 1 <= cpus <= 32 else None
    out = _outcome(MachineSpec(cpus=cpus))
    assert (out is not None) == (want is not None), cpus
    if out is not None:
        assert _after(_argv(out), "-smp") == [str(want)]


NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


@PROPS
@given(name=st.one_of(st.text(max_size=60), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,45}\Z"),
                      st.integers(), st.none(), st.binary(max_size=10)))
def test_name_accepted_exactly_by_the_rule_and_named_in_the_command_line(name):
    ok = isinstance(name, str) and NAME_RULE.fullmatch(name) is not None
    out = _outcome(MachineSpec(name=name))
    assert (out is not None) == ok, name
    if out is not None:
        assert _after(_argv(out), "-name")[0].startswith(f"vmlab-{name},")


@PROPS
@given(size=sizes, bus=st.sampled_from(["virtio", "ide", "ahci", "scsi", "nvme", "sata", "", None]),
       host=st.one_of(st.integers(min_value=-5, max_value=70000), st.text(max_size=5), st.booleans()),
       guest=st.integers(min_value=-5, max_value=70000))
def test_disk_and_forward_accepted_exactly_by_the_rules_and_passed_to_qemu(size, bus, host, guest):
    port_ok = (isinstance(host, int) and not isinstance(host, bool) and 0 <= host <= 65535
               and 1 <= guest <= 65535)
    ok = size_rule(size) is not None and bus in ("virtio", "ide", "ahci", "scsi", "nvme") and port_ok
    out = _outcome(MachineSpec(disks=(Disk(bus=bus, size=size),), nics=(NIC(forwards=((host, guest),)),)))
    assert (out is not None) == ok, (size, bus, host, guest)
    if out is not None:
        argv = _argv(out)
        assert any(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" in a for a in _after(argv, "-netdev")), argv
        assert any("file=/d0" in a or "filename=/d0" in a for a in argv), argv


anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.lists(st.text(max_size=4), max_size=2))


@PROPS
@given(field=st.sampled_from(["name", "accel", "cpus", "memory", "machine", "cpu_model", "console",
                              "balloon", "kernel_args", "modules", "trace", "extra_args", "reboot"]),
       value=anything)
@example(field="memory", value="9" * 400)
@example(field="cpu_model", value=5)
@example(field="kernel_args", value="quiet\0")
def test_any_field_any_value_gives_a_spec_or_spec_error_and_a_clean_argv(field, value):
    out = _outcome(MachineSpec(**{field: value}))
    if out is not None:
        _argv(out)
    # the fields with a closed set of values: accepted exactly when the value is one of them
    closed = {"accel": ("auto", "tcg", "kvm"), "machine": ("pc", "q35"), "console": ("serial", "virtio"),
              "balloon": (True, False), "reboot": (True, False)}
    if field in closed:
        member = any(value is v if isinstance(v, bool) else (isinstance(value, str) and value == v)
                     for v in closed[field])
        assert (out is not None) == member, (field, value)


@PROPS
@given(accel=st.sampled_from(["tcg", "auto"]), machine=st.sampled_from(["pc", "q35"]),
       console=st.sampled_from(["serial", "virtio"]), balloon=st.booleans(), reboot=st.booleans())
def test_accepted_choices_are_what_the_command_line_says(accel, machine, console, balloon, reboot):
    out = _outcome(MachineSpec(accel=accel, machine=machine, console=console, balloon=balloon, reboot=reboot))
    assert out is not None
    argv = _argv(out)
    assert _after(argv, "-machine")[0].split(",")[0] == machine
    assert any("virtio-balloon" in a for a in _after(argv, "-device")) == balloon
    assert ("-no-reboot" in argv) == (not reboot)
    assert "-sandbox" in argv and _after(argv, "-sandbox")[0].startswith("on")
