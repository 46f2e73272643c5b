"""Bare metal vs hosted, measured: the path of work and the noisy neighbour.

* :func:`path_of_work` - the same workloads (``vmbench spin`` ops/s, the cost
  of a system call, of a page fault) run natively on the host (no
  hypervisor), in a KVM guest (where KVM is proven here) and in a TCG guest
  (a user-space emulator). One row per layer x workload; the KVM rows say
  "not available on this host" with the reason when KVM is not usable.
* :func:`noisy_neighbour` - a host CPU hog pinned on the vCPU thread's core
  slows the guest, which under TCG sees no steal time; a KVM guest would
  (that path runs where KVM is proven, and otherwise says why not).
* :func:`cpu_by_thread` and :func:`rss_vs_touch` - the VM as a host process:
  CPU seconds per QEMU thread while the guest works, QEMU's RSS as the guest
  touches memory (lazy allocation).
* :func:`plot_layers` draws the layers each path goes through, annotated
  with the measured costs; :func:`plot_costs` and :func:`plot_noisy` chart them.

``run(quick, progress)`` does both (a ``part`` column tells them apart).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .. import hostview, plots
from ..errors import AccelUnavailable, SpecError, VMError
from ..guestinfo import qemu_pid
from ..hostinfo import host_virtualization, where
from ..hostview import memory_map
from ..measure import DATA_DIR, Progress, Rows, advance, plan, say
from ..plots import KIND_COLORS, OKABE_ITO, axes, style, where_label
from ..procfs import host_steal_ticks, rss_bytes, thread_cpu, threads
from ..vm import VM, kvm_verdict

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

WORKLOADS = {
    # name: (vmbench arguments, metric, unit, higher is better)
    "spin": ("spin --seconds {seconds}", "ops_per_s", "ops/s", True),
    "null_syscall": ("cpu --bench null_syscall --repeats {repeats} --scale {scale}", "ns_per_op", "ns", False),
    "page_fault": ("cpu --bench page_fault --repeats {repeats} --scale {scale}", "ns_per_op", "ns", False),
}
LAYERS = ("native", "kvm", "tcg")
HOG = "hog on the vCPU's core"


def kvm_status() -> Dict[str, Any]:
    """{"usable": bool, "note": str}: KVM proven here by booting a guest, or why not."""
    try:
        v = kvm_verdict()
    except Exception as exc:  # the probe itself failed: say so, do not stop the lesson
        return {"usable": False, "note": f"KVM is not available on this host: the probe failed ({exc})"}
    if v.get("usable"):
        return {"usable": True, "note": "KVM proven by booting a guest"}
    return {"usable": False, "note": f"KVM is not available on this host: {v.get('reason', 'unknown')}"}


def _value(out: Dict[str, Any], metric: str) -> float:
    if "results" in out:
        r = out["results"][0]
        if "skipped" in r:
            return math.nan
        return float(r[metric])
    return float(out[metric])


def _check_workloads(workloads: Sequence[str]) -> None:
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not workloads:
        raise SpecError("workloads", f"unknown workload(s) {bad or workloads!r}",
                        fix="some of: " + ", ".join(WORKLOADS))


def path_of_work(quick: bool = False, progress: Progress = None, *, image: Optional[GuestImage] = None,
                 workloads: Sequence[str] = ("spin", "null_syscall", "page_fault"),
                 repeats: Optional[int] = None, seconds: Optional[float] = None, memory: int = 256) -> pd.DataFrame:
    """The same workloads natively, under KVM (if proven here) and under TCG.

    Rows: layer, workload, metric, unit, value (median over ``repeats`` runs,
    interleaved native / KVM / TCG so host load hits each alike; a cpu run is
    vmbench's own median of 3), values (all runs), per_host_cpu_s (spin: ops
    per second of host CPU the work received - the vCPU thread's, or the native
    process's), higher_is_better, vs_native (how many times slower than native;
    >1 = slower; for spin it compares per_host_cpu_s, which cancels other users'
    load on the host), available, note, and the where-it-ran columns.
    """
    _check_workloads(workloads)
    repeats = repeats or (2 if quick else 5)
    scale = 0.5 if quick else 1
    seconds = seconds or (0.5 if quick else 2.0)
    if not (isinstance(repeats, int) and 1 <= repeats <= 50):
        raise SpecError("repeats", f"{repeats!r} is not between 1 and 50", fix="e.g. repeats=3")
    rows = Rows("path-of-work")
    results: Dict[tuple, List[float]] = {}

    kvm = kvm_status()
    with rows.guard(), contextlib.ExitStack() as stack:
        def native(cmd: str) -> Dict[str, Any]:
            out = hostview.run_native(*cmd.split())
            out["_host_cpu_s"] = out.get("user_s", math.nan) + out.get("sys_s", 0.0)
            return out

        def in_guest(guest: Any):
            tid = hostview.vcpu_tid(guest)

            def runner(cmd: str) -> Dict[str, Any]:
                c0 = thread_cpu(qemu_pid(guest), tid)["cpu_s"]
                out = json.loads(guest.run("vmbench " + cmd, timeout=300).stdout)
                out["_host_cpu_s"] = thread_cpu(qemu_pid(guest), tid)["cpu_s"] - c0
                return out
            return runner

        runners = {"native": native}
        boots = 2 if kvm["usable"] else 1
        plan(progress, boots + len(workloads) * repeats * (1 + boots))   # each boot; each run on each path
        say(progress, "booting a TCG guest: the same vmbench, every instruction translated by QEMU")
        vm = stack.enter_context(VM(accel="tcg", image=image, memory=memory, name="path", warm=True))
        rows.where = where("tcg", vm.kernel_release)
        runners["tcg"] = in_guest(vm)
        advance(progress)
        if kvm["usable"]:
            say(progress, "booting a KVM guest: the same vmbench on the in-kernel hypervisor")
            kvm_vm = stack.enter_context(VM(accel="kvm", image=image, memory=memory, name="path-kvm", warm=True))
            runners["kvm"] = in_guest(kvm_vm)
            advance(progress)
        else:        # the lesson says why once, from kvm_status(); here only that the path is skipped
            say(progress, "no KVM guest: the KVM path is skipped")
        per_cpu: Dict[tuple, List[float]] = {}
        for w in workloads:
            args, metric, _, _ = WORKLOADS[w]
            cmd = args.format(seconds=seconds, repeats=3, scale=scale)
            say(progress, f"{w}: vmbench {cmd}, {repeats} times on each path (interleaved)")
            for _ in range(repeats):
                for layer, runner in runners.items():   # interleaved, so host load hits all alike
                    out = runner(cmd)
                    results.setdefault((layer, w), []).append(_value(out, metric))
                    if w == "spin" and out["_host_cpu_s"] > 0:
                        per_cpu.setdefault((layer, w), []).append(out["ops"] / out["_host_cpu_s"])
                    advance(progress)
        for layer in LAYERS:
            for w in workloads:
                _, metric, unit, hib = WORKLOADS[w]
                vals = results.get((layer, w))
                value = statistics.median(vals) if vals else math.nan
                pc = statistics.median(per_cpu[(layer, w)]) if per_cpu.get((layer, w)) else math.nan
                if w == "spin" and per_cpu.get(("native", w)) and math.isfinite(pc):
                    # ops per second of host CPU received: other users' load on the host cancels out
                    vs = statistics.median(per_cpu[("native", w)]) / pc
                else:
                    native_v = statistics.median(results[("native", w)])
                    vs = (native_v / value if hib else value / native_v) if vals and value and native_v \
                        else math.nan
                note = {"native": "no hypervisor: the host runs vmbench directly",
                        "tcg": "user-space emulator: QEMU translates every guest instruction",
                        "kvm": kvm["note"]}[layer]
                rows.add(layer=layer, workload=w, metric=metric, unit=unit, value=value,
                         values=json.dumps([round(v, 3) for v in vals]) if vals else "[]",
                         per_host_cpu_s=pc, higher_is_better=hib, vs_native=vs, available=bool(vals),
                         note=note, accel=layer if layer != "native" else "none")
    return rows.frame()


def _guest_spin(vm: VM, seconds: float, tid: int) -> Dict[str, Any]:
    c0 = thread_cpu(qemu_pid(vm), tid)["cpu_s"]
    s0 = host_steal_ticks()
    out = json.loads(vm.run(f"vmbench spin --seconds {seconds}", timeout=seconds * 10 + 60).stdout)
    return {"ops_per_s": out["ops_per_s"], "guest_user_s": out["user_s"], "guest_seconds": out["seconds"],
            "steal_ticks": out.get("steal_ticks"),
            "vcpu_host_cpu_s": thread_cpu(qemu_pid(vm), tid)["cpu_s"] - c0,
            "host_steal_ticks": host_steal_ticks() - s0}


def noisy_neighbour(quick: bool = False, progress: Progress = None, *, seconds: Optional[float] = None,
                    repeats: Optional[int] = None, core: Optional[int] = None, image: Optional[GuestImage] = None,
                    kvm: bool = True, hogs: int = 1) -> pd.DataFrame:
    """A host CPU hog on the vCPU thread's core: guest ops/s fall, and steal time stays 0 under TCG.

    The guest's single vCPU thread and a native ``vmbench spin`` hog are both
    pinned (sched_setaffinity) on ``core`` (``hogs`` of them: more hogs, a
    clearer effect on a busy machine). Runs alternate alone / with the hog,
    ``repeats`` times. Rows: accel, condition, repeat, ops_per_s, guest_user_s
    (CPU time the guest believes it used), vcpu_host_cpu_s (what the host gave
    the vCPU thread), hog_cpu_s (what the hogs got meanwhile), steal_ticks
    (the guest's /proc/stat), host_steal_ticks
    (this host is itself a VM), core, available, note. With ``kvm=True`` the
    same runs under KVM where it is proven; otherwise a row says why not.
    """
    seconds = seconds if seconds is not None else (0.5 if quick else 2.0)
    repeats = repeats if repeats is not None else (3 if quick else 5)
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= 120:
        raise SpecError("seconds", f"{seconds!r} is not between 0 and 120 s", fix="e.g. seconds=2")
    if not isinstance(repeats, int) or not 1 <= repeats <= 20:
        raise SpecError("repeats", f"{repeats!r} is not between 1 and 20", fix="e.g. repeats=2")
    if not isinstance(hogs, int) or not 1 <= hogs <= 8:
        raise SpecError("hogs", f"{hogs!r} is not between 1 and 8 hog processes", fix="e.g. hogs=1")
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if core is None else core
    if core not in allowed:
        raise SpecError("core", f"core {core} is not available to this process", fix=f"one of {allowed}")
    rows = Rows("noisy-neighbour")
    accels = ["tcg"]
    status = kvm_status() if kvm else {"usable": False, "note": "KVM not asked for"}
    if status["usable"]:
        accels.append("kvm")
    plan(progress, len(accels) * (1 + 2 * repeats))     # per accel: the boot, then alone and with the hog
    with rows.guard():
        for accel in accels:
            say(progress, f"{accel.upper()}: vCPU thread and a host hog both pinned on core {core}")
            with VM(accel=accel, image=image, name=f"noisy-{accel}", warm=True) as vm:
                if not rows.where:
                    rows.where = where(accel, vm.kernel_release)
                advance(progress)
                tid = hostview.vcpu_tid(vm)
                with hostview.pinned(tid, {core}):
                    for r in range(repeats):
                        for condition in ("alone", HOG):
                            procs = [hostview.CpuHog(core, max_seconds=seconds * 4 + 30)
                                     for _ in range(hogs if condition == HOG else 0)]
                            hog_cpu = 0.0
                            try:
                                for h in procs:
                                    h.start()
                                if procs:
                                    time.sleep(0.05)
                                m = _guest_spin(vm, seconds, tid)
                                hog_cpu = sum(h.cpu_seconds() for h in procs)
                            finally:
                                for h in procs:   # never leave a hog behind
                                    h.stop()
                            row = rows.add(accel=accel, condition=condition, repeat=r, core=core, **m,
                                           hogs=len(procs), hog_cpu_s=hog_cpu, available=True, note="")
                            say(progress, f"  {condition}: {row['ops_per_s'] / 1e6:.0f} M ops/s, guest steal "
                                          f"{row['steal_ticks']} ticks, vCPU thread got "
                                          f"{row['vcpu_host_cpu_s']:.2f} s of host CPU in {seconds:g} s")
                            advance(progress)
        if not status["usable"]:
            rows.add(accel="kvm", condition=HOG, repeat=0, core=core, ops_per_s=math.nan,
                     guest_user_s=math.nan, guest_seconds=math.nan, steal_ticks=math.nan,
                     vcpu_host_cpu_s=math.nan, host_steal_ticks=math.nan, hogs=hogs, hog_cpu_s=math.nan,
                     available=False,
                     note=f"a KVM guest would report steal time here; {status['note']}")
    return rows.frame()


# --------------------------------------------------------------------------- the VM as a host process
def cpu_by_thread(vm: VM, command: str, timeout: float = 120) -> pd.DataFrame:
    """Run *command* in the guest and return, per QEMU thread, the CPU seconds it used meanwhile.

    A DataFrame: tid, name, cpu_s, utime_s, stime_s, share (of the QEMU total),
    plus ``attrs["wall_s"]`` and ``attrs["stdout"]``.
    """
    import pandas as pd
    before = {t["tid"]: t for t in threads(qemu_pid(vm))}
    t0 = time.monotonic()
    res = vm.run(command, timeout=timeout)
    wall = time.monotonic() - t0
    rows = []
    for t in threads(qemu_pid(vm)):
        b = before.get(t["tid"], {"cpu_s": 0.0, "utime_s": 0.0, "stime_s": 0.0})
        rows.append({"tid": t["tid"], "name": t["name"], "cpu_s": t["cpu_s"] - b["cpu_s"],
                     "utime_s": t["utime_s"] - b["utime_s"], "stime_s": t["stime_s"] - b["stime_s"]})
    df = pd.DataFrame(rows).sort_values("cpu_s", ascending=False).reset_index(drop=True)
    total = df["cpu_s"].sum()
    df["share"] = df["cpu_s"] / total if total > 0 else 0.0
    df.attrs["wall_s"] = wall
    df.attrs["stdout"] = res.stdout
    return df




def rss_vs_touch(vm: VM, sizes_mb: Sequence[int], hold_ms: int = 1500,
                 progress: Progress = None) -> pd.DataFrame:
    """Touch *sizes_mb* MiB in the guest (``vmbench touch --mb N --hold-ms T``) and watch QEMU's RSS.

    The guest memory is mapped in QEMU at start but backed by host pages only
    when first written (lazy allocation). For each size: the RSS before, the
    largest RSS seen while the guest holds the memory, and the guest-RAM part
    of it (:func:`vmlab.hostview.memory_map`). Returns a DataFrame, one row per size.
    """
    import pandas as pd
    limit = vm.spec.memory_mb
    for mb in sizes_mb:
        if not isinstance(mb, int) or mb <= 0 or mb > limit * 0.7:
            raise SpecError("sizes_mb", f"{mb!r} MiB cannot be touched in a {limit} MiB guest",
                            fix=f"sizes between 1 and {int(limit * 0.7)} MiB, or a VM with more memory")
    rows = []
    base = rss_bytes(qemu_pid(vm))
    for mb in sizes_mb:
        say(progress, f"guest touches {mb} MiB")
        before = rss_bytes(qemu_pid(vm))
        out = f"/tmp/touch-{mb}.json"
        vm.run(f"vmbench touch --mb {mb} --hold-ms {hold_ms} > {out} 2>&1 &")
        peak, t_end = before, time.monotonic() + 30
        got = b""
        while time.monotonic() < t_end:
            time.sleep(0.1)
            peak = max(peak, rss_bytes(qemu_pid(vm)))
            with contextlib.suppress(VMError):
                got = vm.read_file(out)
            if got.strip():
                break
        if not got.strip():
            raise VMError(f"vmbench touch --mb {mb} did not report within 30 s", fix="give the VM more memory")
        result = json.loads(got.decode().strip().splitlines()[-1])
        if "error" in result:
            raise VMError(f"vmbench touch --mb {mb} failed: {result['error']}", fix="give the VM more memory")
        peak = max(peak, rss_bytes(qemu_pid(vm)))
        ram = memory_map(qemu_pid(vm), limit)["guest_ram"]
        rows.append({"touched_mb": mb, "rss_before_mb": before / 2**20, "rss_mb": peak / 2**20,
                     "rss_growth_mb": (peak - base) / 2**20, "guest_ram_resident_mb": ram,
                     "touch_s": result.get("seconds")})
        time.sleep(hold_ms / 1000)  # let the guest process exit before the next size
    return pd.DataFrame(rows)


def require_kvm_steal() -> None:
    """The KVM-only cell of the lesson: raises AccelUnavailable with the reason when KVM is not proven."""
    status = kvm_status()
    if not status["usable"]:
        raise AccelUnavailable("kvm", status["note"].replace("KVM is not available on this host: ", ""),
                               fix="the TCG rows show the same slowdown without steal time")


def published() -> Any:
    """Published figures beside which the lesson shows its measurements (never as measurements).

    Rows of data/reference: Felter et al. (KVM vs native, linpack / pxz) and
    Adams & Agesen (software VMM vs native: syscall, page fault, forkwait).
    """
    import pandas as pd
    ref = DATA_DIR / "reference"
    out = []
    try:
        f = pd.read_csv(ref / "felter_2015_kvm_docker.csv")
        f = f[f["benchmark"].isin(["linpack", "pxz"])]
        for _, r in f.iterrows():
            out.append({"study": "Felter et al. 2015", "benchmark": r["benchmark"], "platform": r["platform"],
                        "metric": r["metric"], "value": r["value"], "unit": r["unit"], "verified": r["verified"], "via": r["via"],
                        "source": r["source"]})
        a = pd.read_csv(ref / "adams_agesen_2006.csv")
        a = a[a["benchmark"].isin(["syscall", "pgfault", "forkwait"])]
        for _, r in a.iterrows():
            out.append({"study": "Adams & Agesen 2006", "benchmark": r["benchmark"], "platform": r["platform"],
                        "metric": "", "value": r["value"], "unit": r["unit"], "verified": r["verified"], "via": r["via"],
                        "source": r["source"]})
    except (OSError, KeyError, ValueError):
        pass
    return pd.DataFrame(out)


def run(quick: bool = False, progress: Progress = None, **options: Any) -> pd.DataFrame:
    """Path of work then noisy neighbour; a ``part`` column names which."""
    import pandas as pd
    image = options.pop("image", None)
    a = path_of_work(quick, progress, image=image)
    b = noisy_neighbour(quick, progress, image=image)
    a.insert(0, "part", "path of work")
    b.insert(0, "part", "noisy neighbour")
    return pd.concat([a, b], ignore_index=True)


# --------------------------------------------------------------------------- plots
def _fmt(workload: str, value: float, vs: float, layer: str) -> str:
    if not (isinstance(value, float) and math.isfinite(value)):
        return ""
    if workload == "spin":
        s = f"spin {value / 1e6:.0f} M ops/s"
    else:
        s = f"{workload.replace('_', ' ')} {value:,.0f} ns"
    if layer != "native" and math.isfinite(vs):
        s += f" ({vs:.1f}x native" + (" per CPU-s)" if workload == "spin" else ")")
    return s


def plot_layers(df: Any, ax: Any = None) -> Any:
    """The layers each path of work goes through, drawn as boxes, with the measured costs on top."""
    from matplotlib.patches import FancyBboxPatch
    ax = axes(ax, figsize=(11, 5.6))
    n = len(os.sched_getaffinity(0))
    hw = f"hardware ({n} vCPUs of a VM)" if host_virtualization().get("is_vm") else f"hardware ({n} cores)"
    stacks = {
        "native": [hw, "host kernel", "vmbench (host process)"],
        "kvm": ["hardware + VT-x / AMD-V", "host kernel + KVM module", "QEMU process (devices only)",
                "guest kernel", "vmbench (guest process)"],
        "tcg": [hw, "host kernel", "QEMU process: TCG translates\nevery guest instruction",
                "guest kernel", "vmbench (guest process)"],
    }
    titles = {"native": "native (no hypervisor)", "kvm": "in-kernel hypervisor (KVM)",
              "tcg": "user-space emulator (QEMU TCG)"}
    fills = {"hardware": "#DDDDDD", "host kernel": "#BBD6EA", "QEMU": "#F6D7A7", "guest kernel": "#CDE8DC",
             "vmbench": "#FFFFFF"}
    h, w, gap = 0.8, 2.6, 0.5
    for col, layer in enumerate(LAYERS):
        x = col * (w + gap)
        sub = df[df["layer"] == layer] if df is not None and len(df) else None
        available = bool(sub["available"].any()) if sub is not None and len(sub) else False
        for i, label in enumerate(stacks[layer]):
            key = next((k for k in fills if label.startswith(k)), "vmbench")
            box = FancyBboxPatch((x, i * h), w, h * 0.9, boxstyle="round,pad=0.02,rounding_size=0.08",
                                 facecolor=fills[key], edgecolor=KIND_COLORS.get(layer, "#000000"),
                                 linewidth=1.5, hatch=None if available else "//", alpha=1 if available else 0.5)
            ax.add_patch(box)
            ax.text(x + w / 2, i * h + h * 0.45, label, ha="center", va="center", fontsize=8)
        top = len(stacks[layer]) * h
        ax.text(x + w / 2, top + 0.15, titles[layer], ha="center", va="bottom", fontsize=10, weight="bold",
                color=KIND_COLORS.get(layer, "#000000"))
        lines = []
        if sub is not None and len(sub):
            if available:
                for _, r in sub.iterrows():
                    lines.append(_fmt(r["workload"], r["value"], r["vs_native"], layer))
            else:
                lines.append("not available on this host\n(the rows' note says why)")
        ax.text(x + w / 2, top + 0.6, "\n".join(ln for ln in lines if ln), ha="center", va="bottom",
                fontsize=8, color="#333333")
    # the arrow of a system call in each path
    ax.annotate("", xy=(-0.25, 0.2), xytext=(-0.25, 2.2), arrowprops=dict(arrowstyle="->", color=OKABE_ITO[7]))
    ax.text(-0.35, 1.2, "a system call\ngoes down", rotation=90, ha="right", va="center", fontsize=7)
    ax.set_xlim(-0.8, 3 * (w + gap))
    ax.set_ylim(-0.2, 5 * h + 1.9)
    ax.axis("off")
    src = where_label(df[df["layer"] == "tcg"]) if df is not None and len(df) else ""
    if src:
        ax.text(3 * (w + gap) - gap, -0.15, src, ha="right", va="top", fontsize=7, color="#555555")
    return ax


def plot_costs(df: Any, ax: Any = None) -> Any:
    """How many times slower than native each workload is, per layer (log scale if the range is wide)."""
    ax = axes(ax, figsize=(7, 3.8))
    d = df[df["available"] & (df["layer"] != "native")]
    workloads = list(dict.fromkeys(df["workload"]))
    layers = [la for la in LAYERS if la in set(d["layer"])]
    width = 0.8 / max(1, len(layers))
    top = 1.0
    for j, layer in enumerate(layers):
        vals = [d[(d.layer == layer) & (d.workload == w)]["vs_native"].median() for w in workloads]
        xs = [i + (j - (len(layers) - 1) / 2) * width for i in range(len(workloads))]
        ax.bar(xs, vals, width, color=KIND_COLORS.get(layer), label=f"{layer.upper()} guest")
        for x, v in zip(xs, vals, strict=False):
            if math.isfinite(v):
                ax.text(x, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=8)
                top = max(top, v)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w.replace("_", " ") for w in workloads])
    ax.axhline(1, color=KIND_COLORS["native"], lw=1.2, ls="--", label="native (= 1)")
    style(ax, title="Cost of the same work on each path", xlabel="workload",
          ylabel="times slower than native", log="y" if top > 20 else None,
          source=where_label(df[df.layer == "tcg"]))
    if top <= 20:
        ax.set_ylim(0, top * 1.15)
    ax.legend(fontsize=8)
    return ax


def plot_noisy(df: Any, axes: Any = None) -> Any:
    """Guest ops/s alone vs with a hog; and the CPU time the guest believes it had vs what the host gave."""
    axes = plots.axes(axes, figsize=(11, 3.8), ncols=2)
    d = df[df["available"]]
    ax1, ax2 = axes
    conds = ["alone", HOG]
    for j, accel in enumerate(sorted(set(d["accel"]))):
        s = d[d.accel == accel]
        med = [s[s.condition == c]["ops_per_s"].median() / 1e6 for c in conds]
        ax1.bar([i + j * 0.4 for i in range(2)], med, 0.38, color=OKABE_ITO[4 + j], label=accel.upper())
        for i, c in enumerate(conds):
            pts = s[s.condition == c]["ops_per_s"] / 1e6
            ax1.scatter([i + j * 0.4] * len(pts), pts, color="black", s=10, zorder=3)
    ax1.set_xticks([0, 1])
    ax1.set_xticklabels(conds)
    style(ax1, title="Guest throughput, vCPU pinned on one core", xlabel="",
          ylabel="vmbench spin (million ops/s)")
    ax1.legend(fontsize=8)
    s = d[d.condition == HOG]
    x = range(len(s))
    ax2.bar([i - 0.2 for i in x], s["guest_user_s"], 0.38, color=OKABE_ITO[2], label="guest's user time")
    ax2.bar([i + 0.2 for i in x], s["vcpu_host_cpu_s"], 0.38, color=OKABE_ITO[5],
            label="host CPU given to the vCPU thread")
    top = float(max(s["guest_user_s"].max(), s["vcpu_host_cpu_s"].max())) if len(s) else 1.0
    for i, (_, r) in enumerate(s.iterrows()):      # inside the axes, under the title
        ax2.text(i, max(r["guest_user_s"], r["vcpu_host_cpu_s"]) + 0.02 * top, f"steal\n{r['steal_ticks']:.0f}",
                 ha="center", va="bottom", fontsize=7)
    ax2.set_ylim(0, top * 1.3)
    plots.category_labels(ax2, [f"{r['accel'].upper()} run {int(r['repeat']) + 1}" for _, r in s.iterrows()])
    style(ax2, title="With the hog: what the guest sees vs the host", ylabel="CPU seconds (s)",
          source=where_label(d))
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return axes


def plot_rss(df: Any, ax: Any = None, where_df: Any = None) -> Any:
    """QEMU's resident memory as the guest touches more memory (lazy allocation)."""
    ax = axes(ax, figsize=(6.5, 3.8))
    x = [0, *list(df["touched_mb"])]
    base = float(df["rss_before_mb"].iloc[0])
    ax.plot(x, [base, *list(df["rss_mb"])], "o-", color=OKABE_ITO[0], label="QEMU RSS (whole process)")
    ram0 = float(df["guest_ram_resident_mb"].iloc[0] - (df["rss_mb"].iloc[0] - base))
    ax.plot(x, [ram0, *list(df["guest_ram_resident_mb"])], "s-", color=OKABE_ITO[4],
            label="resident part of the guest-RAM mapping")
    ax.plot(x, [base + v for v in x], ":", color="#555555", label="baseline + MiB touched (1:1)")
    style(ax, title="Guest memory is allocated on the host when first touched",
          xlabel="MiB touched in the guest (vmbench touch)", ylabel="host MiB",
          source=where_label(where_df) if where_df is not None else "")
    ax.legend(fontsize=8)
    return ax


def plot_threads(df: Any, ax: Any = None, where_df: Any = None) -> Any:
    """CPU seconds per QEMU thread while the guest ran a job (:func:`cpu_by_thread`)."""
    ax = axes(ax, figsize=(6.5, 3.2))
    d = df.sort_values("cpu_s")
    labels = [f"{r['name']} ({r['tid']})" for _, r in d.iterrows()]
    ax.barh(labels, d["utime_s"], color=OKABE_ITO[4], label="user")
    ax.barh(labels, d["stime_s"], left=d["utime_s"], color=OKABE_ITO[5], label="system (host kernel)")
    style(ax, title="Which QEMU thread did the guest's work", xlabel="host CPU seconds during the job",
          source=where_label(where_df) if where_df is not None else "")
    ax.legend(fontsize=8)
    return ax
