"""The yardstick: a plain QEMU boot of Debian's kernel to a busybox shell.

``qemu-system-x86_64 -M pc -m 256`` with QEMU's defaults (its VGA card and e1000
NIC, SeaBIOS), PVH-booting Debian's packaged ``vmlinux`` (the kernel issue 18 measured vmlab
against; ``--kernel lesson`` boots the lesson kernel vmlab itself boots by default), with an
initramfs holding only busybox and a two-line ``/init`` that prints a marker
and execs ``sh``. The time is from starting QEMU to the marker line on the
serial console (the shell's first line), kernel log printed as usual (no
``quiet``). vmlab's boot figures are judged as ratios to this, measured in the
same run on the same (possibly loaded) machine.

    .venv/bin/python benchmarks/plainboot.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vmlab import procfs  # noqa: E402
from vmlab.image import ensure_image  # noqa: E402
from vmlab.image.cpio import CpioEntry, write_cpio  # noqa: E402
from vmlab.image.guesttools import find_busybox  # noqa: E402
from vmlab.tools import qemu_binary  # noqa: E402

MARKER = b"PLAINBOOT-SHELL"
INIT = b"#!/bin/sh\n/bin/busybox echo PLAINBOOT-SHELL\nexec /bin/sh\n"


def busybox_initramfs(out: Path) -> Path:
    """An initramfs with busybox, /bin/sh and an /init that prints the marker and runs sh."""
    bb = find_busybox().read_bytes()
    entries = [CpioEntry("bin", stat.S_IFDIR | 0o755), CpioEntry("dev", stat.S_IFDIR | 0o755),
               CpioEntry("proc", stat.S_IFDIR | 0o755),
               CpioEntry("bin/busybox", stat.S_IFREG | 0o755, data=bb),
               CpioEntry("bin/sh", stat.S_IFLNK | 0o777, data=b"busybox"),
               CpioEntry("init", stat.S_IFREG | 0o755, data=INIT),
               CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))]
    write_cpio(None, out, extra=entries)
    return out


def plain_boot_once(kernel: Path, initrd: Path, memory_mb: int = 256, timeout: float = 120.0) -> Tuple[float, float]:
    """Seconds from starting QEMU to the busybox shell's first line on the serial console, and QEMU's CPU
    seconds to then (the boot's work, whatever the host's load)."""
    argv = [qemu_binary(), "-M", "pc", "-accel", "tcg", "-m", str(memory_mb), "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while MARKER not in seen:
            left = timeout - (time.monotonic() - t0)
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"the plain boot printed no {MARKER.decode()} within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the plain QEMU exited (status {proc.wait()}) before the shell ran")
            seen = seen[-64:] + chunk
        return time.monotonic() - t0, procfs.process_cpu_seconds(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class PlainBoot:
    """The yardstick set up once (the kernel of the image of *guest_kernel*, ``debian`` or ``lesson``, and a
    busybox initramfs), booted on demand."""

    def __init__(self, guest_kernel: str = "debian") -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="vmlab-plainboot-")
        self.kernel = ensure_image(guest_kernel=guest_kernel).kernel
        self.initrd = busybox_initramfs(Path(self._dir.name) / "busybox.cpio")
        self.cpu_seconds: List[float] = []

    def boot(self) -> float:
        """One plain boot: its wall seconds (its CPU seconds are appended to ``cpu_seconds``)."""
        wall, cpu = plain_boot_once(self.kernel, self.initrd)
        self.cpu_seconds.append(cpu)
        return wall

    def close(self) -> None:
        self._dir.cleanup()


def plain_boot_seconds(repeats: int = 5, guest_kernel: str = "debian") -> Tuple[List[float], List[float]]:
    """Wall and CPU seconds of ``repeats`` plain boots."""
    pb = PlainBoot(guest_kernel)
    try:
        return [pb.boot() for _ in range(repeats)], pb.cpu_seconds
    finally:
        pb.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernel", choices=("debian", "lesson"), default="debian")
    a = ap.parse_args()
    times, cpu = plain_boot_seconds(a.repeats, a.kernel)
    print(json.dumps({"plain_boot_s": [round(t, 3) for t in times], "median": round(statistics.median(times), 3),
                      "plain_cpu_s": [round(t, 3) for t in cpu], "load_avg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
