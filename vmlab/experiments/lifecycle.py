"""Booting and shutting down from both sides: the event timeline of each path,
how long it takes, and whether data written but not synced survives.

The six paths (``action`` column):

==============  ===============================================  ====================
action          how                                              side
==============  ===============================================  ====================
paused_boot     ``start(paused=True)`` then ``resume(wait=True)``  hypervisor boots it
guest_reboot    ``reboot`` run in the guest                        guest
power_button    ``vm.powerdown()`` (ACPI power button)             hypervisor asks
guest_poweroff  ``poweroff`` run in the guest                      guest
quit            ``vm.quit()`` (QMP quit: QEMU exits at once)       hypervisor, plug pulled
kill            ``vm.kill()`` (SIGKILL to QEMU)                    host OS, plug pulled
==============  ===============================================  ====================

For every path but ``paused_boot`` the guest has an ext4 data disk mounted
with ``commit=60`` and the kernel's writeback delayed to 60 s, writes a small
file *without* ``sync``, and then the action happens. ``data_kept`` says
whether the file is on the disk afterwards (read from the host with
``debugfs``; in full mode also by re-attaching the disk to a new VM).
``fs_after`` is what ``e2fsck -n`` says right after, before anything
replays the journal; ``qcow2_ok`` is ``qemu-img check`` of a second, qcow2,
disk the guest was writing to.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .. import disks
from ..errors import GuestError, SpecError, VMError
from ..hostinfo import where
from ..image import ensure_image
from ..measure import Progress, Rows, advance, plan, say, stats
from ..plots import OKABE_ITO, axes, style, where_label
from ..spec import Disk, MachineSpec
from ..vm import VM

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

ACTIONS = ("paused_boot", "guest_reboot", "power_button", "guest_poweroff", "quit", "kill")
GRACEFUL = {"guest_reboot", "power_button", "guest_poweroff"}
SIDE = {"paused_boot": "hypervisor", "guest_reboot": "guest", "power_button": "hypervisor",
        "guest_poweroff": "guest", "quit": "hypervisor", "kill": "host OS"}
NOTE = "precious data, written without sync\n"
# the guest's page cache keeps dirty data for 60 s and ext4 commits its journal every 60 s
DELAY_WRITEBACK = ("echo 6000 > /proc/sys/vm/dirty_expire_centisecs; "
                   "echo 6000 > /proc/sys/vm/dirty_writeback_centisecs")


def ordered(events: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Events in the order they happened. vmlab sees QEMU's exit (EXIT, from the
    process) and the QMP/agent streams on separate channels, so a SHUTDOWN or
    GUEST_BYE that QEMU or the guest sent *before* exiting is sometimes read
    just after EXIT. Nothing can come from a process after it exited, so such
    events are put back before EXIT (marked ``late``; their ``t_s`` stays the time
    vmlab read them)."""
    out = list(events)
    ix = next((i for i, e in enumerate(out) if e["event"] == "EXIT"), None)
    if ix is not None and ix < len(out) - 1:
        out = out[:ix] + [dict(e, late=True) for e in out[ix + 1:]] + [out[ix]]
    # likewise QEMU's POWERDOWN (sent as it presses the button) can be read after the
    # guest agent's GUEST_BYE that the button press caused
    for i, e in enumerate(out):
        if e["event"] == "POWERDOWN":
            j = next((k for k in range(i) if out[k]["event"] == "GUEST_BYE"
                      and "power button" in str((out[k].get("data") or {}).get("reason", ""))), None)
            if j is not None:
                out.insert(j, dict(out.pop(i), late=True))
            break
    return out


def _names(events: Sequence[Dict[str, Any]]) -> str:
    """'A > B > RESET x3 > C': event names in order, a run of the same event counted."""
    out: List[List[Any]] = []
    for e in events:
        if out and out[-1][0] == e["event"]:
            out[-1][1] += 1
        else:
            out.append([e["event"], 1])
    return " > ".join(n if k == 1 else f"{n} x{k}" for n, k in out)


def event_names(events_string: str) -> List[str]:
    """The distinct steps of an ``events`` string, without the 'xN' counts."""
    return [w.split(" x")[0] for w in events_string.split(" > ")] if events_string else []


def _timeline(events: Sequence[Dict[str, Any]], t0_wall: float) -> List[Dict[str, Any]]:
    out = []
    for e in events:
        data = e.get("data") or {}
        detail = data.get("reason") or data.get("action") or ""
        if e["event"] == "EXIT":
            detail = f"exit status {data.get('exit_code')}"
        t = round(e["wall"] - t0_wall, 4)
        if e.get("late"):
            detail = f"{detail} (read late, at {t:.3f} s)".strip()
        out.append({"event": e["event"], "t_s": t, "source": e["source"], "detail": str(detail), "late": bool(e.get("late"))})
    # an event read late happened no later than the event after it: place it there
    for i in range(len(out) - 2, -1, -1):
        if out[i]["late"] and out[i]["t_s"] > out[i + 1]["t_s"]:
            out[i]["t_s"] = out[i + 1]["t_s"]
    for e in out:
        del e["late"]
    return out


def _fs_state(res: Dict[str, Any]) -> str:
    if "skipping journal recovery" in res["output"] or "needs_recovery" in res["output"]:
        return "journal needs replay" if res["ok"] else "errors"
    return "clean" if res["ok"] else "errors"


def prepare_disks(work: Path, tag: str):
    """An empty 32 MiB ext4 data disk (raw) and a 64 MiB qcow2 scratch disk in ``work``."""
    data = disks.make_ext4(work / f"{tag}-data.ext4", "32M", label="data")
    scratch = disks.create_image(work / f"{tag}-scratch.qcow2", "64M", "qcow2")
    return data, scratch


def data_spec(data: Path, scratch: Path, name: str):
    """The lesson guest with the two disks attached (vda: ext4 data, vdb: qcow2 scratch)."""
    return MachineSpec(name=name, accel="tcg", modules=("ext4",),
                       disks=(Disk(path=data, format="raw"), Disk(path=scratch, format="qcow2")))


def write_unsynced(vm: VM) -> None:
    """Mount the data disk with delayed writeback and write ``NOTE`` to /data/note.txt without sync
    (plus 1 MiB, buffered, to the qcow2 scratch disk)."""
    vm.run(DELAY_WRITEBACK + "; mkdir -p /data; mount -t ext4 -o commit=60 /dev/vda /data", timeout=180)
    vm.write_file("/tmp/note", NOTE)
    # cp, not the agent's put: the agent fsyncs what it writes
    vm.run("cp /tmp/note /data/note.txt; dd if=/dev/zero of=/dev/vdb bs=64k count=16 2>/dev/null", timeout=180)


def read_back_in_vm(data: Path, image: Optional[GuestImage] = None) -> Optional[str]:
    """Re-attach the data disk to a new VM (the mount replays ext4's journal) and read the note."""
    with VM(accel="tcg", name="readback", image=image, modules=("ext4",),
            disks=[Disk(path=data, format="raw")], warm=True) as vm:
        vm.run("mkdir -p /data; mount -t ext4 /dev/vda /data")
        r = vm.run("cat /data/note.txt", check=False)
        vm.powerdown()
        vm.wait_exit(60)
    return r.stdout if r.status == 0 else None


def run_action(action: str, *, image: Optional[GuestImage] = None, workdir: Optional[Path] = None,
               verify_in_vm: bool = False) -> Dict[str, Any]:
    """Do one lifecycle path on a fresh VM; returns the row (and the timeline)."""
    if action not in ACTIONS:
        raise SpecError("action", f"unknown action {action!r}", fix="one of: " + ", ".join(ACTIONS))
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="vmlab-life-")) if workdir is None else Path(workdir)
    try:
        data, scratch = prepare_disks(work, action)
        if action == "paused_boot":      # nothing to keep: the plain lesson guest
            vm = VM(MachineSpec(name="paused-boot", accel="tcg"), image=image)
        else:
            vm = VM(data_spec(data, scratch, action.replace("_", "-")), image=image, warm=True)
        row: Dict[str, Any] = {"action": action, "side": SIDE[action]}
        try:
            if action == "paused_boot":
                vm.start(paused=True)
                row["status_before"] = vm.status()
                since = 0
                t0 = vm.events[0]["wall"]          # LAUNCH
                t_act = time.time()
                vm.resume(wait=True)
                end = vm.wait_event("READY", timeout=90)
                row["seconds"] = end["wall"] - t_act
                row["status_after"] = vm.status()
                t0 = min(t0, t_act)
            else:
                vm.start()
                row["boot_s"] = vm.boot_seconds
                write_unsynced(vm)
                since = len(vm.events)
                t_act = t0 = time.time()
                if action == "guest_reboot":
                    with contextlib.suppress(GuestError, VMError):
                        vm.run("reboot", check=False, timeout=10)
                    vm.wait_event("RESET", since=since, timeout=60)
                    vm.wait_ready(90)
                    end = vm.events[-1]
                    row["seconds"] = end["wall"] - t_act
                    r = vm.run("mkdir -p /data; mount -t ext4 /dev/vda /data && cat /data/note.txt",
                               check=False)
                    row["data_kept_vm"] = r.status == 0 and r.stdout == NOTE
                    vm.run("umount /data", check=False)
                elif action == "guest_poweroff":
                    with contextlib.suppress(GuestError, VMError):
                        vm.run("poweroff", check=False, timeout=10)
                    vm.wait_exit(60)
                elif action == "power_button":
                    vm.powerdown()
                    vm.wait_exit(60)
                elif action == "quit":
                    vm.quit()
                elif action == "kill":
                    vm.kill()
                if action != "guest_reboot":
                    end = vm.wait_event("EXIT", since=since, timeout=30)
                    row["seconds"] = end["wall"] - t_act
            kernel = vm.kernel_release
            events = ordered(vm.events[since:])
            if action in ("guest_reboot", "guest_poweroff"):   # the host typed the command in the guest
                word = action.split("_")[1]
                events.insert(0, {"event": "ACTION", "data": {"action": f"{word} (run in the guest)"},
                                  "source": "vmlab", "wall": t_act, "t": None})
        finally:
            vm.shutdown()
        shut = [e for e in events if e["event"] == "SHUTDOWN"]
        row["events"] = _names(events)
        row["shutdown_reason"] = shut[0]["data"].get("reason", "") if shut else ""
        ex = [e for e in events if e["event"] == "EXIT"]
        row["exit_code"] = ex[0]["data"].get("exit_code") if ex else None
        row["timeline"] = json.dumps(_timeline(events, t0))
        if action != "paused_boot":
            fs = disks.fsck_ext4(data)
            row["fs_after"] = _fs_state(fs)
            row["data_kept"] = disks.ext4_read(data, "/note.txt") == NOTE.encode()
            row["qcow2_ok"] = bool(disks.check(scratch)["ok"])
            if verify_in_vm and action != "guest_reboot":
                row["data_kept_vm"] = read_back_in_vm(data, image) == NOTE
                row["fs_after_replay"] = _fs_state(disks.fsck_ext4(data))
        row["_where"] = where(vm.accel or "tcg", kernel)
        return row
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False, progress: Progress = None, *, repeats: Optional[int] = None,
        actions: Sequence[str] = ACTIONS, verify_in_vm: Optional[bool] = None, image: Optional[GuestImage] = None) -> pd.DataFrame:
    """Every lifecycle path on a fresh VM, ``repeats`` times each (quick: once,
    no re-attach check). One row per action x repeat."""
    reps = repeats if repeats is not None else (1 if quick else 3)
    if not isinstance(reps, int) or reps < 1:
        raise SpecError("repeats", f"{reps!r} is not a positive whole number", fix="e.g. repeats=3")
    for a in actions:
        if a not in ACTIONS:
            raise SpecError("actions", f"unknown action {a!r}", fix="some of: " + ", ".join(ACTIONS))
    verify = (not quick) if verify_in_vm is None else verify_in_vm
    image = image or ensure_image()
    rows = Rows("lifecycle")
    with rows.guard(), tempfile.TemporaryDirectory(prefix="vmlab-life-") as tmp:
        plan(progress, reps * len(actions))
        for rep in range(reps):
            for a in actions:
                say(progress, f"lifecycle: {a} (repeat {rep + 1}/{reps})")
                row = run_action(a, image=image, workdir=Path(tmp), verify_in_vm=verify)
                where = row.pop("_where")
                if not rows.where:
                    rows.where = where
                rows.add(repeat=rep, **row)
                for f in Path(tmp).iterdir():
                    f.unlink()
                advance(progress)
    df = rows.frame()
    first = ["action", "events", "seconds", "data_kept"]
    return df[[c for c in first if c in df] + [c for c in df.columns if c not in first]]


# ------------------------------------------------------------------ views
def events_frame(df: Any):
    """One row per event: action, repeat, event, t_s (since the action), source, detail."""
    import pandas as pd
    out = []
    for _, r in df.iterrows():
        for e in json.loads(r["timeline"]):
            out.append({"action": r["action"], "repeat": r.get("repeat", 0), **e})
    return pd.DataFrame(out)


def summary(df: Any):
    """Median seconds per action, the usual event sequence, and how often data was kept."""
    import pandas as pd
    out = []
    for a in [x for x in ACTIONS if x in set(df["action"])]:
        g = df[df["action"] == a]
        s = stats(g["seconds"])
        kept = g["data_kept"].dropna() if "data_kept" in g else pd.Series(dtype=object)
        out.append({"action": a, "side": SIDE[a], "events": g["events"].mode().iloc[0],
                    "seconds_median": s["median"], "seconds_min": s["min"], "seconds_max": s["max"], "n": s["n"],
                    "data_kept": f"{int(kept.astype(bool).sum())}/{len(kept)}" if len(kept) else "n/a"})
    return pd.DataFrame(out)


EVENT_COLORS = {"ACTION": "#000000", "LAUNCH": "#999999", "RESUME": "#009E73", "STOP": "#F0E442",
                "READY": "#0072B2", "RESET": "#CC79A7", "POWERDOWN": "#E69F00", "GUEST_BYE": "#56B4E9",
                "SHUTDOWN": "#D55E00", "EXIT": "#000000"}
EVENT_MARKERS = {"ACTION": "s", "LAUNCH": "^", "RESUME": ">", "STOP": "<", "READY": "*", "RESET": "D",
                 "POWERDOWN": "P", "GUEST_BYE": "o", "SHUTDOWN": "v", "EXIT": "X"}


def plot_timeline(df: Any, ax: Any = None, repeat: int = 0, source: Optional[str] = None) -> Any:
    """Each action's events on a time axis (seconds after the action, symlog),
    one lane per action, one marker shape and colour per event kind."""
    ev = events_frame(df)
    if "repeat" in ev:
        ev = ev[ev["repeat"] == repeat]
    acts = [a for a in ACTIONS if a in set(ev["action"])]
    ax = axes(ax, figsize=(7.5, 0.55 * len(acts) + 1.6))
    seen = set()
    for y, a in enumerate(acts):
        g = ev[ev["action"] == a]
        ax.plot([0, max(g["t_s"].max(), 1e-3)], [y, y], color="#cccccc", zorder=1)
        for k, (_, e) in enumerate(g.iterrows()):
            name = e["event"]
            label = name if name not in seen else None
            seen.add(name)
            ax.scatter(max(e["t_s"], 0), y, marker=EVENT_MARKERS.get(name, "o"), s=110 if name == "READY" else 60,
                       zorder=3,
                       color=EVENT_COLORS.get(name, OKABE_ITO[k % 8]), label=label, edgecolor="white")
    ax.set_yticks(range(len(acts)))
    ax.set_yticklabels(acts)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(-0.0005, max(float(ev["t_s"].max()), 0.01) * 1.6)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False)
    return style(ax, title="What happens after each action (event timeline)",
                 xlabel="seconds after the action (symlog scale)",
                 source=source if source is not None else where_label(df))


def plot_durations(df: Any, ax: Any = None) -> Any:
    """Seconds from each action to its end (READY or QEMU's exit), log scale, one dot per repeat."""
    acts = [a for a in ACTIONS if a in set(df["action"])]
    ax = axes(ax, figsize=(6.5, 3.2))
    colors = {"guest": OKABE_ITO[1], "hypervisor": OKABE_ITO[4], "host OS": OKABE_ITO[5]}
    labelled = set()
    for y, a in enumerate(acts):
        g = df[df["action"] == a]
        side = SIDE[a]
        ax.scatter(g["seconds"], [y] * len(g), color=colors[side], s=40, zorder=3,
                   label=None if side in labelled else f"done by the {side}")
        labelled.add(side)
    ax.legend(fontsize=8)
    ax.set_yticks(range(len(acts)))
    ax.set_yticklabels(acts)
    ax.invert_yaxis()
    return style(ax, title="How long each path takes", xlabel="seconds from the action to its end (log)",
                 log="x", source=where_label(df))
