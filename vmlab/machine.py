"""Lesson VMs: start, control, talk to, measure and stop a QEMU guest.

:class:`AsyncVM` is the implementation (asyncio, written once). :class:`VM` is
the same object for synchronous code and notebooks: each method runs the
coroutine on vmlab's private event loop (see :mod:`vmlab._loop`), so it works
inside a running Jupyter kernel, where ``asyncio.run`` would fail.

    with VM(memory="256M") as vm:          # boots; shutdown is guaranteed
        print(vm.run("uname -r").stdout)
        vm.pause(); vm.resume()
        vm.powerdown(); vm.wait_event("SHUTDOWN")

Every VM lives in a private 0700 directory (console log, QEMU's stderr, trace
log, scratch disks). QMP, the console and the agent channel are socketpairs:
nothing listens on TCP or on a path another user could reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from qemu.qmp import EventListener, QMPClient
from qemu.qmp import ExecuteError as _QMPExecuteError

from . import _loop, reaper
from .agent import AgentClient, RunResult
from .errors import (GuestError, LaunchError, SpecError, StateError, VMDied, VMError,
                     VMLabError, VMTimeout)
from .qemu import Launch, build_launch, qemu_img, qemu_version
from .spec import MachineSpec, parse_size


class RunState(enum.Enum):
    """Where a VM is in its life (the host's view; ``status()`` asks QEMU)."""

    CREATED = "created"          # not started yet
    STARTING = "starting"        # QEMU launched, guest not ready yet
    RUNNING = "running"          # guest running (agent may still be booting after a reset)
    PAUSED = "paused"            # vCPUs stopped (pause(), start(paused=True), or a STOP event)
    SHUTTING_DOWN = "shutting-down"  # SHUTDOWN seen, QEMU on its way out
    OFF = "off"                  # QEMU has exited
    FAILED = "failed"            # QEMU exited unexpectedly or never became ready


CONSOLE_KEEP = 4 << 20
WARM_KEEP = 6          # warm snapshots kept in cache_dir()/warm (least recently used go first)


def _private_root() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base)
    return Path(tempfile.gettempdir())


class AsyncVM:
    """One QEMU virtual machine, driven over QMP and the guest agent."""

    def __init__(self, spec: Optional[MachineSpec] = None, *, image: Any = None,
                 warm: bool = False, boot_timeout: Optional[float] = None,
                 keep_dir: bool = False, **fields: Any) -> None:
        try:
            if spec is None:
                spec = MachineSpec(**fields) if fields else MachineSpec()
            elif fields and isinstance(spec, MachineSpec):
                spec = spec.with_(**fields)
        except TypeError as exc:
            bad = sorted(set(fields) - {f.name for f in dataclasses.fields(MachineSpec)})
            raise SpecError(bad[0] if bad else "spec", f"unknown VM setting(s) {', '.join(bad) or fields}",
                            fix="the settings are: " + ", ".join(f.name for f in dataclasses.fields(MachineSpec))
                                + ", and image=, warm=, boot_timeout=, keep_dir=") from exc
        if not isinstance(spec, MachineSpec):
            raise SpecError("spec", f"expected a MachineSpec, got {spec!r}", fix="use vmlab.MachineSpec(...)")
        self.spec: MachineSpec = spec.validated()
        if warm and self.spec.disks:
            raise SpecError("warm", "a warm start restores memory, not disks, so it needs a spec without disks",
                            fix="use warm=False for VMs with disks")
        if warm and any(n.backend == "socket" for n in self.spec.nics):
            raise SpecError("warm", "a warm start cannot restore a socket NIC", fix="use warm=False")
        if boot_timeout is not None and not (isinstance(boot_timeout, (int, float)) and boot_timeout > 0):
            raise SpecError("boot_timeout", f"{boot_timeout!r} is not a positive number of seconds",
                            fix="e.g. boot_timeout=60")
        if image is not None and not (hasattr(image, "kernel") and hasattr(image, "initrd")):
            raise SpecError("image", f"{image!r} is not a guest image",
                            fix="leave image out (the lesson image is built and cached), or pass vmlab.image.ensure_image()")
        self._image = image
        self.warm = warm
        self.boot_timeout = boot_timeout
        self.keep_dir = keep_dir
        self.state = RunState.CREATED
        self.accel: Optional[str] = None
        self.accel_reason: str = ""
        self.pid: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.private_dir: Optional[Path] = None
        self.launch: Optional[Launch] = None
        self.events: List[Dict[str, Any]] = []
        self.boot_seconds: Optional[float] = None
        self.warm_restored = False
        self.warm_snapshot: Optional[Path] = None   # the snapshot file a warm VM restores from / saves to
        self.nic_sockets: List[Optional[socket.socket]] = []
        self._proc: Optional[subprocess.Popen] = None
        self._qmp: Optional[QMPClient] = None
        self._agent: Optional[AgentClient] = None
        self._tasks: List[asyncio.Task] = []
        self._console = bytearray()
        self._console_base = 0          # bytes dropped from the front of _console
        self._console_file = None
        self._console_changed: Optional[asyncio.Condition] = None
        self._event_changed: Optional[asyncio.Condition] = None
        self._exited: Optional[asyncio.Event] = None
        self._mark = 0                   # event index at the last lifecycle action
        self._t0 = 0.0
        self._finalizer = None
        self._closing = False
        self._socks: List[socket.socket] = []
        self._listener: Optional[EventListener] = None

    # ------------------------------------------------------------------ repr
    def __repr__(self) -> str:
        bits = [repr(self.spec.name), self.state.value]
        if self.accel:
            bits.append(self.accel)
        bits.append(f"{self.spec.memory_mb}MiB")
        if self.pid:
            bits.append(f"pid={self.pid}")
        return f"<{type(self).__name__} {' '.join(bits)}>"

    # --------------------------------------------------------------- helpers
    @property
    def command(self) -> List[str]:
        return list(self.launch.argv) if self.launch else []

    @property
    def console_log(self) -> Optional[Path]:
        return self.private_dir / "console.log" if self.private_dir else None

    @property
    def trace_log(self) -> Optional[Path]:
        return self.private_dir / "trace.log" if self.private_dir else None

    def console_text(self, tail: Optional[int] = None) -> str:
        text = self._console.decode(errors="replace")
        if tail:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    def _stderr_text(self) -> str:
        if not self.private_dir:
            return ""
        try:
            return (self.private_dir / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def _err_kw(self) -> Dict[str, Any]:
        return {"command": self.command, "stderr": self._stderr_text(),
                "console_tail": self.console_text(tail=25), "vm_name": self.spec.name}

    @property
    def agent_ready(self) -> bool:
        return bool(self._agent and self._agent.ready)

    @property
    def kernel_release(self) -> Optional[str]:
        return self._agent.kernel_release if self._agent else None

    def _record_event(self, name: str, data: Dict[str, Any], source: str = "qemu",
                      qemu_time: Optional[float] = None) -> None:
        ev = {"event": name, "data": data, "t": time.monotonic() - self._t0, "wall": time.time(), "source": source}
        if qemu_time is not None:
            ev["qemu_time"] = qemu_time   # QEMU's own timestamp (wall clock) for its events
        self.events.append(ev)
        if name == "STOP":
            if self.state in (RunState.RUNNING, RunState.STARTING):
                self.state = RunState.PAUSED
        elif name == "RESUME":
            if self.state in (RunState.PAUSED, RunState.STARTING):
                self.state = RunState.RUNNING
        elif name == "SHUTDOWN":
            if self.state not in (RunState.OFF, RunState.FAILED):  # may be read after QEMU's exit
                self.state = RunState.SHUTTING_DOWN
        if self._event_changed is not None:
            asyncio.get_running_loop().create_task(self._notify(self._event_changed))

    @staticmethod
    async def _notify(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()

    # ----------------------------------------------------------------- start
    async def start(self, paused: bool = False, wait: bool = True) -> "AsyncVM":
        """Launch QEMU and (unless ``paused`` or ``wait=False``) wait for the guest agent.

        With ``paused=True`` the vCPUs stay stopped (QEMU's ``-S``): boot it
        from the hypervisor side with :meth:`resume`.
        """
        if self.state is not RunState.CREATED:
            raise StateError(f"VM {self.spec.name!r} was already started (state {self.state.value})",
                             fix="create a new VM object to start another machine")
        from .accel import resolve_accel
        from .image import ensure_image
        reaper.sweep_stale()
        self.state = RunState.STARTING
        self._console_changed = asyncio.Condition()
        self._event_changed = asyncio.Condition()
        self._exited = asyncio.Event()
        try:
            if self.accel is None:
                self.accel, self.accel_reason = await resolve_accel(self.spec.accel)
            image = self._image or await asyncio.get_running_loop().run_in_executor(None, ensure_image)
            self._image = image
            snapshot = self.warm_snapshot = self._warm_path(image) if self.warm else None
            if snapshot is not None and snapshot.exists():
                with contextlib.suppress(OSError):
                    os.utime(snapshot)          # most recently used: pruned last
                try:
                    await self._launch(image, paused=paused, incoming=snapshot)
                    await self._finish_restore(paused)
                    self.warm_restored = True
                    return self
                except VMLabError as exc:
                    # a damaged or stale snapshot: forget it and boot cold
                    snapshot.unlink(missing_ok=True)
                    self.accel_reason += f" (warm snapshot unusable, booted cold: {exc.message})"
                    await self._teardown(force=True)
                    self._reset_for_retry()
            await self._launch(image, paused=paused)
            if not paused and wait:
                await self.wait_ready()
                if snapshot is not None:
                    try:
                        await self._save_warm(snapshot)
                        self._prune_warm(snapshot)
                    except VMError as exc:
                        if self.state is not RunState.RUNNING:
                            raise
                        # the snapshot is an optimisation: the booted guest is fine without it
                        self.accel_reason += f" (warm snapshot not saved: {exc.message})"
                        self._record_event("WARM_SKIPPED", {"reason": exc.message}, source="vmlab")
        except BaseException:
            await self._teardown(force=True)
            if self.state is not RunState.OFF:
                self.state = RunState.FAILED
            raise
        return self

    def _reset_for_retry(self) -> None:
        self.state = RunState.STARTING
        self.events.clear()
        self._console.clear()
        self._console_base = 0
        self._exited = asyncio.Event()
        self.pid = None
        self.exit_code = None

    async def _launch(self, image: Any, *, paused: bool, incoming: Optional[Path] = None) -> None:
        loop = asyncio.get_running_loop()
        self.private_dir = Path(tempfile.mkdtemp(prefix=f"vmlab-{self.spec.name}-", dir=_private_root()))
        os.chmod(self.private_dir, 0o700)
        reaper.claim_dir(self.private_dir)
        disk_paths = [self._prepare_disk(i, d) for i, d in enumerate(self.spec.disks)]
        qmp_host, qmp_qemu = socket.socketpair()
        agent_host, agent_qemu = socket.socketpair()
        con_host, con_qemu = socket.socketpair()
        nic_fds: List[Optional[int]] = []
        qemu_side = [qmp_qemu, agent_qemu, con_qemu]
        self.nic_sockets = []
        for n in self.spec.nics:
            if n.backend == "socket":
                h, q = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                nic_fds.append(q.fileno())
                qemu_side.append(q)
                self.nic_sockets.append(h)
            else:
                nic_fds.append(None)
                self.nic_sockets.append(None)
        self._socks = [qmp_host, agent_host, con_host] + [s for s in self.nic_sockets if s]
        incoming_file = open(incoming, "rb") if incoming else None
        try:
            self.launch = build_launch(
                self.spec, accel=self.accel or "tcg", kernel=image.kernel, initrd=image.initrd,
                qmp_fd=qmp_qemu.fileno(), agent_fd=agent_qemu.fileno(), console_fd=con_qemu.fileno(),
                private_dir=self.private_dir, disk_paths=disk_paths, nic_fds=nic_fds,
                paused=paused, incoming_fd=incoming_file.fileno() if incoming_file else None,
                trace_file=self.private_dir / "trace.log")
            stderr = open(self.private_dir / "qemu.stderr", "wb", opener=_user_only)
            self._console_file = open(self.private_dir / "console.log", "wb", opener=_user_only)
            if self.spec.trace:     # QEMU would create it with the umask (0644)
                open(self.private_dir / "trace.log", "wb", opener=_user_only).close()
            self._t0 = time.monotonic()
            try:
                self._proc = subprocess.Popen(
                    reaper.pdeathsig_prefix() + self.launch.argv, pass_fds=self.launch.pass_fds,
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
                    preexec_fn=reaper.pdeathsig_preexec())
            except OSError as exc:
                raise LaunchError(f"cannot execute QEMU: {exc}", fix="check VMLAB_QEMU / install qemu-system-x86",
                                  **self._err_kw()) from exc
            finally:
                stderr.close()
        finally:
            for s in qemu_side:
                s.close()
            if incoming_file:
                incoming_file.close()
        self.pid = self._proc.pid
        reaper.register(self.pid, None if self.keep_dir else self.private_dir)
        self._finalizer = reaper.finalizer(self, self.pid, None if self.keep_dir else self.private_dir)
        pidfd = os.pidfd_open(self.pid)
        loop.add_reader(pidfd, self._on_exit, pidfd)
        # console and agent readers
        reader, writer = await asyncio.open_connection(sock=con_host)
        self._console_writer = writer
        self._tasks.append(loop.create_task(self._pump_console(reader), name="vmlab-console"))
        areader, awriter = await asyncio.open_connection(sock=agent_host, limit=1 << 20)
        self._agent = AgentClient(areader, awriter, on_bye=self._on_bye)
        # QMP
        self._qmp = QMPClient(f"vmlab-{self.spec.name}")
        listener = self._listener = EventListener()
        self._qmp.register_listener(listener)
        self._tasks.append(loop.create_task(self._pump_events(listener), name="vmlab-events"))
        try:
            await asyncio.wait_for(self._qmp.connect(qmp_host), 30)
        except BaseException as exc:
            await self._wait_exit(2.0)
            if self.exit_code is not None:
                raise LaunchError(f"QEMU exited with status {self.exit_code} while starting",
                                  exit_code=self.exit_code, fix=_launch_fix(self._stderr_text()),
                                  **self._err_kw()) from exc
            raise LaunchError(f"could not connect to QEMU's monitor: {exc!r}", **self._err_kw()) from exc
        self.state = RunState.PAUSED if paused else RunState.RUNNING
        if incoming:
            self.state = RunState.STARTING
        self._record_event("LAUNCH", {"pid": self.pid, "paused": paused, "incoming": bool(incoming)},
                           source="vmlab")

    def _prepare_disk(self, index: int, disk: Any) -> Path:
        if disk.path is not None:
            return Path(disk.path)
        assert self.private_dir is not None
        path = self.private_dir / f"scratch{index}.{disk.format}"
        size = parse_size(disk.size, f"disks[{index}].size")
        res = subprocess.run([qemu_img(), "create", "-q", "-f", disk.format, str(path), str(size)],
                             capture_output=True, text=True)
        if res.returncode:
            raise LaunchError(f"qemu-img could not create scratch disk {index}: {res.stderr.strip()}",
                              fix="check free space in " + str(self.private_dir))
        os.chmod(path, 0o600)
        return path

    def _on_exit(self, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = self._proc.poll() if self._proc else None
        if code is None and self._proc is not None:
            try:
                code = self._proc.wait(1)
            except subprocess.TimeoutExpired:
                code = -1
        self.exit_code = code
        if self.pid:
            reaper.unregister(self.pid)
        self._tasks.append(loop.create_task(self._finish_exit(code), name="vmlab-exit"))

    async def _finish_exit(self, code: Optional[int]) -> None:
        """Record EXIT after what QEMU sent before it went away (SHUTDOWN, the guest's BYE).

        QMP, the agent and the process exit arrive on separate channels; letting
        the readers drain first keeps ``events`` in the order things happened.
        """
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            qmp_done = self._qmp is None or str(self._qmp.runstate.value) != "running"
            agent_done = self._agent is None or self._agent.closed_reason is not None
            queue_done = self._listener is None or self._listener.empty()
            if qmp_done and agent_done and queue_done:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        expected = self._closing or self.state in (RunState.SHUTTING_DOWN,)
        self.state = RunState.OFF if expected or code == 0 else RunState.FAILED
        self._record_event("EXIT", {"exit_code": code}, source="vmlab")
        assert self._exited is not None
        self._exited.set()

    def _on_bye(self, why: str) -> None:
        self._record_event("GUEST_BYE", {"reason": why}, source="agent")

    async def _pump_console(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                self._console += chunk
                if len(self._console) > CONSOLE_KEEP:
                    drop = len(self._console) - CONSOLE_KEEP // 2
                    del self._console[:drop]
                    self._console_base += drop
                if self._console_file:
                    self._console_file.write(chunk)
                    self._console_file.flush()
                assert self._console_changed is not None
                async with self._console_changed:
                    self._console_changed.notify_all()
        except (ConnectionError, OSError):
            pass

    async def _pump_events(self, listener: EventListener) -> None:
        async for ev in listener:
            ts = ev.get("timestamp") or {}
            self._record_event(ev["event"], dict(ev.get("data", {})),
                               qemu_time=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 if ts else None)

    async def _wait_exit(self, timeout: float) -> bool:
        assert self._exited is not None
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # ------------------------------------------------------------ readiness
    def _default_boot_timeout(self) -> float:
        if self.boot_timeout:
            return float(self.boot_timeout)
        return 30.0 if self.accel == "kvm" else 90.0

    async def _race(self, aw: Any, timeout: float, phase: str) -> Any:
        """Await *aw*, failing early if QEMU exits or the guest kernel panics."""
        assert self._exited is not None
        task = asyncio.ensure_future(aw)
        exit_task = asyncio.ensure_future(self._exited.wait())
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(phase, timeout, **self._err_kw())
                done, _ = await asyncio.wait({task, exit_task}, timeout=min(left, 0.5),
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if exit_task in done:
                    raise VMDied(f"QEMU exited (status {self.exit_code}) while waiting for {phase}",
                                 exit_code=self.exit_code, fix=_launch_fix(self._stderr_text()),
                                 **self._err_kw())
                if b"Kernel panic" in self._console:
                    why = re.search(rb"Kernel panic - not syncing: ([^\r\n]*)", self._console)
                    raise VMError(f"the guest kernel panicked while waiting for {phase}"
                                  + (f": {why.group(1).decode(errors='replace')}" if why else ""),
                                  fix="read the console tail; more memory (memory=256) often helps",
                                  **self._err_kw())
        finally:
            for t in (task, exit_task):
                if not t.done():
                    t.cancel()

    async def wait_ready(self, timeout: Optional[float] = None) -> str:
        """Wait until the guest agent says hello; returns the guest kernel release."""
        if self.state is RunState.PAUSED:
            raise StateError("the VM is paused, so the guest cannot become ready",
                             fix="resume() it first (it was started paused or stopped)", **self._err_kw())
        assert self._agent is not None
        t = timeout or self._default_boot_timeout()
        release = await self._race(self._agent.wait_hello(), t, "the guest agent (boot)")
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._t0
        self._record_event("READY", {"kernel": release}, source="agent")
        return release

    # ------------------------------------------------------------ warm start
    def _warm_path(self, image: Any) -> Path:
        from .image import cache_dir
        argv = build_launch(self.spec, accel=self.accel or "tcg", kernel=image.kernel, initrd=image.initrd,
                            qmp_fd=3, agent_fd=4, console_fd=5, private_dir=Path("/"), disk_paths=[],
                            nic_fds=[None] * len(self.spec.nics), trace_file=Path("/trace")).argv
        # the VM's name does not change the guest's state: VMs of any name share a snapshot
        i = argv.index("-name")
        argv = argv[:i] + argv[i + 2:]
        key = hashlib.sha256(json.dumps([argv, image.key, qemu_version(), 3]).encode()).hexdigest()[:20]
        d = cache_dir() / "warm"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d / f"{key}.state"

    @staticmethod
    def _prune_warm(keep: Path, most: int = WARM_KEEP) -> None:
        """Keep the *most* recently used snapshots (about 80 MB each); delete the rest."""
        snaps = sorted(keep.parent.glob("*.state"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in snaps if p != keep][max(0, most - 1):]:
            old.unlink(missing_ok=True)

    async def _save_warm(self, path: Path) -> None:
        """Save this booted guest (stop, migrate to a file, continue) for next time."""
        assert self._qmp is not None
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await self.qmp("stop")
            self._qmp.send_fd_scm(fd)
            await self.qmp("getfd", fdname="warm")
            await self.qmp("migrate", uri="fd:warm")
            deadline = time.monotonic() + 60
            while True:
                st = await self.qmp("query-migrate")
                status = st.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise VMError(f"saving the warm snapshot failed: {st}", **self._err_kw())
                await asyncio.sleep(0.02)
            os.fsync(fd)
            os.replace(tmp, path)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            await self.qmp("cont")
        self._record_event("WARM_SAVED", {"path": str(path)}, source="vmlab")

    async def _finish_restore(self, paused: bool) -> None:
        deadline = time.monotonic() + 30
        while True:
            st = await self.qmp("query-status")
            if st["status"] not in ("inmigrate",):
                break
            if time.monotonic() > deadline:
                raise VMTimeout("the warm snapshot to load", 30, **self._err_kw())
            await asyncio.sleep(0.005)
        if st["status"] not in ("running", "paused", "prelaunch"):
            raise VMError(f"restoring the warm snapshot ended in state {st['status']!r}", **self._err_kw())
        assert self._agent is not None
        if paused:
            self.state = RunState.PAUSED
            self._agent.mark_reconnected()
            self._agent.kernel_release = getattr(self._image, "kernel_version", None)
            return
        if st["status"] != "running":
            await self.qmp("cont")
        self.state = RunState.RUNNING
        await self._race(self._agent.ping(timeout=10), 15, "the restored guest agent")
        self._agent.mark_reconnected()
        self._agent.kernel_release = self._agent.kernel_release or getattr(self._image, "kernel_version", None)
        self.boot_seconds = time.monotonic() - self._t0
        self._record_event("READY", {"kernel": self._agent.kernel_release, "warm": True}, source="agent")

    # ------------------------------------------------------------------ QMP
    async def qmp(self, command: str, **args: Any) -> Any:
        """Run any QMP command; returns its ``return`` value."""
        if self._qmp is None or self.state in (RunState.OFF, RunState.FAILED, RunState.CREATED):
            raise StateError(f"cannot run QMP {command!r}: the VM is {self.state.value}",
                             fix="start() the VM first", **self._err_kw())
        try:
            return await self._qmp.execute(command, args or None)
        except _QMPExecuteError as exc:
            raise VMError(f"QMP {command} failed: {exc}", fix="see the QMP reference for its arguments",
                          **self._err_kw()) from exc
        except Exception as exc:
            if self.exit_code is not None or (self._exited and self._exited.is_set()):
                raise VMDied(f"QEMU exited during QMP {command}", exit_code=self.exit_code,
                             **self._err_kw()) from exc
            raise VMError(f"QMP {command} failed: {exc!r}", **self._err_kw()) from exc

    async def hmp(self, command_line: str) -> str:
        """A human-monitor command (``info registers`` ...) through QMP."""
        return await self.qmp("human-monitor-command", **{"command-line": command_line})

    async def status(self) -> str:
        """QEMU's own run state (``query-status``): running, paused, prelaunch, ..."""
        return (await self.qmp("query-status"))["status"]

    # ------------------------------------------------------------ lifecycle
    def _action(self, name: str) -> None:
        self._mark = len(self.events)
        self._record_event("ACTION", {"action": name}, source="vmlab")

    def _require(self, *states: RunState, doing: str) -> None:
        if self.state not in states:
            names = " or ".join(s.value for s in states)
            raise StateError(f"cannot {doing}: the VM is {self.state.value} (needs {names})",
                             fix="check vm.state; start() a new VM if it is off", **self._err_kw())

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``)."""
        self._require(RunState.RUNNING, doing="pause")
        self._action("pause")
        await self.qmp("stop")
        self.state = RunState.PAUSED

    async def resume(self, wait: bool = False) -> None:
        """Start the vCPUs (QMP ``cont``); ``wait=True`` also waits for the agent."""
        self._require(RunState.PAUSED, doing="resume")
        self._action("resume")
        await self.qmp("cont")
        self.state = RunState.RUNNING
        if wait:
            await self.wait_ready()

    async def powerdown(self) -> None:
        """Press the ACPI power button: the guest shuts itself down."""
        self._require(RunState.RUNNING, RunState.PAUSED, doing="press the power button")
        self._action("powerdown")
        await self.qmp("system_powerdown")

    async def reset(self) -> None:
        """Hard reset (the reset button): the guest reboots at once."""
        self._require(RunState.RUNNING, RunState.PAUSED, doing="reset")
        self._action("reset")
        if self._agent:
            self._agent._hello.clear()
        await self.qmp("system_reset")

    async def quit(self) -> None:
        """Pull the plug from the hypervisor side: QEMU exits at once (QMP ``quit``)."""
        self._require(RunState.RUNNING, RunState.PAUSED, RunState.SHUTTING_DOWN, doing="quit")
        self._action("quit")
        self._closing = True
        with contextlib.suppress(VMError):
            await self.qmp("quit")
        await self._wait_exit(10)

    async def kill(self) -> None:
        """SIGKILL the QEMU process (like pulling the plug, from the host OS)."""
        self._action("kill")
        self._closing = True
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
        await self._wait_exit(10)

    async def wait_exit(self, timeout: float = 60) -> int:
        """Wait for QEMU to exit by itself (after a guest poweroff, say)."""
        if not await self._wait_exit(timeout):
            raise VMTimeout("QEMU to exit", timeout, **self._err_kw())
        return self.exit_code if self.exit_code is not None else -1

    async def wait_event(self, name: str, *, match: Optional[Dict[str, Any]] = None,
                         timeout: float = 30.0, since: Optional[int] = None) -> Dict[str, Any]:
        """Wait for an event (QMP's, or vmlab's LAUNCH/READY/EXIT/GUEST_BYE).

        Looks from ``since`` (an index into ``events``; default: the last
        lifecycle action), so an event that came before you asked is found.
        ``match`` filters on the event's data, e.g. ``{"guest": True}``.
        """
        assert self._event_changed is not None
        _check_timeout(timeout, allow_none=False)
        start = self._mark if since is None else since
        deadline = time.monotonic() + timeout

        def find() -> Optional[Dict[str, Any]]:
            for ev in self.events[start:]:
                if ev["event"] == name and all(ev["data"].get(k) == v for k, v in (match or {}).items()):
                    return ev
            return None

        async with self._event_changed:
            while True:
                ev = find()
                if ev:
                    return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(f"event {name}" + (f" with {match}" if match else ""), timeout,
                                    **self._err_kw())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._event_changed.wait(), min(left, 1.0))

    # -------------------------------------------------------------- console
    async def expect(self, pattern: Union[str, "re.Pattern[str]"], timeout: float = 30.0,
                     since: Optional[int] = None) -> "re.Match[str]":
        """Wait until the console output matches ``pattern`` (a regex); returns the match.

        Searches from ``since`` (a console offset) or, by default, from the end
        of the previous ``expect`` match, like pexpect.
        """
        assert self._console_changed is not None
        _check_timeout(timeout, allow_none=False)
        try:
            rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        except re.error as exc:
            raise SpecError("pattern", f"{pattern!r} is not a regular expression: {exc}",
                            fix="escape special characters with re.escape(text)") from exc
        start = getattr(self, "_expect_pos", 0) if since is None else since
        deadline = time.monotonic() + timeout
        async with self._console_changed:
            while True:
                rel = max(0, start - self._console_base)
                text = self._console[rel:].decode(errors="replace")
                m = rx.search(text)
                if m:
                    self._expect_pos = self._console_base + rel + len(text[:m.end()].encode())
                    return m
                if self._exited and self._exited.is_set():
                    raise VMDied(f"QEMU exited before the console showed {rx.pattern!r}",
                                 exit_code=self.exit_code, **self._err_kw())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(f"console output matching {rx.pattern!r}", timeout, **self._err_kw())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._console_changed.wait(), min(left, 1.0))

    @property
    def console_offset(self) -> int:
        return self._console_base + len(self._console)

    # ---------------------------------------------------------------- guest
    def _require_agent(self, doing: str) -> AgentClient:
        if self.state is RunState.PAUSED:
            raise StateError(f"cannot {doing}: the VM is paused", fix="resume() it first", **self._err_kw())
        if self.state not in (RunState.RUNNING,) or self._agent is None:
            raise StateError(f"cannot {doing}: the VM is {self.state.value}", fix="start() a VM first",
                             **self._err_kw())
        return self._agent

    async def run(self, command: str, *, timeout: Optional[float] = 60.0, check: bool = True) -> RunResult:
        """Run a shell command in the guest; returns stdout, stderr, status and durations.

        With ``check=True`` (the default) a non-zero exit raises GuestError.
        """
        if not isinstance(command, str) or not command.strip():
            raise SpecError("command", f"{command!r} is not a shell command", fix='e.g. vm.run("uname -r")')
        _check_timeout(timeout, allow_none=True)
        agent = self._require_agent(f"run {command!r}")
        if not agent.ready:
            await self.wait_ready()
        try:
            res = await self._race(agent.run(command, timeout=timeout),
                                   (timeout or 1e9) + 15, f"command {command!r}")
        except GuestError as exc:
            if agent.closed_reason and await self._wait_exit(1.0):    # the channel closed because QEMU died
                raise VMDied(f"QEMU exited (status {self.exit_code}) while running {command!r}",
                             exit_code=self.exit_code, fix=_launch_fix(self._stderr_text()),
                             **self._err_kw()) from exc
            raise GuestError(str(exc.message), **self._err_kw()) from exc
        except VMTimeout:
            raise
        except asyncio.TimeoutError as exc:     # the agent never answered (a hung or stopped guest)
            raise VMTimeout(f"command {command!r} in the guest (the guest agent did not answer)",
                            timeout or 0, **self._err_kw()) from exc
        if res.status == -1:
            raise VMTimeout(f"command {command!r} in the guest", timeout or 0, **self._err_kw())
        if check and res.status != 0:
            raise GuestError(f"{command!r} exited with status {res.status}: {res.stderr.strip()[-300:]}",
                             result=res, fix="pass check=False to get the result instead", **self._err_kw())
        return res

    async def write_file(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
        """Write a (small) file in the guest, atomically."""
        agent = self._require_agent(f"write {path}")
        if isinstance(data, str):
            data = data.encode()
        await self._race(agent.put(path, data, mode), 120, f"writing {path}")

    async def read_file(self, path: str) -> bytes:
        """Read a (small) file from the guest."""
        agent = self._require_agent(f"read {path}")
        return await self._race(agent.get(path), 120, f"reading {path}")

    async def copy_in(self, local: Union[str, Path], guest_path: str, mode: Optional[int] = None) -> None:
        p = Path(local)
        await self.write_file(guest_path, p.read_bytes(), mode if mode is not None else p.stat().st_mode & 0o777)

    async def copy_out(self, guest_path: str, local: Union[str, Path]) -> Path:
        p = Path(local)
        p.write_bytes(await self.read_file(guest_path))
        return p

    async def ping(self) -> float:
        """Round trip to the guest agent, in seconds."""
        agent = self._require_agent("ping")
        t = time.perf_counter()
        await self._race(agent.ping(), 15, "ping")
        return time.perf_counter() - t

    # ------------------------------------------------------------- measuring
    def qemu_cpu_seconds(self) -> float:
        """User+system CPU seconds QEMU has used so far (all its threads)."""
        from .hostview import process_cpu_seconds
        return process_cpu_seconds(self.pid) if self.pid else 0.0

    def qemu_rss_bytes(self) -> int:
        """Resident memory of the QEMU process now."""
        from .hostview import rss_bytes
        return rss_bytes(self.pid) if self.pid else 0

    def trace_mark(self) -> int:
        """A position in the trace log (``spec.trace`` events); pass it to :meth:`trace_since`."""
        try:
            return self.trace_log.stat().st_size if self.trace_log else 0
        except OSError:
            return 0

    def trace_since(self, mark: int = 0) -> bytes:
        """The trace log lines written after *mark*."""
        path = self.trace_log
        if not path or not path.exists():
            return b""
        with open(path, "rb") as f:
            f.seek(mark)
            return f.read()

    def trace_counts(self, reset: bool = False) -> Dict[str, int]:
        """Count trace events logged so far (``spec.trace`` patterns), by event name.

        With ``reset=True`` the next call counts only what comes after this one.
        """
        offset = getattr(self, "_trace_offset", 0)
        data = self.trace_since(offset)
        counts: Dict[str, int] = {}
        for m in re.finditer(rb"^(?:\d+@[\d.]+:)?([a-z0-9_]+) ", data, re.M):
            name = m.group(1).decode()
            counts[name] = counts.get(name, 0) + 1
        if reset:
            self._trace_offset = offset + len(data)
        return counts

    async def set_tracing(self, on: bool) -> None:
        """Switch the ``spec.trace`` events on or off while the VM runs (tracing slows QEMU)."""
        for pattern in self.spec.trace:
            await self.qmp("trace-event-set-state", name=pattern, enable=bool(on))

    # ------------------------------------------------------------- shutdown
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the VM for sure: QMP quit, then SIGTERM, then SIGKILL, within ``timeout``."""
        if self.state is RunState.CREATED:
            return
        self._closing = True
        try:
            if self._proc and self._proc.poll() is None:
                deadline = time.monotonic() + timeout
                if self._qmp is not None and self._exited and not self._exited.is_set():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._qmp.execute("quit"), max(0.1, timeout / 2))
                    await self._wait_exit(max(0.1, min(timeout / 2, deadline - time.monotonic())))
                if self._proc.poll() is None:
                    self._proc.terminate()
                    await self._wait_exit(max(0.1, min(timeout / 4, deadline - time.monotonic())))
                if self._proc.poll() is None:
                    self._proc.kill()
                    await self._wait_exit(5)
        finally:
            await self._teardown(force=False)
        if self.state is not RunState.FAILED:
            self.state = RunState.OFF

    close = shutdown

    async def _teardown(self, force: bool) -> None:
        """Release everything; idempotent. ``force`` also kills QEMU."""
        if force and self._proc and self._proc.poll() is None:
            self._closing = True
            self._proc.kill()
            if self._exited is not None:
                await self._wait_exit(5)
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(5)
            if self._exited is not None and not self._exited.is_set():
                await self._wait_exit(2)   # let EXIT be recorded before the readers go
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), 2)
            self._qmp = None
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        with contextlib.suppress(Exception):
            self._console_writer.close()
        for s in self._socks:
            with contextlib.suppress(Exception):
                s.close()
        self._socks = []
        if self._console_file:
            self._console_file.close()
            self._console_file = None
        if self.pid:
            reaper.unregister(self.pid)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self.private_dir and not self.keep_dir:
            import shutil
            shutil.rmtree(self.private_dir, ignore_errors=True)

    async def __aenter__(self) -> "AsyncVM":
        if self.state is RunState.CREATED:
            await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()


def _user_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _check_timeout(timeout: Any, *, allow_none: bool) -> None:
    if timeout is None and allow_none:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7:
        raise SpecError("timeout", f"{timeout!r} is not a positive number of seconds",
                        fix="e.g. timeout=60" + (" (or None for no limit)" if allow_none else ""))


def _launch_fix(stderr: str) -> str:
    s = stderr.lower()
    if "kvm" in s and ("permission" in s or "could not access" in s):
        return "add yourself to the kvm group, or use accel='tcg'"
    if "failed to set msr" in s or "kvm_buf_set_msrs" in s:
        return "this host's KVM cannot run this guest (a PVM or nested host?); use accel='tcg'"
    if "could not open" in s or "no such file" in s:
        return "a file named on the command line is missing: check disk paths and the guest image"
    if "address already in use" in s:
        return "a forwarded host port is taken: pick another host port"
    if "load of migration failed" in s or "incoming" in s:
        return "the warm snapshot does not match; it will be rebuilt (delete ~/.cache/vmlab/warm)"
    return "read QEMU's stderr below; `python -m vmlab doctor` checks the set-up"


# --------------------------------------------------------------------------
# The synchronous face (notebooks, scripts)
# --------------------------------------------------------------------------
def _sync(name: str, doc_from: Callable) -> Callable:
    def method(self: "VM", *args: Any, **kwargs: Any) -> Any:
        return _loop.run(getattr(self._avm, name)(*args, **kwargs))
    method.__name__ = name
    method.__doc__ = doc_from.__doc__
    return method


class VM:
    """A lesson VM for synchronous code and Jupyter (see :class:`AsyncVM` for details).

    ``VM(spec)`` or ``VM(memory="256M", cpus=2, ...)``; ``start()`` boots it;
    ``with VM(...) as vm:`` boots it and guarantees shutdown.
    """

    def __init__(self, spec: Optional[MachineSpec] = None, **kwargs: Any) -> None:
        self._avm = AsyncVM(spec, **kwargs)

    def __repr__(self) -> str:
        return repr(self._avm).replace("AsyncVM", "VM", 1)

    def __getattr__(self, item: str) -> Any:
        # plain attributes and properties (state, events, pid, spec, ...) come from the AsyncVM
        if item.startswith("__"):
            raise AttributeError(item)
        return getattr(self._avm, item)

    def start(self, paused: bool = False, wait: bool = True) -> "VM":
        """Launch QEMU; unless paused, wait for the guest to be ready."""
        _loop.run(self._avm.start(paused=paused, wait=wait))
        return self

    for _name in ("wait_ready", "qmp", "hmp", "status", "pause", "resume", "powerdown", "reset",
                  "quit", "kill", "wait_exit", "wait_event", "expect", "run", "write_file", "read_file",
                  "copy_in", "copy_out", "ping", "set_tracing", "shutdown"):
        locals()[_name] = _sync(_name, getattr(AsyncVM, _name))
    del _name
    close = shutdown  # type: ignore[name-defined]  # noqa: F821

    def __enter__(self) -> "VM":
        if self._avm.state is RunState.CREATED:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
