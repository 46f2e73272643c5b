"""Reliability: no orphaned QEMU, no lost results, clear errors when things break,
many VMs at once, and no leaks over many cycles.

Each check has a short version in the default run and a long one behind
``@pytest.mark.long`` (``make reliability``). Every trial prints one summary
line (``pytest -s`` shows them); docs/reliability.md quotes them.

Orphans: a Python process SIGKILLed while its VM runs; a Jupyter kernel
interrupted mid-command and then restarted; an exception inside ``with VM()``.
Each time the QEMU must go away by itself (its exit is awaited as an event, through
a pidfd; how long it took is printed, not asserted: speed belongs in benchmarks/),
the orphans left are counted from the process table (must be 0), and after
``reaper.sweep_stale()`` (which the next VM start runs) no private dir may be left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import copy_builds, qemu_children

from vmlab import VM, ExperimentError, ImageError, StateError, VMError, VMTimeout
from vmlab.measure import Rows
from vmlab.vm import reaper

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "helpers" / "start_vm_and_wait.py"
PY = sys.executable
HANG_GUARD = 120.0         # seconds: only so that a QEMU that never dies fails the test instead of hanging it
SHORT_TRIALS, LONG_TRIALS = 3, 20


# ------------------------------------------------------------------ helpers
def pid_gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting for init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def wait_gone(pid: int, since: float | None = None) -> float:
    """Wait for *pid* to exit (the event, via a pidfd); returns the seconds since *since* (default now), for the
    report. A process that never exits is an orphan: the test fails after HANG_GUARD instead of hanging."""
    import select
    t0 = time.monotonic() if since is None else since
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.monotonic() - t0
    try:
        while not pid_gone(pid):
            if not select.select([fd], [], [], HANG_GUARD)[0] and not pid_gone(pid):
                pytest.fail(f"process {pid} never exited after its owner went away (an orphan)")
    finally:
        os.close(fd)
    return time.monotonic() - t0


def qemu_named(name: str) -> list[int]:
    """Every QEMU on the host started for a VM called *name* (any parent)."""
    pids = []
    needle = f"vmlab-{name},".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes() and not pid_gone(int(d.name)):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def private_dirs(name: str) -> list[Path]:
    return sorted(reaper.private_root().glob(f"vmlab-{name}-*"))


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def spawn_helper(name: str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([PY, str(HELPER), name, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    line = proc.stdout.readline()          # blocks until the VM(s) booted (or the child failed)
    if not line:
        proc.wait(30)
        pytest.fail(f"helper failed: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)


# ================================================================== orphans
def sigkill_trial() -> dict:
    name = "relwarm"        # this module's own name: qemu_named() counts every QEMU of that name on the host
    proc, info = spawn_helper(name, "--warm")
    vm = info["vms"][0]
    qpid, pdir = vm["qemu_pid"], Path(vm["private_dir"])
    assert not pid_gone(qpid) and pdir.is_dir()
    assert (pdir / reaper.OWNER_FILE).is_file(), "the private dir has no owner file for the sweep"
    t_kill = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close(), proc.stderr.close()
    took = wait_gone(qpid, since=t_kill)
    orphans = qemu_named(name)             # counted from the process table, before any sweep could kill them
    # the SIGKILLed parent could not remove its dir; the next start's sweep does
    reaper.sweep_stale()        # (another process's start may have swept it already)
    assert not pdir.exists()
    assert orphans == [] and qemu_named(name) == [] and private_dirs(name) == []
    return {"qemu_gone_s": took, "orphans": len(orphans), "dir_left_before_sweep": True}


def _report(kind: str, results: list[dict]) -> None:
    worst = max(r.get("qemu_gone_s", 0) for r in results)
    orphans = sum(r["orphans"] for r in results)
    extra = ""
    if any("interrupt_s" in r for r in results):
        extra = f"; interrupt to reply {max(r['interrupt_s'] for r in results):.2f} s (worst)"
    print(f"\n[reliability] {kind}: {len(results)} trials, {orphans} orphans (process table), QEMU gone after "
          f"{worst * 1000:.0f} ms (worst){extra}")
    assert orphans == 0


@pytest.mark.integration
def test_sigkilled_python_leaves_no_qemu_and_its_dir_is_swept():
    _report("sigkill", [sigkill_trial() for _ in range(SHORT_TRIALS)])


@pytest.mark.long
@pytest.mark.integration
def test_sigkilled_python_leaves_no_qemu_long():
    _report("sigkill", [sigkill_trial() for _ in range(LONG_TRIALS)])


def test_sweep_leaves_live_owners_foreign_and_unmarked_dirs_alone(tmp_path):
    live = tmp_path / "vmlab-live-x"
    dead = tmp_path / "vmlab-dead-x"
    unmarked = tmp_path / "vmlab-venv"
    other = tmp_path / "not-vmlab-dead"
    for d in (live, dead, unmarked, other):
        d.mkdir()
    reaper.claim_dir(live)
    # a dead owner: a child that has exited (its pid is free, or reused with another start time)
    child = subprocess.Popen([PY, "-c", "pass"])
    child.wait()
    (dead / reaper.OWNER_FILE).write_text(json.dumps({"owner": child.pid, "owner_start": 1}))
    (other / reaper.OWNER_FILE).write_text(json.dumps({"owner": child.pid, "owner_start": 1}))
    # a recycled pid: our own pid with a different start time counts as dead
    recycled = tmp_path / "vmlab-recycled-x"
    recycled.mkdir()
    (recycled / reaper.OWNER_FILE).write_text(json.dumps({"owner": os.getpid(), "owner_start": 1}))
    removed = reaper.sweep_stale(tmp_path)
    assert sorted(removed) == sorted([dead, recycled])
    assert live.is_dir() and unmarked.is_dir() and other.is_dir()


def test_sweep_never_kills_a_process_that_is_not_qemu(tmp_path):
    """A recorded "qemu" pid that now belongs to another program is left alone."""
    d = tmp_path / "vmlab-stray-x"
    d.mkdir()
    stray = subprocess.Popen(["sleep", "30"])      # alive, but not a QEMU
    try:
        dead = subprocess.Popen([PY, "-c", "pass"])
        dead.wait()
        (d / reaper.OWNER_FILE).write_text(json.dumps({
            "owner": dead.pid, "owner_start": 1, "qemu": stray.pid, "qemu_start": reaper.start_time(stray.pid)}))
        reaper.sweep_stale(tmp_path)
        # "sleep" is not a QEMU: the sweep must not kill an unrelated process
        assert stray.poll() is None
        assert not d.exists()
    finally:
        stray.kill()
        stray.wait()


@pytest.mark.integration
def test_sweep_kills_a_real_qemu_whose_owner_died(image, tmp_path):
    """A QEMU that outlived its owner (simulated: the owner file names a dead pid) is killed."""
    name = "relwarm"
    vm = VM(accel="tcg", image=image, name=name, warm=True)
    vm.start()
    try:
        dead = subprocess.Popen([PY, "-c", "pass"])
        dead.wait()
        (vm.private_dir / reaper.OWNER_FILE).write_text(json.dumps({
            "owner": dead.pid, "owner_start": 1, "qemu": vm.pid, "qemu_start": reaper.start_time(vm.pid)}))
        qpid, pdir = vm.pid, vm.private_dir
        reaper.sweep_stale()
        wait_gone(qpid)
        assert not pdir.exists()
    finally:
        vm.shutdown()
    assert vm.state.value in ("off", "failed")


def exception_trial(image) -> dict:
    name = "relwarm"
    seen = {}
    with pytest.raises(RuntimeError, match="boom"), VM(accel="tcg", image=image, name=name, warm=True) as vm:
        seen.update(pid=vm.pid, dir=vm.private_dir)
        vm.run("true")
        seen["t"] = time.monotonic()
        raise RuntimeError("boom")
    took = wait_gone(seen["pid"], since=seen["t"])
    orphans = qemu_named(name)
    assert not seen["dir"].exists() and private_dirs(name) == [] and qemu_children() == [] and orphans == []
    assert vm.state.value == "off"
    return {"qemu_gone_s": took, "orphans": len(orphans)}


@pytest.mark.integration
def test_exception_inside_with_leaves_nothing(image):
    _report("exception in with", [exception_trial(image) for _ in range(SHORT_TRIALS)])


@pytest.mark.long
@pytest.mark.integration
def test_exception_inside_with_leaves_nothing_long(image):
    _report("exception in with", [exception_trial(image) for _ in range(LONG_TRIALS)])


# --------------------------------------------------------------- Jupyter kernel
def _kernel_eval(kc, code: str, expr: str, timeout: float = 180) -> str:
    """Run *code* in the kernel, then evaluate *expr* there; returns its repr.

    Uses the shell channel only (execute_reply with user_expressions): iopub is a
    PUB/SUB stream that can drop or delay output on a loaded machine.
    """
    for _attempt in range(5):
        msg_id = kc.execute(code, user_expressions={"v": expr})
        while True:
            reply = kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        content = reply["content"]
        # right after an error (the KeyboardInterrupt) ipykernel aborts what is already queued: never run, so send
        # it again (the protocol's "aborted" status, not a failure of the code)
        if content["status"] != "aborted":
            break
    assert content["status"] == "ok", f"{content.get('ename')}: {content.get('evalue')}"
    v = content["user_expressions"]["v"]
    assert v["status"] == "ok", f"{v.get('ename')}: {v.get('evalue')}"
    return v["data"]["text/plain"]


def _wait_output(kc, msg_id: str, text: str) -> None:
    """Read iopub until the cell *msg_id* printed *text* (a handshake; fails after HANG_GUARD)."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=HANG_GUARD)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                and text in msg["content"].get("text", "")):
            return
    pytest.fail(f"the kernel never printed {text!r}")


def kernel_trial() -> dict:
    jc = pytest.importorskip("jupyter_client.manager")
    name = "relwarm"
    km, kc = jc.start_new_kernel(kernel_name="python3", startup_timeout=120, cwd=str(ROOT))
    try:
        import ast
        info = ast.literal_eval(_kernel_eval(
            kc, f"from vmlab import VM\nvm = VM(accel='tcg', name='{name}', warm=True)\nvm.start()",
            "{'pid': vm.pid, 'dir': str(vm.private_dir)}"))
        # a long command, interrupted: KeyboardInterrupt, kernel alive, the VM still answers.
        # Handshake: the cell says it is about to call run() (on iopub) before the interrupt is sent; the
        # interrupt then cuts a 30 s guest command short (a reply of KeyboardInterrupt, not a result).
        msg_id = kc.execute("print('run-starting', flush=True); r = vm.run('sleep 30')")
        _wait_output(kc, msg_id, "run-starting")
        t0 = time.monotonic()
        km.interrupt_kernel()
        while True:
            reply = kc.get_shell_msg(timeout=HANG_GUARD)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        interrupt_s = time.monotonic() - t0
        assert reply["content"].get("ename") == "KeyboardInterrupt", reply["content"]
        assert km.is_alive()
        after = _kernel_eval(kc, "pass", "vm.state.value + ' ' + vm.run('echo alive', timeout=30).stdout.strip()")
        assert after == "'running alive'", after
        # restart: the kernel is killed; its QEMU dies with it
        t_restart = time.monotonic()
        km.restart_kernel(now=True)
        took = wait_gone(info["pid"], since=t_restart)
        orphans = qemu_named(name)
        kc.wait_for_ready(timeout=120)
        reaper.sweep_stale()
        assert not Path(info["dir"]).exists()
        assert orphans == [] and qemu_named(name) == [] and private_dirs(name) == []
        assert _kernel_eval(kc, "pass", "'vm' in globals()") == "False"
        return {"qemu_gone_s": took, "interrupt_s": interrupt_s, "orphans": len(orphans)}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.integration
def test_jupyter_kernel_interrupt_then_restart_leaves_no_qemu():
    _report("kernel interrupt+restart", [kernel_trial() for _ in range(SHORT_TRIALS)])


@pytest.mark.long
@pytest.mark.integration
def test_jupyter_kernel_interrupt_then_restart_leaves_no_qemu_long():
    _report("kernel interrupt+restart", [kernel_trial() for _ in range(LONG_TRIALS)])


# =================================================================== faults
@pytest.mark.integration
def test_qemu_killed_mid_experiment_keeps_the_rows(image, tmp_path, monkeypatch):
    import vmlab.measure as measure
    monkeypatch.setattr(measure, "DATA_DIR", tmp_path)     # the partial CSV goes here, not into data/
    rows = Rows("faultdemo", where={"accel": "tcg"})
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:
        qpid = vm.pid
        with pytest.raises(ExperimentError) as ei, rows.guard():
            for i in range(10):
                if i == 4:
                    os.kill(qpid, signal.SIGKILL)       # behind the library's back
                r = vm.run("echo x")
                rows.add(i=i, wall_s=r.wall_s, guest_s=r.guest_s)
        wait_gone(qpid)
        assert vm.state.value in ("failed", "off")
    exc = ei.value
    assert len(exc.rows) == 4 and list(exc.rows["i"]) == [0, 1, 2, 3]
    assert "faultdemo experiment failed after 4 rows" in exc.message
    # The cause: QEMU's exit may be noticed first as the agent channel closing; run() then waits for
    # the exit and reports VMDied ("QEMU exited") either way.
    assert "QEMU exited" in exc.message, exc.message
    assert isinstance(exc.__cause__, VMError)
    saved = list((tmp_path / "measured").glob("faultdemo-partial-*.csv"))
    assert len(saved) == 1 and len(measure.load(saved[0])) == 4
    assert "saved in" in exc.message


@pytest.mark.integration
def test_guest_that_never_becomes_ready_is_a_timeout_naming_the_phase(image):
    # the initramfs runs cat instead of /init: the kernel boots, the agent never starts
    vm = VM(accel="tcg", image=image, name="neverready", kernel_args="rdinit=/bin/cat loglevel=7",
            boot_timeout=8)
    with pytest.raises(VMTimeout) as ei:
        vm.start()
    exc = ei.value
    assert "boot" in exc.phase and exc.seconds == 8
    # the kernel ran (the tail is its timestamped log) but the agent never said hello; how far the kernel got in
    # 8 s depends on the machine's load, so no particular line is required
    assert re.search(r"^\[\s*\d+\.\d+\] ", exc.console_tail, re.M), exc.console_tail
    assert "console tail" in str(exc) and exc.fix
    assert vm.state.value in ("failed", "off") and qemu_children() == []


@pytest.mark.integration
def test_guest_whose_init_dies_is_a_clear_error_with_the_panic(image):
    vm = VM(accel="tcg", image=image, name="neverready", kernel_args="rdinit=/bin/false", boot_timeout=60)
    with pytest.raises(VMError) as ei:
        vm.start()
    assert "panic" in ei.value.message and ei.value.console_tail
    assert "Kernel panic" in vm.console_text() and "Attempted to kill init" in vm.console_text()
    assert qemu_children() == []


@pytest.mark.integration
def test_kernel_panic_error_quotes_the_panic_reason(image):
    vm = VM(accel="tcg", image=image, name="neverready", kernel_args="rdinit=/bin/false", boot_timeout=60)
    with pytest.raises(VMError) as ei:
        vm.start()
    assert "Attempted to kill init" in str(ei.value)


def test_a_panic_line_arriving_in_pieces_is_quoted_whole(tmp_path):
    # the console hands QEMU's output over in chunks; a check between two of them once quoted "Attempted t"
    from vmlab.vm.console import Console

    async def feed(pieces):
        con, reader, seen = Console(), asyncio.StreamReader(), []
        con.open(tmp_path / "console.log")
        pump = asyncio.ensure_future(con.pump(reader))
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)          # the pump takes the chunk
            await asyncio.sleep(0)
            seen.append(con.panic())
        reader.feed_eof()
        await pump
        con.close()
        return seen

    line = b"[    0.41] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n"
    assert asyncio.run(feed([b"[    0.40] Run /init\r\n", line[:52], line[52:]])) == \
        [None, None, "Attempted to kill init! exitcode=0x00000100"]
    assert asyncio.run(feed([b"Kernel panic in an odd format\n"])) == [""]


@pytest.mark.integration
def test_vm_paused_behind_the_librarys_back_is_a_clear_state_error(image):
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:
        vm.qmp("stop")                 # the STOP event tells the library
        # refused at once by the state guard (StateError), not by waiting out the timeout (VMTimeout)
        with pytest.raises(StateError) as ei:
            vm.run("true", timeout=2)
        assert "paused" in str(ei.value) and "resume" in ei.value.fix
        vm.resume()
        assert vm.run("echo back").stdout.strip() == "back"


@pytest.mark.integration
def test_guest_that_stops_answering_is_a_timeout_naming_the_phase(image):
    with VM(accel="tcg", image=image, name="relwarm", warm=True) as vm:
        os.kill(vm.pid, signal.SIGSTOP)          # QEMU frozen: nobody answers, no event says so
        try:
            with pytest.raises(VMTimeout) as ei:
                vm.run("true", timeout=1)
            assert "command 'true'" in ei.value.phase and ei.value.seconds == 1
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert vm.run("echo back", timeout=30).stdout.strip() == "back"


def _seed_cache(dest: Path) -> Path:
    """A fresh cache with the kernel packages and the built lesson kernel linked in (no download, no kernel build)."""
    from vmlab.config import cache_dir
    src = cache_dir() / "downloads"
    dest.mkdir(mode=0o700)
    (dest / "downloads").mkdir(mode=0o700)
    for p in [*src.glob("*.deb"), src / "apt-resolve.json"]:
        if p.is_file():
            try:
                os.link(p, dest / "downloads" / p.name)
            except OSError:
                shutil.copy(p, dest / "downloads" / p.name)
    copy_builds(dest, link=True)
    return dest


@pytest.mark.integration
def test_truncated_cached_image_is_detected_and_rebuilt(tmp_path, monkeypatch):
    from vmlab import image as vi
    from vmlab.config import cache_dir
    if not list((cache_dir() / "downloads").glob("*.deb")):
        pytest.skip("no cached kernel package to seed a fresh cache from")
    monkeypatch.setenv("VMLAB_CACHE", str(_seed_cache(tmp_path / "cache")))
    img = vi.ensure_image()
    good = img.kernel.stat().st_size
    with open(img.kernel, "r+b") as f:
        f.truncate(good // 2)
    msgs: list[str] = []
    fixed = vi.ensure_image(progress=msgs.append)
    assert any("damaged" in m for m in msgs), msgs
    assert fixed.kernel.stat().st_size == good and fixed.key == img.key
    # everything a fresh build writes is user-only
    cache = tmp_path / "cache"
    written = [cache, *cache.glob("*.json"), *(cache / "images").rglob("*")]
    loose = [str(p) for p in written if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert loose == []


@pytest.mark.integration
def test_truncated_warm_snapshot_falls_back_to_a_cold_boot_and_is_rewritten(image):
    name, memory = "faultwarm", 160     # a spec of its own, so its snapshot is not the other tests'
    with VM(accel="tcg", image=image, name=name, memory=memory, warm=True) as vm:
        vm.run("true")
        state = vm.warm_snapshot
    assert state.exists()
    full = state.stat().st_size
    with open(state, "r+b") as f:
        f.truncate(full // 3)
    with VM(accel="tcg", image=image, name=name, memory=memory, warm=True) as vm:
        assert not vm.warm_restored
        assert "warm snapshot unusable" in vm.accel_reason, vm.accel_reason
        assert vm.run("echo cold").stdout.strip() == "cold"
    assert state.exists() and state.stat().st_size > full // 3
    with VM(accel="tcg", image=image, name=name, memory=memory, warm=True) as vm:
        assert vm.warm_restored
        assert vm.run("echo warm").stdout.strip() == "warm"


def test_unusable_cache_dir_is_a_clear_error_before_qemu_starts(tmp_path, monkeypatch):
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("x")
    monkeypatch.setenv("VMLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(ImageError) as ei:
        VM(accel="tcg", name="nocache").start()
    assert str(blocker / "cache") in ei.value.message and "VMLAB_CACHE" in ei.value.fix
    assert qemu_children() == [] and private_dirs("nocache") == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (not root?): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.integration
def test_full_disk_when_saving_a_warm_snapshot_is_said_and_the_vm_still_runs(image, tiny_tmpfs, monkeypatch):
    monkeypatch.setenv("VMLAB_CACHE", str(tiny_tmpfs / "cache"))
    with VM(accel="tcg", image=image, name="fulldisk", warm=True) as vm:
        assert "warm snapshot not saved" in vm.accel_reason and "No space left on device" in vm.accel_reason
        assert any(e["event"] == "WARM_SKIPPED" for e in vm.events)
        assert vm.run("echo still-here").stdout == "still-here\n"     # the snapshot was only an optimisation
    assert qemu_children() == [] and private_dirs("fulldisk") == []
    assert [p.name for p in (tiny_tmpfs / "cache" / "warm").iterdir()] == []   # no half-written file


def test_full_disk_while_building_the_image_is_an_image_error(image, tiny_tmpfs, monkeypatch):
    from vmlab import image as vi
    monkeypatch.setenv("VMLAB_CACHE", str(tiny_tmpfs / "cache"))
    monkeypatch.setenv("VMLAB_KERNEL", str(image.kernel))      # a file kernel: no 600 MB pre-check
    monkeypatch.setenv("VMLAB_BUSYBOX", "debian")             # no musl busybox build (a download) in the tmpfs
    with pytest.raises(ImageError) as ei:
        vi.ensure_image()
    assert "No space left" in str(ei.value) and "VMLAB_CACHE" in ei.value.fix
    assert [p.name for p in (tiny_tmpfs / "cache" / "images").iterdir()] == [".lock"]


def test_a_compile_that_fills_the_disk_names_the_disk_not_the_source(tiny_tmpfs):
    from vmlab.image.guesttools import compile_tool
    from vmlab.image.util import DEFAULT_GUEST_DIR
    (tiny_tmpfs / "filler").write_bytes(bytes(900 << 10))        # ~100 KiB left: a static program does not fit
    with pytest.raises(ImageError) as ei:
        compile_tool(DEFAULT_GUEST_DIR / "vmagent.c", tiny_tmpfs / "vmagent")
    assert "No space left on device" in ei.value.message and "VMLAB_CACHE" in ei.value.fix
    assert "fix the compile error" not in ei.value.fix


# ============================================================== concurrency
def _threads_trial(image, n: int) -> dict:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            with VM(accel="tcg", image=image, name=f"conc{i}", boot_timeout=300) as vm:
                out = vm.run(f"echo vm{i}; cat /proc/sys/kernel/random/boot_id", timeout=120).stdout.split()
                results[i] = {"pid": vm.pid, "dir": vm.private_dir, "console": vm.console_log,
                              "echo": out[0], "boot_id": out[1], "sockets": set(map(id, vm._socks)),
                              "console_text": vm.console_text()}
        except BaseException as exc:   # reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    took = time.monotonic() - t0
    failures = [r for r in results if not isinstance(r, dict)]
    assert not failures, failures
    assert [r["echo"] for r in results] == [f"vm{i}" for i in range(n)]
    assert len({r["pid"] for r in results}) == n
    assert len({r["dir"] for r in results}) == n
    assert len({r["boot_id"] for r in results}) == n           # n different guests answered
    for r in results:
        assert not r["dir"].exists() and pid_gone(r["pid"])
    assert qemu_children() == []
    print(f"\n[reliability] {n} VMs from {n} threads at once: all booted, ran and were cleaned up "
          f"in {took:.1f} s")
    return {"n": n, "seconds": took}


@pytest.mark.integration
def test_vms_started_from_threads_at_once(image):
    _threads_trial(image, 4)


@pytest.mark.long
@pytest.mark.integration
def test_vms_started_from_threads_at_once_long(image):
    _threads_trial(image, 8)


def _processes_trial(per_process: int) -> None:
    procs = [subprocess.Popen([PY, str(HELPER), f"proc{k}-", "--count", str(per_process), "--boot-timeout", "400"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "VMLAB_HELPER_EXIT": "1"}) for k in range(2)]
    t0 = time.monotonic()
    infos = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        infos.append(json.loads(out.strip().splitlines()[-1]))
    vms = [v for info in infos for v in info["vms"]]
    assert len(vms) == 2 * per_process
    assert len({v["qemu_pid"] for v in vms}) == len(vms)
    assert len({v["private_dir"] for v in vms}) == len(vms)
    for v in vms:
        assert pid_gone(v["qemu_pid"]) and not Path(v["private_dir"]).exists()
    print(f"\n[reliability] 2 processes x {per_process} VMs at once: all booted, ran and were cleaned "
          f"up in {time.monotonic() - t0:.1f} s")


@pytest.mark.integration
def test_vms_started_from_two_processes_at_once():
    _processes_trial(2)


@pytest.mark.long
@pytest.mark.integration
def test_vms_started_from_two_processes_at_once_long():
    _processes_trial(8)


# =================================================================== soak
# Bounds (also in docs/reliability.md): after a warm-up cycle, over the whole soak
#   open fds +0 .. +4, threads +0 .. +2, child processes 0, RSS growth <= 40 MB (short) / 80 MB (long).
FD_BOUND, THREAD_BOUND = 4, 2


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _children() -> int:
    me = str(os.getpid())
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text()
                if st[st.rindex(")") + 2:].split()[1] == me:
                    n += 1
            except OSError:
                pass
    return n


def soak(image, cycles: int, runs: int, rss_bound_mb: int) -> dict:
    import gc
    name = "relwarm"
    with VM(accel="tcg", image=image, name=name, warm=True) as vm:    # warm-up: snapshot, lazy imports
        vm.run("true")
    gc.collect()
    base = {"fds": _fds(), "threads": threading.active_count(), "tasks": _tasks(), "rss": _rss(),
            "children": _children()}
    t0 = time.monotonic()
    for _ in range(cycles):
        with VM(accel="tcg", image=image, name=name, warm=True) as vm:
            assert vm.warm_restored
            vm.run("true")
    with VM(accel="tcg", image=image, name=name, warm=True) as vm:
        for i in range(runs):
            assert vm.run(f"echo {i}").stdout.strip() == str(i)
    took = time.monotonic() - t0
    gc.collect()
    end = {"fds": _fds(), "threads": threading.active_count(), "tasks": _tasks(), "rss": _rss(),
           "children": _children()}
    growth = {k: end[k] - base[k] for k in base}
    print(f"\n[reliability] soak: {cycles} warm start/stop cycles + {runs} run() calls in {took:.1f} s; "
          f"growth: fds {growth['fds']:+d}, threads {growth['threads']:+d}, tasks {growth['tasks']:+d}, "
          f"children {growth['children']:+d}, RSS {growth['rss'] / 2**20:+.1f} MB")
    assert growth["fds"] <= FD_BOUND, growth
    assert growth["threads"] <= THREAD_BOUND and growth["tasks"] <= THREAD_BOUND, growth
    assert end["children"] == 0 and growth["children"] <= 0, growth
    assert growth["rss"] <= rss_bound_mb << 20, growth
    return growth


@pytest.mark.integration
def test_soak_short(image):
    soak(image, cycles=20, runs=200, rss_bound_mb=40)


@pytest.mark.long
@pytest.mark.integration
def test_soak_long(image):
    soak(image, cycles=200, runs=1000, rss_bound_mb=80)
