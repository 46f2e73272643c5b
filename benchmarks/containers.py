"""Benchmark: containers vs VMs (issue 15): one workload as a host process, in a hand-made container, in a VM.

Figures, from runs of ``python -m vmlab experiment containers --quick --json`` as a learner runs it:
``cli_quick_s`` (its wall time); ``container_vs_process_startup`` (a container's start-up over a process's,
same run); ``vm_warm_vs_container_startup`` (a VM's warm restore over a container's start-up, same run);
``container_vs_host_null_syscall`` / ``..._page_fault`` (ns per operation in the container over the host's, fastest
repeats, same run: the same kernel does the work); ``container_overhead_mib`` (RSS beyond the 16 MiB the workload holds);
``vm_vs_container_overhead`` (the VM's memory beyond its workload over the container's); ``fault_isolated``
(a guest kernel crash stopped the VM and neither the container nor the host). Targets: benchmarks/targets.toml.

    .venv/bin/python -m benchmarks containers [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import experiment_cli_runs  # noqa: E402


def cli_runs(repeats: int) -> List[Dict[str, Any]]:
    """Each run: its wall time and rows."""
    return experiment_cli_runs("containers", repeats)


def measure(quick: bool = False) -> Dict[str, Any]:
    runs = cli_runs(1 if quick else 3)
    out: Dict[str, Any] = {"cli_quick_s": [run["seconds"] for run in runs]}
    figs: Dict[str, List[float]] = {}

    def add(name: str, value: float) -> None:
        figs.setdefault(name, []).append(float(value))

    for run in runs:
        rows = run["rows"]
        st = {(r["platform"], r["what"].split(" ")[0]): r["seconds"] for r in rows if r["kind"] == "startup"}
        host, ctr = st[("host", "spawn")], st[("container", "unshare")]
        add("container_vs_process_startup", ctr / host)
        if ("vm", "warm") in st:
            add("vm_warm_vs_container_startup", st[("vm", "warm")] / ctr)
        # the fastest repeat: the least disturbed by other users of a shared machine
        nb = {(r["platform"], r["benchmark"]): r["ns_min"] for r in rows if r["kind"] == "nanobench"}
        for b in ("null_syscall", "page_fault"):
            add(f"container_vs_host_{b}", nb[("container", b)] / nb[("host", b)])
            add(f"vm_vs_host_{b}", nb[("vm", b)] / nb[("host", b)])
        mem = {r["platform"]: r for r in rows if r["kind"] == "memory"}
        add("container_overhead_mib", mem["container"]["overhead_mb"])
        add("vm_vs_container_overhead", mem["vm"]["overhead_mb"] / max(0.01, mem["container"]["overhead_mb"]))
        fault = {r["platform"]: r for r in rows if r["kind"] == "fault"}
        if fault:
            add("fault_isolated", float(not fault["vm"]["kept_running"] and fault["container"]["kept_running"]
                                        and fault["host"]["kept_running"]))
    out.update(figs)
    first = runs[0]["rows"][0] if runs and runs[0]["rows"] else {}
    out["_where"] = {k: str(first.get(k, "")) for k in ("accel", "qemu", "guest_kernel", "host_kernel", "host_cpu",
                                                        "cgroup_mode")}
    return out


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["containers", *sys.argv[1:]]))
