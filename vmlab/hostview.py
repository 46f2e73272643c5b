"""The host's view of a VM: a QEMU process with threads, CPU time and memory.

Seen from the host, a hosted (type-2) VM is an ordinary process:

    from vmlab import VM, hostview
    with VM(accel="tcg") as vm:
        hostview.threads(vm.pid)            # tid, name ("CPU 0/TCG"), CPU seconds, last core
        hostview.vcpu_threads(vm)           # QMP query-cpus-fast thread-id, matched to /proc
        hostview.cpu_by_thread(vm, "vmbench spin --seconds 1")   # who did the work
        hostview.memory_map(vm.pid, vm.spec.memory_mb)           # guest RAM vs TCG code vs files
        hostview.rss_vs_touch(vm, [16, 32, 64])                  # lazy allocation

It also compiles ``vmbench`` for the host (:func:`native_vmbench`, the
"no hypervisor" baseline), runs it (:func:`run_native`), and starts a
pinned CPU hog (:func:`cpu_hog`) for the noisy-neighbour lesson. Nothing
here needs root; every process started here is ended by the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from .errors import SetupError, SpecError, VMError

CLK_TCK = os.sysconf("SC_CLK_TCK")
VMBENCH_SRC = Path(__file__).resolve().parent / "guest" / "vmbench.c"


# --------------------------------------------------------------------------- threads
def _stat_fields(path: str) -> List[str]:
    """Fields of a /proc stat file after the ``(comm)``; index 0 is field 3 (state)."""
    with open(path) as f:
        text = f.read()
    return text.rsplit(")", 1)[1].split()


def thread_cpu(pid: int, tid: int) -> Dict[str, float]:
    """utime, stime (seconds) and the core it last ran on, from /proc/PID/task/TID/stat."""
    f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
    # after "(comm)": state=0 ... utime=11 stime=12 ... processor=36
    return {"utime_s": int(f[11]) / CLK_TCK, "stime_s": int(f[12]) / CLK_TCK,
            "cpu_s": (int(f[11]) + int(f[12])) / CLK_TCK, "last_core": int(f[36]), "state": f[0]}


def threads(pid: int) -> List[Dict[str, Any]]:
    """Every thread of process *pid*: tid, name (comm), utime/stime/cpu seconds, last core.

    QEMU runs with ``-name ...,debug-threads=on``, so its vCPU threads are
    named "CPU 0/TCG" (or "CPU 0/KVM"), its I/O threads "IO ...", and so on.
    """
    out: List[Dict[str, Any]] = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as exc:
        raise VMError(f"process {pid} is gone: {exc.strerror}", fix="is the VM still running?") from exc
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            row = {"tid": tid, "name": name, **thread_cpu(pid, tid)}
            row["affinity"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(tid)))
        except (OSError, IndexError, ValueError):
            continue  # the thread ended while we looked
        out.append(row)
    return out


def vcpu_threads(vm: Any) -> List[Dict[str, Any]]:
    """The vCPU threads as QEMU reports them (QMP ``query-cpus-fast``), with their /proc names.

    Each row: cpu_index, thread_id, name (from /proc/PID/task/TID/comm, None if
    that thread is not in the QEMU process - it always is).
    """
    names = {t["tid"]: t["name"] for t in threads(vm.pid)}
    return [{"cpu_index": c["cpu-index"], "thread_id": c["thread-id"], "name": names.get(c["thread-id"])}
            for c in vm.qmp("query-cpus-fast")]


def vcpu_tid(vm: Any, index: int = 0) -> int:
    for c in vcpu_threads(vm):
        if c["cpu_index"] == index:
            return int(c["thread_id"])
    raise SpecError("index", f"the VM has no vCPU {index}", fix=f"use 0..{vm.spec.cpus - 1}")


def cpu_by_thread(vm: Any, command: str, timeout: float = 120) -> Any:
    """Run *command* in the guest and return, per QEMU thread, the CPU seconds it used meanwhile.

    A DataFrame: tid, name, cpu_s, utime_s, stime_s, share (of the QEMU total),
    plus ``attrs["wall_s"]`` and ``attrs["stdout"]``.
    """
    import pandas as pd
    before = {t["tid"]: t for t in threads(vm.pid)}
    t0 = time.monotonic()
    res = vm.run(command, timeout=timeout)
    wall = time.monotonic() - t0
    rows = []
    for t in threads(vm.pid):
        b = before.get(t["tid"], {"cpu_s": 0.0, "utime_s": 0.0, "stime_s": 0.0})
        rows.append({"tid": t["tid"], "name": t["name"], "cpu_s": t["cpu_s"] - b["cpu_s"],
                     "utime_s": t["utime_s"] - b["utime_s"], "stime_s": t["stime_s"] - b["stime_s"]})
    df = pd.DataFrame(rows).sort_values("cpu_s", ascending=False).reset_index(drop=True)
    total = df["cpu_s"].sum()
    df["share"] = df["cpu_s"] / total if total > 0 else 0.0
    df.attrs["wall_s"] = wall
    df.attrs["stdout"] = res.stdout
    return df


# --------------------------------------------------------------------------- memory
def _field_kb(path: str, field: str) -> int:
    """The ``Field:  N kB`` value of a /proc status-like file, in kB (0 if absent or gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM, ...); 0 if the process is gone."""
    return _field_kb(f"/proc/{pid}/status", field)


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes (0 if it is gone)."""
    return status_kb(pid, "VmRSS") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with shared pages split among their users."""
    return _field_kb(f"/proc/{pid}/smaps_rollup", "Pss") * 1024


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of process *pid* so far, all threads (0.0 if it is gone)."""
    try:
        f = _stat_fields(f"/proc/{pid}/stat")
        return (int(f[11]) + int(f[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


_MAP_RX = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def memory_map(pid: int, guest_mb: Optional[int] = None) -> Dict[str, float]:
    """Where a QEMU process's resident memory is, in MiB, from /proc/PID/smaps.

    Keys: ``guest_ram`` (the anonymous mapping as large as the guest's memory),
    ``tcg_code`` (anonymous executable mappings: the TCG translation cache),
    ``files`` (QEMU, its libraries, the guest kernel file), ``other_anon``
    (heap, thread stacks, device buffers), ``total`` (= VmRSS), plus
    ``guest_ram_size`` (MiB mapped for guest RAM; lazily backed).
    """
    out = {"guest_ram": 0.0, "tcg_code": 0.0, "files": 0.0, "other_anon": 0.0, "total": 0.0,
           "guest_ram_size": 0.0}
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError as exc:
        raise VMError(f"cannot read /proc/{pid}/smaps: {exc.strerror}", fix="is the VM still running?") from exc
    target = guest_mb * 1024 if guest_mb else None
    cur: Optional[Dict[str, Any]] = None
    blocks: List[Dict[str, Any]] = []
    for line in text.splitlines():
        m = _MAP_RX.match(line)
        if m and not line.startswith(("Size:", "Rss:")):
            cur = {"perms": m.group(3), "path": m.group(4).strip(), "size": 0, "rss": 0}
            blocks.append(cur)
        elif cur is not None and line.startswith("Size:"):
            cur["size"] = int(line.split()[1])
        elif cur is not None and line.startswith("Rss:"):
            cur["rss"] = int(line.split()[1])
    for b in blocks:
        kb = b["rss"]
        out["total"] += kb
        anon = not b["path"] or b["path"].startswith("[")
        if not anon:
            out["files"] += kb
        elif target and b["size"] == target and "rw" in b["perms"] and out["guest_ram_size"] == 0:
            out["guest_ram"] += kb
            out["guest_ram_size"] = b["size"]
        elif "x" in b["perms"] and not b["path"]:
            out["tcg_code"] += kb
        else:
            out["other_anon"] += kb
    return {k: v / 1024 for k, v in out.items()}


def rss_vs_touch(vm: Any, sizes_mb: Sequence[int], hold_ms: int = 1500,
                 progress: Any = None) -> Any:
    """Touch *sizes_mb* MiB in the guest (``vmbench touch --mb N --hold-ms T``) and watch QEMU's RSS.

    The guest memory is mapped in QEMU at start but backed by host pages only
    when first written (lazy allocation). For each size: the RSS before, the
    largest RSS seen while the guest holds the memory, and the guest-RAM part
    of it (:func:`memory_map`). Returns a DataFrame, one row per size.
    """
    import pandas as pd
    from .measure import say
    limit = vm.spec.memory_mb
    for mb in sizes_mb:
        if not isinstance(mb, int) or mb <= 0 or mb > limit * 0.7:
            raise SpecError("sizes_mb", f"{mb!r} MiB cannot be touched in a {limit} MiB guest",
                            fix=f"sizes between 1 and {int(limit * 0.7)} MiB, or a VM with more memory")
    rows = []
    base = rss_bytes(vm.pid)
    for mb in sizes_mb:
        say(progress, f"guest touches {mb} MiB")
        before = rss_bytes(vm.pid)
        out = f"/tmp/touch-{mb}.json"
        vm.run(f"vmbench touch --mb {mb} --hold-ms {hold_ms} > {out} 2>&1 &")
        peak, t_end = before, time.monotonic() + 30
        got = b""
        while time.monotonic() < t_end:
            time.sleep(0.1)
            peak = max(peak, rss_bytes(vm.pid))
            with contextlib.suppress(VMError):
                got = vm.read_file(out)
            if got.strip():
                break
        if not got.strip():
            raise VMError(f"vmbench touch --mb {mb} did not report within 30 s", fix="give the VM more memory")
        result = json.loads(got.decode().strip().splitlines()[-1])
        if "error" in result:
            raise VMError(f"vmbench touch --mb {mb} failed: {result['error']}", fix="give the VM more memory")
        peak = max(peak, rss_bytes(vm.pid))
        ram = memory_map(vm.pid, limit)["guest_ram"]
        rows.append({"touched_mb": mb, "rss_before_mb": before / 2**20, "rss_mb": peak / 2**20,
                     "rss_growth_mb": (peak - base) / 2**20, "guest_ram_resident_mb": ram,
                     "touch_s": result.get("seconds")})
        time.sleep(hold_ms / 1000)  # let the guest process exit before the next size
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- native vmbench
def native_vmbench(progress: Optional[Any] = None, force: bool = False) -> Path:
    """vmbench.c compiled for this host (``gcc -static -O2``), cached by source hash.

    The "no hypervisor" baseline: the same C code the guest runs, run directly.
    """
    from .image import cache_dir
    from .measure import say
    src = VMBENCH_SRC.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    d = cache_dir() / "native"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    exe = d / f"vmbench-{digest}"
    if exe.exists() and os.access(exe, os.X_OK) and not force:
        return exe
    gcc = shutil.which("gcc")
    if not gcc:
        raise SetupError("gcc is not installed, so vmbench cannot be compiled for the host "
                         "(the native baseline of the CPU and hosted lessons)",
                         fix="apt-get install gcc libc6-dev (or run `make setup`)")
    say(progress, "compiling vmbench.c for the host (gcc -static -O2)")
    tmp = d / f".vmbench-{digest}.tmp{os.getpid()}"
    proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(tmp), str(VMBENCH_SRC)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        err = proc.stderr.strip()
        if re.search(r"cannot find -lc\b|crt1\.o|stdio\.h: No such file", err):
            raise SetupError("cannot build static programs for the host: the static C library is missing",
                             fix="apt-get install libc6-dev")
        raise SetupError(f"compiling vmbench.c for the host failed: {err[-400:]}",
                         fix=f"fix the compile error in {VMBENCH_SRC}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, exe)
    return exe


def run_native(*args: Any, timeout: float = 120, cpus: Optional[Iterable[int]] = None) -> Dict[str, Any]:
    """Run the host's vmbench with *args* and return its JSON result.

    ``cpus`` pins it (sched_setaffinity) to those cores.
    """
    exe = native_vmbench()
    argv = [str(exe), *map(str, args)]
    pre = None
    if cpus is not None:
        cores = set(cpus)
        pre = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise VMError(f"native vmbench {' '.join(map(str, args))} failed (status {p.returncode}): "
                      f"{(p.stderr or p.stdout).strip()[-300:]}", fix="run it by hand: " + " ".join(argv))
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- pinning, hogs
def pin(tid: int, cores: Iterable[int]) -> List[int]:
    """Pin a thread (or process) to *cores*; returns its previous affinity, for :func:`unpin`."""
    old = sorted(os.sched_getaffinity(tid))
    os.sched_setaffinity(tid, set(cores))
    return old


def unpin(tid: int, cores: Iterable[int]) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, set(cores))


@contextlib.contextmanager
def pinned(tid: int, cores: Iterable[int]) -> Iterator[int]:
    """``with pinned(vcpu_tid, {0}):`` - restores the old affinity afterwards."""
    old = pin(tid, cores)
    try:
        yield tid
    finally:
        unpin(tid, old)


class CpuHog:
    """A CPU-bound host process pinned on *core* (the native ``vmbench spin``).

    It ends by itself after *max_seconds* and is killed on :meth:`stop`, on
    leaving a ``with`` block, and (parent-death signal) if Python dies. It
    runs in its own session: with the scheduler's autogroups
    (``/proc/sys/kernel/sched_autogroup_enabled``) CPU time is shared between
    sessions first, and QEMU runs in a session of its own too.
    """

    def __init__(self, core: int, max_seconds: float = 120.0) -> None:
        if core not in os.sched_getaffinity(0):
            raise SpecError("core", f"core {core} is not available to this process",
                            fix=f"one of {sorted(os.sched_getaffinity(0))}")
        self.core = core
        self.max_seconds = max_seconds
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "CpuHog":
        from . import reaper
        exe = native_vmbench()
        core = self.core
        pdeath = reaper.pdeathsig_preexec()

        def pre() -> None:
            os.sched_setaffinity(0, {core})
            if pdeath:
                pdeath()
        self.proc = subprocess.Popen(reaper.pdeathsig_prefix() + [str(exe), "spin", "--seconds",
                                                                  str(self.max_seconds)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, preexec_fn=pre,
                                     # its own session, hence its own scheduler autogroup (like QEMU's):
                                     # with autogroups on, a hog in our session would compete only
                                     # within our group, not with the vCPU thread
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU seconds the hog has used so far (0 once it has been reaped)."""
        if self.proc is None:
            return 0.0
        try:
            f = _stat_fields(f"/proc/{self.proc.pid}/stat")
            return (int(f[11]) + int(f[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def __enter__(self) -> "CpuHog":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def host_steal_ticks() -> int:
    """The steal column of this host's /proc/stat "cpu" line (the host is itself a VM)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) if len(parts) > 8 else 0
