"""vmlab inside vmlab: run vmlab's own KVM path for real, in a nested guest.

Where the host's KVM cannot run guests (a PVM host, a cloud VM without nested
virtualization), KVM still works one level down: a nested guest under TCG gets a virtual
CPU with AMD-V (:mod:`vmlab.vm.nested`). :func:`run_inside` boots such a guest with the
host's root shared into it **read-only** over virtio-9p (``MachineSpec(nested=True,
host_root=True)``), mounts it on ``/host``, gives the chroot a writable ``/tmp`` (an ext4
scratch disk of the nested guest, thrown away with it) and ``/run`` (tmpfs), and runs this
very interpreter (``sys.executable``, the same vmlab package) in ``chroot /host`` with
``VMLAB_ACCEL=kvm``::

    res = run_inside(["-m", "vmlab", "experiment", "disk", "--quick", "--json"], timeout=600)
    res.check().stdout          # the inner vmlab's rows: accel "kvm", kvm_exits filled

The inner vmlab starts its own QEMU (the host's binary, read over 9p) under the nested
guest's ``/dev/kvm``. Its cache (``VMLAB_CACHE``) is a directory on that scratch ``/tmp`` that links to the
host's built guest image, kernel package and native tools (read-only; nothing is copied,
nothing is built inside), so the inner guest is the lesson guest itself. Every QEMU stops
with the nested guest, which :func:`run_inside` always shuts down.

Security: the share is read-only at QEMU's end (``readonly=on``), exists only in these
nested runs (never in a lesson guest), and the outer QEMU keeps ``-sandbox on``.

Cost on a 2-core TCG host (docs/kvm.md has the measurements): the nested guest boots in
≈4 s, the inner Python imports vmlab in ≈5 s over 9p, and an inner lesson guest boots
under KVM in ≈17 s.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import config
from ..errors import SpecError, VMError, VMLabError
from ..hostinfo import host_cpu
from ..image import GuestImage, ensure_image
from ..log import get_logger
from ..spec import Disk, MachineSpec
from ..tools import qemu_version
from .qemu import HOST_ROOT_TAG
from .sync import VM, kvm_verdict

__all__ = [
    "HOST",
    "INNER",
    "MEMORY_MB",
    "TCG_INNER_CPU",
    "CompletedRun",
    "host_tmp_dirs",
    "inner_command",
    "inner_env",
    "inner_spec",
    "run_inside",
    "setup_script",
]

log = get_logger(__name__)

HOST = "/host"                  # where the nested guest mounts the host's root (read-only)
INNER = "/tmp/vmlab-inner"      # inside the chroot, on its scratch /tmp: the inner cache and home
#: the nested guest's memory: the inner QEMU (~60 MiB) + its 128 MiB guest + Python with pandas
#: (~120 MiB) + the nested guest's page cache, with room to spare
MEMORY_MB = 1024
#: variables passed on to the inner vmlab when set here
PASSED_ON = ("VMLAB_QUICK", "VMLAB_LOG", "VMLAB_STRICT", "VMLAB_VERIFY_IMAGE")
#: the nested guest's scratch disk, ext4 on the chroot's /tmp: the inner QEMU opens its scratch disks with
#: O_DIRECT (cache=none), which tmpfs refuses (QEMU exits at start), and it keeps the nested guest's RAM free
SCRATCH = "2G"
#: the nested guest's CPU under TCG: qemu64 with AMD-V and nested paging (kvm_amd) plus x86-64-v2 (SSSE3,
#: SSE4.1/4.2, POPCNT, CX16): the host's NumPy dies of SIGILL on plain qemu64 (measured: status 132)
TCG_INNER_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+svm,+npt"
SCRATCH_DEV = "/dev/vda"
INNER_DIRS = " ".join(f"{HOST}{INNER}/{d}" for d in ("cache/images", "cache/downloads", "cache/native", "cache/busybox",
                                                      "home"))


@dataclass
class CompletedRun:
    """What the inner vmlab did: its output, exit status and timings, and where it ran."""

    argv: List[str]
    rc: int                     # the inner Python's exit status (-1: timed out)
    stdout: str
    stderr: str
    seconds: float              # start of the nested guest to its shutdown
    phases: Dict[str, float] = field(default_factory=dict)     # boot_s, setup_s, run_s
    where: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> CompletedRun:
        """Self if the inner run succeeded, else VMError with the end of its stderr."""
        if self.rc != 0:
            raise VMError(f"vmlab inside the nested guest failed (status {self.rc}): "
                          f"{(self.stderr or self.stdout).strip()[-1500:]}",
                          fix="run the same command on the host first; VMLAB_LOG=debug shows more")
        return self


def inner_spec(memory: int = MEMORY_MB, cpus: int = 1, accel: str = "tcg") -> MachineSpec:
    """The nested guest that runs vmlab: AMD-V in its virtual CPU, the host's / shared read-only.

    Under TCG its CPU is :data:`TCG_INNER_CPU` (the host's Python runs in it: NumPy needs
    x86-64-v2); under KVM the host's CPU (nested virtualization)."""
    if accel not in ("tcg", "kvm"):
        raise SpecError("accel", f"{accel!r} is not tcg or kvm", fix='accel="tcg"')
    return MachineSpec(name="vmlab-inner", accel=accel, nested=True, host_root=True, memory=memory, cpus=cpus,
                       cpu_model=TCG_INNER_CPU if accel == "tcg" else "host", modules=("ext4",),
                       disks=(Disk(size=SCRATCH, bus="virtio"),))


def _host_cache_links(image: GuestImage) -> List[str]:
    """Shell lines linking the inner cache to the host's image, kernel package, native tools and busybox build."""
    host_cache = config.cache_dir()
    inner_cache = f"{HOST}{INNER}/cache"
    q = shlex.quote
    lines = [f"mkdir -p -m 0700 {INNER_DIRS}",
             f"ln -s {q(str(image.root))} {q(f'{inner_cache}/images/{image.key}')}"]
    for sub in ("downloads", "native", "busybox"):
        src = f"{HOST}{host_cache}/{sub}"
        lines.append(f'for f in {q(src)}/*; do [ -e "$f" ] && ln -s "${{f#{HOST}}}" {q(f"{inner_cache}/{sub}/")}; '
                     "done; true")
    lines.append(f"cp {q(f'{HOST}{host_cache}/hashes.json')} {q(inner_cache + '/')} 2>/dev/null; true")
    return lines


def host_tmp_dirs(paths: Optional[Sequence[str]] = None) -> List[str]:
    """The directories right under the host's /tmp that the inner run needs: the interpreter's prefix, this
    vmlab's source, the image cache (a clone or a cache under /tmp, as in CI). The chroot's /tmp is the scratch
    disk, which hides the host's /tmp, so :func:`setup_script` binds these back (read-only, as all of /host)."""
    if paths is None:
        paths = [sys.prefix, str(Path(__file__).resolve().parents[2]), str(config.cache_dir())]
    tops = set()
    for p in paths:
        parts = Path(os.path.abspath(p)).parts            # ('/', 'tmp', 'ci5', ...)
        if len(parts) > 2 and parts[1] == "tmp":
            tops.add("/tmp/" + parts[2])
    return sorted(tops)


def setup_script(image: GuestImage, tmp_dirs: Optional[Sequence[str]] = None) -> str:
    """Shell run in the nested guest: mount the host's root read-only on /host, give the chroot
    /proc, /sys, /dev, a writable /tmp (the scratch disk, ext4, with the host's /tmp directories the run
    needs bound back: :func:`host_tmp_dirs`) and /run (tmpfs), link the inner cache to the host's."""
    q = shlex.quote
    binds = [f"mkdir -p {HOST}{q(d)} && {{ mounted {HOST}{q(d)} || mount -o bind /hosttmp{q(d[4:])} {HOST}{q(d)}; }}"
             for d in (host_tmp_dirs() if tmp_dirs is None else tmp_dirs)]
    lines = ["set -e",
             'mounted() { grep -q " $1 " /proc/mounts; }',
             f"mkdir -p {HOST}",
             f"mounted {HOST} || mount -t 9p -o trans=virtio,version=9p2000.L,ro {HOST_ROOT_TAG} {HOST}",
             f"mounted {HOST}/proc || mount -t proc proc {HOST}/proc",
             f"mounted {HOST}/sys || mount -t sysfs sysfs {HOST}/sys",
             f"mounted {HOST}/dev || mount -o bind /dev {HOST}/dev",
             "mkdir -p /hosttmp",          # the host's /tmp, before the scratch disk hides it (one 9p mount per tag)
             f"mounted /hosttmp || mount -o bind {HOST}/tmp /hosttmp",
             f"mounted {HOST}/tmp || {{ chroot {HOST} /sbin/mkfs.ext4 -q -F {SCRATCH_DEV} && "
             f"mount -t ext4 {SCRATCH_DEV} {HOST}/tmp && chmod 1777 {HOST}/tmp; }}",
             *binds,
             f"mounted {HOST}/run || mount -t tmpfs -o mode=0755 tmpfs {HOST}/run",
             f"test -c {HOST}/dev/kvm",
             *_host_cache_links(image)]
    return "\n".join(lines)


def inner_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The inner vmlab's whole environment: its cache on the scratch /tmp, KVM asked for, this vmlab first
    on the path."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": f"{INNER}/home", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           "VMLAB_CACHE": f"{INNER}/cache", "VMLAB_ACCEL": "kvm", "VMLAB_SLOW_KVM": "1",
           "PYTHONPATH": package_parent, "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
    for name in PASSED_ON:
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(extra or {})
    return env


def inner_command(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                  python: Optional[str] = None) -> str:
    """The shell command the nested guest runs: this interpreter in ``chroot /host`` with ``argv``."""
    exe = python or sys.executable
    if not exe or not os.path.isabs(exe):
        raise VMError(f"cannot tell which Python runs vmlab ({exe!r})",
                      fix="run vmlab with a Python started by its absolute path (e.g. .venv/bin/python)")
    words = ["chroot", HOST, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in (env or inner_env()).items()),
             exe, *argv]
    return f"cd / && {' '.join(shlex.quote(w) for w in words)}"


def where(vm: VM, image: GuestImage) -> Dict[str, Any]:
    """Where an inner run ran: the host, the outer (nested) guest, and the accelerator inside."""
    return {"host": socket.gethostname(), "host_kernel": platform.release(), "host_cpu": host_cpu(),
            "host_cpus": os.cpu_count(), "qemu": qemu_version(), "outer_accel": vm.accel,
            "outer_accel_reason": vm.accel_reason, "nested_guest_kernel": vm.kernel_release,
            "nested_kvm_module": vm.nested_kvm["module"] if vm.nested_kvm else None, "inner_accel": "kvm",
            "nested_memory_mb": vm.spec.memory_mb, "nested_cpus": vm.spec.cpus, "image": image.key,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_before": _load()}


def _load() -> Optional[List[float]]:
    """The host's load averages (1, 5, 15 min): how busy the machine was around the run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_inside(argv: Sequence[str], *, timeout: float = 600.0, memory: int = MEMORY_MB, cpus: int = 1,
               accel: str = "auto", env: Optional[Mapping[str, str]] = None,
               image: Optional[GuestImage] = None) -> CompletedRun:
    """Boot the nested guest with the host's root read-only, run ``python ARGV`` (this interpreter,
    this vmlab) in a chroot of it with ``VMLAB_ACCEL=kvm``, and shut everything down.

    ``argv`` are the Python arguments (``["-m", "vmlab", ...]`` or a script path, which must be
    readable on the host); ``env`` adds to :func:`inner_env`. A failing inner command is a
    result (``rc``), not an error; a nested guest without a working /dev/kvm raises VMError.
    """
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise SpecError("argv", f"{argv!r} is not a list of strings", fix='e.g. ["-m", "vmlab", "doctor"]')
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise SpecError("timeout", f"{timeout!r} is not a positive number of seconds", fix="e.g. timeout=600")
    image = image or ensure_image()
    if accel == "auto":
        accel = "kvm" if kvm_verdict()["usable"] else "tcg"
    command = inner_command(argv, inner_env(env))
    t0 = time.monotonic()
    with VM(inner_spec(memory, cpus, accel), image=image, boot_timeout=180) as vm:
        t_boot = time.monotonic()
        state = vm.nested_kvm
        if not state or not state["works"]:
            raise VMError("KVM does not work inside the nested guest: " + (state["reason"] if state else "no report"),
                          fix="python -m vmlab doctor --reprobe says why (nested KVM line)")
        info = where(vm, image)
        setup = vm.run(setup_script(image), timeout=120, check=False)
        if setup.status != 0:
            raise VMError(f"could not prepare the host's root in the nested guest: "
                          f"{(setup.stderr or setup.stdout).strip()[-500:]}",
                          fix="the nested guest needs the 9p modules (vmlab/guest/modules.txt); "
                              "rebuild the image with python -m vmlab image build")
        t_setup = time.monotonic()
        log.info("inside the nested guest: %s", command)
        res = vm.run(command, timeout=timeout, check=False)
        t_run = time.monotonic()
        info["inner_memory_free_mb"] = _free_mb(vm)
        info["load_after"] = _load()
    return CompletedRun(argv=list(argv), rc=res.status, stdout=res.stdout, stderr=res.stderr,
                        seconds=round(time.monotonic() - t0, 3),
                        phases={"boot_s": round(t_boot - t0, 3), "setup_s": round(t_setup - t_boot, 3),
                                "run_s": round(t_run - t_setup, 3)},
                        where=info)


def _free_mb(vm: VM) -> Optional[int]:
    """MemAvailable of the nested guest after the run (MiB), or None."""
    try:
        for line in vm.run("cat /proc/meminfo", timeout=20).stdout.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) >> 10
    except VMLabError:
        pass
    return None
