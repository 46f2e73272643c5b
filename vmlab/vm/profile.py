"""Where a boot's time goes: ``python -m vmlab boot --profile`` (docs/boot.md).

A cold boot is cut into phases by clocks on both sides:

    host_prep    start() called -> QEMU spawned (image check, private dir, sockets)  host clock
    qemu_start   QEMU spawned -> its QMP monitor answers (loads vmlinux and initrd)  host clock
    firmware_or_lag  QMP up -> the kernel's first instruction (SeaBIOS, PVH option ROM);  host - guest clock
                 on a loaded host it also holds the time the guest clock lost
    kernel       kernel start -> "Run /init" (initcalls, initramfs unpacking)         guest dmesg
    init         /init: mounts, then loading modules, then the rest                  /dev/kmsg marks
    agent        /init execs vmagent -> its HELLO reaches the host                   host - guest clock

The guest's dmesg clock starts with the kernel; the host learns its offset by
writing a mark to ``/dev/kmsg`` in one ``run()`` and taking the middle of that
round trip (the uncertainty, half of it, is reported). One extra boot with
``initcall_debug`` lists the slowest initcalls and each module's init. A warm
restore is cut into qemu_start, load_snapshot (QEMU reads the saved memory)
and agent (the restored agent answers a ping).

Under TCG guest time runs on the host's clock, so on a loaded host every
phase stretches; the profile records the load average beside the figures.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any, Dict, List, Optional

from .sync import VM

__all__ = ["COLD_PHASES", "WARM_PHASES", "boot_profile", "format_profile", "initcall_times"]

COLD_PHASES = ("host_prep", "qemu_start", "firmware_or_lag", "kernel", "init_mounts", "init_modules", "init_rest",
               "agent")
WARM_PHASES = ("host_prep", "qemu_start", "load_snapshot", "agent")
_MARK = "vmlab-profile: mark"
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")


def _dmesg_times(dmesg: str) -> Dict[str, float]:
    """The first dmesg time stamp of each line we cut phases at."""
    wanted = {"run_init": "Run /init as init process", "init_start": "vmlab-init: start",
              "modules_loaded": "vmlab-init: modules loaded", "agent_exec": "vmlab-init: starting agent",
              "mark": _MARK}
    out: Dict[str, float] = {}
    for line in dmesg.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        for key, text in wanted.items():
            if key not in out and text in m.group(2):
                out[key] = float(m.group(1))
    return out


def _event_t(vm: VM, name: str) -> Optional[float]:
    for e in vm.events:
        if e["event"] == name:
            return float(e["t"])
    return None


def _cold_once(accel: str) -> Dict[str, float]:
    t_call = time.monotonic()
    with VM(accel=accel, name="profile-cold") as vm:
        wall = time.monotonic() - t_call
        ready = float(vm.boot_seconds or 0.0)
        t0 = vm._avm._events.t0         # QEMU spawned (host monotonic)
        before = time.monotonic() - t0
        vm.run(f"echo '<6>{_MARK}' >/dev/kmsg")
        after = time.monotonic() - t0
        times = _dmesg_times(vm.run("dmesg").stdout)
        launch = _event_t(vm, "LAUNCH") or 0.0
    missing = [k for k in ("run_init", "init_start", "modules_loaded", "agent_exec", "mark") if k not in times]
    if missing:
        raise RuntimeError(f"the guest's dmesg lacks the marks {missing}: is the guest image current?")
    kernel_start = (before + after) / 2 - times["mark"]     # host time (since spawn) of dmesg's 0.0
    return {"host_prep": wall - ready, "qemu_start": launch, "firmware_or_lag": kernel_start - launch,
            "kernel": times["run_init"], "init_mounts": times["init_start"] - times["run_init"],
            "init_modules": times["modules_loaded"] - times["init_start"],
            "init_rest": times["agent_exec"] - times["modules_loaded"],
            "agent": ready - (kernel_start + times["agent_exec"]),
            "total": wall, "ready": ready, "clock_uncertainty": (after - before) / 2}


def _warm_once(accel: str) -> Optional[Dict[str, float]]:
    t_call = time.monotonic()
    with VM(accel=accel, name="profile-warm", warm=True) as vm:
        wall = time.monotonic() - t_call
        if not vm.warm_restored:
            return None
        ready = float(vm.boot_seconds or 0.0)
        launch = _event_t(vm, "LAUNCH") or 0.0
        restored = _event_t(vm, "RESTORED") or launch
        return {"host_prep": wall - ready, "qemu_start": launch, "load_snapshot": restored - launch,
                "agent": ready - restored, "total": wall, "ready": ready}


def initcall_times(accel: str = "auto", top: int = 12) -> Dict[str, Any]:
    """One boot with ``initcall_debug``: the slowest built-in initcalls and every module's init (ms)."""
    with VM(accel=accel, name="profile-initcalls", kernel_args="initcall_debug log_buf_len=1M") as vm:
        dmesg = vm.run("dmesg").stdout
    builtin: List[Dict[str, Any]] = []
    modules: List[Dict[str, Any]] = []
    for m in re.finditer(r"initcall (\S+?)\+0x\S+ (?:\[(\S+)\] )?returned \S+ after (\d+) usecs", dmesg):
        row = {"initcall": m.group(1), "ms": round(int(m.group(3)) / 1e3, 1)}
        if m.group(2):
            modules.append({**row, "module": m.group(2)})
        else:
            builtin.append(row)
    builtin.sort(key=lambda r: -r["ms"])
    return {"builtin_total_ms": round(sum(r["ms"] for r in builtin), 1), "slowest": builtin[:top],
            "modules": modules}


def _summary(runs: List[Dict[str, float]], phases: tuple) -> Dict[str, Dict[str, float]]:
    out = {}
    for k in (*phases, "total", "ready"):
        v = [r[k] for r in runs if k in r]
        if v:
            out[k] = {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
    return out


def boot_profile(repeats: int = 5, accel: str = "auto", initcalls: bool = True) -> Dict[str, Any]:
    """Cold boot and warm restore phases (median, min, max over ``repeats``), initcalls, load."""
    load_before = os.getloadavg()
    cold = [_cold_once(accel) for _ in range(repeats)]
    _warm_once(accel)                                   # the first warm start may save the snapshot
    warm = [w for w in (_warm_once(accel) for _ in range(repeats)) if w is not None]
    report: Dict[str, Any] = {
        "repeats": repeats, "cold": _summary(cold, COLD_PHASES), "warm": _summary(warm, WARM_PHASES),
        "warm_restored": len(warm), "clock_uncertainty_s": round(max(r["clock_uncertainty"] for r in cold), 4),
        "load_avg": [round(x, 2) for x in (*load_before, *os.getloadavg())]}
    if initcalls:
        report["initcalls"] = initcall_times(accel)
    return report


def format_profile(p: Dict[str, Any]) -> str:
    """The profile as the text the CLI prints."""
    lines = [f"boot profile, median [min-max] of {p['repeats']} boots; load average "
             f"{p['load_avg'][0]:.1f} before, {p['load_avg'][3]:.1f} after (a loaded host stretches every phase)"]
    for kind, phases in (("cold boot", COLD_PHASES), ("warm restore", WARM_PHASES)):
        s = p[kind.split()[0]]
        if not s:
            lines.append(f"{kind}: no figures")
            continue
        lines.append(f"{kind}:")
        for k in (*phases, "total"):
            if k in s:
                v = s[k]
                lines.append(f"  {k:<14} {v['median'] * 1e3:8.0f} ms  [{v['min'] * 1e3:.0f}-{v['max'] * 1e3:.0f}]")
    lines.append(f"(host/guest clock offset known to +-{p['clock_uncertainty_s'] * 1e3:.1f} ms)")
    ic = p.get("initcalls")
    if ic:
        lines.append(f"slowest built-in initcalls (one boot with initcall_debug; all: {ic['builtin_total_ms']:.0f} ms):")
        lines += [f"  {r['ms']:8.1f} ms  {r['initcall']}" for r in ic["slowest"]]
        lines.append("module inits:")
        lines += [f"  {r['ms']:8.1f} ms  {r['module']} ({r['initcall']})" for r in ic["modules"]]
    return "\n".join(lines)
