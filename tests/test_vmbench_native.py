"""Native (host) tests for the guest benchmark tool vmlab/guest/vmbench.c.

The C file is compiled the way the guest image builder does it
(gcc -static -O2 -Wall) and every subcommand is run once on this machine.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "vmlab" / "guest" / "vmbench.c"


@pytest.fixture(scope="module")
def vmbench(tmp_path_factory):
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("vmbench")
    probe = d / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    p = subprocess.run([gcc, "-static", "-o", str(d / "probe"), str(probe)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip("static libc not available: " + p.stderr.strip()[-200:])
    exe = d / "vmbench"
    p = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(exe), str(SRC)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr, p.stderr
    return str(exe)


def run(exe, *args, rc=0, timeout=30):
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == rc, (args, p.returncode, p.stdout, p.stderr)
    if rc == 2:
        return p
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    return json.loads(lines[0])


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(exe, *args):
    """Start udp-recv/udp-echo and wait for READY on stderr."""
    proc = subprocess.Popen([exe, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.strip() == "READY", line
    return proc


def finish(proc):
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


ALL_BENCHES = {"null_syscall", "page_fault", "port_io", "signal_fpe", "mprotect",
               "mmap_munmap", "clock_gettime", "rdtsc", "compute", "memory_bw",
               "fork_wait"}


def test_help(vmbench):
    p = subprocess.run([vmbench, "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for sub in ("disk", "write", "udp-send", "udp-recv", "udp-rr", "udp-echo",
                "cpu", "spin", "touch", "sysinfo"):
        assert sub in p.stdout


def test_cpu(vmbench):
    d = run(vmbench, "cpu", "--scale", "0.1", "--repeats", "3", timeout=60)
    assert d["test"] == "cpu"
    res = {r["benchmark"]: r for r in d["results"]}
    assert set(res) == ALL_BENCHES
    assert "compute" in res and "null_syscall" in res
    for name, r in res.items():
        if "skipped" in r:
            assert name == "port_io", r        # only port_io may be skipped
            assert r["skipped"].startswith("ioperm:")
            assert "ns_per_op" not in r
            continue
        assert positive(r["ns_per_op"]), r
        assert r["ns_min"] <= r["ns_per_op"] <= r["ns_max"], r
        assert r["repeats"] == 3 and len(r["samples_ns"]) == 3
        assert r["iterations"] >= 1
        assert r["ns_cv"] >= 0
        assert positive(r["cycles_per_op"]), r
    assert "skipped" not in res["compute"] and "skipped" not in res["null_syscall"]
    assert "clocksource" in res["clock_gettime"]
    assert positive(res["memory_bw"]["mb_s"])


def test_cpu_select(vmbench):
    d = run(vmbench, "cpu", "--bench", "compute,rdtsc", "--repeats", "1", "--scale", "0.01")
    assert [r["benchmark"] for r in d["results"]] == ["rdtsc", "compute"]


def _disk(exe, path, mode, pattern, *extra):
    d = run(exe, "disk", "--dev", path, "--mode", mode, "--pattern", pattern,
            "--bs", 4096, "--total", 1 << 20, *extra)
    assert d["test"] == "disk" and d["mode"] == mode and d["pattern"] == pattern
    assert d["bytes"] == 1 << 20 and d["ops"] == 256 and d["bs"] == 4096
    assert positive(d["seconds"]) and positive(d["throughput_mb_s"])
    assert d["lat_us_median"] <= d["lat_us_p99"]
    assert d["user_s"] >= 0 and d["sys_s"] >= 0
    return d


def test_disk(vmbench, tmp_path):
    f = str(tmp_path / "disk.img")
    _disk(vmbench, f, "write", "seq")
    assert os.path.getsize(f) == 1 << 20
    data = Path(f).read_bytes()
    assert 0 not in data[:8192]                      # non-zero pattern
    _disk(vmbench, f, "read", "seq")
    _disk(vmbench, f, "write", "rand", "--seed", 3)
    _disk(vmbench, f, "read", "rand")


def test_disk_direct(vmbench, tmp_path):
    f = tmp_path / "direct.img"
    f.write_bytes(b"\x01" * (1 << 20))
    try:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported on {tmp_path}: {e}")
    for mode in ("write", "read"):
        for pattern in ("seq", "rand"):
            _disk(vmbench, str(f), mode, pattern, "--direct")


def test_disk_read_too_small(vmbench, tmp_path):
    f = tmp_path / "tiny"
    f.write_bytes(b"x" * 100)
    p = subprocess.run([vmbench, "disk", "--dev", str(f), "--mode", "read", "--pattern", "seq",
                        "--bs", "4096", "--total", "8192"], capture_output=True, text=True)
    assert p.returncode == 1
    assert "error" in json.loads(p.stdout)


def test_write(vmbench, tmp_path):
    f = tmp_path / "out.txt"
    d = run(vmbench, "write", "--path", f, "--bs", 1000, "--total", 123457)
    assert d["test"] == "write" and d["bytes"] == 123457 and d["bs"] == 1000
    assert os.path.getsize(f) == d["bytes"]
    data = f.read_bytes()
    assert b"\n" not in data and all(97 <= b <= 122 for b in data[:1000])
    assert positive(d["throughput_mb_s"])


def test_write_tty(vmbench):
    """A tty is switched to raw mode (no newline translation) and restored."""
    pty = pytest.importorskip("pty")
    import termios
    import threading
    master, slave = pty.openpty()
    got = bytearray()

    def reader():
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                return
            if not b:
                return
            got.extend(b)

    threading.Thread(target=reader, daemon=True).start()
    try:
        before = termios.tcgetattr(slave)
        d = run(vmbench, "write", "--path", os.ttyname(slave), "--bs", 512, "--total", 20000)
        assert d["bytes"] == 20000
        deadline = time.monotonic() + 5
        while len(got) < 20000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) == 20000 and all(97 <= b <= 122 for b in got)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(slave)
        os.close(master)


def test_udp_send_recv(vmbench):
    port = free_udp_port()
    srv = start_server(vmbench, "udp-recv", "--port", port, "--count", 2000, "--timeout-ms", 500)
    s = run(vmbench, "udp-send", "--dst", "127.0.0.1", "--port", port, "--size", 512,
            "--count", 2000)
    r = finish(srv)
    assert s["test"] == "udp-send" and s["count"] == 2000 and s["bytes"] == 2000 * 512
    assert positive(s["pps"]) and s["errors"] >= 0
    assert r["test"] == "udp-recv" and r["received"] > 0
    assert r["lost"] == 2000 - r["received"]
    assert r["bytes"] == 512 * r["received"]


def test_udp_recv_timeout(vmbench):
    """With nobody sending, the receiver ends by its own timeout (finish() only guards a hang) and says so."""
    srv = start_server(vmbench, "udp-recv", "--port", free_udp_port(), "--count", 5,
                       "--timeout-ms", 200)
    r = finish(srv)
    assert r["received"] == 0 and r["lost"] == 5


def test_udp_echo_rr(vmbench):
    port = free_udp_port()
    srv = start_server(vmbench, "udp-echo", "--port", port, "--count", 200, "--timeout-ms", 1000)
    rr = run(vmbench, "udp-rr", "--dst", "127.0.0.1", "--port", port, "--size", 64,
             "--count", 200, "--timeout-ms", 1000)
    e = finish(srv)
    assert rr["test"] == "udp-rr" and rr["count"] == 200 and rr["replies"] > 0
    assert 0 < rr["rtt_us_min"] <= rr["rtt_us_median"] <= rr["rtt_us_p99"]
    assert e["test"] == "udp-echo" and e["echoed"] >= rr["replies"]


def test_spin(vmbench):
    d = run(vmbench, "spin", "--seconds", "0.3")
    assert d["test"] == "spin" and d["seconds"] >= 0.3
    assert d["ops"] > 0 and positive(d["ops_per_s"])
    assert d["user_s"] > 0
    assert d["steal_ticks"] is None or (isinstance(d["steal_ticks"], int) and d["steal_ticks"] >= 0)


def test_touch(vmbench):
    d = run(vmbench, "touch", "--mb", 8, "--hold-ms", 10)
    assert d == {"test": "touch", "mb": 8, "seconds": d["seconds"], "mb_s": d["mb_s"]}
    assert positive(d["seconds"]) and positive(d["mb_s"])


def test_sysinfo(vmbench):
    d = run(vmbench, "sysinfo")
    assert d["test"] == "sysinfo"
    assert isinstance(d["hypervisor_bit"], bool)     # this host is a KVM guest, but don't insist
    if d["hypervisor_bit"]:
        assert isinstance(d["hypervisor_vendor"], str)
        assert isinstance(d["hypervisor_max_leaf"], int)
    else:
        assert d["hypervisor_vendor"] is None
    assert isinstance(d["cpu_vendor"], str) and d["cpu_vendor"]
    assert isinstance(d["clocksources_available"], list)
    assert d["nproc"] >= 1 and d["mem_total_kb"] > 0


@pytest.mark.parametrize("args, needle", [
    (["frobnicate"], "frobnicate"),
    (["disk", "--dev", "x", "--mode", "read", "--pattern", "seq", "--bs", "0", "--total", "4096"], "--bs"),
    (["disk", "--dev", "x", "--mode", "read", "--pattern", "seq", "--bs", "4096", "--total", "abc"], "--total"),
    (["disk", "--dev", "x", "--mode", "sideways", "--pattern", "seq", "--bs", "4096", "--total", "4096"], "--mode"),
    (["disk", "--mode", "read", "--pattern", "seq", "--bs", "4096", "--total", "4096"], "--dev"),
    (["cpu", "--bench", "nope"], "--bench"),
    (["cpu", "--scale", "-1"], "--scale"),
    (["cpu", "--repeats", "0"], "--repeats"),
    (["udp-send", "--dst", "1.2.3", "--port", "9", "--size", "10", "--count", "1"], "--dst"),
    (["udp-recv", "--port", "70000", "--count", "1"], "--port"),
    (["spin", "--seconds", "nan"], "--seconds"),
    (["touch", "--mb"], "--mb"),
    (["write", "--path", "/dev/null", "--bs", "-5", "--total", "10"], "--bs"),
])
def test_bad_usage(vmbench, args, needle):
    p = run(vmbench, *args, rc=2)
    assert needle in p.stderr
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1
