"""The class's spawner on one machine: no system accounts, one uid, one home and one cgroup per student.

``ClassroomSpawner`` is JupyterHub's ``SimpleLocalProcessSpawner`` (no ``/etc/passwd`` entry needed) plus what a
class needs on a shared machine:

- **a uid per student** when the hub runs as root: ``uid_base + user id`` (no account is created; Linux needs
  none to run a process). Each home is 0700 and owned by that uid, so a student cannot read another's files,
  and the shared guest image cache, owned by root, really is read-only to them. Not root: every student runs
  as the hub's user (a test set-up only).
- **the course in each home**: ``~/lessons`` is a copy of the lessons (``vmlab.workspace.sync_workspace``:
  a lesson the student edited is kept).
- **a shared, read-only guest image cache**: each student's ``VMLAB_CACHE`` is ``~/.cache/vmlab`` whose
  ``images``, ``downloads`` and ``busybox`` are symbolic links into ``image_cache`` (built once by ``make classroom``),
  so no student rebuilds the image; warm snapshots and KVM verdicts stay per student.
- **per-student limits** from ``mem_limit`` and ``cpu_limit``, enforced with a cgroup per student (v1 memory +
  cpu, or v2 memory.max + cpu.max) where the hub may create cgroups; otherwise the hub logs that the limits are
  not enforced.
- **nothing outlives a stopped server**: after the server stops, every process still in the student's cgroup
  (a QEMU whose kernel died, say) is killed, and how many there were is written to ``STATE/sweeps/USER.json``
  (the load run reports it).

The cgroup paths of a running student are in ``STATE/cgroups/USER.json`` (the load run reads the usage there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets import Bool, Integer, Unicode

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "vmlab-class"


def _own_cgroups() -> dict[str, str]:
    """{controller: path relative to its hierarchy} of this process (v2's unified one under key "")."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _num, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def cgroup_dirs(user: str) -> dict[str, Path]:
    """Where the student's cgroups go: {"memory": dir, "cpu": dir, "cpuacct": dir} (v1) or {"unified": dir} (v2)."""
    own = _own_cgroups()
    if (CGROUP_ROOT / "cgroup.controllers").exists():             # pure v2
        return {"unified": CGROUP_ROOT / own.get("", "/").lstrip("/") / GROUP / user}
    dirs: dict[str, Path] = {}
    for c in ("memory", "cpu", "cpuacct"):
        if (CGROUP_ROOT / c / "cgroup.procs").exists() and c in own:
            dirs[c] = CGROUP_ROOT / c / own[c].lstrip("/") / GROUP / user
    return dirs


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def cgroup_pids(dirs: dict[str, Path]) -> list[int]:
    for d in dirs.values():
        try:
            return [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except OSError:
            continue
    return []


def cgroup_usage(dirs: dict[str, Path]) -> dict[str, Optional[float]]:
    """{"mem_peak_bytes", "mem_now_bytes", "cpu_seconds"} of a student's cgroup (None where not readable)."""
    def read(p: Path) -> Optional[float]:
        try:
            text = p.read_text()
        except OSError:
            return None
        if p.name == "cpu.stat":
            for line in text.splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return None
        return float(text.split()[0])
    if "unified" in dirs:
        d = dirs["unified"]
        return {"mem_peak_bytes": read(d / "memory.peak"), "mem_now_bytes": read(d / "memory.current"),
                "cpu_seconds": read(d / "cpu.stat")}
    out: dict[str, Optional[float]] = {"mem_peak_bytes": None, "mem_now_bytes": None, "cpu_seconds": None}
    if "memory" in dirs:
        out["mem_peak_bytes"] = read(dirs["memory"] / "memory.max_usage_in_bytes")
        out["mem_now_bytes"] = read(dirs["memory"] / "memory.usage_in_bytes")
    if "cpuacct" in dirs:
        ns = read(dirs["cpuacct"] / "cpuacct.usage")
        out["cpu_seconds"] = None if ns is None else ns / 1e9
    return out


def world_searchable(path: Path) -> bool:
    """True if any uid may enter ``path`` (it and every directory above it have the x bit for others)."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def world_runnable(command: str) -> bool:
    """True if any uid may run ``command`` and the interpreter its ``#!`` line names (every directory on the
    way searchable by others, the files executable by others)."""
    def ok(path: Path) -> bool:
        try:
            real = path.resolve(strict=True)
        except OSError:
            return False
        if not real.stat().st_mode & 0o001:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    cmd = Path(shutil.which(command) or command)
    if not ok(cmd):
        return False
    try:
        with open(cmd, "rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    if first.startswith(b"#!"):
        interp = first[2:].split()[0].decode()
        return ok(Path(interp))
    return True


class ClassroomSpawner(SimpleLocalProcessSpawner):
    """SimpleLocalProcessSpawner with a uid, a home with the lessons, a cache and a cgroup per student."""

    state_dir = Unicode(config=True, help="the class's state directory (homes, cgroups, sweeps)")
    image_cache = Unicode("", config=True, help="the shared guest image cache (a VMLAB_CACHE built once)")
    class_store = Unicode("", config=True, help="VMLAB_CLASS_STORE for the students (service URL or directory)")
    lessons_source = Unicode("", config=True, help="the lessons to copy into each home (default: vmlab's)")
    uid_base = Integer(200000, config=True, help="a student's uid is uid_base + their hub user id (as root)")
    separate_uids = Bool(True, config=True, help="as root: run each student under their own uid")
    enforce_limits = Bool(True, config=True, help="put each student in a cgroup with mem_limit and cpu_limit")

    # ------------------------------------------------------------------ identity and home
    @property
    def student_uid(self) -> Optional[int]:
        if os.getuid() != 0 or not self.separate_uids:
            return None
        if not world_runnable(self.cmd[0]):
            self.log.warning("classroom: %s cannot be run by another uid (a directory on its way is not "
                             "world-searchable): %s runs as the hub's user. Run make classroom to build a "
                             "students' venv (build/classroom/venv).", self.cmd[0], self.user.name)
            return None
        import vmlab
        for need in (Path(self.home_dir).parent, Path(vmlab.__file__).parent):
            if not world_searchable(need):
                self.log.warning("classroom: another uid cannot reach %s: %s runs as the hub's user",
                                 need, self.user.name)
                return None
        return int(self.uid_base + self.user.id)

    def _chown_tree(self, path: Path, uid: int) -> None:
        for dirpath, _dirs, files in os.walk(path):
            os.lchown(dirpath, uid, uid)
            for f in files:
                os.lchown(os.path.join(dirpath, f), uid, uid)

    def prepare_home(self) -> None:
        """The student's home: 0700, the lessons, a vmlab cache pointing into the shared image cache."""
        from vmlab.workspace import sync_workspace
        home = Path(self.home_dir)
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        lessons = home / "lessons"
        if self.lessons_source:
            sync_workspace(Path(self.lessons_source), lessons)
        else:
            sync_workspace(workspace=lessons)
        cache = home / ".cache" / "vmlab"
        cache.mkdir(parents=True, exist_ok=True)
        if self.image_cache:
            shared = Path(self.image_cache)
            for name in ("images", "downloads", "busybox"):
                link = cache / name
                if link.is_symlink() or not link.exists():
                    if link.is_symlink():
                        link.unlink()
                    link.symlink_to(shared / name)
            hashes = shared / "hashes.json"
            if hashes.exists() and not (cache / "hashes.json").exists():
                shutil.copy2(hashes, cache / "hashes.json")
        uid = self.student_uid
        if uid is not None:
            self._chown_tree(home, uid)

    # ------------------------------------------------------------------ cgroups
    def _cgroup_record(self) -> Path:
        return Path(self.state_dir) / "cgroups" / f"{self.user.name}.json"

    def make_cgroups(self) -> dict[str, Path]:
        """Create the student's cgroups with the limits; {} (and a warning) where that is not possible."""
        if not self.enforce_limits:
            return {}
        dirs = cgroup_dirs(self.user.name)
        made: dict[str, Path] = {}
        try:
            for kind, d in dirs.items():
                d.mkdir(parents=True, exist_ok=True)
                made[kind] = d
            mem = int(self.mem_limit) if self.mem_limit else None
            cpu = float(self.cpu_limit) if self.cpu_limit else None
            if "unified" in made:
                u = made["unified"]
                with_ctrl = (u.parent / "cgroup.subtree_control")
                _write(with_ctrl, "+memory +cpu")
                if mem:
                    _write(u / "memory.max", str(mem))
                if cpu:
                    _write(u / "cpu.max", f"{int(cpu * 100000)} 100000")
            else:
                if mem and "memory" in made:
                    _write(made["memory"] / "memory.limit_in_bytes", str(mem))
                if cpu and "cpu" in made:
                    _write(made["cpu"] / "cpu.cfs_period_us", "100000")
                    _write(made["cpu"] / "cpu.cfs_quota_us", str(int(cpu * 100000)))
        except OSError as exc:
            self.log.warning("classroom: cannot create cgroups for %s (%s): limits NOT enforced",
                             self.user.name, exc)
            self._remove_cgroups(made)
            return {}
        rec = self._cgroup_record()
        rec.parent.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps({k: str(v) for k, v in made.items()}))
        return made

    def _remove_cgroups(self, dirs: dict[str, Path]) -> None:
        for d in dirs.values():
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)      # the last process is still leaving
            try:
                d.parent.rmdir()         # the class's group, once its last student has left
            except OSError:
                pass
        self._cgroup_record().unlink(missing_ok=True)

    def sweep(self, dirs: dict[str, Path]) -> list[dict[str, Any]]:
        """Kill every process still in the student's cgroup; what was killed."""
        killed: list[dict[str, Any]] = []
        for _round in range(10):
            pids = cgroup_pids(dirs)
            if not pids:
                break
            for pid in pids:
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                if pid not in [k["pid"] for k in killed]:
                    killed.append({"pid": pid, "comm": name})
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return killed

    # ------------------------------------------------------------------ the spawner API
    def make_preexec_fn(self, name: str) -> Any:
        home = self.home_dir
        uid = self.student_uid
        procs = [str(d / "cgroup.procs") for d in getattr(self, "_cgroups", {}).values()]

        def preexec() -> None:
            pid = str(os.getpid())
            for p in procs:                 # join the student's cgroups (before dropping root)
                with open(p, "w") as f:
                    f.write(pid)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(home)

        return preexec

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        env = super().user_env(env)
        home = self.home_dir
        env["VMLAB_CACHE"] = os.path.join(home, ".cache", "vmlab")
        env["XDG_CACHE_HOME"] = os.path.join(home, ".cache")
        env["XDG_RUNTIME_DIR"] = ""          # not the hub's: vmlab falls back to the temp dir
        if self.class_store:
            env["VMLAB_CLASS_STORE"] = self.class_store
        return env

    async def start(self) -> Any:
        self.prepare_home()
        self._cgroups = self.make_cgroups()
        return await super().start()

    async def shutdown_kernels(self, timeout: float = 20) -> int:
        """Ask the student's server to shut its kernels down (so vmlab stops their VMs cleanly) before the
        server itself is stopped; a stopping server does not always do it. Returns how many were asked."""
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError
        if self.server is None or not self.api_token:
            return 0
        client = AsyncHTTPClient()
        headers = {"Authorization": f"token {self.api_token}"}
        base = self.server.url.rstrip("/") + "/api/kernels"
        try:
            resp = await client.fetch(base, headers=headers, request_timeout=timeout)
            kernels = json.loads(resp.body)
            for k in kernels:
                await client.fetch(f"{base}/{k['id']}", method="DELETE", headers=headers,
                                   request_timeout=timeout)
        except (OSError, HTTPClientError, ValueError, KeyError) as exc:
            self.log.warning("classroom: could not shut down %s's kernels before the stop: %s", self.user.name, exc)
            return 0
        return len(kernels)

    async def stop(self, now: bool = False) -> None:
        if not now:
            n = await self.shutdown_kernels()
            if n:
                self.log.info("classroom: shut down %d kernel(s) of %s before stopping the server", n,
                              self.user.name)
        await super().stop(now=now)
        dirs = getattr(self, "_cgroups", None) or {}
        if not dirs:
            # the hub may have restarted since the start: find the record
            try:
                dirs = {k: Path(v) for k, v in json.loads(self._cgroup_record().read_text()).items()}
            except (OSError, ValueError):
                dirs = {}
        if dirs:
            killed = self.sweep(dirs)
            sweeps = Path(self.state_dir) / "sweeps"
            sweeps.mkdir(parents=True, exist_ok=True)
            (sweeps / f"{self.user.name}.json").write_text(json.dumps({"t": time.time(), "killed": killed}))
            if killed:
                self.log.warning("classroom: %s's server left %d processes, killed: %s", self.user.name,
                                 len(killed), ", ".join(k["comm"] for k in killed))
            self._remove_cgroups(dirs)
        self._cgroups = {}
