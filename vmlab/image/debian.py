"""Debian's kernel package: version comparison, which package, download (no root needed).

The kernel is the generic ``linux-image-<ver>-amd64`` that the newest ``linux-image-amd64``
meta-package depends on (``apt-cache show``), fetched with ``apt-get download`` into
``cache_dir()/downloads``. The answer of apt is remembered until apt's lists change.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import ImageError, SetupError
from ..tools import find_tool, need_tool, run_tool, tail
from .util import Progress, log, rmtree, say, write_json

KERNEL_META_PACKAGE = "linux-image-amd64"

_FIX_APT = ("run `apt-get update` (as root) so apt knows the kernel packages, or set "
            "VMLAB_KERNEL to a kernel file (and VMLAB_KERNEL_MODULES to its modules dir)")


# --------------------------------------------------------------------------- versions
def _order(c: str) -> int:
    """dpkg's character order: ``~`` first, then letters, then everything else."""
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


_NON_DIGITS = re.compile(r"\D*")
_DIGITS = re.compile(r"\d*")


def _lead(rx: re.Pattern[str], s: str) -> str:
    m = rx.match(s)
    return m.group() if m else ""


def _cmp_part(a: str, b: str) -> int:
    """Compare two upstream (or revision) strings as dpkg does: alternating non-digit and
    digit runs; non-digits by :func:`_order`, digits numerically."""
    while a or b:
        na, nb = _lead(_NON_DIGITS, a), _lead(_NON_DIGITS, b)
        a, b = a[len(na):], b[len(nb):]
        for i in range(max(len(na), len(nb))):
            oa = _order(na[i]) if i < len(na) else 0
            ob = _order(nb[i]) if i < len(nb) else 0
            if oa != ob:
                return -1 if oa < ob else 1
        da, db = _lead(_DIGITS, a), _lead(_DIGITS, b)
        a, b = a[len(da):], b[len(db):]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return -1 if ia < ib else 1
    return 0


def version_compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` is older than, equal to or newer than ``b``
    (``[epoch:]upstream[-revision]``, the rules of ``dpkg --compare-versions``)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


# --------------------------------------------------------------------------- which package
def apt_stamp() -> list[list[object]]:
    """Cheap fingerprint of apt's package lists (changes after apt-get update)."""
    stamp: list[list[object]] = []
    for d in ("/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        try:
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                if e.is_file():
                    st = e.stat()
                    stamp.append([e.path, st.st_size, st.st_mtime_ns])
        except OSError:
            pass
    for f in ("/etc/apt/sources.list", "/etc/apt/preferences"):
        with contextlib.suppress(OSError):
            st = os.stat(f)
            stamp.append([f, st.st_size, st.st_mtime_ns])
    return stamp


def resolve_package(downloads: Path) -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 depends on; cached."""
    cache_file = downloads / "apt-resolve.json"
    stamp = apt_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        c = json.loads(cache_file.read_text())
        if c["stamp"] == stamp and c["package"] and c["version"]:
            return c["package"], c["version"]
    apt_cache = find_tool("apt-cache")
    if not apt_cache:
        raise SetupError("apt-cache is not available, so the Debian kernel cannot be found",
                         fix="set VMLAB_KERNEL to a kernel file (vmlinuz or vmlinux) and "
                             "VMLAB_KERNEL_MODULES to its /lib/modules/<version> directory")
    try:      # not run_tool: a non-zero exit with some stanzas is still an answer
        proc = subprocess.run([apt_cache, "show", KERNEL_META_PACKAGE], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"apt-cache show {KERNEL_META_PACKAGE} failed: {exc}", fix=_FIX_APT) from exc
    best = newest_generic_kernel(proc.stdout.decode(errors="replace"))
    if best is None:
        err = tail(proc.stderr.decode(errors="replace"), 3)
        raise ImageError(
            f"apt knows no {KERNEL_META_PACKAGE} package depending on a generic "
            f"linux-image-<version>-amd64 kernel" + (f" ({err})" if err else ""), fix=_FIX_APT)
    try:
        write_json(cache_file, {"stamp": stamp, "package": best[0], "version": best[1]})
    except OSError as exc:
        log.debug("cannot remember apt's answer in %s: %s", cache_file, exc)
    return best


def newest_generic_kernel(apt_show: str) -> Optional[tuple[str, str]]:
    """From ``apt-cache show linux-image-amd64`` output: (package, version) of the kernel the
    newest stanza depends on, skipping -cloud- and -rt- flavours; None if there is none."""
    best: Optional[tuple[str, str]] = None
    best_meta = ""
    for stanza in apt_show.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+):\s*(.*)$", stanza, re.M))
        dep = fields.get("Depends", "")
        m = re.search(r"(linux-image-[0-9][^\s,(]*-amd64)\s*\(\s*=\s*([^)\s]+)\s*\)", dep)
        if not m or "-cloud-" in m.group(1) or "-rt-" in m.group(1):
            continue
        meta = fields.get("Version", "0")
        if best is None or version_compare(meta, best_meta) > 0:
            best, best_meta = (m.group(1), m.group(2)), meta
    return best


# --------------------------------------------------------------------------- download
def find_deb(downloads: Path, package: str, version: str, arch: str = "amd64") -> Optional[Path]:
    """The already downloaded .deb of ``package`` ``version``, or None."""
    ver = version.replace(":", "%3a")
    p = downloads / f"{package}_{ver}_{arch}.deb"
    return p if p.is_file() else None


def download_deb(downloads: Path, package: str, version: str, progress: Progress, *, arch: str = "amd64",
                 size: str = "about 70 MB") -> Path:
    """``apt-get download package=version`` into ``downloads`` (once; 0600)."""
    existing = find_deb(downloads, package, version, arch)
    if existing:
        return existing
    apt_get = need_tool("apt-get", needed_for="to download the guest kernel")
    say(progress, f"downloading {package} {version} ({size}) into {downloads}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))
    try:
        run_tool([apt_get, "download", f"{package}={version}"], cwd=tmp,
                 what=f"downloading {package}", error=ImageError, timeout=1800,
                 fix="check the network and run `apt-get update` (as root); or set VMLAB_KERNEL "
                     "to a kernel file you already have")
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} produced no .deb file",
                             fix="run `apt-get update` (as root) and try again")
        final = downloads / debs[0].name
        os.chmod(debs[0], 0o600)
        os.replace(debs[0], final)
        return final
    finally:
        rmtree(tmp)
