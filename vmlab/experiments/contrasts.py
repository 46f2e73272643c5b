"""What the three device contrasts (disk, console, net) share: a VM booted per
profile with the rows stamped, the columns every device row has, ratios beside
the published figures, and the interventions plot.

    from vmlab.experiments import contrasts, disk
    df = disk.run(quick=True)
    contrasts.measured_ratios(df, "disk")        # paravirtual vs emulated, from the frame
    contrasts.reference_for("disk")              # published figures (cited, never measured here)
    contrasts.plot_interventions(df, by="mode")

The device profiles, the probe that counts interventions and its
:class:`~vmlab.devices.Measurement` are in :mod:`vmlab.devices`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from ..devices import DeviceProfile, Measurement, boot
from ..guestinfo import where_vm
from ..measure import DATA_DIR, Progress, Rows, advance, say
from ..plots import axes, grouped_bars, is_wide, number, style, where_label
from ..vm import VM

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage


@contextlib.contextmanager
def booted(profile: DeviceProfile, rows: Optional[Rows] = None, progress: Progress = None, *,
           accel: str = "tcg", image: Optional[GuestImage] = None, **spec_kw: Any) -> Iterator[VM]:
    """A VM carrying ``profile``, started, with ``rows`` stamped with where it runs; shut down on exit.

        for prof in profiles:
            with booted(prof, rows, progress, accel=accel) as vm:
                ...
    """
    say(progress, f"{profile.contrast}: starting a VM with {profile.title}")
    vm = boot(profile, accel=accel, image=image, **spec_kw)
    advance(progress)           # booting is one step of the experiment's plan
    try:
        if rows is not None:
            rows.where = {**where_vm(vm), "qemu_pinned_cpu": "" if vm.host_cpu is None else str(vm.host_cpu)}
        yield vm
    finally:
        vm.shutdown()


def common_row(profile: DeviceProfile, m: Measurement, *, bytes_moved: int, counted_bytes: int,
               counted: Optional[Measurement]) -> Dict[str, Any]:
    """Columns every device row shares (counts from ``counted``, maybe another run)."""
    c = counted
    mb = counted_bytes / 1e6 if counted_bytes else float("nan")
    return {
        "device": profile.name, "kind": profile.kind, "title": profile.title,
        "host_cpu_s": round(m.host_cpu_s, 4),
        "guest_cpu_s": m.guest_cpu_s if m.guest_cpu_s is not None else m.guest_busy_s,
        "guest_busy_s": m.guest_busy_s, "wall_s": round(m.wall_s, 4),
        "bytes": bytes_moved,
        "interventions": c.interventions if c else None,
        "traps": c.n_traps if c else None, "irqs": c.n_irqs if c else None,
        "interventions_per_mb": (c.interventions / mb) if c and mb == mb else None,
        "counted_bytes": counted_bytes if c else None,
        "breakdown": c.breakdown() if c else "",
        # what QEMU's trace events count: calls into the device model (register accesses, virtio kicks), under
        # either accelerator; under KVM one string-I/O exit (rep insw) is replayed element by element here
        "device_calls": c.n_traps if c else None,
        "device_calls_per_mb": (c.n_traps / mb) if c and mb == mb else None,
        # what KVM's own counters (QMP query-stats) count: VM exits of this run (None under TCG, kvm_note says why)
        "kvm_exits": m.kvm_exits, "kvm_note": m.kvm_note,
        "kvm_io_exits": m.kvm_exit_counts.get("io_exits"), "kvm_mmio_exits": m.kvm_exit_counts.get("mmio_exits"),
        "kvm_exits_per_mb": (m.kvm_exits / (bytes_moved / 1e6)) if m.kvm_exits is not None and bytes_moved
        else None,
    }


# ---------------------------------------------------------------------------
# Beside published figures: ratios, the reference rows, the interventions plot
# ---------------------------------------------------------------------------
_PAIRS = {"disk": [("ide-pio", "virtio-blk"), ("ide-dma", "virtio-blk"), ("ahci", "virtio-blk"),
                   ("nvme", "virtio-blk")],
          "console": [("uart", "virtio-console")],
          "net": [("e1000", "virtio-net"), ("rtl8139", "virtio-net")]}
_GROUP = {"disk": ["mode", "pattern", "bs"], "console": [], "net": ["direction", "size_bytes"]}


def reference_contrasts() -> pd.DataFrame:
    """Published device contrasts (data/reference/device_contrasts.csv): cited, never measured here."""
    import pandas as pd
    return pd.read_csv(DATA_DIR / "reference" / "device_contrasts.csv")


def measured_ratios(df: pd.DataFrame, contrast: str) -> pd.DataFrame:
    """Paravirtual-vs-emulated ratios from a frame: throughput (para/emu, >1 = paravirtual faster)
    and interventions per MB (emu/para, >1 = paravirtual needs fewer)."""
    import pandas as pd
    by = [c for c in _GROUP[contrast] if c in df.columns]
    med = df.groupby([*by, "device"], dropna=False)[["throughput_mb_s", "interventions_per_mb"]].median()
    rows = []
    for emu, para in _PAIRS[contrast]:
        if emu not in set(df.device) or para not in set(df.device):
            continue
        keys = sorted({k[:-1] if by else () for k in med.index}) if by else [()]
        for key in keys:
            try:
                e = med.loc[(*tuple(key), emu)] if by else med.loc[emu]
                p = med.loc[(*tuple(key), para)] if by else med.loc[para]
            except KeyError:
                continue
            rows.append({**dict(zip(by, key, strict=False)), "emulated": emu, "paravirtual": para,
                         "throughput_ratio": p["throughput_mb_s"] / e["throughput_mb_s"]
                         if e["throughput_mb_s"] else None,
                         "interventions_ratio": e["interventions_per_mb"] / p["interventions_per_mb"]
                         if p["interventions_per_mb"] else None})
    out = pd.DataFrame(rows)
    if len(out) and "accel" in df:
        out["accel"] = df["accel"].iloc[0]
    return out


def reference_for(contrast: str) -> pd.DataFrame:
    """The published rows for a contrast (disk: virtio-blk vs IDE; net: virtio-net vs e1000)."""
    ref = reference_contrasts()
    key = {"disk": "blk|IDE", "net": "net|e1000|I/O devices", "console": "console"}[contrast]
    sub = ref[ref["contrast"].str.contains(key, case=False, regex=True)]
    return sub[["contrast", "metric", "ratio", "ratio_high", "bound", "tool", "context", "source", "verified"]]


def plot_interventions(df: pd.DataFrame, ax: Any = None, *, by: Optional[str] = None, per: str = "mb") -> Any:
    """Interventions per MB (or per byte) per device: traps and interrupts side by side (never stacked: on a log
    axis a stack hides the smaller count), each bar with its number; a log axis only for ranges over 30x."""
    import pandas as pd
    ax = axes(ax, figsize=(8, 3.8))
    d = df.copy()
    scale = d["counted_bytes"] / (1e6 if per == "mb" else 1.0)
    d["traps_per"] = d["traps"] / scale
    d["irqs_per"] = d["irqs"] / scale
    keys = ["device", "kind"] + ([by] if by else [])
    g = d.groupby(keys, sort=False)[["traps_per", "irqs_per"]].median().reset_index()
    labels = g["device"] + ((" " + g[by].astype(str)) if by else "")
    unit = "MB" if per == "mb" else "byte"
    t = pd.DataFrame({"traps (register accesses, kicks)": g["traps_per"].to_numpy(),
                      "interrupts": g["irqs_per"].to_numpy()}, index=list(labels))
    grouped_bars(ax, t, colors={"traps (register accesses, kicks)": "#555555", "interrupts": "#56B4E9"},
                 hatches=True)
    wide = is_wide(t.to_numpy().ravel())
    for c in ax.containers:
        ax.bar_label(c, labels=[number(v) if v > 0 else "0" for v in c.datavalues], fontsize=7, padding=1,
                     rotation=90 if len(t) > 4 else 0)
    if wide:
        lo = t[t > 0].min().min()
        ax.set_ylim(bottom=lo / 3 if lo == lo else None, top=t.max().max() * 8)
    else:
        ax.set_ylim(top=t.max().max() * 1.3)
    style(ax, title=f"Interventions per {unit} moved", xlabel="device" + (f" and {by}" if by else ""),
          ylabel=f"interventions per {unit} (count/{unit})", log="y" if wide else None, source=where_label(df))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax
