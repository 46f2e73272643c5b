"""16550 UART vs virtio-console: bytes/s written by the guest, interventions per byte.

One VM per device. The UART under test is a second COM port (``/dev/ttyS1``,
``-serial null``); the virtio console has its own virtio-serial controller
(``/dev/hvc0``, null back end). In the guest ``vmbench write`` writes the bytes
(tty in raw mode, ``tcdrain`` inside the timed region). As in the disk
experiment, timed runs have tracing off and one counted run per size has it on.

    df = run(quick=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from .. import devices as dv
from .. import plots
from ..errors import SpecError
from ..measure import Progress, Rows, advance, plan, say
from ..plots import style, where_label
from ..spec import parse_size
from .contrasts import booted, common_row
from .disk import stretch

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage


def command(profile: dv.DeviceProfile, bs: int, total: int) -> str:
    return f"vmbench write --path {profile.guest_path} --bs {bs} --total {total}"


def run(quick: bool = False, progress: Progress = None, *, devices: Optional[Iterable[str]] = None,
        sizes: Optional[Sequence[Any]] = None, bs: Any = 4096, repeats: Optional[int] = None,
        min_seconds: Optional[float] = None, accel: str = "auto", image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Measure every (device, size, repeat); returns a tidy DataFrame (see docs/devices.md)."""
    profs = dv.resolve(devices, "console", quick)
    totals = [parse_size(s, "sizes", default_unit="K") if isinstance(s, str) else int(s)
              for s in (sizes or ([64 << 10] if quick else [64 << 10, 256 << 10]))]
    bs_b = parse_size(bs, "bs", default_unit="K") if isinstance(bs, str) else int(bs)
    if bs_b <= 0 or any(t < bs_b for t in totals):
        raise SpecError("sizes", f"every size must be >= bs ({bs_b})", fix="e.g. sizes=[65536], bs=4096")
    repeats = int(repeats or (1 if quick else 5))
    min_s = float(min_seconds if min_seconds is not None else (0.0 if quick else 0.3))
    if repeats < 1:
        raise SpecError("repeats", f"{repeats} is not a positive number", fix="e.g. repeats=5")
    rows = Rows("console")
    plan(progress, len(profs) * (1 + len(totals)))  # a boot and each size, per device
    with rows.guard():
        for prof in profs:
            with booted(prof, rows, progress, accel=accel, image=image) as vm:
                probe = dv.Probe(vm, prof)
                probe.calibrate(command(prof, 1024, 16 << 10))
                for total in totals:
                    counted = probe.measure(command(prof, bs_b, total), count=True)
                    run_total = stretch(probe, lambda n, prof=prof: command(prof, bs_b, n), total, bs_b, min_s,
                                        limit=16 << 20)
                    for r in range(repeats):
                        m = probe.measure(command(prof, bs_b, run_total), count=False)
                        res = m.result
                        n = int(res["bytes"])
                        rows.add(**{
                            **common_row(prof, m, bytes_moved=n, counted_bytes=int(counted.result["bytes"]),
                                            counted=counted),
                            "repeat": r, "bs": bs_b, "size_bytes": n, "requested_bytes": total,
                            "path": prof.guest_path,
                            "seconds": float(res["seconds"]),
                            "throughput_mb_s": float(res["throughput_mb_s"]),
                            "bytes_per_s": n / float(res["seconds"]) if res["seconds"] else None,
                            "lat_us_median": None,
                            "interventions_per_byte": counted.interventions / int(counted.result["bytes"]),
                            "counted_seconds": float(counted.result["seconds"]),
                        })
                    say(progress, f"console: {prof.name} {total} bytes: "
                                  f"{rows.rows[-1]['throughput_mb_s']:.2f} MB/s, "
                                  f"{counted.interventions} interventions")
                    advance(progress)
    return rows.frame()


def plot(df, axes=None):
    """Throughput and interventions per byte, one bar (and colour) per device, medians over repeats; a log axis
    only where the devices differ by more than 30x."""
    axes = plots.axes(axes, figsize=(9, 3.5), ncols=2)
    g = df.groupby(["device", "kind"], sort=False)[["throughput_mb_s", "interventions_per_byte"]].median()
    g = g.reset_index()
    colors = plots.device_colors(list(g["device"]), dict(zip(g["device"], g["kind"], strict=False)))
    for ax, metric, title, label in (
            (axes[0], "throughput_mb_s", "Console write throughput", "throughput (MB/s)"),
            (axes[1], "interventions_per_byte", "Interventions per byte written", "interventions per byte (count/byte)")):
        bars = ax.bar(g["device"], g[metric], color=[colors[d] for d in g["device"]], edgecolor=plots.EDGE,
                      linewidth=0.5)
        ax.bar_label(bars, labels=[plots.number(v) for v in g[metric]], fontsize=8, padding=2)
        wide = plots.is_wide(g[metric])
        ax.set_ylim(top=float(g[metric].max()) * (4 if wide else 1.2))
        style(ax, title=title, xlabel="device", ylabel=label, log="y" if wide else None,
              source=where_label(df) if metric == "throughput_mb_s" else "")
    return axes
