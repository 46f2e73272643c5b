"""Thin provisioning and overlays: the experiments of the virtual-disk lesson (``01.01``).

    from vmlab.experiments import thin
    df = thin.run(quick=True)            # qcow2 and raw: host allocation after each step the guest writes
    thin.plot(df)
    thin.measure_overlay(8)              # a golden base, a qcow2 overlay, a guest writing to it

Both boot a real guest; the disk tools themselves are in :mod:`vmlab.disks`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Sequence

from ..disks import MiB, PathLike, allocated_bytes, check, create_image, create_overlay, info, sha256
from ..errors import SpecError
from ..hostinfo import where
from ..measure import Progress, Rows, say
from ..plots import OKABE_ITO, axes, style, where_label
from ..spec import Disk, parse_size
from ..vm import VM

if TYPE_CHECKING:
    import pandas as pd

    from ..image import GuestImage

FORMATS = ("qcow2", "raw")


def _where_rows(name: str, vm: VM) -> Rows:
    return Rows(name, where(vm.accel or "tcg", vm.kernel_release))


@contextlib.contextmanager
def _workdir(directory: Optional[PathLike]) -> Iterator[Path]:
    if directory is not None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        yield d
        return
    d = Path(tempfile.mkdtemp(prefix="vmlab-disks-"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure_thin_provisioning(total_mib: int = 64, step_mib: int = 8, *, virtual_size: str = "256M",
                              fmt: str = "qcow2", directory: Optional[PathLike] = None,
                              image: Optional[GuestImage] = None, progress: Progress = None) -> pd.DataFrame:
    """Boot a guest with an empty ``fmt`` disk, write ``step_mib`` MiB at a time
    (``dd ... oflag=direct`` to the raw device), and record the image's host
    allocation after each step.

    Returns a DataFrame: ``written_mib`` (guest), ``allocated_mib`` (host,
    ``actual-size``), ``virtual_mib`` (the guest's disk size), ``format``,
    ``write_s`` (guest dd wall time), plus where-it-ran columns.
    """
    if not (0 < step_mib <= total_mib):
        raise SpecError("step_mib", f"{step_mib} must be between 1 and total_mib ({total_mib})", fix="e.g. 8")
    if total_mib * MiB > parse_size(virtual_size, "virtual_size"):
        raise SpecError("total_mib", f"{total_mib} MiB does not fit in a {virtual_size} disk",
                        fix="write less, or make the disk bigger")
    with _workdir(directory) as d:
        path = create_image(d / f"thin.{fmt}", virtual_size, fmt)
        with VM(accel="tcg", name="thin", image=image, disks=[Disk(path=path, cache="none")], warm=True) as vm:
            rows = _where_rows("thin-provisioning", vm)
            with rows.guard():
                i0 = info(path)
                rows.add(format=fmt, written_mib=0, allocated_mib=i0["actual_size"] / MiB,
                         virtual_mib=i0["virtual_size"] / MiB, write_s=0.0)
                written = 0
                while written < total_mib:
                    n = min(step_mib, total_mib - written)
                    r = vm.run(f"dd if=/dev/urandom of=/dev/vda bs=1M count={n} seek={written} "
                               f"oflag=direct conv=notrunc 2>/dev/null", timeout=120)
                    written += n
                    i = info(path)
                    rows.add(format=fmt, written_mib=written, allocated_mib=i["actual_size"] / MiB,
                             virtual_mib=i["virtual_size"] / MiB, write_s=r.wall_s)
                    say(progress, f"{fmt}: wrote {written} MiB, host allocation {i['actual_size'] / MiB:.1f} MiB")
        return rows.frame()


def run(quick: bool = False, progress: Progress = None, *, formats: Sequence[str] = FORMATS,
        total_mib: Optional[int] = None, step_mib: Optional[int] = None, virtual_size: str = "256M",
        directory: Optional[PathLike] = None, image: Optional[GuestImage] = None) -> pd.DataFrame:
    """:func:`measure_thin_provisioning` for each format (quick: 32 MiB in 8 MiB steps, else 128 in 16)."""
    import pandas as pd
    total = total_mib or (32 if quick else 128)
    step = step_mib or (8 if quick else 16)
    frames = [measure_thin_provisioning(total, step, virtual_size=virtual_size, fmt=f, image=image,
                                        directory=Path(directory) / f"thin-{f}" if directory is not None else None,
                                        progress=progress)
              for f in formats]
    return pd.concat(frames, ignore_index=True)


def measure_overlay(write_mib: int = 8, *, base_size: str = "64M", directory: Optional[PathLike] = None,
                    image: Optional[GuestImage] = None, progress: Progress = None) -> Dict[str, Any]:
    """A golden base image, a qcow2 overlay over it, a guest that writes to the overlay.

    Returns the base's hash before and after (unchanged), the overlay's
    allocation before and after the write, and what the guest reads back.
    """
    with _workdir(directory) as d:
        base = create_image(d / "golden.qcow2", base_size, "qcow2")
        # put a recognisable pattern in the base, with a VM, then seal it
        with VM(accel="tcg", name="golden", image=image, disks=[Disk(path=base)], warm=True) as vm:
            vm.run("printf 'GOLDEN-BASE' | dd of=/dev/vda bs=512 seek=0 conv=notrunc 2>/dev/null; sync")
        before = sha256(base)
        top = create_overlay(base, d / "throwaway.qcow2")
        top_before = allocated_bytes(top)
        with VM(accel="tcg", name="overlay", image=image, disks=[Disk(path=top)], warm=True) as vm:
            seen = vm.run("dd if=/dev/vda bs=11 count=1 2>/dev/null").stdout
            vm.run(f"dd if=/dev/urandom of=/dev/vda bs=1M count={write_mib} seek=1 oflag=direct 2>/dev/null")
            vm.run("printf 'CHANGED-BY-VM' | dd of=/dev/vda bs=512 seek=0 conv=notrunc oflag=direct 2>/dev/null")
            after_read = vm.run("dd if=/dev/vda bs=13 count=1 2>/dev/null").stdout
            say(progress, f"overlay: the guest wrote {write_mib} MiB")
        out = {"base_sha256_before": before, "base_sha256_after": sha256(base),
               "base_unchanged": before == sha256(base),
               "guest_saw_base_data": seen, "guest_read_after_write": after_read,
               "overlay_bytes_before": top_before, "overlay_bytes_after": allocated_bytes(top),
               "base_bytes": allocated_bytes(base), "overlay_backing": info(top)["backing"],
               "overlay_check": check(top)["ok"], "write_mib": write_mib}
        return out


def plot(df: pd.DataFrame, ax: Any = None) -> Any:
    """Host allocation vs bytes the guest wrote, one line per format, with the virtual size."""
    ax = axes(ax, figsize=(6, 3.6))
    looks = {"qcow2": (OKABE_ITO[4], "o", "-"), "raw": (OKABE_ITO[0], "s", "--")}
    for k, (fmt, g) in enumerate(df.groupby("format")):
        g = g.sort_values("written_mib")
        color, marker, line = looks.get(fmt, (OKABE_ITO[(2 + k) % 8], "^", "-."))
        ax.plot(g["written_mib"], g["allocated_mib"], marker=marker, linestyle=line, color=color,
                markerfacecolor="none" if fmt == "raw" else color, label=f"{fmt}: allocated on the host")
    vmax = float(df["virtual_mib"].max())
    ax.axhline(vmax, color=OKABE_ITO[5], linestyle=":", linewidth=2, label=f"virtual size ({vmax:.0f} MiB)")
    top = float(df["written_mib"].max())
    ax.plot([0, top], [0, top], color="#999999", linewidth=6, alpha=0.3, label="allocated = written")
    ax.legend(fontsize=8, loc="center right")
    return style(ax, title="Thin provisioning: the image grows as the guest writes",
                 xlabel="MiB written by the guest", ylabel="MiB allocated on the host",
                 source=where_label(df))
