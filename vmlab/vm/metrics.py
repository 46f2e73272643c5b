"""The host's view of a VM's QEMU process: CPU time and resident memory, from /proc.

For threads, pinning and the memory map see :mod:`vmlab.hostview`.
"""

from __future__ import annotations

from .. import procfs
from .core import VMCore

__all__ = ["MetricsMixin"]


class MetricsMixin(VMCore):
    """Host-side measurements of the QEMU process."""

    def qemu_cpu_seconds(self) -> float:
        """User+system CPU seconds QEMU has used so far (all its threads)."""
        return procfs.process_cpu_seconds(self.pid) if self.pid else 0.0

    def qemu_rss_bytes(self) -> int:
        """Resident memory of the QEMU process now."""
        return procfs.rss_bytes(self.pid) if self.pid else 0
