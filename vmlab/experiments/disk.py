"""Emulated (IDE in PIO and DMA mode, AHCI, NVMe) vs paravirtual (virtio-blk, virtio-scsi) disks.

One VM per device with a blank scratch disk; inside it ``vmbench disk`` (O_DIRECT,
monotonic clock, per-operation latency) reads and writes the raw device.

Two runs per workload, on purpose:

* the **timed** runs (``repeats`` of them) have QEMU's tracing switched off, because
  tracing slows the emulated devices far more than the virtio ones (IDE in PIO mode
  is ~10x slower traced) and would distort throughput;
* one **counted** run per workload (same workload, at most ``count_cap`` bytes) has
  tracing on and counts interventions (register traps + kicks on the host, interrupts
  in the guest). Its counts are copied into every repeat's row; ``counted_bytes``
  says how many bytes they cover and ``interventions_per_mb`` is normalised by it.

    df = run(quick=True)              # seconds: 4 devices, seq read + write, 8 MiB timed, 2 MiB counted
    df = run(devices=["ide-pio", "virtio-blk"], bs=[4096, 65536], repeats=5)
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from .. import devices as dv
from ..errors import SpecError
from ..measure import Progress, Rows, advance, plan, say
from ..plots import axes, device_colors, grouped_bars, is_wide, style, where_label
from ..spec import parse_size
from .contrasts import booted, common_row

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

MODES = ("read", "write")
PATTERNS = ("seq", "rand")


def _sizes(values: Any, name: str) -> list:
    if isinstance(values, (int, str)):
        values = [values]
    out = []
    for v in values:
        n = parse_size(v, name, default_unit="K") if isinstance(v, str) else int(v)
        if n <= 0 or n % 512:
            raise SpecError(name, f"{v!r} is not a positive multiple of 512 bytes (O_DIRECT needs it)",
                            fix="e.g. bs=[4096, 65536]")
        out.append(n)
    return out


def workloads(modes: Sequence[str], patterns: Sequence[str], bs: Sequence[int]):
    for m in modes:
        if m not in MODES:
            raise SpecError("modes", f"unknown mode {m!r}", fix="read and/or write")
    for p in patterns:
        if p not in PATTERNS:
            raise SpecError("patterns", f"unknown pattern {p!r}", fix="seq and/or rand")
    return list(itertools.product(modes, patterns, bs))


def command(profile: dv.DeviceProfile, mode: str, pattern: str, bs: int, total: int, seed: int = 1) -> str:
    return (f"vmbench disk --dev {profile.guest_path} --mode {mode} --pattern {pattern} "
            f"--bs {bs} --total {total} --direct --seed {seed}")


def stretch(probe: dv.Probe, make: Any, total: int, unit: int, min_seconds: float,
            limit: int = 2 << 30) -> int:
    """Bytes per timed run so that one run lasts at least ``min_seconds`` (an untimed pilot run
    measures the speed; short runs on a busy 2-core host give a large spread). 0 = keep ``total``.
    ``limit`` is 2 GiB: the null disk moves 256 KiB requests at up to ~3 GB/s here, and a cap of 256 MiB
    made those runs ~0.1 s long, where one pause of the host moved a repeat by 25 % (docs/devices.md)."""
    if min_seconds <= 0:
        return total
    secs = float(probe.measure(make(total), count=False).result["seconds"])
    if secs >= min_seconds or secs <= 0:
        return total
    want = int(total * min_seconds / secs * 1.2)
    return max(total, min(limit, (want + unit - 1) // unit * unit))


def run(quick: bool = False, progress: Progress = None, *, devices: Optional[Iterable[str]] = None,
        modes: Optional[Sequence[str]] = None, patterns: Optional[Sequence[str]] = None,
        bs: Optional[Sequence[Any]] = None, total: Any = None, repeats: Optional[int] = None,
        count_cap: Any = None, min_seconds: Optional[float] = None, accel: str = "auto",
        disk_size: str = "64M", image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Measure every (device, workload, repeat); returns a tidy DataFrame (see docs/devices.md)."""
    profs = dv.resolve(devices, "disk", quick)
    modes = tuple(modes or MODES)
    patterns = tuple(patterns or (("seq",) if quick else PATTERNS))
    bss = _sizes(bs if bs is not None else ([65536] if quick else [4096, 65536, 262144]), "bs")
    total_b = parse_size(total, "total") if total is not None else (8 << 20 if quick else 16 << 20)
    if total_b > 1 << 30:     # e.g. total=2 << 20 meant as 2 MiB: a bare number is MiB, so that is 2 TiB
        raise SpecError("total", f"{total!r} is {total_b / 2**30:,.0f} GiB per run (a bare number means MiB)",
                        fix='give the size with its unit, e.g. total="8M"')
    cap = parse_size(count_cap, "count_cap") if count_cap is not None else 2 << 20
    repeats = int(repeats or (1 if quick else 5))
    min_s = float(min_seconds if min_seconds is not None else (0.0 if quick else 0.3))
    if repeats < 1:
        raise SpecError("repeats", f"{repeats} is not a positive number", fix="e.g. repeats=5")
    parse_size(disk_size, "disk_size")   # sequential runs wrap at the end of the disk
    wl = workloads(modes, patterns, bss)
    for (_, _, b) in wl:
        if b > total_b:
            raise SpecError("bs", f"block size {b} is larger than total {total_b}", fix="raise total= or lower bs=")

    rows = Rows("disk")
    plan(progress, len(profs) * (1 + len(wl)))      # a boot and each workload, per device
    with rows.guard():
        for prof in profs:
            with booted(prof, rows, progress, accel=accel, image=image, disk_size=disk_size) as vm:
                probe = dv.Probe(vm, prof)
                probe.calibrate(command(prof, "read", "seq", 65536, 256 << 10))
                for (mode, pattern, b) in wl:
                    counted_total = max(b, min(total_b, cap) // b * b)
                    say(progress, f"disk: {prof.name} {mode} {pattern} bs={b}: counting {counted_total} bytes")
                    counted = probe.measure(command(prof, mode, pattern, b, counted_total), count=True)
                    run_total = stretch(probe, lambda n, prof=prof, mode=mode, pattern=pattern, b=b: command(prof, mode, pattern, b, n), total_b, b, min_s)
                    for r in range(repeats):
                        m = probe.measure(command(prof, mode, pattern, b, run_total, seed=r + 1), count=False)
                        res = m.result
                        rows.add(**{
                            **common_row(prof, m, bytes_moved=int(res["bytes"]),
                                            counted_bytes=int(counted.result["bytes"]), counted=counted),
                            "repeat": r, "mode": mode, "pattern": pattern, "bs": b,
                            "size_bytes": int(res["bytes"]), "requested_bytes": total_b, "ops": int(res["ops"]),
                            "seconds": float(res["seconds"]),
                            "throughput_mb_s": float(res["throughput_mb_s"]),
                            "lat_us_median": float(res["lat_us_median"]),
                            "lat_us_p99": float(res["lat_us_p99"]),
                            "ops_per_s": int(res["ops"]) / float(res["seconds"]) if res["seconds"] else None,
                            "counted_seconds": float(counted.result["seconds"]),
                        })
                    say(progress, f"disk: {prof.name} {mode} {pattern} bs={b}: "
                                  f"{rows.rows[-1]['throughput_mb_s']:.1f} MB/s, "
                                  f"{counted.interventions} interventions")
                    advance(progress)
    return rows.frame()


def plot(df, ax=None, *, metric: str = "throughput_mb_s"):
    """Bars per device (median over repeats) for each workload, a colour per device; a log axis only when the
    values span more than 30x."""
    ax = axes(ax, figsize=(8, 4))
    g = df.groupby(["mode", "pattern", "bs", "device", "kind"], sort=False)[metric].median().reset_index()
    g["workload"] = g["mode"] + " " + g["pattern"] + "\n" + (g["bs"] // 1024).astype(str) + " KiB"
    kind = dict(zip(g["device"], g["kind"], strict=False))
    table = g.pivot(index="workload", columns="device", values=metric).reindex(
        index=list(dict.fromkeys(g["workload"])), columns=list(dict.fromkeys(g["device"])))
    colors = device_colors(list(table.columns), kind)      # one colour per device: warm emulated, cool virtio
    grouped_bars(ax, table, colors=colors, labels=lambda d: f"{d} ({kind[d]})")
    label = {"throughput_mb_s": "throughput (MB/s)", "interventions_per_mb": "interventions per MB (count/MB)",
             "lat_us_median": "median latency per operation (µs)"}.get(metric, metric)
    style(ax, title=f"Disks: {label}", xlabel="workload (mode, pattern, block size)", ylabel=label,
          log="y" if is_wide(g[metric]) else None, source=where_label(df))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # beside, not over the bars
    return ax
