"""Emulated NICs (rtl8139, e1000) vs virtio-net: throughput, packets/s, latency, interventions.

Back end: ``NIC(backend="socket")``, whose host end is a socket carrying raw
Ethernet frames, served by :class:`vmlab.netsink.NetSink` in a host thread. QEMU's
user-mode network (slirp) is *not* used: it caps every NIC near 2 MB/s here, so
it would measure slirp, not the NIC.

The guest is 10.0.0.2; the made-up host peer is 10.0.0.1 (static neighbour
entry, and the sink answers ARP too). Three workloads:

* ``guest->host``: ``vmbench udp-send`` to the sink; throughput and packets/s are
  measured on the host where the frames land (first to last arrival);
  ``lost`` = sent - arrived (the guest's qdisc drops silently).
* ``host->guest``: the sink injects UDP frames as fast as QEMU takes them,
  ``vmbench udp-recv`` measures in the guest (first to last datagram).
* ``rr``: ``vmbench udp-rr`` 64-byte request/response; ``lat_us_median`` is the
  round-trip time, ``pps`` transactions per second.

Timed runs have tracing off; one counted run per workload has it on.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence

from .. import devices as dv
from .. import plots
from ..errors import ExperimentError, SpecError, VMError
from ..guestinfo import nic_socket
from ..measure import Progress, Rows, advance, plan, say
from ..netsink import HOST_IP, NetSink, guest_setup
from ..plots import grouped_bars, style, where_label
from .contrasts import booted, common_row

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

SINK_PORT, RX_PORT, RR_PORT = 9000, 9001, 9002
DIRECTIONS = ("guest->host", "host->guest", "rr")


def _wait_quiet(sink: NetSink, expect: int, quiet: float = 0.3, limit: float = 10.0) -> None:
    """Wait until the sink has ``expect`` datagrams or nothing arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = sink.counts.udp_frames
        if n >= expect:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.02)


def _tx(vm, probe, sink, size: int, count: int, counted: bool) -> Dict[str, Any]:
    sink.reset()
    m = probe.measure(f"vmbench udp-send --dst {HOST_IP} --port {SINK_PORT} --size {size} --count {count}",
                      count=counted)
    _wait_quiet(sink, count)
    c = sink.reset()
    secs = c.seconds
    return {"m": m, "bytes": c.udp_bytes, "packets": c.udp_frames, "lost": count - c.udp_frames,
            "seconds": secs, "throughput_mb_s": c.udp_bytes / 1e6 / secs if secs > 0 else None,
            "pps": c.udp_frames / secs if secs > 0 else None, "lat_us_median": None,
            "guest_side_mb_s": m.result.get("throughput_mb_s")}


def _rx(vm, probe, sink, size: int, count: int, counted: bool) -> Dict[str, Any]:
    vm.run("rm -f /tmp/rx.ready")
    box: Dict[str, Any] = {}

    def guest() -> None:
        try:
            box["m"] = probe.measure(f"vmbench udp-recv --port {RX_PORT} --count {count} --timeout-ms 1500 "
                                     f"2>/tmp/rx.ready", count=counted)
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    t = threading.Thread(target=guest, name="vmlab-net-rx")
    t.start()
    deadline = time.monotonic() + 60
    while "READY" not in vm.run("cat /tmp/rx.ready 2>/dev/null; true").stdout:
        if not t.is_alive() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if t.is_alive():
        sink.inject(count, size, RX_PORT)
    t.join(120)
    if "error" in box:
        raise box["error"]
    if "m" not in box:
        raise VMError("the guest receiver did not finish", fix="see vm.console_text()")
    m = box["m"]
    r = m.result
    return {"m": m, "bytes": int(r["bytes"]), "packets": int(r["received"]), "lost": int(r["lost"]),
            "seconds": float(r["seconds"]), "throughput_mb_s": float(r["throughput_mb_s"]) or None,
            "pps": float(r["pps"]) or None, "lat_us_median": None, "guest_side_mb_s": float(r["throughput_mb_s"])}


def _rr(vm, probe, sink, size: int, count: int, counted: bool) -> Dict[str, Any]:
    m = probe.measure(f"vmbench udp-rr --dst {HOST_IP} --port {RR_PORT} --size {size} --count {count} "
                      f"--timeout-ms 1000", count=counted)
    r = m.result
    replies, secs = int(r["replies"]), float(r["seconds"])
    moved = 2 * size * replies
    return {"m": m, "bytes": moved, "packets": 2 * replies, "lost": count - replies, "seconds": secs,
            "throughput_mb_s": moved / 1e6 / secs if secs > 0 else None,
            "pps": replies / secs if secs > 0 else None, "lat_us_median": r.get("rtt_us_median"),
            "guest_side_mb_s": None}


WORKLOADS = {"guest->host": _tx, "host->guest": _rx, "rr": _rr}


def run(quick: bool = False, progress: Progress = None, *, devices: Optional[Iterable[str]] = None,
        directions: Optional[Sequence[str]] = None, sizes: Optional[Sequence[int]] = None,
        count: Optional[int] = None, rr_count: Optional[int] = None, repeats: Optional[int] = None,
        accel: str = "auto", image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Measure every (device, direction, size, repeat); returns a tidy DataFrame."""
    profs = dv.resolve(devices, "net", quick)
    directions = tuple(directions or DIRECTIONS)
    for d in directions:
        if d not in WORKLOADS:
            raise SpecError("directions", f"unknown direction {d!r}", fix=f"one of: {', '.join(DIRECTIONS)}")
    sizes = [int(s) for s in (sizes or ([1472] if quick else [64, 1472]))]
    for s in sizes:
        if not 8 <= s <= 1472:
            raise SpecError("sizes", f"{s} bytes does not fit one Ethernet frame with its sequence number",
                            fix="UDP payload sizes from 8 to 1472 bytes")
    count = int(count or (2000 if quick else 5000))
    rr_count = int(rr_count or (200 if quick else 1000))
    repeats = int(repeats or (1 if quick else 5))
    if count < 1 or rr_count < 1 or repeats < 1:
        raise SpecError("count", "count, rr_count and repeats must be positive", fix="e.g. count=2000")
    rows = Rows("net")
    plan(progress, len(profs) * (1 + sum(1 if d == "rr" else len(sizes) for d in directions)))
    with rows.guard():
        for prof in profs:
            with booted(prof, rows, progress, accel=accel, image=image) as vm:
                mac = vm.spec.nics[0].mac or "52:54:00:12:34:56"
                vm.run(guest_setup(prof.guest_path))
                with NetSink(nic_socket(vm, 0), guest_mac=mac, sink_port=SINK_PORT, rr_port=RR_PORT) as sink:
                    probe = dv.Probe(vm, prof)
                    probe.calibrate(f"vmbench udp-send --dst {HOST_IP} --port {SINK_PORT} --size 512 --count 200")
                    _wait_quiet(sink, 200)
                    sink.reset()
                    for d in directions:
                        for size in (sizes if d != "rr" else [64]):
                            n = rr_count if d == "rr" else count
                            fn = WORKLOADS[d]
                            counted = fn(vm, probe, sink, size, n, True)
                            cm = counted["m"]
                            for r in range(repeats):
                                res = fn(vm, probe, sink, size, n, False)
                                m = res.pop("m")
                                rows.add(**{
                                    **common_row(prof, m, bytes_moved=res["bytes"],
                                                    counted_bytes=counted["bytes"], counted=cm),
                                    "repeat": r, "direction": d, "size_bytes": size, "count": n,
                                    **res,
                                    "interventions_per_packet": (cm.interventions / counted["packets"]
                                                                 if counted["packets"] else None),
                                })
                            if sink.error:
                                raise ExperimentError(f"the host network peer failed: {sink.error!r}")
                            last = rows.rows[-1]
                            say(progress, f"net: {prof.name} {d} {size} B: "
                                          f"{(last['throughput_mb_s'] or 0):.2f} MB/s, "
                                          f"{(last['pps'] or 0):.0f} pkt/s, {cm.interventions} interventions")
                            advance(progress)
    df = rows.frame()
    return df


def plot(df, axes=None):
    """Throughput per direction and interventions per MB, one bar (and colour) per device, medians; a log axis
    only where the values span more than 30x."""
    axes = plots.axes(axes, figsize=(11.5, 3.8), ncols=2)
    g = df[df.direction != "rr"].groupby(["direction", "size_bytes", "device", "kind"], sort=False)[
        ["throughput_mb_s", "interventions_per_mb"]].median().reset_index()
    g["workload"] = g["direction"].map({"guest->host": "to the host", "host->guest": "to the guest"}).fillna(
        g["direction"]) + "\n" + g["size_bytes"].astype(str) + " B"
    kind = dict(zip(g["device"], g["kind"], strict=False))
    wls, devs = list(dict.fromkeys(g["workload"])), list(dict.fromkeys(g["device"]))
    for ax, metric, label in ((axes[0], "throughput_mb_s", "throughput (MB/s)"),
                              (axes[1], "interventions_per_mb", "interventions per MB (count/MB)")):
        table = g.pivot(index="workload", columns="device", values=metric).reindex(index=wls, columns=devs)
        grouped_bars(ax, table, colors=plots.device_colors(devs, kind), labels=lambda d: f"{d} ({kind[d]})")
        style(ax, title=f"NICs: {label}", xlabel="direction, UDP payload size", ylabel=label,
              log="y" if plots.is_wide(g[metric]) else None,
              source=where_label(df) if metric == "throughput_mb_s" else "")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # beside the bars
    return axes
