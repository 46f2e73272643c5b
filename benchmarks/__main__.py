"""Run the benchmarks and judge every target: ``python -m benchmarks [NAME ...] [--quick]`` (``make bench``).

Prints target, measured (median and spread over the repeats) and verdict for each target, writes the figures with
where they ran to ``build/bench/`` (one JSON per run, plus ``latest.json``), and exits 1 when a target is missed,
a figure is missing or a benchmark fails; 0 when every target is met or skipped (a figure this machine cannot
measure, e.g. no KVM).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    TARGETS_FILE,
    Target,
    available,
    bench_module,
    failed,
    load_targets,
    summarize,
    verdict,
)

OUT_DIR = ROOT / "build" / "bench"


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    a = abs(v)
    return f"{v:.3g}" if a < 100 else f"{v:.0f}"


def _short(text: str, limit: int = 200) -> str:
    """One line of a (possibly long, multi-line) error for the table; the JSON keeps all of it."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def measured_text(s: Dict[str, Any]) -> str:
    if "skipped" in s:
        return "skipped"
    if "failed" in s:
        return "failed"
    if not s.get("n"):
        return "no value"
    if s["n"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}] n={s['n']}"


def where_ran(infos: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """vmlab.hostinfo: the host, its CPU, QEMU, whether the host is a VM, the accelerator the benchmarks used."""
    from vmlab.hostinfo import host_virtualization, where
    accel = kernel = ""
    for info in infos.values():
        w = info.get("_where") or {}
        accel = accel or w.get("accel", "")
        kernel = kernel or w.get("guest_kernel", "")
    return {**where(accel or "tcg", kernel), "host_virtualization": host_virtualization()}


def run(names: List[str], quick: bool, targets: List[Target], out_dir: Path = OUT_DIR,
        stream: Any = sys.stdout) -> int:
    by_bench: Dict[str, List[Target]] = {}
    for t in targets:
        by_bench.setdefault(t.bench, []).append(t)
    report: Dict[str, Any] = {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                              "quick": quick, "targets_file": str(TARGETS_FILE.relative_to(ROOT)),
                              "load_avg_before": os.getloadavg(), "benchmarks": {}, "targets": []}
    infos: Dict[str, Dict[str, Any]] = {}
    rows: List[Dict[str, Any]] = []
    for name in names:
        print(f"== {name}{' (quick)' if quick else ''}", file=stream, flush=True)
        t0 = time.monotonic()
        figures: Dict[str, Any] = {}
        error = None
        try:
            figures = dict(bench_module(name).measure(quick=quick))
        except Exception as exc:  # a failing benchmark is a failed target, reported with its cause
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds = time.monotonic() - t0
        info = {k: figures.pop(k) for k in [k for k in figures if k.startswith("_")]}
        infos[name] = info
        bench_rows = [verdict(t, figures, error) for t in by_bench.get(name, [])]
        rows += bench_rows
        judged = {t.figure for t in by_bench.get(name, [])}
        report["benchmarks"][name] = {"seconds": round(seconds, 1), "error": error, **info,
                                      "figures": {k: summarize(v) for k, v in figures.items()}}
        print(f"   {'target':<34} {'wanted':<22} {'measured: median [min-max] n':<34} verdict", file=stream)
        for r in bench_rows:
            shown = measured_text(r["measured"]) if "measured" in r else ""
            detail = f"  ({_short(r['detail'])})" if r.get("detail") else ""
            print(f"   {r['target']:<34} {r['wanted']:<22} {shown:<34} {r['verdict']}{detail}", file=stream)
        for k, v in figures.items():
            if k not in judged:
                print(f"   {name + '.' + k:<34} {'(no target)':<22} {measured_text(summarize(v)):<34}", file=stream)
        print(f"   {name}: {seconds:.0f} s", file=stream, flush=True)
    report["targets"] = rows
    report["load_avg_after"] = os.getloadavg()
    report["where"] = where_ran(infos)
    bad = failed(rows)
    report["failed"] = [r["target"] for r in bad]
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{stamp}.json"
    text = json.dumps(report, indent=1, default=str)
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "MISSED", "skipped", "missing", "error")}
    print(f"\n{len(rows)} targets: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) +
          f"; load average {report['load_avg_before'][0]:.1f} -> {report['load_avg_after'][0]:.1f}; "
          f"figures in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=stream)
    for r in bad:
        print(f"FAILED {r['target']}: wanted {r['wanted']}, "
              f"{_short(r.get('detail') or '') or 'measured ' + measured_text(r['measured'])}", file=stream)
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (fewer repeats, shorter runs)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their targets")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where the JSON goes (default build/bench)")
    a = ap.parse_args(argv)
    targets = load_targets()
    names = available()
    if a.list:
        for n in names:
            print(n)
            for t in targets:
                if t.bench == n:
                    print(f"  {t.figure:<30} {t.describe():<22} {t.why}")
        return 0
    orphans = sorted({t.bench for t in targets} - set(names))
    if orphans:
        print(f"targets.toml names benchmarks that do not exist: {orphans} (add benchmarks/NAME.py with measure())",
              file=sys.stderr)
        return 2
    unknown = [n for n in a.names if n not in names]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return run(a.names or names, a.quick, targets, a.out)


if __name__ == "__main__":
    sys.exit(main())
