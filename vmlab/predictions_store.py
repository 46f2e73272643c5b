"""Record a student's predictions in the class store, on a JupyterHub (docs/classroom.md, docs/instructor.md).

The predict-then-measure widgets call :func:`save` whenever a prediction or its measurement is
recorded. It does nothing at all unless both are set:

- ``JUPYTERHUB_USER`` (set by JupyterHub in every student's server and kernel), and
- ``VMLAB_CLASS_STORE`` (:func:`vmlab.config.class_store`), one of
    * an ``http://`` or ``https://`` URL: the class predictions service (``classroom/predictions_service.py``,
      a JupyterHub service). The record is POSTed with the student's own ``JUPYTERHUB_API_TOKEN``; the
      service takes the student's name from the hub, not from the request, and lets only instructors read.
    * a directory: the record goes to ``DIR/<user>.json`` (mode 0600), one file per student. Use it where
      each student is a separate system user, so file permissions keep students out of each other's files.

Students are named only by their hub user name; nothing else about them is stored, and nothing leaves
the hub. A failure to store is logged (``VMLAB_LOG=debug``) and never raised: a lesson must not break
because the class store is down.

The record of one prediction (what the service and the directory files hold)::

    {"key": "3f2a9c01d4e5", "question": "...", "unit": "s", "predicted": 2.0, "measured": 1.7,
     "t": 1764500000.0}

``key`` is :func:`question_key` of the question text; a student's file is
``{"user": NAME, "updated": T, "predictions": {KEY: RECORD, ...}}`` (the latest record per question).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .config import atomic_write, class_store
from .log import get_logger

__all__ = ["USER_RE", "enabled", "make_record", "merge_into_file", "question_key", "save", "user_file"]

log = get_logger(__name__)

#: hub user names this store accepts as file names (JupyterHub's own names are a subset after escaping)
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

#: seconds a POST to the service may take before the prediction is given up (never blocks a lesson long)
POST_TIMEOUT = 3.0


def question_key(question: str) -> str:
    """12 hex digits identifying a question (sha256 of its text, whitespace-normalised)."""
    return hashlib.sha256(" ".join(question.split()).encode()).hexdigest()[:12]


def _number(x: Any) -> Optional[float]:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def make_record(question: str, unit: str, predicted: Any, measured: Any,
                t: Optional[float] = None) -> dict[str, Any]:
    """One prediction as stored (numbers that are not finite become None)."""
    return {"key": question_key(question), "question": str(question)[:500], "unit": str(unit)[:40],
            "predicted": _number(predicted), "measured": _number(measured),
            "t": time.time() if t is None else float(t)}


def enabled() -> bool:
    """True on a hub with a class store configured (JUPYTERHUB_USER and VMLAB_CLASS_STORE set)."""
    return bool(os.environ.get("JUPYTERHUB_USER")) and class_store() is not None


def user_file(directory: Path, user: str) -> Path:
    """``directory/<user>.json``; ValueError for a name that cannot be a file name."""
    if not USER_RE.match(user):
        raise ValueError(f"{user!r} is not a hub user name this store accepts (letters, digits, . _ @ -)")
    return Path(directory) / f"{user}.json"


def merge_into_file(directory: Path, user: str, record: dict[str, Any]) -> Path:
    """Put ``record`` into the student's file (latest record per question wins), under a lock.

    Used by the directory store and by the predictions service; the file is written atomically, 0600.
    """
    path = user_file(directory, user)
    lock = Path(directory) / f".{user}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("predictions"), dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        preds = data.get("predictions") or {}
        preds[str(record["key"])] = record
        data = {"user": user, "updated": time.time(), "predictions": preds}
        atomic_write(path, json.dumps(data, sort_keys=True), mode=0o600)
    finally:
        os.close(fd)        # releases the lock
    return path


def _post(url: str, record: dict[str, Any]) -> None:
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    req = urllib.request.Request(url.rstrip("/") + "/api/record", data=json.dumps(record).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=POST_TIMEOUT) as resp:
        resp.read()


def save(question: str, unit: str, predicted: Any, measured: Any = None) -> bool:
    """Store the student's current prediction (and measurement, if any). Returns True if stored.

    Does nothing (False) off a hub or without ``VMLAB_CLASS_STORE``; never raises.
    """
    user = os.environ.get("JUPYTERHUB_USER")
    where = class_store()
    if not user or not where:
        return False
    record = make_record(question, unit, predicted, measured)
    try:
        if where.startswith(("http://", "https://")):
            _post(where, record)
        else:
            merge_into_file(Path(where), user, record)
        return True
    except (OSError, ValueError, urllib.error.URLError) as exc:
        log.debug("could not store the prediction of %s in %s: %s", user, where, exc)
        return False
