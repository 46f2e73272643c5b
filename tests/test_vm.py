"""The VM driver on real QEMU guests under TCG."""

import asyncio
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab import VM, AsyncVM, Disk, GuestError, RunState, SetupError, StateError, VMError, VMTimeout
from vmlab.vm.reaper import MAIN_LOOP_NICE
from vmlab.vm.warm import QUIET_S, snapshot_path

pytestmark = pytest.mark.integration


def test_boot_run_files_and_shutdown(vm, tmp_path):
    assert vm.state is RunState.RUNNING and vm.accel == "tcg"
    r = vm.run("uname -r; echo err >&2; exit 3", check=False)
    assert r.status == 3 and r.stdout.strip() == vm.kernel_release and r.stderr.strip() == "err"
    assert r.guest_s > 0 and r.wall_s > 0       # both clocks timed the command (their order is not asserted:
    # the guest clock and the host clock are different clocks, and an order between them is a timing assertion)
    with pytest.raises(GuestError) as info:
        vm.run("false")
    assert info.value.result.status == 1
    payload = bytes(range(256)) * 300
    vm.write_file("/tmp/blob", payload, mode=0o600)
    assert vm.read_file("/tmp/blob") == payload
    assert vm.run("stat -c %a /tmp/blob").stdout.strip() == "600"
    src = tmp_path / "in.txt"
    src.write_text("hello")
    vm.copy_in(src, "/tmp/in.txt")
    assert vm.copy_out("/tmp/in.txt", tmp_path / "out.txt").read_text() == "hello"
    assert "vmlab-init: starting agent" in vm.console_text()
    assert oct(vm.private_dir.stat().st_mode & 0o777) == "0o700"


def test_the_guest_boots_what_the_image_and_the_fast_settings_say(vm, image):
    """The compressed initramfs is what QEMU loaded, every skipped initcall is skipped, tracefs is empty."""
    from vmlab.image.elf import trim_zero_tails
    from vmlab.vm.qemu import SKIPPED_INITCALLS

    dmesg = vm.run("dmesg").stdout
    freed = [int(x) for x in re.findall(r"Freeing initrd memory: (\d+)K", dmesg)]
    lz4_pages = -(-image.initrd.stat().st_size // 4096)
    assert image.initrd.name == "initrd.lz4" and freed == [lz4_pages * 4], (freed, lz4_pages)
    # the skipped initcalls this kernel has (Debian's kernel has all of them; the lesson kernel is built without
    # most of the code they belong to): each one is skipped
    syms = set(vm.run("cut -d' ' -f3 /proc/kallsyms").stdout.split())
    present = sorted(n for n in SKIPPED_INITCALLS if n in syms)
    assert sorted(set(re.findall(r"initcall (\S+) blacklisted", dmesg))) == present
    if image.manifest["kernel"].get("source") == "debian":
        assert present == sorted(SKIPPED_INITCALLS)
    assert trim_zero_tails(image.kernel, dry_run=True) == 0, "the image's vmlinux stores no zero tails"
    assert image.kernel.read_bytes()[0x28:0x30] == bytes(8), "the image's vmlinux has no section table"
    assert image.manifest["vmlinux_symbols_not_stored"] > 1_000_000       # the kernel's .symtab and .strtab
    # the default guest's initramfs carries the base modules only (initrd-all.lz4 has the others)
    kos = vm.run("find /lib/modules -name '*.ko'").stdout.split()
    assert sorted(os.path.basename(k)[:-3].replace("-", "_") for k in kos) == sorted(image.base_modules)
    loaded = {line.split()[0] for line in vm.run("cat /proc/modules").stdout.splitlines()}
    assert loaded == set(image.base_modules), loaded
    # QEMU runs without transparent huge pages (reaper.qemu_preexec, inherited from this process): 4 KiB pages
    status = Path(f"/proc/{vm.pid}/status").read_text()
    assert re.search(r"^THP_enabled:\s+0$", status, re.M), status
    rollup = Path(f"/proc/{vm.pid}/smaps_rollup").read_text()
    assert re.search(r"^AnonHugePages:\s+0 kB$", rollup, re.M), rollup
    if "tracer_init_tracefs" in present:          # a kernel with tracing: its tracefs stays empty
        vm.run("mkdir -p /run/t && mount -t tracefs none /run/t")
        found = vm.run("find /run/t | wc -l; test -e /run/t/events && echo events || true").stdout.split()
        assert found[1:] == [] and int(found[0]) < 100, f"tracefs was populated ({found}; ~9,700 files when it is)"
        vm.run("umount /run/t")
    else:                                         # the lesson kernel has no tracing at all
        assert "tracefs" not in vm.run("cat /proc/filesystems").stdout


def test_a_guest_that_loads_other_modules_boots_initrd_all(image):
    """boot_initrd: the base initramfs unless the spec's guest loads a module it does not carry."""
    from vmlab import NIC, Disk, MachineSpec
    from vmlab.vm.qemu import boot_initrd
    assert image.initrd_all is not None and image.initrd_all != image.initrd
    assert boot_initrd(MachineSpec(), image) == image.initrd
    assert boot_initrd(MachineSpec(modules=("evdev",)), image) == image.initrd      # a base module
    for spec in (MachineSpec(modules=("e1000",)), MachineSpec(nested=True), MachineSpec(balloon=True),
                 MachineSpec(nics=(NIC(model="e1000"),)),
                 MachineSpec(disks=(Disk(size="8M"),), kernel_args="vmlab.root=/dev/vda")):
        assert boot_initrd(spec, image) == image.initrd_all, spec


def test_run_timeout_and_concurrent_commands(vm):
    with pytest.raises(VMTimeout) as info:
        vm.run("sleep 5", timeout=0.5)
    assert "sleep 5" in str(info.value)
    # the agent serves several commands at once
    async def both():
        avm = vm._avm
        return await asyncio.gather(avm.run("sleep 0.3; echo a"), avm.run("echo b"))
    from vmlab.vm.runner import block_on
    a, b = block_on(both())
    assert (a.stdout, b.stdout) == ("a\n", "b\n")


def test_a_command_starts_as_a_fresh_process(vm):
    """run() starts sh -c in its own session, stdin /dev/null, no signal blocked or ignored that a login
    shell would not have, SCHED_OTHER (the agent is SCHED_BATCH around the clone), and the agent goes on."""
    r = vm.run("grep -E '^(SigBlk|SigIgn)' /proc/self/status; stat -L -c %t:%T /proc/self/fd/0; "
               "echo $$ $(cut -d' ' -f6 /proc/$$/stat); "
               "cut -d' ' -f41 /proc/self/stat")
    fields = dict(line.split(":\t") for line in r.stdout.splitlines()[:2])
    assert fields == {"SigBlk": "0000000000000000", "SigIgn": "0000000000000000"}, r.stdout
    rest = r.stdout.splitlines()[2:]
    assert rest[0] == "1:3"                      # /dev/null: char device 1,3
    pid, sid = rest[1].split()
    assert pid == sid                            # the sh that run() started leads its own session (setsid)
    assert rest[2:] == ["0"], rest               # SCHED_OTHER (0) for the command
    # the agent is SCHED_BATCH only until it runs again: once this command sleeps, it has run
    assert vm.run("sleep 0.1; cut -d' ' -f41 /proc/1/stat").stdout == "0\n"
    # SIGPIPE is default: the writer of a pipe whose reader left dies of it (128 + 13), as in any shell
    r = vm.run("(yes; echo \"yes-status=$?\" >&2) | head -n1")
    assert (r.stdout, r.stderr) == ("y\n", "yes-status=141\n")
    # a command that cannot be found is the shell's error, the agent's spawn went fine
    r = vm.run("nosuch-command", check=False)
    assert r.status == 127 and "nosuch-command: not found" in r.stderr
    assert vm.run("echo still here").stdout == "still here\n"


#: plain commands (only words of letters, digits and _./+,:=%@-), each with an answer that does not change between two runs
PLAIN_COMMANDS = [
    "true", "false", "echo a  b", "  echo   lead  ", "echo --help", "true --help", "test -d /proc", "test -f /nope",
    "nosuch", "/nosuch", "/etc/hostname", "/root/noshebang x", "/root/shebang y", "cat /nope", "uname -r", "id",
    "pwd", "printf %s x", "busybox echo hi", "vmbench --help", "dd if=/dev/zero of=/dev/null bs=1k count=3",
    "grep -E Sig /proc/self/status", "cat /proc/self/cmdline", "readlink /proc/self/exe", "ls /proc/self/fd",
    "ps -o comm", "env",
]


def test_a_plain_command_runs_without_the_shell_and_gets_what_sh_c_would_give_it(vm):
    """The agent execs a plain command itself (vmagent.c, "Plain commands"): every answer equals the shell's.
    ``CMD ;`` is the same command through ``sh -c`` (the ``;`` makes it not plain)."""
    vm.run("printf 'echo script $0 $1\\n' >/root/noshebang; printf '#!/bin/sh\\necho sb $0 $1\\n' >/root/shebang; "
           "chmod +x /root/noshebang /root/shebang")
    # the image lists busybox's applets for the agent, which runs them in preference to PATH as ash does
    assert vm.run("cat /etc/vmlab/applets").stdout.split() == sorted(vm.run("busybox --list").stdout.split())
    # the plain path was taken: ps, an applet ash runs inside its own process, sees itself as ps, not sh -c
    plain, shell = (vm.run(c).stdout.splitlines() for c in ("ps -o args", "ps -o args ;"))
    assert "ps -o args" in plain and not any("sh -c" in line for line in plain), plain
    assert "{ps} sh -c ps -o args ;" in shell and "ps -o args" not in shell, shell
    for cmd in PLAIN_COMMANDS:
        a, b = vm.run(cmd, check=False), vm.run(cmd + " ;", check=False)
        got = [(r.status, sorted(r.stdout.splitlines()) if cmd == "env" else r.stdout, r.stderr) for r in (a, b)]
        assert got[0] == got[1], (cmd, got)
    # what those answers say: errors are the shell's own, ash's environment and its ignored SIGQUIT
    assert vm.run("nosuch", check=False).stderr == "sh: nosuch: not found\n"
    assert vm.run("/etc/hostname", check=False).status == 126
    assert vm.run("/root/noshebang x").stdout == "script /root/noshebang x\n"
    env = vm.run("env").stdout.splitlines()
    assert "SHLVL=2" in env and "PWD=/" in env, env
    assert "SigIgn:\t0000000000000004" in vm.run("grep -E Sig /proc/self/status").stdout.splitlines()
    # its own session, stdin /dev/null, SCHED_OTHER, like a shell run() starts
    stat = vm.run("cat /proc/self/stat").stdout.split()
    assert stat[0] == stat[5] and stat[40] == "0", stat
    assert vm.run("stat -L -c %t:%T /proc/self/fd/0").stdout == "1:3\n"
    # an applet is busybox's even where /bin has another program of its name (ash prefers applets)
    vm.run("rm /bin/nproc; ln -s vmbench /bin/nproc")
    assert vm.run("nproc").stdout == vm.run("nproc ;").stdout == "1\n"


def test_lifecycle_events(image):
    vm = VM(accel="tcg", image=image, name="life")
    try:
        vm.start(paused=True)
        assert vm.state is RunState.PAUSED and vm.status() == "prelaunch"
        with pytest.raises(StateError):
            vm.run("true")
        vm.resume(wait=True)
        assert vm.run("echo up").stdout == "up\n"
        vm.pause()
        assert vm.status() == "paused"
        vm.resume()
        vm.reset()
        vm.wait_event("RESET")
        vm.wait_ready()
        assert vm.run("cat /proc/uptime").ok
        vm.powerdown()
        ev = vm.wait_event("SHUTDOWN", match={"guest": True})
        assert ev["data"]["reason"] == "guest-shutdown"
        assert vm.wait_exit(30) == 0
        assert vm.state is RunState.OFF
        names = [e["event"] for e in vm.events]
        for expected in ("LAUNCH", "RESUME", "READY", "STOP", "RESET", "POWERDOWN", "GUEST_BYE", "SHUTDOWN", "EXIT"):
            assert expected in names
    finally:
        vm.shutdown()
    assert not vm.private_dir.exists()


def test_quit_and_kill_are_hard_stops(image):
    for how in ("quit", "kill"):
        with VM(accel="tcg", image=image) as vm:
            getattr(vm, how)()
            assert vm.state in (RunState.OFF, RunState.FAILED)
            assert vm.events[-1]["event"] == "EXIT"
            pid = vm.pid
        assert not os.path.exists(f"/proc/{pid}")


def test_warm_start_restores_a_booted_guest(image):
    snapshot_path(VM(accel="tcg", image=image, name="warmtest").spec, "tcg", image).unlink(missing_ok=True)
    with VM(accel="tcg", image=image, name="warmtest", warm=True) as vm:   # boots cold and saves
        first = vm.run("echo ok").stdout
        saved = [e for e in vm.events if e["event"] == "WARM_SAVED"]
        assert not vm.warm_restored and len(saved) == 1
        assert saved[0]["data"]["settle_s"] >= QUIET_S
    steps = ("LAUNCH", "RESTORED", "RESUME", "READY")
    with VM(accel="tcg", image=image, name="warmtest") as vm:
        cold = [e["event"] for e in vm.events if e["event"] in steps]
    with VM(accel="tcg", image=image, name="warmtest", warm=True) as vm:
        assert vm.warm_restored
        assert vm.run("echo ok").stdout == first == "ok\n"
        assert vm.kernel_release == image.kernel_version
        # restored settled: the kernel's late switch from the early clocksource (TCG: tsc-early -> tsc) was done
        # before the save, so the restored guest neither redoes it nor reads a clock it is about to drop
        cs = vm.run("cat /sys/devices/system/clocksource/clocksource0/available_clocksource").stdout.split()
        assert cs[0] == "tsc" and "tsc-early" not in cs
        # a restore loads the saved memory and resumes it; a cold boot never restores (how much faster a restore is
        # is benchmarks/boot.py's warm_vs_cold, a target measured in one run)
        assert [e["event"] for e in vm.events if e["event"] in steps] == list(steps)
        # the QEMU that loaded the snapshot may use transparent huge pages (reaper.qemu_spawn: ~33,000 fewer page
        # faults while it writes the guest's memory); this process, and so every other child, stays without
        assert re.search(r"^THP_enabled:\s+1$", Path(f"/proc/{vm.pid}/status").read_text(), re.M)
        assert re.search(r"^THP_enabled:\s+0$", Path("/proc/self/status").read_text(), re.M)
        if "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            huge = re.search(r"^AnonHugePages:\s+(\d+) kB$", Path(f"/proc/{vm.pid}/smaps_rollup").read_text(), re.M)
            assert huge and int(huge.group(1)) > 0
    assert "RESTORED" not in cold and cold[0] == "LAUNCH" and cold[-1] == "READY"


def test_host_cpu_pins_every_qemu_thread_and_leaves_this_process_as_it_was(image):
    """host_cpu=N: QEMU and every thread it starts (vCPU, main loop, workers) may run on CPU N only; the process
    that spawned it keeps its own affinity. "auto" picks a CPU this process may use."""
    allowed = os.sched_getaffinity(0)
    for want in (max(allowed), "auto"):
        with VM(accel="tcg", image=image, name="pintest", host_cpu=want) as vm:
            assert vm.host_cpu in allowed and (want == "auto" or vm.host_cpu == want)
            vm.run("true")      # the agent has answered: QEMU's threads are all up
            tids = os.listdir(f"/proc/{vm.pid}/task")
            assert len(tids) >= 2
            assert {frozenset(os.sched_getaffinity(int(t))) for t in tids} == {frozenset({vm.host_cpu})}
            assert f"host-cpu={vm.host_cpu}" in repr(vm)
            # the main loop (the first thread) yields to the vCPU: MAIN_LOOP_NICE levels below it
            nice = {t: os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids}
            vcpus = [t for t in tids if Path(f"/proc/{vm.pid}/task/{t}/comm").read_text().startswith("CPU ")]
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            assert len(vcpus) == 1 and nice[vcpus[0]] == mine
            assert nice[str(vm.pid)] == vm.main_loop_nice == min(19, mine + MAIN_LOOP_NICE)
        assert os.sched_getaffinity(0) == allowed
    with VM(accel="tcg", image=image, name="pintest") as vm:
        assert vm.host_cpu is None and os.sched_getaffinity(vm.pid) == allowed
        vm.run("true")
        assert vm.main_loop_nice is None
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{vm.pid}/task")} == {
            os.getpriority(os.PRIO_PROCESS, 0)}


def test_warm_restore_with_other_disks_sees_their_contents(image, tmp_path):
    """Saved with a blank disk, restored with a partitioned one: the guest reads the new disk, partitions and all."""
    def disk(name: str, partitioned: bool) -> Disk:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(32 << 20)
            if partitioned:     # an MBR with one Linux partition from sector 2048, and a mark in the boot code
                mbr = bytearray(512)
                mbr[:11] = b"second-disk"
                mbr[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 30000)
                mbr[510:512] = b"\x55\xaa"
                f.seek(0)
                f.write(mbr)
        return Disk(path=p, format="raw", bus="virtio")
    spec = dict(accel="tcg", image=image, name="warmdisk")
    snapshot_path(VM(**spec, disks=[disk("blank.raw", False)]).spec, "tcg", image).unlink(missing_ok=True)
    with VM(**spec, disks=[disk("blank.raw", False)], warm=True) as vm:      # boots cold, saves
        assert not vm.warm_restored
        assert vm.run("ls /sys/block/vda").stdout.split().count("vda1") == 0
    with VM(**spec, disks=[disk("parted.raw", True)], warm=True) as vm:
        assert vm.warm_restored
        assert [e["event"] for e in vm.events if e["event"] in ("RESTORED", "DISKS_REREAD")] == ["RESTORED",
                                                                                                  "DISKS_REREAD"]
        assert "vda1" in vm.run("ls /sys/block/vda").stdout.split()    # the restored kernel read the new table
        assert vm.run("head -c 11 /dev/vda").stdout == "second-disk"
    # a disk of another size is another snapshot: the guest learnt the size at boot
    big = tmp_path / "big.raw"
    big.write_bytes(b"")
    os.truncate(big, 64 << 20)
    bigger = VM(**spec, disks=[Disk(path=big, format="raw", bus="virtio")], warm=True)
    assert snapshot_path(bigger.spec, "tcg", image) != snapshot_path(VM(**spec, disks=[disk("blank.raw", False)]).spec,
                                                                     "tcg", image)


def test_sync_api_inside_a_running_event_loop(image):
    """What a Jupyter cell does: call the sync API while an event loop runs in this thread."""
    async def cell():
        with VM(accel="tcg", image=image) as vm:
            return vm.run("echo from-a-cell").stdout
    assert asyncio.run(cell()) == "from-a-cell\n"


def test_async_api(image):
    async def main():
        async with AsyncVM(accel="tcg", image=image) as vm:
            return (await vm.run("echo async")).stdout
    from vmlab.vm.runner import block_on
    assert block_on(main()) == "async\n"


def test_guest_never_ready_times_out_with_console_tail(image):
    # init=/bin/false: the kernel panics (PID 1 exits), so no agent ever says hello
    vm = VM(accel="tcg", image=image, kernel_args="rdinit=/bin/false", boot_timeout=20, reboot=False)
    with pytest.raises(VMError) as info:
        vm.start()
    text = str(info.value)
    assert "console tail" in text and "command:" in text
    assert vm.state in (RunState.FAILED, RunState.OFF)
    assert not vm.private_dir.exists()


def test_missing_qemu_binary(monkeypatch, image):
    monkeypatch.setenv("VMLAB_QEMU", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(SetupError) as info:
        VM(accel="tcg", image=image).start()
    assert "VMLAB_QEMU" in str(info.value.fix) or "apt-get" in str(info.value.fix)


def test_cli_boot_and_doctor_json():
    out = subprocess.run([sys.executable, "-m", "vmlab", "boot", "--json", "--repeats", "1", "--accel", "tcg"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    fig = json.loads(out.stdout)
    for key in ("cold_boot_s", "warm_boot_s", "run_roundtrip_ms", "accel", "qemu_version"):
        assert key in fig
    assert fig["accel"] == "tcg"
    for key in ("cold_boot_s", "warm_boot_s", "run_roundtrip_ms"):   # measured, so a positive number (None fails)
        assert isinstance(fig[key], (int, float)) and math.isfinite(fig[key]) and fig[key] > 0, (key, fig[key])
    # every warm start restored the snapshot (warm_boot_s counts only restores; its speed is benchmarks/boot.py's)
    assert len(fig["warm_boot_s_all"]) == fig["repeats"] == len(fig["cold_boot_s_all"]), fig
    out = subprocess.run([sys.executable, "-m", "vmlab", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    rep = json.loads(out.stdout)
    # doctor's exit status says whether it found problems: 0 with none, 1 with some
    assert out.returncode == (1 if rep["problems"] else 0), (out.returncode, rep["problems"], out.stderr)
    assert rep["accelerators"]["tcg"]["usable"] is True
    assert rep["accelerators"]["kvm"]["reason"]
    assert "is_vm" in rep["host"]["virtualization"]
    assert rep["image"]["busybox"]["libc"] == "musl", rep["image"]      # vmlab's build (vmlab.image.busybox)
