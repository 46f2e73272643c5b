"""Containers vs virtual machines, measured: one small workload as a host process, in a container,
in a VM.

    from vmlab.experiments import containers
    df = containers.run(quick=True)
    containers.plot_costs(df); containers.isolation_table(df); containers.felter_rows()

The workload is ``vmbench`` (vmlab/guest/vmbench.c): the host's static build
runs as a plain process and inside a container made with ``unshare`` and
cgroup limits (:mod:`vmlab.experiments.nscontainer`, no engine); the same
source built into the guest image runs in a vmlab VM. One row per
measurement, ``kind``:

* ``startup``: seconds from asking to the workload's answer (``vmbench
  sysinfo``): process spawn, container spawn (namespaces, chroot, /proc,
  cgroup), VM cold boot + the command, VM warm restore + the command; median,
  min, max over ``n`` tries;
* ``memory``: the workload holding 16 MiB (``vmbench touch --mb 16``):
  ``rss_mb`` of what holds it (the process; the process in the container, and
  its memory cgroup's peak; the QEMU process), ``overhead_mb`` = that minus
  the 16 MiB, and for the VM ``pss_mb``;
* ``nanobench``: ``null_syscall`` and ``page_fault`` ns per operation (``vmbench cpu``);
* ``isolation``: what each sees: kernel release, boot id, its own PID, processes
  visible, mounts, network interfaces, hostname;
* ``fault``: a kernel fault in the VM (``echo c > /proc/sysrq-trigger`` in the
  guest: its kernel panics, and with ``panic=-1`` the virtual machine resets) while
  a counter runs in the container and on the host: did each keep counting.

Every row carries the where-it-ran columns (``accel`` is the VM's).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .. import plots
from ..errors import VMLabError
from ..hostinfo import where
from ..hostview import native_vmbench
from ..image import ensure_image
from ..measure import DATA_DIR, Progress, Rows, advance, plan, say
from ..plots import KIND_COLORS, OKABE_ITO, style, where_label
from ..procfs import descendants, pss_bytes, rss_bytes
from ..vm import VM
from .nscontainer import Container, cgroup_setup

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

NAME = "containers"
__all__ = ["PLATFORMS", "felter_rows", "isolation_table", "plot_costs", "plot_startup", "run"]

PLATFORMS = ("host", "container", "vm")
QUICK = {"spawns": 10, "warm": 2, "repeats": 3, "scale": 0.05}
FULL = {"spawns": 30, "warm": 3, "repeats": 5, "scale": 0.2}
TOUCH_MB = 16
# what each place sees; busybox sh in the container and the guest, the host's sh on the host
PROBE = ("echo kernel=$(uname -r); echo boot_id=$(cat /proc/sys/kernel/random/boot_id); echo pid=$$; "
         "echo processes=$(ls /proc | grep -c '^[0-9]'); echo mounts=$(cat /proc/mounts | wc -l); "
         "echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' '); "
         "echo hostname=$(hostname)")
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _spread(values: List[float]) -> Dict[str, float]:
    return {"seconds": statistics.median(values), "min_s": min(values), "max_s": max(values), "n": len(values)}


def _check(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise VMLabError(f"{what} failed (status {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return proc.stdout


def _probe_lines(text: str) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in text.strip().splitlines() if "=" in line)


def run(quick: bool = False, progress: Progress = None, *, spawns: Optional[int] = None,
        image: Optional[GuestImage] = None, memory: int = 256, fault: bool = True) -> pd.DataFrame:
    """The three side by side; one row per measurement (see the module docstring)."""
    p = QUICK if quick else FULL
    spawns = int(spawns or p["spawns"])
    image = image or ensure_image()
    exe = native_vmbench(progress)
    rows = Rows(NAME)
    cg = cgroup_setup()
    bench = ["cpu", "--bench", "null_syscall,page_fault", "--repeats", str(p["repeats"]), "--scale", str(p["scale"])]
    plan(progress, 6 + int(fault))     # start-ups, cold boot, memory, nanobench, isolation, warm (, fault)
    with rows.guard(), Container(vmbench=exe) as ctr:
        rows.where = where("none")
        rows.where.update(cgroup_mode=ctr.cgroup_mode)
        say(progress, f"container: {ctr.cgroup_why}")
        # ---- start-up
        say(progress, f"start-up: {spawns} host processes, {spawns} containers")
        host = [_timed(lambda: _check(subprocess.run([str(exe), "sysinfo"], capture_output=True, text=True),
                                      "vmbench on the host")) for _ in range(spawns)]
        rows.add(kind="startup", platform="host", what="spawn a process, run vmbench sysinfo", **_spread(host))
        cont = [_timed(lambda: _check(ctr.run(["/bin/vmbench", "sysinfo"]), "vmbench in the container"))
                for _ in range(spawns)]
        rows.add(kind="startup", platform="container", what="unshare 6 namespaces + chroot + /proc + cgroup, run it",
                 **_spread(cont))
        advance(progress)
        say(progress, "start-up: a VM, cold boot")
        vm = VM(memory=memory, image=image, name="ctr-vs-vm")
        t = time.perf_counter()
        try:
            vm.start()
            vm.run("vmbench sysinfo")
            rows.add(kind="startup", platform="vm", what="cold boot + run it", **_spread([time.perf_counter() - t]))
            vm_where = where(vm.accel or "tcg", vm.kernel_release)
            rows.where.update(accel=vm_where["accel"], guest_kernel=vm_where["guest_kernel"])
            advance(progress)
            _memory(rows, vm, ctr, exe, progress)
            advance(progress)
            _nanobench(rows, vm, ctr, exe, bench, progress)
            advance(progress)
            _isolation(rows, vm, ctr, progress)
            advance(progress)
        finally:
            vm.shutdown()
        _warm(rows, image, memory, int(p["warm"]), progress)
        advance(progress)
        if fault:
            _fault(rows, image, memory, ctr, progress)
            advance(progress)
    df = rows.frame()
    df.attrs["cgroup"] = cg
    df.attrs["cgroup_why"] = ctr.cgroup_why
    return df


def _warm(rows: Rows, image: GuestImage, memory: int, n: int, progress: Progress) -> None:
    say(progress, f"start-up: a VM restored from a warm snapshot ({n}x)")
    times = []
    for _ in range(n + 1):
        t = time.perf_counter()
        with VM(memory=memory, image=image, name="ctr-vs-vm-warm", warm=True) as w:
            w.run("vmbench sysinfo")
            if w.warm_restored:
                times.append(time.perf_counter() - t)
        if len(times) >= n:
            break
    if times:
        rows.add(kind="startup", platform="vm", what="warm restore + run it", **_spread(times))


def _memory(rows: Rows, vm: VM, ctr: Container, exe: Path, progress: Progress) -> None:
    say(progress, f"memory: each holds {TOUCH_MB} MiB")
    hold = ["touch", "--mb", str(TOUCH_MB), "--hold-ms", "1500"]
    p = subprocess.Popen([str(exe), *hold], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    p.stdout.readline()         # the JSON line comes once the pages are touched
    rss = rss_bytes(p.pid) / 2**20
    p.communicate()             # waits, and closes the pipe (no ResourceWarning)
    rows.add(kind="memory", platform="host", rss_mb=rss, overhead_mb=rss - TOUCH_MB, what="the process")
    c = ctr.popen(["/bin/vmbench", *hold])
    assert c.stdout is not None
    c.stdout.readline()
    inner = [q for q in descendants(c.pid)]
    crss = sum(rss_bytes(q) for q in inner) / 2**20
    c.communicate()
    use = ctr.usage()
    rows.add(kind="memory", platform="container", rss_mb=crss, overhead_mb=crss - TOUCH_MB,
             cgroup_peak_mb=use["memory_peak_mb"], what="its processes (the cgroup's peak beside)")
    assert vm.pid is not None
    idle = rss_bytes(vm.pid) / 2**20
    vm.run(f"vmbench touch --mb {TOUCH_MB} --hold-ms 1500 > /tmp/touch.json &")
    vm.run("sleep 1")
    vrss, vpss = rss_bytes(vm.pid) / 2**20, pss_bytes(vm.pid) / 2**20
    rows.add(kind="memory", platform="vm", rss_mb=vrss, overhead_mb=vrss - TOUCH_MB, pss_mb=vpss,
             idle_rss_mb=idle, guest_memory_mb=vm.spec.memory_mb, what="the QEMU process")


def _nanobench(rows: Rows, vm: VM, ctr: Container, exe: Path, bench: List[str], progress: Progress) -> None:
    say(progress, "null system call and page fault, in each")
    outs: List[Tuple[str, str]] = [
        ("host", _check(subprocess.run([str(exe), *bench], capture_output=True, text=True), "vmbench cpu")),
        ("container", _check(ctr.run(["/bin/vmbench", *bench]), "vmbench cpu in the container")),
        ("vm", vm.run("vmbench " + " ".join(bench), timeout=600).stdout)]
    for platform, out in outs:
        for r in json.loads(out.strip().splitlines()[-1])["results"]:
            rows.add(kind="nanobench", platform=platform, benchmark=r["benchmark"], ns_per_op=r.get("ns_per_op"),
                     ns_min=r.get("ns_min"), ns_max=r.get("ns_max"), ns_cv=r.get("ns_cv"))


def _isolation(rows: Rows, vm: VM, ctr: Container, progress: Progress) -> None:
    say(progress, "what each one sees")
    seen = {"host": _probe_lines(_check(subprocess.run(["sh", "-c", PROBE], capture_output=True, text=True), "sh")),
            "container": _probe_lines(_check(ctr.run(["/bin/sh", "-c", PROBE]), "sh in the container")),
            "vm": _probe_lines(vm.run(PROBE).stdout)}
    for platform, items in seen.items():
        for item, value in items.items():
            rows.add(kind="isolation", platform=platform, item=item, value=value.strip(),
                     same_as_host=value.strip() == seen["host"].get(item, "").strip())


def _fault(rows: Rows, image: GuestImage, memory: int, ctr: Container, progress: Progress) -> None:
    say(progress, "a kernel fault in the VM while the container and the host keep counting")
    host_dir = ctr.path("/tmp/host-counter")
    host_dir.mkdir()
    host_count = host_dir / "count"
    hc = subprocess.Popen(["sh", "-c", COUNTER.replace("/tmp/count", str(host_count))])
    cc = ctr.popen(["/bin/sh", "-c", COUNTER])
    vm = VM(memory=memory, image=image, name="ctr-vs-vm-fault", warm=True)    # a restore: no second boot
    try:
        vm.start()
        time.sleep(0.3)
        mark = vm.console_offset

        def read(path: Path) -> int:
            for _ in range(50):         # the shell truncates, then writes: retry an empty read
                try:
                    text = path.read_text().strip()
                except OSError:
                    text = ""
                if text.isdigit():
                    return int(text)
                time.sleep(0.005)
            return -1
        before = {"host": read(host_count), "container": read(ctr.path("/tmp/count"))}
        try:
            vm.run("echo c > /proc/sysrq-trigger", timeout=10, check=False)
        except VMLabError:
            pass                # the guest died under the request: that is the point
        panic = vm.expect(r"Kernel panic[^\r\n]*", timeout=60, since=mark).group(0)
        time.sleep(0.5)
        after = {"host": read(host_count), "container": read(ctr.path("/tmp/count"))}
        # panic=-1: the dead guest's machine resets (QEMU stays, the guest boots again from scratch)
        rows.add(kind="fault", platform="vm", fault_in="vm", kept_running=False, evidence=panic.strip()[-120:])
        for platform in ("container", "host"):
            rows.add(kind="fault", platform=platform, fault_in="vm", kept_running=after[platform] > before[platform],
                     counter_before=before[platform], counter_after=after[platform],
                     evidence=f"counter {before[platform]} -> {after[platform]}")
    finally:
        vm.shutdown()
        for proc in (hc, cc):
            proc.kill()
            proc.communicate()


# ----------------------------------------------------------------- tables and plots
def isolation_table(df: pd.DataFrame) -> pd.DataFrame:
    """What each one sees: one row per item, one column per platform."""
    iso = df[df["kind"] == "isolation"]
    return iso.pivot(index="item", columns="platform", values="value")[list(PLATFORMS)]


def felter_rows() -> pd.DataFrame:
    """The published Felter et al. rows (data/reference/felter_2015_kvm_docker.csv), the columns to read."""
    import pandas as pd
    ref = pd.read_csv(DATA_DIR / "reference" / "felter_2015_kvm_docker.csv")
    return ref[["benchmark", "platform", "metric", "value", "value_high", "unit", "notes"]]


def plot_startup(df: pd.DataFrame, ax: Any = None) -> Any:
    """Start-up time of each, log scale (from microseconds to seconds)."""
    ax = plots.axes(ax, figsize=(8, 3.5))
    st = df[df["kind"] == "startup"].reset_index(drop=True)
    labels = [f"{p}\n{w.split(',')[0][:28]}" for p, w in zip(st["platform"], st["what"], strict=False)]
    colors = [_color(p) for p in st["platform"]]
    ax.barh(range(len(st)), st["seconds"], color=colors)
    ax.errorbar(st["seconds"], range(len(st)), xerr=[st["seconds"] - st["min_s"], st["max_s"] - st["seconds"]],
                fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(range(len(st)), labels, fontsize=8)
    style(ax, title="Start-up: from asking to the first answer", xlabel="seconds (log)", log="x",
          source=where_label(df))
    return ax


def plot_costs(df: pd.DataFrame, ax: Any = None) -> Any:
    """Null system call and page fault, ns per operation, for each (log scale)."""
    ax = plots.axes(ax, figsize=(7, 3.5))
    nb = df[df["kind"] == "nanobench"]
    table = nb.pivot(index="benchmark", columns="platform", values="ns_per_op")[list(PLATFORMS)]
    lo = nb.pivot(index="benchmark", columns="platform", values="ns_min")[list(PLATFORMS)]
    hi = nb.pivot(index="benchmark", columns="platform", values="ns_max")[list(PLATFORMS)]
    err = {p: [list(table[p] - lo[p]), list(hi[p] - table[p])] for p in PLATFORMS}
    plots.grouped_bars(ax, table, colors={p: _color(p) for p in PLATFORMS}, yerr=err)
    style(ax, title="What an operation costs in each (median, whiskers: fastest and slowest repeat)",
          ylabel="ns per operation (log)", log="y", source=where_label(df))
    ax.legend(fontsize=8)
    return ax


def _color(platform: str) -> str:
    return {"host": KIND_COLORS.get("native", OKABE_ITO[0]), "container": OKABE_ITO[2],
            "vm": KIND_COLORS.get("tcg", OKABE_ITO[5])}.get(platform, OKABE_ITO[7])
