"""The virtual platform around the CPU: clocks, the memory balloon, and what a
guest can tell about being virtualized.

Clocks::

    with VM(accel="tcg", trace=CLOCK_TRACE) as vm:   # trace lets us count timer-register reads
        quiet_trace(vm)                              # tracing off except while counting
        df = clock_costs(vm)                         # one row per clocksource: ns/read, traps/read

Reading the time from the TSC is one instruction the guest runs itself. Reading
it from the HPET (an MMIO register) or the ACPI PM timer (an I/O port) is a
device access the hypervisor must emulate: QEMU's ``memory_region_ops_read``
trace event fires once for each, naming the device region ("hpet", "acpi-tmr"),
so the emulated accesses can be counted under TCG and KVM alike (QEMU 7.2 has
no HPET- or PM-timer-specific trace events).

Balloon::

    with VM(accel="tcg", memory=256, balloon=True) as vm:
        set_balloon(vm, 128)                         # guest memory target in MiB
        sample(vm)                                   # guest's and host's view, now

Awareness::

    guest_awareness(vm); host_awareness()            # CPUID bit, vendor leaf, dmesg lines
    awareness_experiment()                           # default vs hidden (-hypervisor) guests
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import SpecError
from .measure import Rows, say

Progress = Optional[Callable[[str], None]]

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
def clocksources(vm: Any) -> Tuple[str, List[str]]:
    """(current, available) clocksources as the guest kernel lists them."""
    out = vm.run(f"cat {CS_DIR}/current_clocksource {CS_DIR}/available_clocksource").stdout.splitlines()
    return out[0].strip(), out[1].split() if len(out) > 1 else []


def wait_clocksource(vm: Any, name: str = "tsc", timeout: float = 5.0) -> bool:
    """Wait until ``name`` is listed (``tsc`` replaces ``tsc-early`` about 2 s after boot)."""
    deadline = time.monotonic() + timeout
    while True:
        _, avail = clocksources(vm)
        if name in avail:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def set_clocksource(vm: Any, name: str) -> bool:
    """Switch the guest's clocksource; True if the kernel now uses it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise SpecError("clocksource", f"{name!r} is not a clocksource name", fix="e.g. tsc, hpet, acpi_pm")
    vm.run(f"echo {name} > {CS_DIR}/current_clocksource", check=False)
    return clocksources(vm)[0] == name


def quiet_trace(vm: Any, on: bool = False) -> None:
    """Switch the clock trace event (the VM's ``trace=CLOCK_TRACE``) on or off at run time."""
    vm.set_tracing(on)


def count_device_reads(vm: Any, command: str, timeout: float = 120) -> Tuple[Dict[str, int], Any]:
    """Run ``command`` in the guest with the read trace on; count reads by device region."""
    if not vm.spec.trace:
        raise SpecError("trace", "counting device reads needs the VM started with trace=CLOCK_TRACE",
                        fix="VM(..., trace=vmlab.platform.CLOCK_TRACE)")
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


def _cpu_bench(vm: Any, bench: str, repeats: int, scale: float) -> Dict[str, Any]:
    r = vm.run(f"vmbench cpu --bench {bench} --repeats {repeats} --scale {scale!r}", timeout=300)
    return json.loads(r.stdout)["results"][0]


def clock_costs(vm: Any, sources: Sequence[str] = CLOCKSOURCES, repeats: int = 5, scale: float = 0.005,
                count: bool = True, rows: Optional[Rows] = None, progress: Progress = None) -> Any:
    """Cost of clock_gettime() under each clocksource, and the device reads each call causes.

    A clocksource the guest does not offer gets a row with ``available=False`` and
    the reason. The guest's clocksource is restored afterwards.
    """
    from .hostinfo import where
    own = rows is None
    rows = rows or Rows("clocks")
    w = where(vm.accel, vm.kernel_release)
    if "tsc" in sources:
        wait_clocksource(vm, "tsc", timeout=5)
    original, avail = clocksources(vm)
    if "tsc" in sources and "tsc" not in avail and "tsc-early" in avail and "tsc-early" not in sources:
        sources = tuple(sources) + ("tsc-early",)        # the TSC is still there, under its early name
    can_count = count and bool(vm.spec.trace) and "memory_region_ops_read" in vm.spec.trace
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
                continue
            if not set_clocksource(vm, cs):
                rows.add(**row, note="the kernel refused to switch to it")
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
    finally:
        set_clocksource(vm, original)
    return rows.frame() if own else None


def clock_experiment(quick: bool = False, progress: Progress = None, *, accel: str = "tcg",
                     image: Any = None, repeats: Optional[int] = None) -> Any:
    """Boot a guest with the read trace, measure every clocksource it offers."""
    from .machine import VM
    repeats = repeats or (3 if quick else 7)
    scale = 0.003 if quick else 0.01
    rows = Rows("clocks")
    with rows.guard():
        with VM(accel=accel, name=f"clocks-{accel}", trace=CLOCK_TRACE, image=image) as vm:
            quiet_trace(vm, False)
            clock_costs(vm, repeats=repeats, scale=scale, rows=rows, progress=progress)
    return rows.frame()


# ================================================================ balloon
def meminfo(vm: Any) -> Dict[str, int]:
    """The guest's /proc/meminfo, in bytes."""
    text = vm.read_file("/proc/meminfo").decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if "kB" in line else 1)
    return out


def balloon_actual(vm: Any) -> int:
    """QEMU's view: the guest's memory size after ballooning (``query-balloon``), bytes."""
    return int(vm.qmp("query-balloon")["actual"])


def sample(vm: Any, t0: Optional[float] = None, **extra: Any) -> Dict[str, Any]:
    """One observation of both views: the guest's (/proc/meminfo) and the host's (balloon, QEMU RSS)."""
    mi = meminfo(vm)
    mib = 1 << 20
    row = {"t": time.monotonic() - (t0 if t0 is not None else 0.0),
           "balloon_actual_mb": balloon_actual(vm) / mib if vm.spec.balloon else math.nan,
           "guest_total_mb": mi.get("MemTotal", 0) / mib, "guest_free_mb": mi.get("MemFree", 0) / mib,
           "guest_available_mb": mi.get("MemAvailable", 0) / mib,
           "qemu_rss_mb": vm.qemu_rss_bytes() / mib}
    row.update(extra)
    return row


def _check_target(vm: Any, target_mb: float) -> int:
    if not vm.spec.balloon:
        raise SpecError("balloon", "this VM has no balloon device", fix="start it with balloon=True")
    if isinstance(target_mb, bool) or not isinstance(target_mb, (int, float)) or not math.isfinite(target_mb):
        raise SpecError("target_mb", f"{target_mb!r} is not a number of MiB", fix="e.g. 128")
    if not 64 <= target_mb <= vm.spec.memory_mb:
        raise SpecError("target_mb", f"{target_mb} MiB is outside 64..{vm.spec.memory_mb} MiB",
                        fix=f"the balloon can shrink the guest from {vm.spec.memory_mb} MiB, not grow it; "
                            "below 64 MiB the lesson guest runs out of memory")
    return int(target_mb) << 20


def set_balloon(vm: Any, target_mb: float, wait: bool = True, timeout: float = 20.0,
                on_sample: Optional[Callable[[Dict[str, Any]], None]] = None, t0: Optional[float] = None,
                every: float = 0.25) -> int:
    """Ask the balloon driver for a guest memory size of ``target_mb`` MiB (QMP ``balloon``).

    With ``wait`` polls ``query-balloon`` until it reaches the target, or stops
    moving for 3 s (the guest may refuse to give up memory it uses). Returns
    the final ``actual`` in bytes; ``on_sample`` gets a :func:`sample` each poll.
    """
    target = _check_target(vm, target_mb)
    vm.qmp("balloon", value=target)
    if not wait:
        return balloon_actual(vm)
    deadline = time.monotonic() + timeout
    last, last_change = balloon_actual(vm), time.monotonic()
    while True:
        if on_sample:
            on_sample(sample(vm, t0, target_mb=target_mb))
        actual = balloon_actual(vm)
        if abs(actual - target) < (2 << 20):
            return actual
        now = time.monotonic()
        if actual != last:
            last, last_change = actual, now
        elif now - last_change > 3.0 or now > deadline:
            return actual
        time.sleep(every)


def touch(vm: Any, mb: int) -> Dict[str, Any]:
    """Make the guest write ``mb`` MiB (then free it): QEMU must back those pages with host RAM."""
    return json.loads(vm.run(f"vmbench touch --mb {int(mb)}", timeout=120).stdout)


def balloon_experiment(quick: bool = False, progress: Progress = None, *, memory: int = 256,
                       low_mb: Optional[int] = None, touch_mb: Optional[int] = None,
                       image: Any = None) -> Any:
    """Inflate and deflate a virtio-balloon, watching the guest's and the host's view.

    Phases: booted; the guest touches ``touch_mb`` MiB (host RSS grows); inflate to
    ``low_mb`` (guest MemTotal drops; RSS drops because QEMU discards the pages the
    guest hands over); deflate (MemTotal comes back, RSS does not until the guest
    touches the memory again); touch again. One row per sample.
    """
    from .hostinfo import where
    from .machine import VM
    low_mb = low_mb or memory // 2
    touch_mb = touch_mb or int(memory * 0.55)
    rows = Rows("balloon")
    with rows.guard():
        with VM(accel="tcg", name="balloon", memory=memory, balloon=True, image=image) as vm:
            w = where(vm.accel, vm.kernel_release)
            t0 = time.monotonic()

            def rec(phase: str) -> Callable[[Dict[str, Any]], None]:
                def add(s: Dict[str, Any]) -> None:
                    rows.add(**w, phase=phase, memory_mb=memory, **s)
                return add

            rec("booted")(sample(vm, t0, target_mb=memory))
            say(progress, f"guest touches {touch_mb} MiB, then frees it")
            touch(vm, touch_mb)
            rec(f"touched {touch_mb} MiB")(sample(vm, t0, target_mb=memory))
            say(progress, f"inflating the balloon: guest memory {memory} -> {low_mb} MiB")
            set_balloon(vm, low_mb, on_sample=rec(f"inflate to {low_mb} MiB"), t0=t0)
            time.sleep(0.5)
            rec(f"inflated to {low_mb} MiB")(sample(vm, t0, target_mb=low_mb))
            say(progress, f"deflating: guest memory back to {memory} MiB")
            set_balloon(vm, memory, on_sample=rec(f"deflate to {memory} MiB"), t0=t0)
            time.sleep(0.5)
            rec(f"deflated to {memory} MiB")(sample(vm, t0, target_mb=memory))
            if not quick:
                touch(vm, touch_mb)
                rec(f"touched {touch_mb} MiB again")(sample(vm, t0, target_mb=memory))
    return rows.frame()


def balloon_summary(df: Any) -> Any:
    """The last sample of each phase (a readable table of the experiment)."""
    cols = ["phase", "t", "target_mb", "balloon_actual_mb", "guest_total_mb", "guest_available_mb", "qemu_rss_mb"]
    return df.groupby("phase", sort=False).tail(1)[[c for c in cols if c in df]].reset_index(drop=True)


def plot_balloon(df: Any, ax: Any = None) -> Any:
    """Guest MemTotal / MemAvailable, the balloon target and QEMU's RSS over time."""
    import matplotlib.pyplot as plt
    from .plots import OKABE_ITO, style, where_label
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    ax.plot(df.t, df.guest_total_mb, color=OKABE_ITO[4], marker="o", ms=3, label="guest MemTotal")
    ax.plot(df.t, df.guest_available_mb, color=OKABE_ITO[1], ls="--", marker="o", ms=3, label="guest MemAvailable")
    if "target_mb" in df:
        ax.step(df.t, df.target_mb, where="post", color="#555555", lw=1, ls=":", label="balloon target")
    ax.plot(df.t, df.qemu_rss_mb, color=OKABE_ITO[5], marker="s", ms=3, label="host: QEMU RSS")
    ax.legend(fontsize=8, loc="best")
    style(ax, title="Memory balloon: the guest's view and the host's", xlabel="time (s)",
          ylabel="memory (MiB)", source=where_label(df))
    return ax


def plot_clocks(df: Any, ax: Any = None) -> Any:
    """ns per clock_gettime for each clocksource (log scale), with emulated reads per call noted."""
    import matplotlib.pyplot as plt
    import numpy as np
    from .plots import OKABE_ITO, style, where_label
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.8))
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
    if len(d):
        ax.set_ylim(top=float(np.nanmax(d.ns_max.to_numpy(dtype=float))) * 3)
    missing = df[~df.available].clocksource.tolist()
    title = "Cost of reading the time, by clocksource"
    style(ax, title=title, ylabel="ns per clock_gettime (log)", log="y",
          source=where_label(df) + (f"; not offered: {', '.join(missing)}" if missing else ""))
    return ax


# ================================================================ awareness
AWARE_PATTERNS = (r"Booting paravirtualized kernel on .*", r"Hypervisor detected: .*",
                  r"clocksource: Switched to clocksource .*", r"kvm-clock: .*")


def _dmesg_lines(text: str) -> List[str]:
    out = []
    for line in text.splitlines():
        body = re.sub(r"^\[\s*[\d.]+\]\s*", "", line)
        if any(re.search(p, body) for p in AWARE_PATTERNS):
            out.append(body.strip())
    return out


def _summarise(info: Dict[str, Any], dmesg: Optional[str], cpu_flags: str, dmi: Dict[str, str]) -> Dict[str, Any]:
    lines = _dmesg_lines(dmesg) if dmesg is not None else []
    boot = next((l for l in lines if l.startswith("Booting paravirtualized")), None)
    det = next((l for l in lines if l.startswith("Hypervisor detected")), None)
    return {"hypervisor_bit": info.get("hypervisor_bit"), "hypervisor_vendor": info.get("hypervisor_vendor"),
            "cpu_vendor": info.get("cpu_vendor"), "cpu_brand": info.get("cpu_brand"),
            "cpuinfo_hypervisor_flag": " hypervisor" in f" {cpu_flags} ",
            "kernel_says": boot if dmesg is not None else "dmesg not readable",
            "hypervisor_detected": det or ("" if dmesg is not None else "dmesg not readable"),
            "clocksource": info.get("clocksource_current"),
            "clocksources": " ".join(info.get("clocksources_available") or []),
            "dmi_vendor": dmi.get("sys_vendor", ""), "dmi_product": dmi.get("product_name", ""),
            "dmesg_lines": "\n".join(lines)}


def guest_awareness(vm: Any) -> Dict[str, Any]:
    """What the guest can see of its platform: CPUID hypervisor bit and vendor leaf, dmesg, DMI."""
    info = json.loads(vm.run("vmbench sysinfo").stdout)
    dmesg = vm.run("dmesg", check=False)
    flags = vm.run("grep -m1 '^flags' /proc/cpuinfo", check=False).stdout
    dmi = {}
    for k in ("sys_vendor", "product_name"):
        r = vm.run(f"cat /sys/class/dmi/id/{k}", check=False)
        if r.status == 0:
            dmi[k] = r.stdout.strip()
    return _summarise(info, dmesg.stdout if dmesg.status == 0 else None, flags, dmi)


def host_awareness() -> Dict[str, Any]:
    """The same questions asked on this host (itself a KVM guest on the project's machines)."""
    from .experiments.cpu import native_vmbench
    info = json.loads(subprocess.run([str(native_vmbench()), "sysinfo"], capture_output=True, text=True,
                                     timeout=30).stdout)
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
        dmesg = p.stdout if p.returncode == 0 and p.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        dmesg = None
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        pass
    dmi = {}
    for k in ("sys_vendor", "product_name"):
        try:
            with open(f"/sys/class/dmi/id/{k}") as f:
                dmi[k] = f.read().strip()
        except OSError:
            pass
    return _summarise(info, dmesg, flags, dmi)


def awareness_experiment(quick: bool = False, progress: Progress = None, *, image: Any = None,
                         kvm: Optional[bool] = None) -> Any:
    """Host, default TCG guest, TCG guest with the hypervisor bit hidden (and the KVM pair where
    KVM is proven). ``df.attrs["kvm"]`` says why KVM rows are missing."""
    from .experiments.cpu import kvm_status
    from .hostinfo import where
    from .machine import VM
    rows = Rows("awareness")
    configs = [("tcg", None, "TCG, default CPU model"),
               ("tcg", "qemu64,-hypervisor", "TCG, hypervisor bit hidden (-cpu qemu64,-hypervisor)")]
    verdict = kvm_status(progress, probe=kvm is not False)
    notes = []
    if kvm is not False and verdict.get("usable"):
        configs += [("kvm", None, "KVM, default CPU model"),
                    ("kvm", "qemu64,kvm=off,-hypervisor", "KVM, hidden (kvm=off,-hypervisor)")]
    else:
        notes.append(f"no KVM rows: KVM is not available on this host ({verdict.get('reason')})")
        say(progress, notes[-1])
    with rows.guard():
        rows.add(**where("none"), system="this host (native)", cpu_model="", **host_awareness())
        for accel, model, label in configs:
            say(progress, f"booting: {label}")
            with VM(accel=accel, name="aware", cpu_model=model, image=image) as vm:
                rows.add(**where(vm.accel, vm.kernel_release), system=label, cpu_model=model or "",
                         **guest_awareness(vm))
    df = rows.frame()
    df.attrs["kvm"] = verdict
    df.attrs["notes"] = notes
    return df
