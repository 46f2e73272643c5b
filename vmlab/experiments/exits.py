"""VM exits, counted: which guest instructions leave the guest under KVM, and how often.

    from vmlab.experiments import exits
    df = exits.run(quick=True)          # rows: workload x level x exit reason (x size x repeat)
    exits.table(df)                     # exits per op: to user space, handled in the kernel
    exits.plot_by_reason(df)            # the same, one pair of bars per guest program
    exits.plot_string_io(df)            # exits vs elements moved: out loop, rep outsb, rep insb

A hypervisor in about 200 lines (``vmlab/guest/hv.c``, on the KVM API) runs small
guest programs (``vmlab/guest/hvprogs/*.S``) with one vCPU. It counts every exit
that reaches it, by reason (``KVM_EXIT_IO``, ``KVM_EXIT_MMIO``, ``KVM_EXIT_HLT``...),
and reads the vCPU's in-kernel counters (``KVM_GET_STATS_FD``), which also count the
exits KVM handles without telling user space.

Where it runs (column ``where``):

* ``direct kvm``: on a host whose KVM is proven to boot guests *and* runs ``hv``,
  hv runs on the host (compiled for it, cached). Times are KVM's: ``us_per_exit``.
* ``nested-in-tcg``: otherwise in a nested guest (``MachineSpec(nested=True)``): QEMU's
  TCG emulates AMD-V and the guest loads ``kvm_amd``. The counts are KVM's own (the
  same kernel code decides what exits); the times are TCG's emulation of every exit,
  so ``us_per_exit`` stays empty and ``time_note`` says so.
* ``nested-in-kvm``: a nested guest under KVM (nested pass-through); nested times.

Columns: ``workload``, ``instruction``, ``n`` (the program's loop count), ``ops`` (=
n x instructions per round; for string I/O the elements moved), ``level`` ("user
space": exits hv saw; "kernel": KVM's counters: ``all`` exits, and those ``handled in
kernel`` = all minus the ones hv saw), ``exit_reason``, ``count``, ``per_op`` = count /
ops, ``fixed`` (the empty program's count at the same level and reason: every program
ends with one ``out`` to hv's done port), ``where``, ``repeat``, ``loop_s`` (hv's
``KVM_RUN`` loop), ``us_per_exit`` (direct KVM only), ``time_note``, ``kvm_*`` (the
vCPU's counters), ``result`` (the program's own count, e.g. page faults handled), and
the where-it-ran columns of :func:`vmlab.hostinfo.where` (``accel`` is ``kvm``,
``kvm-in-tcg`` or ``kvm-in-kvm``).
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import plots
from ..errors import ExperimentError, SpecError, VMLabError
from ..hostinfo import where as where_ran
from ..image import GuestImage, native_programs, native_tool
from ..measure import DATA_DIR, Progress, Rows, advance, plan, say
from ..spec import MachineSpec
from ..vm import VM, kvm_device_problem, kvm_verdict, nested_verdict

if TYPE_CHECKING:
    import pandas as pd

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
USER_REASONS = ("IO", "MMIO", "HLT")
KERNEL_STATS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "insn_emulation",
                "pf_taken", "pf_guest", "tlb_flush", "invlpg", "signal_exits", "hypercalls")
NESTED_TIME_NOTE = "nested guest under TCG: not KVM's times (the counts carry over, the times do not)"
NESTED_KVM_TIME_NOTE = "nested guest under KVM: nested times, not single-level KVM's"
DIRECT_TIME_NOTE = "direct KVM on this host"


@dataclass(frozen=True)
class Workload:
    name: str              # the program: vmlab/guest/hvprogs/<name>.S, /lib/hv/<name>.bin in the guest
    instruction: str       # what it repeats
    what: str              # one line for tables and plots
    privileged: str        # faults outside ring 0?
    sensitive: str         # reads or changes machine state / behaves by it?
    ops_per_n: int = 1     # instructions (or elements) per loop round
    string_io: bool = False
    label: str = ""        # short name on plots (default: the instruction)


_IO_PRIV = "yes, unless IOPL or the TSS I/O bitmap allow the port"
WORKLOADS: Dict[str, Workload] = {w.name: w for w in (
    Workload("out", "out %al,%dx", "one byte to the serial port", _IO_PRIV, "yes", label="out"),
    Workload("outs", "rep outsb", "N bytes to the serial port, one instruction", _IO_PRIV, "yes", string_io=True),
    Workload("ins", "rep insb", "N bytes from the serial port, one instruction", _IO_PRIV, "yes", string_io=True),
    Workload("mmio", "mov to/from MMIO", "a store and a load at a device register (no RAM behind it)",
             "no", "yes (a device)", ops_per_n=2, label="MMIO mov"),
    Workload("cpuid", "cpuid", "CPU identification", "no", "yes"),
    Workload("rdtsc", "rdtsc", "read the time-stamp counter", "no (unless CR4.TSD is set)", "yes"),
    Workload("hlt", "hlt", "halt until an interrupt", "yes", "yes"),
    Workload("priv", "wbinvd", "write back and invalidate the caches", "yes", "yes"),
    Workload("cr3", "mov %eax,%cr3", "switch page tables", "yes", "yes", label="mov cr3"),
    Workload("sgdt", "sgdt", "store the GDT register", "no", "yes"),
    Workload("pf", "#PF", "a page fault taken and handled by the guest itself", "-", "-"),
)}
BASELINE = "nothing"

QUICK: Dict[str, Any] = {"n": 1000, "repeats": 1, "string_sizes": (10, 1000, 10000)}
FULL: Dict[str, Any] = {"n": 10000, "repeats": 3, "string_sizes": (1, 10, 100, 1000, 10000, 100000)}
MAX_N = 1_000_000
STRING_MAX = 0x200000   # hv's string-I/O buffer (HV_BUF_SIZE in hvdefs.h)


# ---------------------------------------------------------------- hv's output
def parse_hv(text: str) -> Dict[str, Any]:
    """The JSON line hv printed (the last line that starts with ``{``)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError as exc:
                raise ExperimentError(f"hv printed a line that is not JSON: {line[:200]!r}",
                                      fix="rebuild the guest image: python -m vmlab image build --force") from exc
    raise ExperimentError(f"hv printed no result: {text.strip()[-300:]!r}",
                          fix="rebuild the guest image: python -m vmlab image build --force")


def level_counts(result: Dict[str, Any]) -> Dict[Tuple[str, str], int]:
    """{(level, reason): count} of one hv run: user-space exits by reason (IO, MMIO and HLT
    always present), KVM's ``exits`` counter, and the exits handled in the kernel."""
    user = {str(k): int(v) for k, v in (result.get("exits") or {}).items()}
    out: Dict[Tuple[str, str], int] = {("user space", r): user.get(r, 0) for r in USER_REASONS}
    for r, v in user.items():
        out[("user space", r)] = v
    stats = result.get("kvm_stats") or {}
    if "exits" in stats:
        out[("kernel", "all")] = int(stats["exits"])
        out[("kernel", "handled in kernel")] = max(0, int(stats["exits"]) - sum(user.values()))
    return out


def result_rows(result: Dict[str, Any], workload: Workload, n: int, *, fixed: Dict[Tuple[str, str], int],
                where: str, repeat: int) -> List[Dict[str, Any]]:
    """The rows of one hv run (before the where-it-ran columns are added)."""
    if not result.get("ok"):
        raise ExperimentError(f"hv {workload.name} {n}: the guest program failed ({result.get('error')}); "
                              f"exits: {result.get('exits')}",
                              fix=f"see vmlab/guest/hvprogs/{workload.name}.S and hv's output")
    ops = n * workload.ops_per_n
    stats = result.get("kvm_stats") or {}
    loop_s = float(result.get("seconds", math.nan))
    total = int(stats.get("exits", 0))
    direct = where == "direct kvm"
    note = {"direct kvm": DIRECT_TIME_NOTE, "nested-in-kvm": NESTED_KVM_TIME_NOTE}.get(where, NESTED_TIME_NOTE)
    rows = []
    for (level, reason), count in level_counts(result).items():
        rows.append({
            "workload": workload.name, "instruction": workload.instruction, "n": n, "ops": ops,
            "level": level, "exit_reason": reason, "count": count,
            "per_op": count / ops if ops else math.nan, "fixed": fixed.get((level, reason), 0),
            "where": where, "repeat": repeat, "loop_s": loop_s,
            "us_per_exit": loop_s * 1e6 / total if direct and total else math.nan,
            "time_note": note, "result": result.get("result"),
            **{f"kvm_{k}": stats.get(k) for k in KERNEL_STATS},
        })
    return rows


def check_options(n: Optional[int] = None, repeats: Optional[int] = None,
                  workloads: Optional[Iterable[str]] = None, string_sizes: Optional[Sequence[int]] = None,
                  where: str = "auto") -> List[str]:
    """SpecError before anything boots; returns the workload names."""
    for name, value, top, example in (("n", n, MAX_N, "n=1000"), ("repeats", repeats, 20, "repeats=3")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top):
            raise SpecError(name, f"{value!r} is not a whole number from 1 to {top}", fix=f"e.g. {example}")
    if string_sizes is not None:
        if isinstance(string_sizes, (str, bytes)) or not isinstance(string_sizes, (list, tuple)):
            raise SpecError("string_sizes", f"{string_sizes!r} is not a list of sizes",
                            fix="e.g. string_sizes=(10, 1000, 10000)")
        for s in string_sizes:
            if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= STRING_MAX:
                raise SpecError("string_sizes", f"{s!r} is not a size from 1 to {STRING_MAX} bytes",
                                fix="e.g. string_sizes=(10, 1000, 10000)")
    if where not in ("auto", "nested", "direct"):
        raise SpecError("where", f"unknown place {where!r}", fix="use auto, nested or direct")
    if workloads is None:
        return list(WORKLOADS)
    if isinstance(workloads, str):
        workloads = [w.strip() for w in workloads.split(",") if w.strip()]
    names = list(workloads)
    bad = [str(w) for w in names if w not in WORKLOADS]
    if bad or not names:
        raise SpecError("workloads", f"unknown workload(s): {', '.join(bad) or '(none given)'}",
                        fix="use some of: " + ", ".join(WORKLOADS))
    return names


# ---------------------------------------------------------------- where hv runs
Runner = Callable[[str, int], Dict[str, Any]]


def _host_runner(progress: Progress) -> Runner:
    """hv and its guest programs compiled for this host (cached), run on its /dev/kvm."""
    hv, progs = native_tool("hv", progress), native_programs("hv", progress)

    def run_one(program: str, n: int) -> Dict[str, Any]:
        try:
            proc = subprocess.run([str(hv), str(progs / f"{program}.bin"), str(n)],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise ExperimentError(f"hv {program} {n} did not finish on the host in 120 s",
                                  fix="use where='nested'") from exc
        return parse_hv(proc.stdout or proc.stderr)
    return run_one


def _vm_runner(vm: Any) -> Runner:
    def run_one(program: str, n: int) -> Dict[str, Any]:
        r = vm.run(f"hv {program} {n}", timeout=300, check=False)
        if r.status not in (0, 1):
            raise ExperimentError(f"hv {program} {n} failed in the guest (exit status {r.status}): "
                                  f"{(r.stderr or r.stdout).strip()[-300:]}",
                                  fix="rebuild the guest image: python -m vmlab image build --force")
        return parse_hv(r.stdout)
    return run_one


def direct_kvm_problem(progress: Progress = None) -> Optional[str]:
    """Why hv cannot run directly on this host's /dev/kvm, or None if it can (proven)."""
    problem = kvm_device_problem()
    if problem:
        return problem
    try:
        verdict = kvm_verdict()
    except VMLabError as exc:
        return f"the KVM probe failed: {exc.message}"
    if not verdict.get("usable"):
        return str(verdict.get("reason", "KVM is not usable here"))
    try:
        result = _host_runner(progress)(BASELINE, 1)
    except VMLabError as exc:
        return f"hv could not run on this host: {exc.message}"
    if not result.get("ok"):
        return f"hv's guest did not run on this host's KVM ({result.get('error')})"
    return None


def nested_where(accel: str) -> str:
    return "nested-in-kvm" if accel == "kvm" else "nested-in-tcg"


def _accel_label(where: str) -> str:
    return {"direct kvm": "kvm", "nested-in-kvm": "kvm-in-kvm"}.get(where, "kvm-in-tcg")


# ---------------------------------------------------------------- the experiment
def measure(runner: Runner, rows: Rows, *, where: str, n: int, repeats: int, names: Sequence[str],
            string_sizes: Sequence[int], progress: Progress = None) -> Dict[Tuple[str, str], int]:
    """Run the workloads through ``runner(program, n)`` into ``rows``; returns the fixed counts."""
    per_rep = sum(len({n, *string_sizes}) if (WORKLOADS[m].string_io or m == "out") else 1 for m in names)
    plan(progress, 1 + repeats * per_rep)      # the empty program, then each workload and size
    base = runner(BASELINE, 1)
    if not base.get("ok"):
        raise ExperimentError(f"hv's empty program failed: {base.get('error')}",
                              fix="check /dev/kvm inside the guest (vm.nested_kvm)")
    fixed = level_counts(base)
    advance(progress)
    for rep in range(repeats):
        for name in names:
            w = WORKLOADS[name]
            sizes = sorted({n, *string_sizes}) if (w.string_io or name == "out") else [n]
            for size in sizes:
                say(progress, f"hv {name} {size} ({where}, repeat {rep + 1}/{repeats})")
                for r in result_rows(runner(name, size), w, size, fixed=fixed, where=where, repeat=rep):
                    rows.add(**r)
                advance(progress)
    return fixed


def run(quick: bool = False, progress: Progress = None, *, where: str = "auto", vm: Any = None,
        n: Optional[int] = None, repeats: Optional[int] = None, workloads: Optional[Iterable[str]] = None,
        string_sizes: Optional[Sequence[int]] = None, image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Run the guest programs under hv and count their exits (see the module's docstring).

    ``where``: ``auto`` (direct KVM if proven here, else a nested guest), ``nested`` or
    ``direct``. ``vm``: an already started ``VM(MachineSpec(nested=True))`` to use
    (not shut down here). ``df.attrs``: ``where``, ``n``, ``notes``, ``nested_kvm``.
    """
    names = check_options(n, repeats, workloads, string_sizes, where)
    mode = QUICK if quick else FULL
    n = n or mode["n"]
    repeats = repeats or mode["repeats"]
    sizes = tuple(string_sizes) if string_sizes is not None else mode["string_sizes"]
    notes: List[str] = []
    attrs: Dict[str, Any] = {"n": n, "notes": notes}
    if vm is None and where in ("auto", "direct"):
        problem = direct_kvm_problem(progress)
        if problem is None:
            rows = Rows("exits", {**where_ran("kvm"), "paging": "the host's"})
            with rows.guard():
                measure(_host_runner(progress), rows, where="direct kvm", n=n, repeats=repeats, names=names,
                        string_sizes=sizes, progress=progress)
            df = rows.frame()
            attrs.update(where="direct kvm")
            df.attrs.update(attrs)
            return df
        if where == "direct":
            raise ExperimentError(f"hv cannot run directly on this host's KVM: {problem}",
                                  fix="use where='nested' (or 'auto')")
        notes.append(f"host KVM not used: {problem}; measured in a nested guest")
    if vm is not None:
        return _in_vm(vm, names, n, repeats, sizes, notes, attrs, progress)
    say(progress, "booting a nested guest (KVM inside a guest)")
    with VM(MachineSpec(name="exits", nested=True), image=image, warm=True) as nvm:
        return _in_vm(nvm, names, n, repeats, sizes, notes, attrs, progress)


#: a nested guest's CPU without nested paging: KVM inside it falls back to shadow page tables
SHADOW_CPU = "qemu64,+svm,-npt"
SHADOW_WORKLOADS = ("out", "cpuid", "cr3", "pf")


def shadow_paging(quick: bool = False, progress: Progress = None, *, n: Optional[int] = None,
                  workloads: Iterable[str] = SHADOW_WORKLOADS, image: Optional[GuestImage] = None) -> pd.DataFrame:
    """The same programs in a nested guest under TCG whose virtual CPU has AMD-V but no nested
    paging (:data:`SHADOW_CPU`): KVM there keeps shadow page tables, so page-table work of the
    guest (``mov %cr3``, ``invlpg``, its page faults) has to exit. Rows as :func:`run`'s, with
    ``paging`` = "shadow"; compare with :func:`paging_table`."""
    names = check_options(n, None, workloads, None)
    n = n or (QUICK if quick else FULL)["n"]
    notes: List[str] = []
    attrs: Dict[str, Any] = {"n": n, "notes": notes}
    say(progress, "booting a nested guest without nested paging (KVM uses shadow page tables)")
    spec = MachineSpec(name="exits-shadow", accel="tcg", nested=True, cpu_model=SHADOW_CPU)
    with VM(spec, image=image, warm=True) as nvm:
        return _in_vm(nvm, names, n, 1, (), notes, attrs, progress, paging="shadow")


def paging_table(df: pd.DataFrame, shadow: pd.DataFrame) -> pd.DataFrame:
    """Exits per instruction handled in the kernel with nested paging (``df``, from :func:`run`
    in a nested guest) and with shadow paging (``shadow``, from :func:`shadow_paging`)."""
    import pandas as pd
    k = {"nested paging (NPT)": per_op(df, level="kernel", reason="handled in kernel"),
         "shadow paging": per_op(shadow, level="kernel", reason="handled in kernel")}
    out = pd.DataFrame(k).dropna()
    d = _main_rows(shadow)
    d = d[(d["level"] == "kernel") & (d["exit_reason"] == "all")].groupby("workload").first()
    for stat in ("pf_taken", "pf_guest", "tlb_flush", "invlpg"):
        out[f"shadow: {stat} / op"] = (d[f"kvm_{stat}"] / d["ops"]).reindex(out.index)
    out.insert(0, "instruction", [WORKLOADS[w].instruction for w in out.index])
    return out


def _in_vm(vm: VM, names: Sequence[str], n: int, repeats: int, sizes: Sequence[int], notes: List[str],
           attrs: Dict[str, Any], progress: Progress, paging: str = "") -> pd.DataFrame:
    state = vm.nested_kvm
    if state is None or not state["works"]:
        why = state["reason"] if state is not None else "it is not a nested guest"
        raise ExperimentError(f"KVM does not work inside the guest: {why}",
                              fix="start it with MachineSpec(nested=True); see python -m vmlab doctor")
    where = nested_where(vm.accel or "tcg")
    paging = paging or ("nested" if where == "nested-in-tcg" else "the host's")
    rows = Rows("exits", {**where_ran(_accel_label(where), vm.kernel_release), "paging": paging})
    with rows.guard():
        measure(_vm_runner(vm), rows, where=where, n=n, repeats=repeats, names=names,
                string_sizes=sizes, progress=progress)
    if where != "direct kvm":
        notes.append("times are " + (NESTED_TIME_NOTE if where == "nested-in-tcg" else NESTED_KVM_TIME_NOTE)
                     + "; us_per_exit is left empty")
    df = rows.frame()
    attrs.update(where=where, nested_kvm=dict(state), paging=paging)
    df.attrs.update(attrs)
    return df


# ---------------------------------------------------------------- reading the rows
def _main_rows(df: Any) -> Any:
    """One n per workload: the frame's main n (string programs have several sizes)."""
    n = df.attrs.get("n") or int(df["n"].mode().iloc[0])
    return df[df["n"] == n]


def per_op(df: Any, *, level: str = "user space", reason: Optional[str] = None) -> Any:
    """Exits per op by workload (median over repeats), net of the fixed overhead, at the main n.

    ``reason`` None sums the user-space reasons (level "user space") or takes ``all``
    (level "kernel")."""
    d = _main_rows(df)
    d = d[d["level"] == level]
    if reason is None:
        reason = "all" if level == "kernel" else None
    if reason is not None:
        d = d[d["exit_reason"] == reason]
    d = d.assign(net=(d["count"] - d["fixed"]).clip(lower=0))
    net = d.groupby(["workload", "repeat"])["net"].sum().groupby("workload").median()
    ops = d.groupby("workload")["ops"].first()
    return (net / ops).reindex([w for w in WORKLOADS if w in net.index])


def string_exits(df: Any, workload: str, size: int) -> float:
    """User-space exits of one string-I/O run of ``size`` elements, net of the done exit."""
    d = df[(df["workload"] == workload) & (df["n"] == size) & (df["level"] == "user space")]
    if not len(d):
        raise KeyError(f"no {workload} rows with n={size}")
    net = (d["count"] - d["fixed"]).clip(lower=0)
    return float(net.groupby(d["repeat"]).sum().median())


def table(df: Any) -> Any:
    """Exits per instruction (net of the fixed overhead) by workload: to user space, handled in
    the kernel, and the user-space reasons."""
    import pandas as pd
    out = pd.DataFrame({
        "instruction": pd.Series({w: WORKLOADS[w].instruction for w in WORKLOADS}),
        "to user space / op": per_op(df, level="user space"),
        "handled in kernel / op": per_op(df, level="kernel", reason="handled in kernel"),
    })
    for r in USER_REASONS:
        out[f"{r} / op"] = per_op(df, level="user space", reason=r)
    return out.dropna(subset=["to user space / op"])


def workload_table() -> Any:
    """The guest programs: what each repeats, and whether it is privileged / sensitive."""
    import pandas as pd
    return pd.DataFrame([{"program": w.name, "instruction": w.instruction, "what": w.what,
                          "privileged (faults in user mode)": w.privileged, "sensitive": w.sensitive}
                         for w in WORKLOADS.values()]).set_index("program")


def time_table(df: Any) -> Any:
    """Loop time per exit for the programs whose time is mostly exits (at least one exit per two
    instructions), with where it was measured and what the time means."""
    d = _main_rows(df)
    d = d[(d["level"] == "kernel") & (d["exit_reason"] == "all")]
    d = d[d["count"] >= d["ops"] / 2]      # only where exits dominate the loop's time
    d = d.assign(s_per_exit=d["loop_s"] / d["count"])
    g = d.groupby("workload").agg(exits=("count", "median"), loop_s=("loop_s", "median"),
                                  us_per_exit=("us_per_exit", "median"), where=("where", "first"),
                                  time_note=("time_note", "first"))
    col = "us_per_exit_here (NOT KVM's)" if not d["where"].eq("direct kvm").all() else "us_per_exit_here"
    g[col] = (d.groupby("workload")["s_per_exit"].median() * 1e6).round(2)
    return g.reindex([w for w in WORKLOADS if w in g.index])


def reference_costs() -> pd.DataFrame:
    """Published costs of an exit (``data/reference/vm_exit_costs.csv``) and Adams & Agesen's
    ``in`` natively and in a first-generation VT-x VMM (``adams_agesen_2006.csv``)."""
    import pandas as pd
    ref = DATA_DIR / "reference"
    costs = pd.read_csv(ref / "vm_exit_costs.csv")
    aa = pd.read_csv(ref / "adams_agesen_2006.csv")
    aa = aa[(aa["benchmark"] == "in") & aa["unit"].eq("cycles")]
    aa = aa.assign(what="`in` from port 0x80, " + aa["platform"].str.replace("_", " "),
                   hardware="2006 hardware (CPU not stated), first-generation VT-x", value_high=math.nan,
                   source="K. Adams and O. Agesen, 'A Comparison of Software and Hardware Techniques for "
                          "x86 Virtualization', ASPLOS 2006")
    cols = ["what", "value", "value_high", "unit", "hardware", "source", "verified"]
    return pd.concat([costs[cols], aa[cols]], ignore_index=True)


def source_excerpt(name: str, start: Optional[str] = None, end: Optional[str] = None) -> str:
    """Lines of ``vmlab/guest/<name>`` from the one containing ``start`` up to (not including)
    the one containing ``end`` (the whole file without them)."""
    lines = (GUEST_DIR / name).read_text().splitlines()
    i = next((k for k, ln in enumerate(lines) if start in ln), 0) if start else 0
    j = next((k for k, ln in enumerate(lines) if end in ln and k > i), len(lines)) if end else len(lines)
    return "\n".join(lines[i:j])


# ---------------------------------------------------------------- plots
def _source(df: Any) -> str:
    where = df.attrs.get("where") or (df["where"].iloc[0] if len(df) else "")
    return plots.where_label(df) + f"; hv ran: {where}"


def plot_by_reason(df: Any, ax: Any = None) -> Any:
    """Exits per instruction for each guest program: to user space vs handled in the kernel (log)."""
    import pandas as pd
    ax = plots.axes(ax, figsize=(10, 4.8))
    t = pd.DataFrame({"to user space": per_op(df, level="user space"),
                      "handled in kernel": per_op(df, level="kernel", reason="handled in kernel")})
    floor = 1e-4
    plots.grouped_bars(ax, t.clip(lower=floor), colors={"to user space": plots.OKABE_ITO[0],
                                                        "handled in kernel": plots.OKABE_ITO[4]},
                       labels={"to user space": "exits to hv in user space",
                               "handled in kernel": "exits handled in the kernel (KVM)"})
    ax.axhline(1, color="#555555", lw=0.8, ls="--")
    ax.set_ylim(floor * 0.8, 3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xticklabels([WORKLOADS[w].label or WORKLOADS[w].instruction for w in t.index], fontsize=8)
    return plots.style(ax, title="VM exits per instruction, by who handles them",
                       ylabel="exits per instruction (log; bars at the floor: none)", log="y",
                       source=_source(df))


def plot_string_io(df: Any, ax: Any = None) -> Any:
    """Exits to user space vs elements moved: the out loop, rep outsb and rep insb (log-log)."""
    ax = plots.axes(ax, figsize=(8, 4.5))
    d = df[(df["level"] == "user space") & df["workload"].isin(["out", "outs", "ins"])]
    d = d.assign(net=(d["count"] - d["fixed"]).clip(lower=0))
    net = d.groupby(["workload", "n", "repeat"])["net"].sum().groupby(["workload", "n"]).median()
    xs: List[float] = []
    for i, w in enumerate(["out", "outs", "ins"]):
        if w not in net.index.get_level_values(0):
            continue
        s = net[w]
        xs += list(s.index)
        ax.plot(s.index, s.clip(lower=0.5).values, marker="osD"[i], ms=[9, 5, 6][i], lw=[4, 1.5, 1.5][i],
                alpha=[0.5, 1, 1][i], color=plots.OKABE_ITO[[5, 0, 4][i]],
                label=f"{w}: {WORKLOADS[w].instruction}" + (" (a loop)" if w == "out" else ""))
    if xs:
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [lo, hi], ls="--", color="#555555", lw=0.8, label="one exit per element")
    ax.legend(fontsize=8)
    return plots.style(ax, title="String I/O: exits to user space vs bytes moved",
                       xlabel="bytes moved (log)", ylabel="exits to user space (log)", log="xy",
                       source=_source(df))


# ---------------------------------------------------------------- facts for lessons
def kvm_facts(vm: Optional[VM] = None) -> List[str]:
    """doctor's two KVM lines, now: this host's KVM (the remembered verdict of booting a guest
    under it) and KVM inside a nested guest (``vm.nested_kvm`` of a started nested guest, else
    the remembered verdict, probed if there is none)."""
    host = kvm_verdict()
    lines = [f"host KVM: {'usable' if host['usable'] else 'not usable'} ({host['reason']})"]
    if vm is not None and vm.nested_kvm is not None:
        state = vm.nested_kvm
        inside = (f"works ({state['reason']}; /dev/kvm proven {state['seconds']:.1f} s after start)"
                  if state["works"] else f"does not work ({state['reason']})")
        lines.append(f"nested KVM inside a {state['outer_accel'].upper()} guest: {inside}")
    else:
        v = nested_verdict()
        lines.append(f"nested KVM inside a TCG guest: {v['reason'] if v['works'] else 'does not work: ' + v['reason']}")
    return lines
