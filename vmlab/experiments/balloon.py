"""The memory balloon: the guest's view of its memory and the host's, while a
virtio-balloon inflates and deflates.

    from vmlab.experiments import balloon
    df = balloon.run(quick=True)                     # one row per sample, phase by phase
    balloon.summary(df); balloon.plot(df)

or, in a VM of your own::

    with VM(accel="tcg", memory=256, balloon=True) as vm:
        balloon.set_balloon(vm, 128)                 # guest memory target in MiB
        balloon.sample(vm)                           # guest's and host's view, now
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from ..errors import SpecError
from ..guestinfo import where_vm
from ..measure import Progress, Rows, advance, plan, say
from ..plots import OKABE_ITO, axes, style, where_label
from ..vm import VM

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

Sample = Dict[str, Any]


def meminfo(vm: VM) -> Dict[str, int]:
    """The guest's /proc/meminfo, in bytes."""
    text = vm.read_file("/proc/meminfo").decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if "kB" in line else 1)
    return out


def balloon_actual(vm: VM) -> int:
    """QEMU's view: the guest's memory size after ballooning (``query-balloon``), bytes."""
    return int(vm.qmp("query-balloon")["actual"])


def sample(vm: VM, t0: Optional[float] = None, **extra: Any) -> Sample:
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


def _check_target(vm: VM, target_mb: float) -> int:
    if not vm.spec.balloon:
        raise SpecError("balloon", "this VM has no balloon device", fix="start it with balloon=True")
    if isinstance(target_mb, bool) or not isinstance(target_mb, (int, float)) or not math.isfinite(target_mb):
        raise SpecError("target_mb", f"{target_mb!r} is not a number of MiB", fix="e.g. 128")
    if not 64 <= target_mb <= vm.spec.memory_mb:
        raise SpecError("target_mb", f"{target_mb} MiB is outside 64..{vm.spec.memory_mb} MiB",
                        fix=f"the balloon can shrink the guest from {vm.spec.memory_mb} MiB, not grow it; "
                            "below 64 MiB the lesson guest runs out of memory")
    return int(target_mb) << 20


def set_balloon(vm: VM, target_mb: float, wait: bool = True, timeout: float = 20.0,
                on_sample: Optional[Callable[[Sample], None]] = None, t0: Optional[float] = None,
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


def touch(vm: VM, mb: int) -> Dict[str, Any]:
    """Make the guest write ``mb`` MiB (then free it): QEMU must back those pages with host RAM."""
    out: Dict[str, Any] = json.loads(vm.run(f"vmbench touch --mb {int(mb)}", timeout=120).stdout)
    return out


def run(quick: bool = False, progress: Progress = None, *, memory: int = 256,
        low_mb: Optional[int] = None, touch_mb: Optional[int] = None,
        image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Inflate and deflate a virtio-balloon, watching the guest's and the host's view.

    Phases: booted; the guest touches ``touch_mb`` MiB (host RSS grows); inflate to
    ``low_mb`` (guest MemTotal drops; RSS drops because QEMU discards the pages the
    guest hands over); deflate (MemTotal comes back, RSS does not until the guest
    touches the memory again); touch again. One row per sample.
    """
    low_mb = low_mb or memory // 2
    touch_mb = touch_mb or int(memory * 0.55)
    rows = Rows("balloon")
    plan(progress, 4 if quick else 5)          # boot, touch, inflate, deflate (, touch again)
    with rows.guard(), VM(accel="tcg", name="balloon", memory=memory, balloon=True, image=image) as vm:
        advance(progress)
        w = where_vm(vm)
        t0 = time.monotonic()

        def rec(phase: str) -> Callable[[Sample], None]:
            def add(s: Sample) -> None:
                rows.add(**w, phase=phase, memory_mb=memory, **s)
            return add

        rec("booted")(sample(vm, t0, target_mb=memory))
        say(progress, f"guest touches {touch_mb} MiB, then frees it")
        touch(vm, touch_mb)
        rec(f"touched {touch_mb} MiB")(sample(vm, t0, target_mb=memory))
        advance(progress)
        say(progress, f"inflating the balloon: guest memory {memory} -> {low_mb} MiB")
        set_balloon(vm, low_mb, on_sample=rec(f"inflate to {low_mb} MiB"), t0=t0)
        time.sleep(0.5)
        rec(f"inflated to {low_mb} MiB")(sample(vm, t0, target_mb=low_mb))
        advance(progress)
        say(progress, f"deflating: guest memory back to {memory} MiB")
        set_balloon(vm, memory, on_sample=rec(f"deflate to {memory} MiB"), t0=t0)
        time.sleep(0.5)
        rec(f"deflated to {memory} MiB")(sample(vm, t0, target_mb=memory))
        advance(progress)
        if not quick:
            touch(vm, touch_mb)
            rec(f"touched {touch_mb} MiB again")(sample(vm, t0, target_mb=memory))
            advance(progress)
    return rows.frame()


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """The last sample of each phase (a readable table of the experiment)."""
    cols = ["phase", "t", "target_mb", "balloon_actual_mb", "guest_total_mb", "guest_available_mb", "qemu_rss_mb"]
    return df.groupby("phase", sort=False).tail(1)[[c for c in cols if c in df]].reset_index(drop=True)


def plot(df: pd.DataFrame, ax: Any = None) -> Any:
    """Guest MemTotal / MemAvailable, the balloon target and QEMU's RSS over time."""
    ax = axes(ax, figsize=(9, 4))
    ax.plot(df.t, df.guest_total_mb, color=OKABE_ITO[4], marker="o", ms=3, label="guest MemTotal")
    ax.plot(df.t, df.guest_available_mb, color=OKABE_ITO[1], ls="--", marker="o", ms=3, label="guest MemAvailable")
    if "target_mb" in df:
        ax.step(df.t, df.target_mb, where="post", color="#555555", lw=1, ls=":", label="balloon target")
    ax.plot(df.t, df.qemu_rss_mb, color=OKABE_ITO[5], marker="s", ms=3, label="host: QEMU RSS")
    ax.legend(fontsize=8, loc="best")
    style(ax, title="Memory balloon: the guest's view and the host's", xlabel="time (s)",
          ylabel="memory (MiB)", source=where_label(df))
    return ax
