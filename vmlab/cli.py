"""``python -m vmlab``: doctor, boot, image, experiment."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from . import experiments
from .errors import VMLabError
from .measure import save, to_json_rows


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


# ---------------------------------------------------------------- doctor
def doctor_report(reprobe: bool = False, nested: bool = True) -> Dict[str, Any]:
    """What this machine can do, each problem with its fix.

    ``accelerators.kvm`` is the host's own KVM (proven by booting a guest under it);
    ``nested_kvm`` (with ``nested=True``) is KVM inside a nested guest under TCG, proven by
    booting one and running hv in it. Both verdicts are remembered; ``reprobe`` tests again.
    """
    from .hostinfo import host_cpu, host_virtualization
    from .image import image_status
    from .spec import host_memory_bytes
    from .vm import kvm_device_problem, kvm_verdict, nested_verdict
    report: Dict[str, Any] = {"problems": []}
    problems: List[Dict[str, str]] = report["problems"]
    try:
        from .tools import qemu_binary, qemu_version
        report["qemu"] = {"path": qemu_binary(), "version": qemu_version()}
    except VMLabError as exc:
        report["qemu"] = None
        problems.append({"problem": exc.message, "fix": exc.fix or ""})
    report["qemu_img"] = shutil.which("qemu-img")
    if not report["qemu_img"]:
        problems.append({"problem": "qemu-img is missing", "fix": "apt-get install qemu-utils"})
    img = image_status()
    report["image"] = img
    problems.extend(img.get("problems", []))
    accels: Dict[str, Any] = {}
    accels["tcg"] = {"usable": report["qemu"] is not None,
                     "reason": "software emulation (binary translation); always available with QEMU"
                     if report["qemu"] else "QEMU is missing"}
    if report["qemu"] and img.get("built"):
        try:
            accels["kvm"] = kvm_verdict(use_cache=not reprobe)
        except VMLabError as exc:
            accels["kvm"] = {"usable": False, "reason": exc.message}
    else:
        problem = kvm_device_problem()
        accels["kvm"] = {"usable": False,
                         "reason": problem or "not proven: build the guest image first "
                                              "(python -m vmlab image build), then run doctor again"}
    report["accelerators"] = accels
    report["default_accel"] = "kvm" if accels["kvm"].get("usable") else "tcg"
    if nested and report["qemu"] and img.get("built"):
        try:
            report["nested_kvm"] = nested_verdict(use_cache=not reprobe)
        except VMLabError as exc:
            report["nested_kvm"] = {"works": False, "reason": exc.message}
    report["host"] = {"cpu": host_cpu(), "cpus": os.cpu_count(), "memory_mb": host_memory_bytes() >> 20,
                      "kernel": platform.release(), "virtualization": host_virtualization()}
    return report


def _doctor(args: argparse.Namespace) -> int:
    report = doctor_report(reprobe=args.reprobe)
    if args.json:
        _print_json(report)
        return 0 if not report["problems"] else 1
    q = report["qemu"]
    print(f"QEMU        {q['version']} at {q['path']}" if q else "QEMU        MISSING")
    img = report["image"]
    print(f"guest image {'built: ' + str(img.get('path')) if img.get('built') else 'not built'}"
          + (f" (kernel {img.get('kernel_version')}, {img.get('kernel_kind')}"
             + (f", busybox {img['busybox']['libc']}" if img.get("busybox") else "") + ")"
             if img.get("kernel_version") else ""))
    if img.get("note"):
        print(f"            {img['note']}")
    for name, v in report["accelerators"].items():
        mark = "yes" if v.get("usable") else "no "
        cached = " (remembered; --reprobe to test again)" if v.get("cached") else ""
        print(f"{'host KVM' if name == 'kvm' else name:<11} {mark}  {v.get('reason', '')}{cached}")
    if "nested_kvm" in report:
        v = report["nested_kvm"]
        cached = " (remembered; --reprobe to test again)" if v.get("cached") else ""
        print(f"{'nested KVM':<11} {'yes' if v.get('works') else 'no '}  inside a TCG guest: "
              f"{v.get('reason', '')}{cached}")
    print(f"lessons run under: {report['default_accel'].upper()}")
    h = report["host"]
    hv = h["virtualization"]
    print(f"host        {h['cpu']}, {h['cpus']} CPUs, {h['memory_mb']} MiB, Linux {h['kernel']}")
    why = [w for w in (hv.get("detected"), "CPUID hypervisor flag" if hv.get("cpuid_hypervisor_flag") else None) if w]
    print(f"host is a VM: {'yes' if hv['is_vm'] else 'no'}"
          + (f" ({', '.join(why)})" if why else "")
          + (f"; inside a {hv['container']} container" if hv.get("container") else "")
          + ("; its KVM is PVM (nested, paravirtual)" if hv.get("pvm_host") else ""))
    for p in report["problems"]:
        print(f"PROBLEM: {p['problem']}\n   fix: {p['fix']}")
    return 0 if not report["problems"] else 1


# ------------------------------------------------------------------ boot
def boot_figures(repeats: int = 3, accel: str = "auto", roundtrips: int = 50) -> Dict[str, Any]:
    """Cold boot, warm restore and run() round trip, medians over repeats."""
    from .tools import qemu_version
    from .vm import VM
    cold: List[float] = []
    warm: List[float] = []
    rtt: List[float] = []
    rss: List[int] = []
    used_accel, reason, release = "", "", ""
    for _ in range(repeats):
        with VM(accel=accel, name="boot-cold") as vm:
            cold.append(vm.boot_seconds or 0.0)
            release = vm.run("uname -r").stdout.strip()
            used_accel, reason = vm.accel or "", vm.accel_reason or ""
            for _ in range(roundtrips):
                rtt.append(vm.run("true").wall_s)
            rss.append(vm.qemu_rss_bytes())
    # the first warm VM may have to save the snapshot
    with VM(accel=accel, name="boot-warm", warm=True) as vm:
        vm.run("true")
    for _ in range(repeats):
        with VM(accel=accel, name="boot-warm", warm=True) as vm:
            if vm.warm_restored:
                warm.append(vm.boot_seconds or 0.0)
            vm.run("true")
    med = statistics.median
    return {"cold_boot_s": round(med(cold), 3), "warm_boot_s": round(med(warm), 3) if warm else None,
            "run_roundtrip_ms": round(med(rtt) * 1e3, 2), "accel": used_accel, "accel_reason": reason,
            "qemu_version": qemu_version(), "guest_kernel": release, "repeats": repeats,
            "cold_boot_s_all": [round(x, 3) for x in cold], "warm_boot_s_all": [round(x, 3) for x in warm],
            "qemu_rss_mb": round(med(rss) / 2**20, 1)}


def _boot(args: argparse.Namespace) -> int:
    if args.profile:
        from .vm.profile import boot_profile, format_profile
        prof = boot_profile(repeats=args.repeats, accel=args.accel)
        if args.json:
            _print_json(prof)
        else:
            print(format_profile(prof))
        return 0
    fig = boot_figures(repeats=args.repeats, accel=args.accel)
    if args.json:
        _print_json(fig)
    else:
        print(f"booted {fig['guest_kernel']} under {fig['accel']} ({fig['accel_reason']})")
        print(f"cold boot to a ready guest: {fig['cold_boot_s']} s (median of {fig['repeats']})")
        print(f"warm restore:               {fig['warm_boot_s']} s")
        print(f"run('true') round trip:     {fig['run_roundtrip_ms']} ms")
        print(f"QEMU RSS:                   {fig['qemu_rss_mb']} MiB")
    return 0


# ------------------------------------------------------------ experiment
def _experiment_list(as_json: bool) -> int:
    """``python -m vmlab experiment list``: every registered experiment and what it measures."""
    if as_json:
        _print_json([{"name": k, "description": v} for k, v in experiments.DESCRIPTIONS.items()])
        return 0
    width = max(len(k) for k in experiments.REGISTRY)
    for name, description in experiments.DESCRIPTIONS.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    if args.name == "list":
        return _experiment_list(args.json)
    progress = None if args.json else (lambda m: print(m, file=sys.stderr))
    t0 = time.monotonic()
    df = experiments.run_experiment(args.name, quick=args.quick, progress=progress, nested=args.nested)
    if args.save:
        path = save(df, args.name)
        print(f"saved {path}", file=sys.stderr)
    if args.json:
        print(to_json_rows(df))
    else:
        import pandas as pd
        with pd.option_context("display.width", 200, "display.max_columns", 12):
            print(df.drop(columns=[c for c in ("host_cpu", "host_kernel", "measured_at", "qemu",
                                               "guest_kernel", "host_cpus", "experiment") if c in df]))
        print(f"({len(df)} rows in {time.monotonic() - t0:.1f} s)", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmlab", description="run and measure virtualization")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", help="what this machine can do, and fixes for what it cannot")
    d.add_argument("--json", action="store_true")
    d.add_argument("--reprobe", action="store_true", help="test KVM again instead of using the remembered verdict")
    b = sub.add_parser("boot", help="boot the default guest and report cold/warm boot and run() round trip")
    b.add_argument("--json", action="store_true")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--accel", default="auto", choices=["auto", "tcg", "kvm"])
    b.add_argument("--profile", action="store_true",
                   help="where the time goes: cold boot and warm restore phases, slowest initcalls (docs/boot.md)")
    sub.add_parser("image", help="build or inspect the guest image (image build|status)", add_help=False)
    e = sub.add_parser("experiment", help="run an experiment and print its rows (list: what there is)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="experiments:\n" + "\n".join(f"  {k:<10} {v}"
                                                            for k, v in experiments.DESCRIPTIONS.items()))
    e.add_argument("name", choices=["list", *sorted(experiments.REGISTRY)], metavar="NAME",
                   help="an experiment (below), or `list` to list them")
    e.add_argument("--quick", action="store_true", help="seconds, not minutes (CI, first try)")
    e.add_argument("--json", action="store_true", help="print a JSON array of row objects")
    e.add_argument("--save", action="store_true", help="also save the rows as CSV in data/measured/")
    e.add_argument("--nested", action="store_true",
                   help="run it under real KVM inside a nested guest (the host's files shared read-only; "
                        "minutes under TCG; docs/kvm.md)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["image"]:
        from .image import build_image_cli
        return build_image_cli(argv[1:])
    args = p.parse_args(argv)
    try:
        return {"doctor": _doctor, "boot": _boot, "experiment": _experiment}[args.cmd](args)
    except VMLabError as exc:
        print(f"vmlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmlab: interrupted", file=sys.stderr)
        return 130
