"""CPU virtualization: the same nanobenchmarks natively, under TCG (binary
translation) and, where it is proven to work, under KVM (hardware-assisted).

    from vmlab.experiments import cpu
    df = cpu.run(quick=True)                 # one row per benchmark x platform
    df.attrs["kvm"]                          # why KVM rows are there or missing
    cpu.plot_ratios(df)

``vmbench cpu`` (vmlab/guest/vmbench.c) is compiled for the host (``gcc -static
-O2``, cached in ``vmlab.config.cache_dir()/native``) and run there, and the
same source, built into the guest image as ``/bin/vmbench``, runs in the guest.
Both print ns and cycles per operation as the median over repeats, with min,
max and the coefficient of variation.

What to expect (Adams & Agesen 2006): binary translation runs ordinary code at
close to native speed and pays on privileged operations -- system calls, page
faults, port I/O, page-table updates -- which a translator must emulate. QEMU's
TCG differs from the VMware BT the paper measured in one important way: VMware
ran guest *user* code directly on the CPU and translated only the kernel, while
TCG translates everything, user code included, and every guest memory access
goes through a software TLB lookup. A register-only loop (``compute``) runs near
native under TCG; a memory-heavy one (``memory_bw``) does not.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from ..errors import SetupError, SpecError, VMLabError
from ..guestinfo import accel_of, where_vm
from ..hostinfo import host_virtualization, where
from ..hostview import native_vmbench  # vmbench for the host; re-exported as cpu.native_vmbench
from ..measure import DATA_DIR, Rows, advance, plan, say
from ..plots import OKABE_ITO, axes, color_for, grouped_bars, source_note, style
from ..vm import VM, kvm_device_problem, kvm_verdict

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

SOURCE = Path(__file__).resolve().parent.parent / "guest" / "vmbench.c"

BENCHMARKS = ("null_syscall", "page_fault", "port_io", "signal_fpe", "mprotect", "mmap_munmap",
              "clock_gettime", "rdtsc", "compute", "memory_bw", "fork_wait")

# What each benchmark exercises, and which of the paper's nanobenchmarks it corresponds to.
DESCRIPTIONS: Dict[str, str] = {
    "null_syscall": "getppid() system call: user -> kernel -> user",
    "page_fault": "first touch of a fresh anonymous page (kernel allocates, maps it)",
    "port_io": "inb from port 0x80 (a device register: emulated by the hypervisor)",
    "signal_fpe": "divide by zero -> SIGFPE -> handler -> siglongjmp",
    "mprotect": "change a page's protection (a page-table update + TLB flush)",
    "mmap_munmap": "map, touch and unmap one page (page-table create + teardown)",
    "clock_gettime": "read the time (vDSO; cost depends on the clocksource)",
    "rdtsc": "read the time-stamp counter instruction",
    "compute": "register-only ALU loop (xorshift + multiply-add), per iteration",
    "memory_bw": "memcpy, ns per 4 KiB copied",
    "fork_wait": "fork + child exit + waitpid (the paper's forkwait)",
}
# Adams & Agesen's names for the same (or the closest) operation.
PAPER_NAME: Dict[str, str] = {
    "null_syscall": "syscall", "page_fault": "pgfault", "port_io": "in", "signal_fpe": "divzero",
    "mprotect": "ptemod", "fork_wait": "forkwait",
}
PRIVILEGED = ("null_syscall", "page_fault", "signal_fpe", "mprotect", "mmap_munmap", "fork_wait")

QUICK = {"repeats": 5, "scale": 0.1}
FULL = {"repeats": 7, "scale": 0.5}


# ---------------------------------------------------------------- native tool
def _bench_args(benchmarks: Optional[Sequence[str]], repeats: int, scale: float) -> List[str]:
    args = ["cpu", "--repeats", str(int(repeats)), "--scale", repr(float(scale))]
    if benchmarks:
        args += ["--bench", ",".join(benchmarks)]
    return args


def check_options(benchmarks: Optional[Sequence[str]] = None, repeats: int = 5,
                  scale: float = 1.0) -> Optional[List[str]]:
    """Validate benchmark names, repeats and scale (SpecError before anything runs)."""
    if benchmarks is not None:
        if isinstance(benchmarks, str):
            benchmarks = [b.strip() for b in benchmarks.split(",") if b.strip()]
        bad = [b for b in benchmarks if b not in BENCHMARKS]
        if bad or not benchmarks:
            raise SpecError("benchmarks", f"unknown benchmark(s) {bad or benchmarks!r}",
                            fix="choose from: " + ", ".join(BENCHMARKS))
        benchmarks = list(benchmarks)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 1000:
        raise SpecError("repeats", f"{repeats!r} is not a whole number from 1 to 1000", fix="e.g. repeats=5")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale <= 100):
        raise SpecError("scale", f"{scale!r} is not a positive work multiplier (<= 100)",
                        fix="e.g. scale=0.1 for a quick run, 1 for the full one")
    return benchmarks


def run_native(benchmarks: Optional[Sequence[str]] = None, repeats: int = 5, scale: float = 1.0,
               timeout: float = 600, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run ``vmbench cpu`` on the host; returns its parsed JSON."""
    benchmarks = check_options(benchmarks, repeats, scale)
    exe = native_vmbench(progress)
    proc = subprocess.run([str(exe), *_bench_args(benchmarks, repeats, scale)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SetupError(f"vmbench failed on the host (status {proc.returncode}): {proc.stderr.strip()[-300:]}",
                         fix="run it by hand to see why: " + f"{exe} cpu --scale 0.1")
    return json.loads(proc.stdout)


def run_guest(vm: VM, benchmarks: Optional[Sequence[str]] = None, repeats: int = 5, scale: float = 1.0,
              timeout: float = 600) -> Dict[str, Any]:
    """Run ``/bin/vmbench cpu`` in a booted guest; returns its parsed JSON."""
    benchmarks = check_options(benchmarks, repeats, scale)
    res = vm.run("vmbench " + " ".join(_bench_args(benchmarks, repeats, scale)), timeout=timeout)
    return json.loads(res.stdout)


# ---------------------------------------------------------------- rows
def _best_rounds(datas: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per benchmark, the round with the lowest median (rounds are whole vmbench runs)."""
    best: Dict[str, Dict[str, Any]] = {}
    order: List[str] = []
    for k, d in enumerate(datas):
        for r in d["results"]:
            b = r["benchmark"]
            if b not in best:
                order.append(b)
            r = dict(r, round=k + 1)
            cur = best.get(b)
            if cur is None or ("ns_per_op" in r and ("ns_per_op" not in cur or r["ns_per_op"] < cur["ns_per_op"])):
                best[b] = r
    return {"test": "cpu", "results": [best[b] for b in order]}


def add_results(rows: Rows, data: Dict[str, Any], platform: str, where: Dict[str, str],
                **extra: Any) -> None:
    """One row per benchmark of a ``vmbench cpu`` result."""
    for r in data["results"]:
        row: Dict[str, Any] = dict(where)
        row.update(benchmark=r["benchmark"], platform=platform, ns_per_op=r.get("ns_per_op", math.nan),
                   ns_min=r.get("ns_min", math.nan), ns_max=r.get("ns_max", math.nan),
                   ns_cv=r.get("ns_cv", math.nan), cycles_per_op=r.get("cycles_per_op", math.nan),
                   iterations=r.get("iterations"), repeats=r.get("repeats"),
                   skipped=r.get("skipped", ""), clocksource=r.get("clocksource", ""),
                   samples_ns=json.dumps(r.get("samples_ns", [])), round=r.get("round", 1))
        if row["cycles_per_op"] is None:
            row["cycles_per_op"] = math.nan
        row.update(extra)
        rows.add(**row)


def add_ratios(df: Any) -> Any:
    """``ratio_to_native`` = ns_per_op / the native ns_per_op of the same benchmark (NaN if no native)."""
    import pandas as pd
    native = df[df["platform"] == "native"].set_index("benchmark")["ns_per_op"]
    df["ratio_to_native"] = [
        (ns / native[b]) if b in native.index and pd.notna(native[b]) and native[b] > 0 and pd.notna(ns)
        else math.nan for b, ns in zip(df["benchmark"], df["ns_per_op"], strict=False)]
    return df


def where_native() -> Dict[str, Any]:
    """The where-it-ran columns of a native run (on this host, no hypervisor)."""
    w: Dict[str, Any] = where("none")
    hv = host_virtualization()
    w.update(accel="none", ran_on="host", host_is_vm=bool(hv.get("is_vm")),
             guest_kernel="")
    return w


def kvm_status(progress: Optional[Callable[[str], None]] = None, probe: bool = True) -> Dict[str, Any]:
    """The KVM verdict for this host (``vmlab.vm.kvm_verdict``), never raising."""
    problem = kvm_device_problem()
    if problem:
        return {"usable": False, "reason": problem}
    if not probe:
        return {"usable": False, "reason": "KVM not probed (kvm=False)"}
    try:
        return dict(kvm_verdict())
    except VMLabError as exc:
        return {"usable": False, "reason": f"the KVM probe failed: {exc.message}"}


def run(quick: bool = False, progress: Optional[Callable[[str], None]] = None, *,
        benchmarks: Optional[Sequence[str]] = None, repeats: Optional[int] = None,
        scale: Optional[float] = None, kvm: Optional[bool] = None, image: Optional[GuestImage] = None,
        memory: int = 256, rounds: int = 2) -> pd.DataFrame:
    """Native vs TCG (vs KVM where proven) nanobenchmarks; one row per benchmark x platform.

    ``kvm``: None = add KVM rows if ``vmlab.vm.kvm_verdict()`` proves KVM works here,
    False = never. Why KVM rows are missing is in ``df.attrs["kvm"]`` and ``df.attrs["notes"]``
    (and said to ``progress``).

    ``rounds`` alternates native and guest runs; for each benchmark and platform the round
    with the lower median is kept (column ``round``), so a burst of load from other work
    on the host spoils neither side more than the other.
    """
    base = QUICK if quick else FULL
    repeats = int(base["repeats"]) if repeats is None else repeats
    scale = base["scale"] if scale is None else scale
    benchmarks = check_options(benchmarks, repeats, scale)
    native_vmbench(progress)          # a missing compiler is a SetupError before anything runs
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 10:
        raise SpecError("rounds", f"{rounds!r} is not a whole number from 1 to 10", fix="e.g. rounds=2")
    notes: List[str] = []
    rows = Rows("cpu")
    with rows.guard():
        verdict = kvm_status(progress, probe=kvm is not False)
        accels = ["tcg"]
        if kvm is not False and verdict.get("usable"):
            accels.append("kvm")
        else:
            msg = f"no KVM rows: KVM is not available on this host ({verdict.get('reason', 'unknown')})"
            notes.append(msg)
            say(progress, msg)
        runs: Dict[str, List[Dict[str, Any]]] = {"native": []}
        wheres: Dict[str, Dict[str, Any]] = {"native": where_native()}
        vms = []
        plan(progress, len(accels) + rounds * (1 + len(accels)))   # each boot; each round: native, each guest
        try:
            for accel in accels:
                say(progress, f"{accel}: booting a guest")
                vm = VM(accel=accel, name=f"cpu-{accel}", memory=memory, image=image, warm=True)
                vms.append(vm)
                vm.start()
                w: Dict[str, Any] = where_vm(vm)
                w.update(ran_on="guest", host_is_vm=wheres["native"]["host_is_vm"])
                wheres[accel_of(vm)] = w
                runs[accel_of(vm)] = []
                advance(progress)
            # rounds alternate native and guest runs, so host load hits both sides alike
            for k in range(rounds):
                say(progress, f"round {k + 1}/{rounds}: vmbench cpu --repeats {repeats} --scale {scale:g} "
                              f"natively, then in the guest" + ("s" if len(vms) > 1 else ""))
                runs["native"].append(run_native(benchmarks, repeats, scale, progress=progress))
                advance(progress)
                for vm in vms:
                    runs[accel_of(vm)].append(run_guest(vm, benchmarks, repeats, scale, timeout=900))
                    advance(progress)
        finally:
            for vm in vms:
                vm.shutdown()
        for plat, datas in runs.items():
            best = _best_rounds(datas)
            add_results(rows, best, plat, wheres[plat], rounds=len(datas))
            for r in best["results"]:
                if r.get("skipped"):
                    notes.append(f"{plat} {r['benchmark']} skipped: {r['skipped']}")
        df = add_ratios(rows.frame())
    first = ["benchmark", "platform", "ns_per_op", "ratio_to_native", "ns_min", "ns_max", "ns_cv",
             "cycles_per_op", "skipped", "ran_on", "accel"]
    df = df[[c for c in first if c in df] + [c for c in df.columns if c not in first]]
    df.attrs["kvm"] = verdict
    df.attrs["notes"] = notes
    return df


# ---------------------------------------------------------------- views
def table(df: Any) -> Any:
    """Benchmarks down, platforms across: ns/op and the ratio to native."""
    import pandas as pd
    ns = df.pivot_table(index="benchmark", columns="platform", values="ns_per_op", aggfunc="median")
    ratio = df[df.platform != "native"].pivot_table(index="benchmark", columns="platform",
                                                    values="ratio_to_native", aggfunc="median")
    ratio.columns = [f"{c}/native" for c in ratio.columns]
    out = pd.concat([ns, ratio], axis=1)
    order = [b for b in BENCHMARKS if b in out.index]
    return out.loc[order]


def paper_table(df: Any, reference: Optional[Any] = None) -> Any:
    """Measured cycles/op beside Adams & Agesen's published figures (secondary sources).

    One row per paper benchmark that vmbench has a counterpart for. Published
    values keep their own unit (some are ratios or differences, not cycles).
    """
    import pandas as pd
    ref = reference if reference is not None else pd.read_csv(DATA_DIR / "reference" / "adams_agesen_2006.csv")
    out = []
    for bench, paper in PAPER_NAME.items():
        sub = df[df.benchmark == bench]
        ns = {p: sub[sub.platform == p]["ns_per_op"].median() for p in sub.platform.unique()}
        pub = ref[ref.benchmark == paper]
        pubtxt = {}
        for _, r in pub.iterrows():
            unit = "" if r["unit"] in ("cycles",) else f" {r['unit']}"
            pubtxt[r["platform"]] = f"{r['value']:g}{unit}"
        out.append({
            "vmbench": bench, "paper": paper,
            "measured_native_ns": ns.get("native", math.nan),
            "measured_tcg_ns": ns.get("tcg", math.nan),
            "measured_kvm_ns": ns.get("kvm", math.nan),
            "measured_tcg/native": (ns.get("tcg", math.nan) / ns["native"]) if ns.get("native") else math.nan,
            "paper_native": pubtxt.get("native", "not found"),
            "paper_software_vmm": pubtxt.get("software_vmm", "not found"),
            "paper_hardware_vmm": pubtxt.get("hardware_vmm", "not found"),
            "paper_verified": ",".join(sorted(set(pub["verified"]))) if len(pub) else "",
        })
    return pd.DataFrame(out)


def source_label(df: Any) -> str:
    """Where the rows were measured: host CPU and kernel, and the guest's accelerator/QEMU/kernel."""
    if df is None or len(df) == 0:
        return ""
    r = df.iloc[0]
    parts = [f"native = this host ({r.get('host_cpu', '?')}, Linux {r.get('host_kernel', '?')}"
             + (", itself a KVM guest" if bool(r.get("host_is_vm")) else "") + ")"]
    g = df[df.platform != "native"]
    if len(g):
        gr = g.iloc[0]
        parts.append(f"guests: {', '.join(sorted(set(g.platform.str.upper())))} on QEMU {gr.get('qemu', '?')}, "
                     f"guest kernel {gr.get('guest_kernel', '?')}")
    return "; ".join(parts)


def paper_ratios(df: Any, reference: Optional[Any] = None) -> Any:
    """Slowdown vs native, published and measured, for the paper benchmarks whose native,
    software-VMM and hardware-VMM figures were all found in cycles (pgfault, divzero)."""
    import pandas as pd
    ref = reference if reference is not None else pd.read_csv(DATA_DIR / "reference" / "adams_agesen_2006.csv")
    pt = paper_table(df, ref)
    rows = []
    for paper in ref.benchmark.unique():
        r = ref[(ref.benchmark == paper) & (ref.unit == "cycles")].set_index("platform")["value"]
        if not {"native", "software_vmm", "hardware_vmm"} <= set(r.index):
            continue
        if paper == "ptemod" or paper not in set(pt.paper):   # ptemod's "native" is one store: no vmbench match
            continue
        m = pt[pt.paper == paper].iloc[0]
        rows.append({"paper": paper, "vmbench": m["vmbench"],
                     "paper: software VMM / native": r["software_vmm"] / r["native"],
                     "paper: hardware VMM / native": r["hardware_vmm"] / r["native"],
                     "measured: TCG / native": m["measured_tcg/native"],
                     "measured: KVM / native": (m["measured_kvm_ns"] / m["measured_native_ns"])
                     if m["measured_native_ns"] else math.nan})
    return pd.DataFrame(rows).set_index("paper").dropna(axis=1, how="all")


def plot_paper(df: Any, reference: Optional[Any] = None, ax: Any = None) -> Any:
    """Bars: published slowdowns (secondary) beside the measured ones."""
    import numpy as np
    from matplotlib.ticker import ScalarFormatter
    t = paper_ratios(df, reference)
    ax = axes(ax, figsize=(10, 4.5))   # room for the legend beside the bars (constrained layout)
    cols = [c for c in t.columns if c != "vmbench"]
    colors = {"paper: software VMM / native": OKABE_ITO[0], "paper: hardware VMM / native": OKABE_ITO[2],
              "measured: TCG / native": OKABE_ITO[1], "measured: KVM / native": OKABE_ITO[4]}
    x = np.arange(len(t))
    w = 0.8 / len(cols)
    for i, c in enumerate(cols):
        ax.bar(x + (i - (len(cols) - 1) / 2) * w, t[c].to_numpy(dtype=float), w, label=c, color=colors[c],
               hatch="//" if c.startswith("paper") else None, edgecolor="white")
    ax.axhline(1, color="black", lw=1, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{p}\n(vmbench {v})" for p, v in zip(t.index, t.vmbench, strict=False)])
    style(ax, title="Slowdown vs native: published (2006, secondary) and measured here",
          ylabel="time / native time (log)", log="y")
    ax.set_ylim(0.5, max(2.0, float(np.nanmax(t[cols].to_numpy(dtype=float))) * 1.6))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # beside, not on a bar
    source_note(ax, "measured: " + source_label(df))
    ax.annotate("published: Adams & Agesen, ASPLOS 2006, read in a secondary text (data/reference)",
                xy=(1.0, -0.26), xycoords="axes fraction", ha="right", va="top", fontsize=7, color="#555555")
    return ax


def plot_ns(df: Any, ax: Any = None) -> Any:
    """Grouped bars: ns per operation for each benchmark and platform (log scale)."""
    import numpy as np
    ax = axes(ax, figsize=(10, 4.2))
    t = df.pivot_table(index="benchmark", columns="platform", values="ns_per_op", aggfunc="median")
    lo = df.pivot_table(index="benchmark", columns="platform", values="ns_min", aggfunc="median")
    hi = df.pivot_table(index="benchmark", columns="platform", values="ns_max", aggfunc="median")
    order = [b for b in BENCHMARKS if b in t.index]
    plats = [p for p in ("native", "tcg", "kvm") if p in t.columns]
    table = t.loc[order, plats]
    err = {p: np.vstack([table[p].to_numpy(dtype=float) - lo.loc[order, p].to_numpy(dtype=float),
                         hi.loc[order, p].to_numpy(dtype=float) - table[p].to_numpy(dtype=float)]) for p in plats}
    x = grouped_bars(ax, table, colors=color_for, yerr=err, rotation=30)
    w = 0.8 / max(1, len(plats))
    for j, b in enumerate(order):
        if "native" in t.columns and not np.isfinite(t.loc[b, "native"]):
            ax.annotate("native\nskipped", (x[j] - w * (len(plats) - 1) / 2, 0.02), fontsize=6, ha="center",
                        xycoords=("data", "axes fraction"), va="bottom")
    ax.legend(title="platform")
    style(ax, title="Nanobenchmarks: cost per operation (median; bars = min..max over repeats)",
          ylabel="ns per operation (log)", log="y")
    source_note(ax, source_label(df))
    return ax


def plot_ratios(df: Any, ax: Any = None) -> Any:
    """Slowdown relative to native, per benchmark (log scale); 1 = native speed."""
    ax = axes(ax, figsize=(10, 4))
    g = df[(df.platform != "native") & df.ratio_to_native.notna()]
    t = g.pivot_table(index="benchmark", columns="platform", values="ratio_to_native", aggfunc="median")
    order = [b for b in BENCHMARKS if b in t.index]
    plats = [p for p in ("tcg", "kvm") if p in t.columns]
    grouped_bars(ax, t.loc[order, plats], colors=color_for, rotation=30)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.text(len(order) - 0.5, 1.03, "native speed", ha="right", va="bottom", fontsize=8)
    ax.legend(title="platform")
    style(ax, title="Slowdown vs native (1 = native speed)",
          ylabel="time / native time (log)", log="y")
    source_note(ax, source_label(df))
    return ax
