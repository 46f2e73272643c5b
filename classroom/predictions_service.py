"""The class predictions service: a JupyterHub service that keeps one file per student.

Run by the hub (``c.JupyterHub.services``, see ``jupyterhub_config.py``); it listens on loopback only.

    POST /api/record        a student's kernel sends one prediction (vmlab.predictions_store.save), with the
                            student's own JUPYTERHUB_API_TOKEN. The hub says whose token it is; the record
                            goes to DIR/<that user>.json. A student can only ever write their own file.
    GET  /api/predictions   every student's records, for an instructor only (a name in CLASSROOM_INSTRUCTORS
                            or a hub admin): {"users": {NAME: {"updated": T, "predictions": {...}}}}
    GET  /api/health        "ok" (no data)

Environment (the hub sets the JUPYTERHUB_* ones): JUPYTERHUB_API_TOKEN, JUPYTERHUB_API_URL,
JUPYTERHUB_SERVICE_URL (where to listen), CLASSROOM_PREDICTIONS_DIR (the files; made 0700),
CLASSROOM_INSTRUCTORS (comma-separated hub user names).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from jupyterhub.services.auth import HubAuth
from tornado import ioloop, web

from vmlab.predictions_store import USER_RE, make_record, merge_into_file

#: the largest request body accepted (one record is a few hundred bytes)
MAX_BODY = 16 * 1024


def store_dir() -> Path:
    d = Path(os.environ.get("CLASSROOM_PREDICTIONS_DIR", "predictions"))
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def read_all(directory: Path) -> dict[str, Any]:
    users: dict[str, Any] = {}
    for p in sorted(directory.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        name = p.stem
        if USER_RE.match(name) and isinstance(data, dict):
            users[name] = {"updated": data.get("updated"), "predictions": data.get("predictions") or {}}
    return {"users": users}


class Base(web.RequestHandler):
    auth: HubAuth

    async def caller(self) -> Optional[dict[str, Any]]:
        token = self.auth.get_token(self, in_cookie=False)
        if not token:
            return None
        model = await self.auth.user_for_token(token, sync=False)
        if not model or model.get("kind", "user") != "user":
            return None
        return model

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish({"error": message})


class RecordHandler(Base):
    async def post(self) -> None:
        model = await self.caller()
        if model is None:
            return self.fail(403, "a student's hub token is needed (Authorization: token ...)")
        if len(self.request.body) > MAX_BODY:
            return self.fail(413, f"a record is at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.request.body)
            record = make_record(str(body["question"]), str(body.get("unit", "")), body.get("predicted"),
                                 body.get("measured"), t=None)
        except (ValueError, KeyError, TypeError) as exc:
            return self.fail(400, f"bad record: {exc}")
        try:
            merge_into_file(store_dir(), model["name"], record)
        except ValueError as exc:
            return self.fail(400, str(exc))
        self.finish({"ok": True, "key": record["key"]})


class ReadHandler(Base):
    async def get(self) -> None:
        model = await self.caller()
        instructors = {s.strip() for s in os.environ.get("CLASSROOM_INSTRUCTORS", "").split(",") if s.strip()}
        if model is None or not (model["name"] in instructors or model.get("admin")):
            return self.fail(403, "only an instructor may read the class's predictions")
        self.finish(read_all(store_dir()))


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.finish("ok")


def make_app(auth: HubAuth, prefix: str = "/") -> web.Application:
    Base.auth = auth
    prefix = prefix.rstrip("/")
    return web.Application([(f"{prefix}/api/record", RecordHandler), (f"{prefix}/api/predictions", ReadHandler),
                            (f"{prefix}/api/health", HealthHandler)])


def main() -> int:
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    if url.hostname not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("CLASSROOM_LISTEN_ANY"):
        print(f"refusing to listen on {url.hostname}: loopback only (set CLASSROOM_LISTEN_ANY=1 in a pod)",
              file=sys.stderr)
        return 2
    auth = HubAuth(api_token=os.environ["JUPYTERHUB_API_TOKEN"], api_url=os.environ["JUPYTERHUB_API_URL"],
                   cache_max_age=60)
    store_dir()
    app = make_app(auth, os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/"))
    app.listen(url.port or 80, address="0.0.0.0" if os.environ.get("CLASSROOM_LISTEN_ANY") else url.hostname)
    loop = ioloop.IOLoop.current()

    def stop(_signum: int, _frame: Any) -> None:
        loop.add_callback_from_signal(loop.stop)

    # The hub stops a service with SIGINT, which a process started in the background inherits as ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    loop.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
