"""Clocks: what reading the time costs the guest under each clocksource.

    from vmlab.experiments import clocks
    df = clocks.run(quick=True)                      # one row per clocksource: ns/read, traps/read
    clocks.plot(df)

or, in a VM of your own::

    with VM(accel="tcg", trace=clocks.CLOCK_TRACE) as vm:   # trace lets us count timer-register reads
        clocks.quiet_trace(vm)                              # tracing off except while counting
        df = clocks.clock_costs(vm)

Reading the time from the TSC is one instruction the guest runs itself. Reading
it from the HPET (an MMIO register) or the ACPI PM timer (an I/O port) is a
device access the hypervisor must emulate: QEMU's ``memory_region_ops_read``
trace event fires once for each, naming the device region ("hpet", "acpi-tmr"),
so the emulated accesses can be counted under TCG and KVM alike (QEMU 7.2 has
no HPET- or PM-timer-specific trace events).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..errors import SpecError
from ..guestinfo import where_vm
from ..measure import Progress, Rows, advance, plan, say
from ..plots import OKABE_ITO, axes, is_wide, style, where_label
from ..vm import VM

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

CS_DIR = "/sys/devices/system/clocksource/clocksource0"
CLOCK_TRACE = ("memory_region_ops_read",)
CLOCKSOURCES = ("tsc", "kvm-clock", "hpet", "acpi_pm")
# The QEMU memory-region name each clocksource reads (None: no device access)
CLOCK_REGION = {"tsc": None, "tsc-early": None, "kvm-clock": None, "hpet": "hpet", "acpi_pm": "acpi-tmr"}
CLOCK_HOW = {
    "tsc": "rdtsc in the vDSO: an instruction the guest executes itself",
    "tsc-early": "rdtsc, before the kernel refined its TSC calibration",
    "kvm-clock": "rdtsc scaled by a page the hypervisor shares (paravirtual clock)",
    "hpet": "a 32-bit MMIO register of the emulated HPET",
    "acpi_pm": "the ACPI PM timer, an emulated 24-bit I/O port",
}
_TRACE_LINE = re.compile(rb"memory_region_ops_read .*?name '([^']*)'")


# ============================================================== clocksources
def clocksources(vm: VM) -> Tuple[str, List[str]]:
    """(current, available) clocksources as the guest kernel lists them."""
    out = vm.run(f"cat {CS_DIR}/current_clocksource {CS_DIR}/available_clocksource").stdout.splitlines()
    return out[0].strip(), out[1].split() if len(out) > 1 else []


def wait_clocksource(vm: VM, name: str = "tsc", timeout: float = 5.0) -> bool:
    """Wait until ``name`` is listed (``tsc`` replaces ``tsc-early`` about 2 s after boot)."""
    deadline = time.monotonic() + timeout
    while True:
        _, avail = clocksources(vm)
        if name in avail:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def set_clocksource(vm: VM, name: str) -> bool:
    """Switch the guest's clocksource; True if the kernel now uses it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise SpecError("clocksource", f"{name!r} is not a clocksource name", fix="e.g. tsc, hpet, acpi_pm")
    vm.run(f"echo {name} > {CS_DIR}/current_clocksource", check=False)
    return clocksources(vm)[0] == name


def quiet_trace(vm: VM, on: bool = False) -> None:
    """Switch the clock trace event (the VM's ``trace=CLOCK_TRACE``) on or off at run time."""
    vm.set_tracing(on)


def count_device_reads(vm: VM, command: str, timeout: float = 120) -> Tuple[Dict[str, int], Any]:
    """Run ``command`` in the guest with the read trace on; count reads by device region.

    Returns the counts and the command's result (``RunResult``).
    """
    if not vm.spec.trace:
        raise SpecError("trace", "counting device reads needs the VM started with trace=CLOCK_TRACE",
                        fix="VM(..., trace=vmlab.experiments.clocks.CLOCK_TRACE)")
    off = vm.trace_mark()
    quiet_trace(vm, True)
    try:
        res = vm.run(command, timeout=timeout)
    finally:
        quiet_trace(vm, False)
    time.sleep(0.05)
    counts: Dict[str, int] = {}
    for m in _TRACE_LINE.finditer(vm.trace_since(off)):
        n = m.group(1).decode(errors="replace")
        counts[n] = counts.get(n, 0) + 1
    return counts, res


def _cpu_bench(vm: VM, bench: str, repeats: int, scale: float) -> Dict[str, Any]:
    r = vm.run(f"vmbench cpu --bench {bench} --repeats {repeats} --scale {scale!r}", timeout=300)
    result: Dict[str, Any] = json.loads(r.stdout)["results"][0]
    return result


def clock_costs(vm: VM, sources: Sequence[str] = CLOCKSOURCES, repeats: int = 5, scale: float = 0.005,
                count: bool = True, rows: Optional[Rows] = None,
                progress: Progress = None) -> Optional[pd.DataFrame]:
    """Cost of clock_gettime() under each clocksource, and the device reads each call causes.

    A clocksource the guest does not offer gets a row with ``available=False`` and
    the reason. The guest's clocksource is restored afterwards. Returns the rows
    as a DataFrame, or None when they went into the caller's ``rows``.
    """
    own = rows is None
    rows = rows or Rows("clocks")
    w = where_vm(vm)
    if "tsc" in sources:
        wait_clocksource(vm, "tsc", timeout=5)
    original, avail = clocksources(vm)
    if "tsc" in sources and "tsc" not in avail and "tsc-early" in avail and "tsc-early" not in sources:
        sources = (*tuple(sources), "tsc-early")        # the TSC is still there, under its early name
    can_count = count and bool(vm.spec.trace) and "memory_region_ops_read" in vm.spec.trace
    plan(progress, len(sources) + (0 if own else 1))    # run(): its boot was the first step
    try:
        for cs in sources:
            row: Dict[str, Any] = dict(w, clocksource=cs, available=cs in avail, how=CLOCK_HOW.get(cs, ""),
                                       offered=" ".join(avail))
            if cs not in avail:
                why = "not offered by the guest kernel"
                if cs == "kvm-clock" and vm.accel != "kvm":
                    why += " (kvm-clock needs KVM's paravirtual clock; under TCG there is none)"
                elif cs == "tsc":
                    why += " (the kernel marked the TSC unstable, or has not finished calibrating it)"
                rows.add(**row, note=why)
                say(progress, f"{cs}: {why}")
                advance(progress)
                continue
            if not set_clocksource(vm, cs):
                rows.add(**row, note="the kernel refused to switch to it")
                advance(progress)
                continue
            r = _cpu_bench(vm, "clock_gettime", repeats, scale)
            row.update(ns_per_read=r["ns_per_op"], ns_min=r["ns_min"], ns_max=r["ns_max"], ns_cv=r["ns_cv"],
                       cycles_per_read=r.get("cycles_per_op"), repeats=r["repeats"], note="")
            if can_count:
                cscale = 0.0005                    # 1000 reads + the 100-read warm-up
                counts, res = count_device_reads(
                    vm, f"vmbench cpu --bench clock_gettime --repeats 1 --scale {cscale}")
                it = json.loads(res.stdout)["results"][0]["iterations"]
                calls = it + max(1, it // 10)
                region = CLOCK_REGION.get(cs)
                timer = counts.get(region, 0) if region else sum(counts.get(x, 0) for x in ("hpet", "acpi-tmr"))
                row.update(calls_counted=calls, timer_reads=timer, traps_per_read=timer / calls,
                           device_reads=json.dumps(counts, sort_keys=True))
            say(progress, f"{cs}: {row['ns_per_read']:.0f} ns per clock_gettime"
                + (f", {row['traps_per_read']:.2f} emulated timer reads per call" if can_count else ""))
            rows.add(**row)
            advance(progress)
    finally:
        set_clocksource(vm, original)
    return rows.frame() if own else None


def run(quick: bool = False, progress: Progress = None, *, accel: str = "tcg",
        image: Optional[GuestImage] = None, repeats: Optional[int] = None) -> pd.DataFrame:
    """Boot a guest with the read trace, measure every clocksource it offers."""
    repeats = repeats or (3 if quick else 7)
    scale = 0.003 if quick else 0.01
    rows = Rows("clocks")
    plan(progress, 1 + len(CLOCKSOURCES))      # the boot, then each clocksource
    with rows.guard(), VM(accel=accel, name=f"clocks-{accel}", trace=CLOCK_TRACE, image=image, warm=True) as vm:
        advance(progress)
        quiet_trace(vm, False)
        clock_costs(vm, repeats=repeats, scale=scale, rows=rows, progress=progress)
    return rows.frame()


def plot(df: pd.DataFrame, ax: Any = None) -> Any:
    """ns per clock_gettime for each clocksource (a log axis when they differ by more than 30x), with emulated
    reads per call noted."""
    import numpy as np
    ax = axes(ax, figsize=(7, 3.8))
    d = df[df.available & df.ns_per_read.notna()] if "ns_per_read" in df else df.iloc[0:0]
    x = np.arange(len(d))
    y = d.ns_per_read.to_numpy(dtype=float)
    err = np.vstack([y - d.ns_min.to_numpy(dtype=float), d.ns_max.to_numpy(dtype=float) - y])
    colors = [OKABE_ITO[5] if CLOCK_REGION.get(c) else OKABE_ITO[2] for c in d.clocksource]
    ax.bar(x, y, color=colors, yerr=err, capsize=3)
    for i, (_, r) in enumerate(d.iterrows()):
        if "traps_per_read" in d and not (isinstance(r.traps_per_read, float) and math.isnan(r.traps_per_read)):
            ax.annotate(f"{r.traps_per_read:.2f} emulated\nreads/call", (i, y[i]), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels(d.clocksource)
    wide = is_wide(y)          # a log axis only when the clocksources differ by more than 30x
    if len(d):
        ax.set_ylim(top=float(np.nanmax(d.ns_max.to_numpy(dtype=float))) * (3 if wide else 1.25))
    missing = df[~df.available].clocksource.tolist()
    title = "Cost of reading the time, by clocksource"
    style(ax, title=title, xlabel="clocksource", ylabel="ns per clock_gettime (ns)", log="y" if wide else None,
          source=where_label(df) + (f"; not offered: {', '.join(missing)}" if missing else ""))
    return ax
