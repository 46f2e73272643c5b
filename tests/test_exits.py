"""The exits experiment: rows from hv's output (no VM), then on a real nested guest, and the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab.errors import ExperimentError, SpecError
from vmlab.experiments import exits

ROOT = Path(__file__).resolve().parent.parent

# hv's output for `hv out 10`, as printed inside a nested guest (trimmed stats)
OUT10 = ('{"program":"out","n":10,"ok":true,"seconds":0.002,"result":10,"exits":{"IO":11},'
         '"done_exits":1,"other_io":0,"serial_out_bytes":10,"serial_in_bytes":0,"serial_text":"xxxxxxxxxx",'
         '"kvm_stats":{"exits":15,"io_exits":11,"mmio_exits":0,"halt_exits":0,"pf_taken":3}}')
NOTHING = ('{"program":"nothing","n":1,"ok":true,"seconds":0.001,"result":0,"exits":{"IO":1},'
           '"done_exits":1,"kvm_stats":{"exits":4,"io_exits":1}}')


def test_parse_and_rows_from_hv_output():
    r = exits.parse_hv("some noise\n" + OUT10 + "\n")
    fixed = exits.level_counts(exits.parse_hv(NOTHING))
    assert fixed[("user space", "IO")] == 1 and fixed[("kernel", "handled in kernel")] == 3
    rows = exits.result_rows(r, exits.WORKLOADS["out"], 10, fixed=fixed, where="nested-in-tcg", repeat=0)
    by = {(x["level"], x["exit_reason"]): x for x in rows}
    assert by[("user space", "IO")]["count"] == 11 and by[("user space", "IO")]["per_op"] == 1.1
    assert by[("user space", "MMIO")]["count"] == 0 and by[("user space", "HLT")]["count"] == 0
    assert by[("kernel", "all")]["count"] == 15 and by[("kernel", "handled in kernel")]["count"] == 4
    assert all(math.isnan(x["us_per_exit"]) and "not KVM's" in x["time_note"] for x in rows)
    direct = exits.result_rows(r, exits.WORKLOADS["out"], 10, fixed=fixed, where="direct kvm", repeat=0)
    assert direct[0]["us_per_exit"] == pytest.approx(0.002 * 1e6 / 15)


def test_bad_output_and_failed_programs_are_clear_errors():
    with pytest.raises(ExperimentError, match="no result"):
        exits.parse_hv("hv: open /dev/kvm: No such file or directory\n")
    failed = json.loads(NOTHING) | {"ok": False, "error": "SHUTDOWN", "exits": {"SHUTDOWN": 1}}
    with pytest.raises(ExperimentError, match="SHUTDOWN"):
        exits.result_rows(failed, exits.WORKLOADS["pf"], 1, fixed={}, where="nested-in-tcg", repeat=0)


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"), ({"n": "10"}, "n"), ({"repeats": 99}, "repeats"), ({"workloads": ["outb"]}, "workloads"),
    ({"string_sizes": (10, 1 << 30)}, "string_sizes"), ({"where": "moon"}, "where")])
def test_options_are_checked_before_anything_boots(kwargs, field):
    with pytest.raises(SpecError) as e:
        exits.run(quick=True, **kwargs)
    assert e.value.field == field and e.value.fix


def test_every_workload_has_its_program():
    progs = ROOT / "vmlab" / "guest" / "hvprogs"
    for name in [*exits.WORKLOADS, exits.BASELINE]:
        assert (progs / f"{name}.S").is_file(), name


def test_programs_are_linked_where_hv_loads_them():
    from vmlab.image.guesttools import FLAT_CFLAGS, guest_tool
    defs = (ROOT / "vmlab" / "guest" / "hvprogs" / "hvdefs.h").read_text()
    load = int(re.search(r"#define HV_LOAD\s+(0x[0-9a-fA-F]+)", defs).group(1), 16)
    assert f"-Wl,-Ttext={load:#x}" in FLAT_CFLAGS
    assert guest_tool("hv").programs == "hvprogs"


@pytest.fixture(scope="module")
def quick_df(image):
    return exits.run(quick=True, image=image)


@pytest.mark.integration
def test_exits_quick_on_a_nested_guest(quick_df):
    df = quick_df
    for col in ("workload", "exit_reason", "count", "ops", "per_op", "where", "level", "fixed", "accel",
                "qemu", "guest_kernel", "host_kernel", "host_cpu", "measured_at", "kvm_exits", "time_note"):
        assert col in df.columns, col
    assert set(df.workload) == set(exits.WORKLOADS)
    n = df.attrs["n"]
    assert df.attrs["where"] in ("nested-in-tcg", "nested-in-kvm", "direct kvm")
    if df.attrs["where"] != "direct kvm":
        assert df["us_per_exit"].isna().all() and df["time_note"].str.contains("not").all()
    user = exits.per_op(df, level="user space")
    kernel = exits.per_op(df, level="kernel", reason="handled in kernel")
    assert user["out"] == 1.0 and user["hlt"] == 1.0 and user["mmio"] == 1.0 and user["outs"] == 1.0
    assert user["cpuid"] == 0 and user["rdtsc"] == 0 and user["pf"] == 0
    assert kernel["cpuid"] >= 1.0 and kernel["priv"] >= 1.0
    assert exits.string_exits(df, "ins", 10000) <= 10000 / 100
    assert exits.string_exits(df, "outs", 1000) == 1000
    row = df[(df.workload == "out") & (df.n == n) & (df.level == "user space") & (df.exit_reason == "IO")].iloc[0]
    assert row["count"] == n + 1 and row["per_op"] == (n + 1) / n and row["fixed"] == 1
    tbl = exits.table(df)
    assert list(tbl.index[:3]) == ["out", "outs", "ins"]


@pytest.mark.integration
def test_exits_plots(quick_df):
    import matplotlib
    matplotlib.use("Agg")
    ax = exits.plot_by_reason(quick_df)
    assert "per instruction" in ax.get_title()
    ax = exits.plot_string_io(quick_df)
    assert ax.get_xscale() == "log" and len(ax.get_lines()) >= 3


@pytest.mark.integration
def test_cli_exits_quick_json(image):
    proc = subprocess.run([sys.executable, "-m", "vmlab", "experiment", "exits", "--quick", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    out = [r for r in rows if r["workload"] == "out" and r["level"] == "user space" and r["exit_reason"] == "IO"]
    assert out and all(r["count"] == r["n"] + 1 for r in out)
    ins = [r for r in rows if r["workload"] == "ins" and r["level"] == "user space" and r["exit_reason"] == "IO"]
    assert all(r["count"] - 1 <= max(1, r["n"] // 100) for r in ins)


@pytest.mark.integration
def test_shadow_paging_makes_page_table_work_exit(quick_df, image):
    shadow = exits.shadow_paging(quick=True, image=image)
    assert set(shadow["paging"]) == {"shadow"} and set(quick_df["paging"]) <= {"nested", "the host's"}
    t = exits.paging_table(quick_df, shadow)
    assert t.loc["cr3", "shadow paging"] >= 1.0            # every mov to %cr3 exits
    assert t.loc["pf", "shadow paging"] >= 2.0             # PTE store, invlpg, the fault itself
    assert t.loc["pf", "shadow: pf_guest / op"] == 1.0     # each fault reflected into the guest
    # with nested paging (NPT; EPT on a direct Intel host) neither exits
    assert t.loc["cr3", "nested paging (NPT)"] < 0.1 and t.loc["pf", "nested paging (NPT)"] < 0.1
    assert abs(t.loc["cpuid", "shadow paging"] - t.loc["cpuid", "nested paging (NPT)"]) < 0.1
