"""The bottom layer: vmlab.config, vmlab.log, vmlab.procfs, vmlab.tools (no VM needed)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading

import pytest

from vmlab import config, procfs, tools
from vmlab.errors import DiskError, ImageError, SetupError, ToolError, VMError, VMLabError


# --------------------------------------------------------------------------- config
def test_every_vmlab_variable_in_the_package_is_in_the_table():
    root = os.path.dirname(config.__file__)
    seen = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".py") and name != "config.py":
                with open(os.path.join(dirpath, name)) as f:
                    text = f.read()
                seen |= set(re.findall(r"\bVMLAB_[A-Z_]+[A-Z]\b", text))
    assert seen - set(config.ENV_VARS) == set()
    for var in config.ENV_VARS:
        assert var in config.__doc__


def test_env_reads_at_call_time_and_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("VMLAB_ACCEL", "kvm")
    assert config.accel_override() == "kvm"
    monkeypatch.setenv("VMLAB_ACCEL", "bogus")
    assert config.accel_override() is None
    monkeypatch.setenv("VMLAB_VERIFY_IMAGE", "0")
    assert not config.verify_image()
    monkeypatch.setenv("VMLAB_VERIFY_IMAGE", "1")
    assert config.verify_image()
    with pytest.raises(KeyError, match="ENV_VARS"):
        config.env("VMLAB_TYPO")


def test_cache_dir_is_private_and_a_blocked_path_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "c"))
    d = config.cache_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(config.cache_subdir("native").stat().st_mode) == 0o700
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "file" / "c"))
    with pytest.raises(ImageError) as ei:
        config.cache_dir()
    assert "VMLAB_CACHE" in (ei.value.fix or "")


def test_private_root_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.private_root() == tmp_path
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert config.private_root() != tmp_path / "missing"


def test_atomic_write_sets_the_mode_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "f.json"
    config.atomic_write(p, "one")
    assert p.read_text() == "one" and stat.S_IMODE(p.stat().st_mode) == 0o600
    config.atomic_write(p, b"two", mode=0o644)
    assert p.read_bytes() == b"two" and stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(OSError):
        config.atomic_write(tmp_path / "no" / "dir", "x")


# --------------------------------------------------------------------------- log
def _child_stderr(level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VMLAB_LOG"}
    if level is not None:
        env["VMLAB_LOG"] = level
    code = "from vmlab.log import logger; logger.debug('dbg-line'); logger.warning('warn-line')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stderr


def test_logger_is_quiet_by_default_and_vmlab_log_shows_it():
    assert _child_stderr(None) == ""
    out = _child_stderr("debug")
    assert "dbg-line" in out and "warn-line" in out
    out = _child_stderr("warning")
    assert "dbg-line" not in out and "warn-line" in out
    assert "not a log level" in _child_stderr("loud")


# --------------------------------------------------------------------------- procfs
def test_procfs_reads_this_process():
    me = os.getpid()
    assert procfs.start_time(me) is not None and procfs.parent_pid(me) == os.getppid()
    assert procfs.comm(me) and procfs.status_kb(me, "VmRSS") > 0
    assert procfs.rss_bytes(me) > 0 and procfs.pss_bytes(me) > 0
    assert procfs.process_cpu_seconds(me) > 0
    ev = threading.Event()
    t = threading.Thread(target=ev.wait, name="procfs-test", daemon=True)
    t.start()
    try:
        rows = procfs.threads(me)
        assert {me, t.native_id} <= {r["tid"] for r in rows}
        assert all(r["cpu_s"] >= 0 and r["last_core"] >= 0 for r in rows)
    finally:
        ev.set()
        t.join()
    assert procfs.host_steal_ticks() >= 0


def test_procfs_of_a_child_and_of_a_gone_process():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in procfs.descendants(os.getpid())
        assert procfs.comm(child.pid) == "sleep" and procfs.is_zombie(child.pid) is False
    finally:
        child.kill()
        child.wait()
    gone = child.pid
    assert procfs.start_time(gone) is None and procfs.rss_bytes(gone) == 0 and procfs.comm(gone) == ""
    assert procfs.process_cpu_seconds(gone) == 0.0 and procfs.is_zombie(gone) is None
    with pytest.raises(VMError, match="is gone"):
        procfs.threads(gone)


def test_stat_fields_survive_a_command_name_with_a_paren(tmp_path):
    fake = tmp_path / "stat"
    fake.write_text("42 (a) b) S 7 42 42 0 -1 0 0 0 0 0 11 12 0 0 20 0 1 0 99 0 0\n")
    f = procfs.stat_fields(str(fake))
    assert f[0] == "S" and f[1] == "7" and f[11] == "11" and f[19] == "99"


# --------------------------------------------------------------------------- tools
def test_need_tool_names_the_debian_package():
    assert tools.need_tool("sh")
    with pytest.raises(SetupError) as ei:
        tools.need_tool("qemu-io-does-not-exist", "qemu-utils", needed_for="to test")
    assert "qemu-io-does-not-exist" in ei.value.message and ei.value.fix == "apt-get install qemu-utils"


def test_run_tool_errors_say_what_failed_and_why():
    ok = tools.run_tool(["sh", "-c", "echo hi"], what="echo", text=True)
    assert ok.stdout == "hi\n"
    with pytest.raises(ToolError) as ei:
        tools.run_tool(["sh", "-c", "echo boom >&2; exit 3"], what="the test tool", fix="do X")
    e = ei.value
    assert e.exit_code == 3 and e.stderr.strip() == "boom" and e.fix == "do X"
    assert "the test tool failed (exit status 3)" in e.message and "boom" in e.message
    with pytest.raises(DiskError) as di:
        tools.run_tool(["sh", "-c", "exit 1"], what="disk", error=DiskError)
    assert isinstance(di.value, ToolError) and isinstance(di.value, VMLabError)
    with pytest.raises(ImageError, match="boom"):
        tools.run_tool(["sh", "-c", "echo boom >&2; exit 1"], what="image step", error=ImageError)
    assert tools.run_tool(["sh", "-c", "exit 2"], what="ok 2", ok=(0, 2)).returncode == 2
    with pytest.raises(SetupError, match="not installed"):
        tools.run_tool(["/nonexistent/tool"], what="missing")
    with pytest.raises(ToolError, match="did not finish"):
        tools.run_tool(["sleep", "5"], what="slow", timeout=0.2)
