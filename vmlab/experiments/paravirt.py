"""Para-virtualization then and now, and device-model calls beside KVM exits (lessons 02.00, 02.01, DeviceRace).

* :func:`kernel_evidence` - what a booted guest's stock kernel carries for para-virtualization: the boot line
  pv_ops prints ("Booting paravirtualized kernel on ..."), how many Xen PV and KVM guest functions are built in
  (``/proc/kallsyms``), which virtio modules are loaded. One agent call on a VM the lesson already has.
* :func:`stock_image` - the guest image on Debian's packaged kernel (the stock kernel :func:`kernel_evidence`
  examines in 02.00; the lessons' own kernel is built from its source without Xen support).
* :func:`barham_rows` - Barham et al., *Xen and the Art of Virtualization* (SOSP 2003), the rows of
  ``data/reference/barham_2003_xen.csv`` that compare a system with native Linux, as a fraction of native
  (with their bound: a point value, at least, or less than).
* :func:`plot_then_and_now` - those published fractions beside this run's disk devices (throughput as a
  fraction of virtio-blk's, same workload).
* :func:`exits_table` - :func:`vmlab.experiments.inside.device_exits_table` on frames whose KVM columns may
  hold ``None`` (a live TCG run): they are made float first, so a missing count is NaN, never a dropped column.
* :func:`where_text` - where a recorded nested-KVM run ran, in one sentence.
* :func:`plot_calls_vs_exits` - per device, QEMU's device-model calls per MB (trace events, either
  accelerator) beside KVM's VM exits per MB (a recorded nested-KVM run), from
  :func:`vmlab.experiments.inside.device_exits_table`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..measure import DATA_DIR
from ..plots import KIND_COLORS, OKABE_ITO, axes, device_colors, grouped_bars, is_wide, number, style, where_label

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage
    from ..vm import VM

BARHAM_CSV = DATA_DIR / "reference" / "barham_2003_xen.csv"
_SEP = "@@vmlab@@"
_EVIDENCE_CMD = (f"dmesg | grep -m1 'paravirtualized kernel'; echo {_SEP}; grep -c ' xen_' /proc/kallsyms; "
                 f"echo {_SEP}; grep -c ' kvm_' /proc/kallsyms; echo {_SEP}; ls /sys/module | grep '^virtio'; "
                 f"echo {_SEP}; uname -r")
_SYSTEMS = {"xen": "Xen (para-virtualized XenoLinux)", "vmware_workstation_3.2": "VMware Workstation 3.2 (full, hosted)",
            "user_mode_linux": "User-mode Linux (Linux ported to run as host processes)"}
_BENCHMARKS = {"linux_build": "Linux kernel build", "spec_web99": "SPEC WEB99 (web server)"}
_SHORT = {"xen": "Xen", "vmware_workstation_3.2": "VMware WS 3.2", "user_mode_linux": "UML"}
_SHORT_BENCH = {"linux_build": "Linux build", "spec_web99": "SPEC WEB99"}


def _int(text: str) -> Optional[int]:
    try:
        return int(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def kernel_evidence(vm: VM) -> Dict[str, Any]:
    """What the guest's kernel carries for para-virtualization (one agent call on a running VM).

    Keys: ``kernel`` (``uname -r``), ``boot_line`` (pv_ops's "Booting paravirtualized kernel on ..." line from
    the kernel log, "" if absent), ``xen_functions`` / ``kvm_functions`` (symbols named ``xen_*`` / ``kvm_*`` in
    ``/proc/kallsyms``: Xen PV guest code and KVM guest code built into this kernel), ``virtio_modules``
    (loaded modules named ``virtio*``).
    """
    out = vm.run(_EVIDENCE_CMD).stdout
    parts = (out.split(_SEP) + [""] * 5)[:5]
    line = parts[0].strip()
    return {"kernel": parts[4].strip(), "boot_line": line.split("] ", 1)[-1] if line else "",
            "xen_functions": _int(parts[1]), "kvm_functions": _int(parts[2]),
            "virtio_modules": [m for m in parts[3].split() if m]}


def stock_image() -> GuestImage:
    """The guest image on Debian's packaged kernel (built once and cached, like the lessons' image)."""
    from ..image import ensure_image
    return ensure_image(guest_kernel="debian")


def evidence_table(ev: Dict[str, Any]) -> pd.DataFrame:
    """:func:`kernel_evidence` as rows: what was looked at, what was found, what it means."""
    import pandas as pd
    boot = ev.get("boot_line") or "(no such line in the kernel log)"
    rows = [
        ("the guest kernel", ev.get("kernel", ""), "the stock Debian kernel of every lesson guest"),
        ("pv_ops at boot (kernel log)", boot,
         "pv_ops chose its implementation at boot: 'bare hardware' = native instructions, "
         "'KVM' or 'Xen' = that hypervisor's para-virtual interface"),
        ("Xen PV guest functions (xen_* in /proc/kallsyms)", ev.get("xen_functions"),
         "the code that makes this same binary a para-virtualized Xen guest (hypercalls, event channels)"),
        ("KVM guest functions (kvm_* in /proc/kallsyms)", ev.get("kvm_functions"),
         "KVM's para-virtual clock, steal time and hints, used only when KVM is detected"),
        ("virtio modules loaded", ", ".join(ev.get("virtio_modules") or []) or "(none)",
         "the para-virtual device drivers, part of the same kernel package"),
    ]
    return pd.DataFrame(rows, columns=["what", "found in this guest", "what it means"])


def barham_rows() -> pd.DataFrame:
    """Barham et al. 2003's comparisons with native Linux as a fraction of native performance.

    Columns: benchmark, system, fraction (of native), bound ("=" point value, ">=" at least, "<" less than),
    and the CSV's source/verified/notes. Only rows that compare with native are kept (data/reference is cited,
    never measured here).
    """
    import pandas as pd
    ref = pd.read_csv(BARHAM_CSV)
    out: List[Dict[str, Any]] = []
    for _, r in ref.iterrows():
        metric, v = r["metric"], float(r["value"])
        if metric == "overhead_vs_native" and r["unit"] == "percent":
            frac, bound = 1 - v / 100, "="
        elif metric == "within_native_upper_bound" and r["unit"] == "percent":
            frac, bound = 1 - v / 100, ">="
        elif metric == "relative_to_native_upper_bound":
            frac, bound = v, "<"
        else:
            continue
        out.append({"label": f"{_SHORT.get(r['system'], r['system'])}\n{_SHORT_BENCH.get(r['benchmark'], r['benchmark'])}",
                    "benchmark": _BENCHMARKS.get(r["benchmark"], r["benchmark"]),
                    "system": _SYSTEMS.get(r["system"], r["system"]), "fraction": frac, "bound": bound,
                    "source": r["source"], "verified": r["verified"], "notes": r["notes"]})
    return pd.DataFrame(out)


def relative_to_virtio(df: pd.DataFrame, reference: str = "virtio-blk") -> pd.DataFrame:
    """Per disk device of a run, median throughput as a fraction of ``reference``'s, for the first workload
    (mode, pattern, block size) that both have."""
    import pandas as pd
    keys = [k for k in ("mode", "pattern", "bs") if k in df]
    med = df.groupby([*keys, "device", "kind"], sort=False)["throughput_mb_s"].median().reset_index()
    for _, w in med[med.device == reference].iterrows():
        sub = med[(med[keys] == w[keys]).all(axis=1)].copy()
        if len(sub) > 1 and w["throughput_mb_s"]:
            sub["fraction"] = sub["throughput_mb_s"] / w["throughput_mb_s"]
            sub["workload"] = " ".join(str(w[k]) if k != "bs" else f"{int(w[k]) // 1024} KiB" for k in keys)
            return sub.reset_index(drop=True)
    return pd.DataFrame(columns=[*keys, "device", "kind", "throughput_mb_s", "fraction", "workload"])


def plot_then_and_now(df: pd.DataFrame, axs: Any = None) -> Any:
    """Left: Barham et al. 2003 (published), each system as a fraction of native Linux, bounds marked.
    Right: this run's disk devices, throughput as a fraction of virtio-blk's (same workload)."""
    axs = axes(axs, figsize=(12, 4.4), ncols=2)
    left, right = axs
    b = barham_rows()
    families = {"Xen": (KIND_COLORS["paravirtual"], "Xen: modified guest kernel, type-1 VMM"),
             "VMware WS 3.2": (KIND_COLORS["emulated"], "VMware Workstation: unmodified guest, hosted VMM"),
             "UML": ("#999999", "User-mode Linux: Linux ported to run as host processes")}
    colors = [families.get(lbl.split("\n")[0], ("#777777", ""))[0] for lbl in b["label"]]
    bars = left.bar(range(len(b)), b["fraction"], color=colors, edgecolor="#333333", linewidth=0.5)
    for bar, r in zip(bars, b.itertuples(), strict=False):
        if r.bound != "=":
            bar.set_hatch("//")
        text = {"=": "", ">=": "at least ", "<": "less than "}[r.bound] + f"{r.fraction:.2f}"
        left.text(bar.get_x() + bar.get_width() / 2, r.fraction + 0.02, text, ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(b)))
    left.set_xticklabels(list(b["label"]), fontsize=8)
    from matplotlib.patches import Patch
    left.legend(handles=[Patch(color=c, label=text) for c, text in families.values()], fontsize=7.5,
                loc="upper right", frameon=False)
    left.axhline(1.0, color="#555555", ls="--", lw=1)
    left.set_ylim(0, 1.45)
    style(left, title="2003: Xen's modified guest vs the alternatives", ylabel="fraction of native Linux",
          source="published: Barham et al., SOSP 2003, section 4.1 (hatched = a bound, not a point value)")
    r = relative_to_virtio(df)
    if len(r):
        kinds = dict(zip(r["device"], r["kind"], strict=False))
        dcol = device_colors(list(r["device"]), kinds)
        rb = right.bar(range(len(r)), r["fraction"], color=[dcol[d] for d in r["device"]], edgecolor="#333333",
                       linewidth=0.5)
        right.bar_label(rb, labels=[f"{v:.2f}" for v in r["fraction"]], fontsize=8, padding=2)
        right.set_xticks(range(len(r)))
        right.set_xticklabels([f"{d}\n({kinds[d]})" for d in r["device"]], fontsize=8)
        right.axhline(1.0, color="#555555", ls="--", lw=1)
        right.set_ylim(0, max(1.25, float(r["fraction"].max()) * 1.15))
        title = f"Now: disk devices, {r['workload'].iloc[0]}"
    else:
        right.text(0.5, 0.5, "no virtio-blk row in this run", ha="center", va="center", transform=right.transAxes)
        title = "Now: disk devices"
    style(right, title=title, ylabel="throughput, fraction of virtio-blk", source=where_label(df))
    return axs


_COUNT_COLUMNS = ("kvm_exits", "kvm_io_exits", "kvm_mmio_exits", "kvm_exits_per_mb", "device_calls",
                  "device_calls_per_mb", "traps", "counted_bytes", "size_bytes", "throughput_mb_s")


def exits_table(*frames: pd.DataFrame) -> pd.DataFrame:
    """Per device: device-model calls per MB and VM exits per MB of each frame (recorded KVM rows, live TCG rows),
    as :func:`vmlab.experiments.inside.device_exits_table` gives them; count columns are made float first."""
    from .inside import device_exits_table
    fixed = [f.astype({c: float for c in _COUNT_COLUMNS if c in f}) for f in frames]
    for f, g in zip(frames, fixed, strict=True):
        g.attrs.update(f.attrs)
    return device_exits_table(*fixed)


def where_text(rows: pd.DataFrame, contrast: str) -> str:
    """Where a recorded nested-KVM run of ``contrast`` ran, in one sentence (from ``rows.attrs["where"]``)."""
    w = (rows.attrs.get("where") or {}).get(contrast) or {}
    if not w:
        return "where it ran was not recorded"
    load = w.get("load_before") or []
    return (f"{str(w.get('inner_accel', 'kvm')).upper()} ({w.get('nested_kvm_module', '?')}) inside a "
            f"{str(w.get('outer_accel', '?')).upper()} guest ({w.get('nested_cpus', '?')} vCPU, guest kernel "
            f"{w.get('nested_guest_kernel', '?')}), QEMU {w.get('qemu', '?')}, on host '{w.get('host', '?')}' "
            f"({w.get('host_cpu', '?')}, {w.get('host_cpus', '?')} CPUs, kernel {w.get('host_kernel', '?')}), "
            f"{str(w.get('date', '?'))[:16].replace('T', ' ')} UTC"
            + (f", load average {load[0]:.1f} before" if load else ""))


def plot_calls_vs_exits(tab: pd.DataFrame, ax: Any = None, *, workload: Optional[str] = None) -> Any:
    """Per device: QEMU device-model calls per MB and KVM VM exits per MB, one bar per (count, where it ran).

    ``tab`` is :func:`vmlab.experiments.inside.device_exits_table` output (recorded KVM rows and live TCG rows).
    One workload (``workload``, default the table's first). A log axis when the values span more than 30x; a
    missing bar means that count does not exist there (no VM exits under TCG)."""
    import pandas as pd
    ax = axes(ax, figsize=(10, 4.2))
    if "workload" in tab and len(tab):
        workload = workload or str(tab["workload"].iloc[0])
        tab = tab[tab["workload"] == workload]
    if (tab["accel"] == "kvm").any():       # side by side only where both exist
        tab = tab[tab["device"].isin(set(tab[tab["accel"] == "kvm"]["device"]))]
    series: Dict[str, Dict[str, float]] = {}
    order: List[str] = []
    for r in tab.itertuples():
        dev = str(r.device)
        if dev not in order:
            order.append(dev)
        where = str(r.accel).upper()
        series.setdefault(f"device-model calls per MB ({where})", {})[dev] = float(r.device_calls_per_mb)
        kvm = float(r.kvm_exits_per_mb) if r.kvm_exits_per_mb == r.kvm_exits_per_mb else math.nan
        if math.isfinite(kvm):
            series.setdefault(f"VM exits per MB ({where})", {})[dev] = kvm
    rank = {"device-model calls per MB (TCG)": 0, "device-model calls per MB (KVM)": 1, "VM exits per MB (KVM)": 2}
    t = pd.DataFrame(series).reindex(order)
    t = t[sorted(t.columns, key=lambda c: rank.get(c, 9))]
    fixed = {"device-model calls per MB (TCG)": KIND_COLORS["tcg"], "device-model calls per MB (KVM)": KIND_COLORS["kvm"],
             "VM exits per MB (KVM)": "#555555"}
    palette = {name: fixed.get(name, OKABE_ITO[(i * 2 + 1) % len(OKABE_ITO)]) for i, name in enumerate(t.columns)}
    grouped_bars(ax, t, colors=palette, hatches=True)
    for c in ax.containers:
        ax.bar_label(c, labels=[number(v) if v == v and v > 0 else "" for v in c.datavalues], fontsize=7,
                     padding=1, rotation=90 if len(t) > 3 else 0)
    vals = t.to_numpy().ravel()
    wide = is_wide(vals[vals == vals])
    if wide:
        ax.set_ylim(top=float(pd.Series(vals).max()) * 20)
    ran = "; ".join(f"{str(a).upper()}: {r}" for a, r in tab.groupby("accel", sort=False)["ran"].first().items()) \
        if "ran" in tab else ""
    style(ax, title="Device-model calls vs VM exits" + (f", {workload}" if workload else ""), xlabel="device",
          ylabel="count per MB moved (count/MB)", log="y" if wide else None, source=ran)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax
