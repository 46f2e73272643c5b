"""Small helpers of the image builder: progress, hashing, the guest sources dir, cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config import atomic_write
from ..log import get_logger

log = get_logger("vmlab.image")

#: where ``init``, ``modules.txt`` and the guest tools' C sources are (the package's guest/)
DEFAULT_GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"

Progress = Optional[Callable[[str], None]]


def say(progress: Progress, message: str) -> None:
    """Report a build step to ``progress`` (if any) and to the debug log."""
    log.debug("%s", message)
    if progress is not None:
        progress(message)


def resolve_guest_dir(given: Optional[Path] = None) -> Path:
    """``given`` or the package's guest sources directory."""
    return Path(given) if given else DEFAULT_GUEST_DIR


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as sorted, indented JSON, atomically, mode 0600."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600)


def cached_sha256(path: Path, cache_file: Path) -> str:
    """sha256 of ``path``, remembered in ``cache_file`` keyed by (size, mtime)."""
    st = path.stat()
    ident = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(ident)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[ident] = {"stamp": stamp, "sha256": digest}
    try:
        write_json(cache_file, cache)
    except OSError as exc:          # only a speed-up: the next call hashes again
        log.debug("cannot remember the hash of %s in %s: %s", path, cache_file, exc)
    return digest


def prune_builds(root: Path, keep: int) -> None:
    """Remove all but the *keep* newest builds in *root* (``<key>/build.json`` dirs) and their ``build-<key>.log``."""
    built = sorted((d for d in root.iterdir() if d.is_dir() and (d / "build.json").is_file()),
                   key=lambda d: (d / "build.json").stat().st_mtime, reverse=True)
    for d in built[keep:]:
        rmtree(d)
        (root / f"build-{d.name}.log").unlink(missing_ok=True)


def rmtree(path: Path) -> None:
    """Remove a tree, including read-only directories (as extracted from packages)."""
    def onerror(func: Callable[[str], object], p: str, _exc_info: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError as exc:
            log.debug("cannot remove %s: %s", p, exc)
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def exclusive_lock(directory: Path, progress: Progress, what: str) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively (waiting, with a message naming *what* another process builds)."""
    import fcntl
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(progress, f"another process is building {what}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock
