"""Experiments under real KVM where the host has none: run them inside a nested guest.

``python -m vmlab experiment disk --quick --json --nested`` runs the disk experiment with
:func:`vmlab.vm.inner.run_inside`: in a nested guest (TCG here, AMD-V emulated) whose
``/dev/kvm`` works, the inner vmlab boots its lesson guests under KVM, so the rows have
``accel == "kvm"`` and KVM's own exit counters (``kvm_exits``, ``kvm_io_exits``,
``kvm_mmio_exits``: QMP ``query-stats``) beside QEMU's trace-event counts
(``device_calls``: calls into the device model, which both accelerators make).

    df = run_nested("disk", quick=True)          # rows of the inner run, stamped outer_*
    kvm = nested_kvm_device_rows("disk")         # the recorded run (data/measured/nested_kvm_devices.json)
    device_exits_table(kvm, tcg_df)              # per device: exits per MB under KVM, device calls per MB

The recorded file holds one real run of ``disk`` and ``console`` with where it ran (host,
outer and inner accelerator, kernels, QEMU, date, load); :func:`record_nested_devices`
writes it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..errors import ExperimentError, SpecError
from ..measure import DATA_DIR, Progress, say
from ..vm.inner import CompletedRun, run_inside

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEVICE_FILE", "EXIT_COLUMNS", "device_exits_table", "nested_kvm_device_rows", "record_nested_devices",
           "run_nested"]

#: one recorded nested-KVM run of the disk and console contrasts
DEVICE_FILE = DATA_DIR / "measured" / "nested_kvm_devices.json"
#: the columns device_exits_table() gives, per device (and workload)
EXIT_COLUMNS = ["contrast", "device", "kind", "accel", "workload", "bytes", "device_calls_per_mb",
                "kvm_exits_per_mb", "kvm_io_exits_per_mb", "kvm_mmio_exits_per_mb", "throughput_mb_s", "ran"]
NESTED_TIMEOUT = 900.0
#: quick nested runs: under KVM nested in TCG every VM exit costs 50-250 µs (TCG emulates the world switch), and
#: writes by string I/O exit once per element (``rep outsw``: an exit per 2 bytes an IDE disk in PIO mode is
#: sent; the UART an exit per byte), so the nested quick runs move less: 2 MiB of IDE PIO writes took over 300 s
NESTED_QUICK: Dict[str, Dict[str, Any]] = {
    "disk": {"devices": ["ide-pio", "virtio-blk"], "total": "256K", "count_cap": "256K"},
    "console": {"sizes": [32768]},
}
#: what the nested guest's Python runs: the experiment, then its rows as the CLI's --json prints them
INNER_PROGRAM = ("import json, sys\n"
                 "from vmlab.experiments import run_experiment\n"
                 "from vmlab.measure import to_json_rows\n"
                 "df = run_experiment(sys.argv[1], quick=sys.argv[2] == 'quick', **json.loads(sys.argv[3]))\n"
                 "print(to_json_rows(df))\n")


def _rows_of(run: CompletedRun, name: str) -> List[Dict[str, Any]]:
    run.check()
    text = run.stdout.strip()
    start = text.find("[")
    try:
        rows = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        rows = None
    if not isinstance(rows, list):
        raise ExperimentError(f"the nested {name} experiment printed no JSON rows: {text[-500:]!r}",
                              fix="run it again with VMLAB_LOG=debug; its stderr is in the error above")
    return rows


def run_nested(name: str, quick: bool = False, progress: Progress = None, *,
               timeout: float = NESTED_TIMEOUT) -> pd.DataFrame:
    """Run experiment ``name`` inside a nested guest under real KVM; its rows, each stamped with the
    outer host (``outer_*``) and ``ran`` ("nested KVM in a TCG guest"). ``df.attrs["nested"]`` has the
    timings, the options of the run (quick: :data:`NESTED_QUICK`) and where it ran. ``name`` is checked by
    the caller, :func:`vmlab.experiments.run_experiment` (this module does not import its package: no circle)."""
    import pandas as pd

    options = NESTED_QUICK.get(name, {}) if quick else {}
    argv = ["-c", INNER_PROGRAM, name, "quick" if quick else "full", json.dumps(options)]
    say(progress, f"{name}: booting a nested guest with the host's files read-only; vmlab runs inside it "
                  "under KVM (minutes under TCG)")
    run = run_inside(argv, timeout=timeout)
    rows = _rows_of(run, name)
    w = run.where
    ran = f"nested KVM in a {str(w.get('outer_accel', '?')).upper()} guest"
    stamp = {"ran": ran, "outer_host": w.get("host"), "outer_host_kernel": w.get("host_kernel"),
             "outer_host_cpu": w.get("host_cpu"), "outer_accel": w.get("outer_accel"), "outer_qemu": w.get("qemu")}
    df = pd.DataFrame([{**r, **stamp} for r in rows])
    df.attrs["nested"] = {"where": w, "phases": run.phases, "seconds": run.seconds, "quick": quick,
                          "options": options}
    say(progress, f"{name}: {len(df)} rows under {sorted(set(df.get('accel', [])))} in {run.seconds:.0f} s "
                  f"(nested guest boot {run.phases.get('boot_s', 0):.0f} s)")
    return df


def record_nested_devices(path: Optional[Path] = None, progress: Progress = None,
                          contrasts: Sequence[str] = ("disk", "console")) -> Path:
    """Run the quick ``contrasts`` nested under KVM and write them, with where they ran, to ``path``."""
    out: Dict[str, Any] = {"what": "device contrasts measured under real KVM inside a nested guest "
                                   "(python -m vmlab experiment NAME --quick --json --nested)",
                           "runs": {}}
    for name in contrasts:
        df = run_nested(name, quick=True, progress=progress)
        out["runs"][name] = {**df.attrs["nested"], "rows": json.loads(df.to_json(orient="records"))}
    target = Path(path) if path else DEVICE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1) + "\n")
    return target


def nested_kvm_device_rows(contrast: Optional[str] = None, path: Optional[Path] = None) -> pd.DataFrame:
    """The recorded nested-KVM device rows (``data/measured/nested_kvm_devices.json``): every column of
    the experiment's rows plus ``contrast``, ``ran`` and ``outer_*``; ``df.attrs["where"]`` per contrast
    says where and when it ran. ``contrast``: ``"disk"`` or ``"console"`` (None: both)."""
    import pandas as pd
    p = Path(path) if path else DEVICE_FILE
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ExperimentError(f"no recorded nested-KVM run at {p} ({exc.strerror})",
                              fix="record one: python -c 'from vmlab.experiments.inside import "
                                  "record_nested_devices as r; r()' (about 10 minutes under TCG)") from exc
    runs = data["runs"]
    if contrast is not None and contrast not in runs:
        raise SpecError("contrast", f"no recorded nested-KVM run of {contrast!r}", fix="one of: " + ", ".join(runs))
    frames = [pd.DataFrame(r["rows"]).assign(contrast=name) for name, r in runs.items()
              if contrast is None or name == contrast]
    df = pd.concat(frames, ignore_index=True)
    df.attrs["where"] = {name: r["where"] for name, r in runs.items()}
    return df


def _workload(row: pd.Series) -> str:
    if "mode" in row and isinstance(row.get("mode"), str):
        return f"{row['mode']} {row.get('pattern', '')} {int(row['bs']) // 1024} KiB".strip()
    return f"write {int(row['bs'])} B blocks" if "bs" in row and row["bs"] == row["bs"] else ""


def device_exits_table(*frames: pd.DataFrame) -> pd.DataFrame:
    """Per device, accelerator and workload (medians over repeats): device-model calls per MB (QEMU's
    trace events, either accelerator) and VM exits per MB (KVM's counters; empty under TCG). Pass the
    recorded KVM rows and live TCG rows to see them side by side (columns: :data:`EXIT_COLUMNS`)."""
    import pandas as pd
    out = []
    for df in frames:
        d = df.copy()
        if "contrast" not in d:
            d["contrast"] = d.get("experiment", "")
        if "ran" not in d:
            d["ran"] = "here: " + d["accel"].astype(str)
        d["workload"] = d.apply(_workload, axis=1)
        mb = d["size_bytes"] / 1e6
        for col in ("kvm_io_exits", "kvm_mmio_exits"):
            d[f"{col}_per_mb"] = d[col] / mb if col in d else float("nan")
        if "kvm_exits_per_mb" not in d:
            d["kvm_exits_per_mb"] = float("nan")
        if "device_calls_per_mb" not in d:      # rows from before device_calls existed: traps are the same count
            d["device_calls_per_mb"] = d["traps"] / (d["counted_bytes"] / 1e6)
        g = d.groupby(["contrast", "device", "kind", "accel", "workload", "ran"], sort=False, dropna=False)
        med = g[["device_calls_per_mb", "kvm_exits_per_mb", "kvm_io_exits_per_mb", "kvm_mmio_exits_per_mb",
                 "throughput_mb_s"]].median(numeric_only=True)
        med["bytes"] = g["size_bytes"].median()
        out.append(med.reset_index())
    return pd.concat(out, ignore_index=True)[EXIT_COLUMNS]
