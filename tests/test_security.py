"""The locked-down default, each with a test.

- QMP, consoles and the agent are socketpairs: QEMU holds no TCP socket except the
  explicit host forwards, bound to 127.0.0.1;
- ``-sandbox on`` (seccomp active in the QEMU process), no display, no VNC;
- user networking is restricted: the guest reaches neither the host's loopback
  services nor the outside, only what is forwarded to it;
- the private dir is 0700; the cached images and warm snapshots are user-only;
- the library works as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import copy_builds

from vmlab import NIC, VM
from vmlab.config import cache_dir

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def inet_sockets(pid: int) -> list[dict]:
    """The process's IPv4/IPv6 TCP and UDP sockets, from /proc/PID/net/* matched by inode."""
    mine = socket_inodes(pid)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in mine:
                addr, port = f[1].rsplit(":", 1)
                found.append({"proto": proto, "local": addr, "port": int(port, 16),
                              "state": f[3], "inode": f[9]})
    return found


@pytest.fixture
def vm(image):
    """A default guest, warm-started (0.1 s instead of a boot): the same command line and sockets."""
    with VM(accel="tcg", image=image, name="secwarm", warm=True) as v:
        yield v


LOOPBACK_HEX = "0100007F"       # 127.0.0.1 as /proc/net/tcp writes it (little-endian)
LISTEN = "0A"


@pytest.mark.integration
def test_command_line_is_locked_down(vm):
    argv = vm.command
    joined = " ".join(argv)
    assert "-sandbox" in argv and argv[argv.index("-sandbox") + 1].startswith("on")
    for deny in ("obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
        assert deny in argv[argv.index("-sandbox") + 1]
    assert argv[argv.index("-display") + 1] == "none"
    assert "-nodefaults" in argv and "-no-user-config" in argv
    for forbidden in ("-vnc", "-spice", "-qmp", "-monitor", "-daemonize", "-gdb", "-s"):
        assert forbidden not in argv
    assert "tcp:" not in joined and "telnet" not in joined and "0.0.0.0" not in joined
    # QMP, console and agent are handed over as inherited fds
    for chardev in ("id=qmp", "id=con0", "id=agent"):
        spec = next(a for a in argv if chardev in a)
        assert spec.startswith("socket,") and ",fd=" in spec and "path=" not in spec
    # seccomp is really on in the process (2 = filter mode)
    status = Path(f"/proc/{vm.pid}/status").read_text()
    assert "\nSeccomp:\t2" in status


@pytest.mark.integration
def test_qemu_has_no_inet_socket_without_forwards(vm):
    assert inet_sockets(vm.pid) == []
    # its sockets are all UNIX (socketpairs), none bound to a path
    unix = Path(f"/proc/{vm.pid}/net/unix").read_text().splitlines()[1:]
    mine = socket_inodes(vm.pid)
    paths = [line.split()[7] for line in unix if len(line.split()) > 7 and line.split()[6] in mine]
    assert paths == [], f"QEMU has UNIX sockets bound to paths: {paths}"


@pytest.mark.integration
def test_guest_reaches_only_explicit_forwards(image):
    host_service = socket.socket()
    host_service.bind(("127.0.0.1", 0))
    host_service.listen(5)
    host_service.settimeout(0.2)
    service_port = host_service.getsockname()[1]
    fwd = free_port()
    try:
        with VM(accel="tcg", image=image, name="secnet", nics=[NIC(forwards=((fwd, 8080),))]) as vm:
            # QEMU's only inet socket: the forward, listening on 127.0.0.1
            socks = inet_sockets(vm.pid)
            assert [(s["proto"], s["local"], s["port"], s["state"]) for s in socks] == \
                [("tcp", LOOPBACK_HEX, fwd, LISTEN)], socks
            vm.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 "
                   "&& ip route add default via 10.0.2.2")
            # control: the guest's nc works (a guest-local server answers)
            vm.run("(echo local-ok | nc -l -p 7000) >/dev/null 2>&1 &")
            wait_listening(vm, 7000)
            assert "local-ok" in vm.run("nc -w 2 127.0.0.1 7000 </dev/null", timeout=20).stdout
            # the host's loopback service, through the gateway: refused
            to_host = vm.run(f"echo x | nc -w 2 10.0.2.2 {service_port}; echo rc=$?",
                             check=False, timeout=20).stdout
            with pytest.raises(socket.timeout):
                host_service.accept()
            assert "rc=0" not in to_host, to_host
            # the outside (TEST-NET-1, never routed): unreachable
            outside = vm.run("echo x | nc -w 2 192.0.2.1 80; echo rc=$?", check=False, timeout=20).stdout
            assert "rc=0" not in outside, outside
            # the forward: the host reaches the guest's server
            vm.run("(echo hello-from-guest | nc -l -p 8080) >/dev/null 2>&1 &")
            wait_listening(vm, 8080)
            with socket.create_connection(("127.0.0.1", fwd), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(100).startswith(b"hello-from-guest")
            # and the forward is not reachable on another host address
            others = [a for a in _host_addresses() if not a.startswith("127.")]
            for addr in others:
                with pytest.raises(OSError):
                    socket.create_connection((addr, fwd), timeout=2).close()
    finally:
        host_service.close()


def wait_listening(vm, port: int, tries: int = 300) -> None:
    """Readiness handshake: return once the guest's /proc/net/tcp or tcp6 (busybox nc listens dual-stack) shows
    *port* in LISTEN (state 0A). Polled inside the guest, bounded by a count of tries; fails if it never appears."""
    pattern = f":{port:04X} [0-9A-F]+:0000 0A"
    r = vm.run(f"i=0; while [ $i -lt {tries} ]; do cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -Eq '{pattern}' "
               f"&& echo listening && exit 0; "
               f"i=$((i+1)); sleep 0.05; done; echo never", check=False, timeout=120)
    assert r.stdout.strip() == "listening", f"nothing listens on guest port {port}: {r.stdout!r} {r.stderr!r}"


def _host_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
    return [a for a in out.split() if ":" not in a]


@pytest.mark.integration
def test_private_dir_is_0700(vm):
    d = vm.private_dir
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


@pytest.mark.integration
def test_files_in_private_dir_are_user_only(vm):
    files = [p for p in vm.private_dir.iterdir() if p.is_file()]
    assert files
    loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o077}
    assert loose == {}


@pytest.mark.integration
def test_cached_images_and_warm_snapshots_are_user_only(image):
    with VM(accel="tcg", image=image, name="secwarm", warm=True) as vm:
        vm.run("true")
        snapshot = vm.warm_snapshot
    cache = cache_dir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    checked = 0
    for sub in ("images", "warm"):
        d = cache / sub
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, d
        for p in d.rglob("*"):
            if p.is_symlink():
                continue
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, f"{p} is readable by others"
            checked += 1
    assert snapshot.exists() and snapshot.parent == cache / "warm"
    assert checked >= 4


def _nobody_cache() -> Path:
    """A cache dir owned by nobody, pre-seeded with the kernel package and the built lesson kernel (no download,
    no kernel build: the image is built from them)."""
    base = Path(tempfile.mkdtemp(prefix="vmlab-sec-nobody-", dir="/tmp"))
    (base / "cache" / "downloads").mkdir(parents=True)
    src = cache_dir() / "downloads"
    for p in [*src.glob("*.deb"), src / "apt-resolve.json"]:
        if p.is_file():
            shutil.copy(p, base / "cache" / "downloads" / p.name)
    copy_builds(base / "cache")
    for p in [base, *base.rglob("*")]:
        os.chown(p, NOBODY, NOBODY)
    os.chmod(base, 0o700)
    return base


CHILD = """
import json, os, stat
from vmlab import VM
from vmlab.config import cache_dir
from vmlab.image import ensure_image
img = ensure_image()
with VM(accel="tcg", image=img, name="nobody") as vm:
    out = vm.run("echo guest-ok").stdout.strip()
    info = {"uid": os.getuid(), "guest": out, "dir_uid": vm.private_dir.stat().st_uid,
            "dir_mode": oct(stat.S_IMODE(vm.private_dir.stat().st_mode)),
            "image_uid": img.kernel.stat().st_uid, "cache": str(cache_dir())}
print(json.dumps(info))
"""


@pytest.mark.integration
def test_works_as_an_unprivileged_user(image):
    if os.getuid() != 0:
        pytest.skip("needs root to switch to nobody (as a normal user, the whole suite already is that test)")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing")
    base = _nobody_cache()
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base),
               "VMLAB_CACHE": str(base / "cache"), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                              cwd=str(base), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["uid"] == NOBODY and info["guest"] == "guest-ok"
        assert info["dir_uid"] == NOBODY and info["dir_mode"] == "0o700"
        assert info["image_uid"] == NOBODY and info["cache"] == str(base / "cache")
    finally:
        shutil.rmtree(base, ignore_errors=True)
