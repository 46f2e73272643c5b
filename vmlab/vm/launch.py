"""Launch plumbing: the private directory, the socketpairs, the QEMU process, its exit, teardown.

Every VM lives in a private 0700 directory (console log, QEMU's stderr, trace
log, scratch disks) under :func:`vmlab.config.private_root`. QMP, the console,
the agent channel and ``backend="socket"`` NICs are socketpairs: nothing
listens on TCP or on a path another user could reach. QEMU starts under a
parent-death signal and is registered with :mod:`vmlab.vm.reaper`; a pidfd
tells the event loop when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import List, Optional

from qemu.qmp import EventListener, QMPClient

from ..config import private_root, takes_direct_io
from ..errors import LaunchError
from ..image import GuestImage
from ..log import get_logger
from ..spec import Disk, parse_size
from ..tools import qemu_img
from .agent import AgentClient
from .console import user_only
from .core import VMCore
from .qemu import DIRECT_CACHE_MODES, boot_initrd, build_launch, launch_fix
from .reaper import claim_dir, finalizer, pdeathsig_prefix, qemu_spawn, register, unregister, yield_main_loop
from .runner import running_loop
from .state import Trigger

__all__ = ["LaunchMixin"]

log = get_logger(__name__)

# VMs launched on vmlab's private loop and not torn down yet: closed at interpreter exit (before the reaper's
# atexit kills what is left), so no reader task is destroyed pending and QMP's end-of-file is collected.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def _close_all_at_exit() -> None:
    loop = running_loop()
    vms = [vm for vm in list(_LIVE) if getattr(vm, "_loop", None) is loop]
    if loop is None or not vms:
        return

    async def close_all() -> None:
        await asyncio.gather(*(vm._teardown(force=True) for vm in vms), return_exceptions=True)
    try:
        asyncio.run_coroutine_threadsafe(close_all(), loop).result(20)
    except Exception as exc:       # the reaper's atexit still kills what is left
        log.debug("closing VMs at exit: %r", exc)


class LaunchMixin(VMCore):
    """Start QEMU for the spec, watch it, and release everything afterwards."""

    async def _launch(self, image: GuestImage, *, paused: bool, incoming: Optional[Path] = None) -> None:
        loop = asyncio.get_running_loop()
        self.private_dir = Path(tempfile.mkdtemp(prefix=f"vmlab-{self.spec.name}-", dir=private_root()))
        os.chmod(self.private_dir, 0o700)
        claim_dir(self.private_dir)
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
        incoming_file = open(incoming, "rb") if incoming else None    # noqa: SIM115 - closed below
        try:
            self.launch = build_launch(
                self.spec, accel=self.accel or "tcg", kernel=image.kernel, initrd=boot_initrd(self.spec, image),
                qmp_fd=qmp_qemu.fileno(), agent_fd=agent_qemu.fileno(), console_fd=con_qemu.fileno(),
                private_dir=self.private_dir, disk_paths=disk_paths, nic_fds=nic_fds,
                paused=paused, incoming_fd=incoming_file.fileno() if incoming_file else None,
                trace_file=self.private_dir / "trace.log")
            stderr = open(self.private_dir / "qemu.stderr", "wb", opener=user_only)  # noqa: SIM115
            self._console.open(self.private_dir / "console.log")
            if self.spec.trace:     # QEMU would create it with the umask (0644)
                open(self.private_dir / "trace.log", "wb", opener=user_only).close()
            self._events.t0 = time.monotonic()
            try:
                with qemu_spawn(huge_pages=incoming is not None, host_cpu=self.spec.host_cpu,
                                name=Path(self.launch.argv[0]).name[:15]) as (preexec, self.host_cpu):
                    self._proc = subprocess.Popen(
                        pdeathsig_prefix() + self.launch.argv, pass_fds=self.launch.pass_fds,
                        stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
                        preexec_fn=preexec)
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
        register(self.pid, None if self.keep_dir else self.private_dir)
        self._remember_live(loop)
        self._finalizer = finalizer(self, self.pid, None if self.keep_dir else self.private_dir)
        pidfd = os.pidfd_open(self.pid)
        loop.add_reader(pidfd, self._on_exit, pidfd)
        # console and agent readers
        reader, writer = await asyncio.open_connection(sock=con_host)
        self._console.writer = writer
        self._tasks.append(loop.create_task(self._console.pump(reader), name="vmlab-console"))
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
                                  exit_code=self.exit_code, fix=launch_fix(self._stderr_text()),
                                  **self._err_kw()) from exc
            raise LaunchError(f"could not connect to QEMU's monitor: {exc!r}", **self._err_kw()) from exc
        if self.host_cpu is not None:   # the vCPU threads exist now: only the main loop yields to them
            try:
                self.main_loop_nice = yield_main_loop(self.pid)
            except ProcessLookupError:  # QEMU has just exited: the exit is reported as any other
                pass
        self._advance(Trigger.RESTORING if incoming else Trigger.LAUNCHED_PAUSED if paused else Trigger.LAUNCHED)
        self._record_event("LAUNCH", {"pid": self.pid, "paused": paused, "incoming": bool(incoming)},
                           source="vmlab")

    def _remember_live(self, loop: asyncio.AbstractEventLoop) -> None:
        global _atexit_registered
        self._loop = loop
        _LIVE.add(self)
        if not _atexit_registered:      # registered after the reaper's hook, so it runs before it
            atexit.register(_close_all_at_exit)
            _atexit_registered = True

    def _prepare_disk(self, index: int, disk: Disk) -> Path:
        if disk.null:                   # no file (build_launch does not use the path)
            return Path(os.devnull)
        path = self._disk_file(index, disk)
        if disk.cache in DIRECT_CACHE_MODES and not takes_direct_io(path):
            where = "scratch disk" if disk.path is None else "image"
            raise LaunchError(
                f"disks[{index}]: the {where} {path} is on a file system that refuses O_DIRECT (tmpfs before Linux "
                f"6.6, ramfs), which cache={disk.cache!r} needs",
                fix=("make the private directories on a disk file system: TMPDIR=/var/tmp (and XDG_RUNTIME_DIR unset)"
                     if disk.path is None else "move the image to a disk file system")
                + ", or give the disk cache='writethrough' (the host's page cache then serves the guest's reads)")
        return path

    def _disk_file(self, index: int, disk: Disk) -> Path:
        if disk.path is not None:
            return Path(disk.path)
        assert self.private_dir is not None and disk.size is not None   # validated: a size or a path
        path = self.private_dir / f"scratch{index}.{disk.format}"
        size = parse_size(disk.size, f"disks[{index}].size")
        res = subprocess.run([qemu_img(), "create", "-q", "-f", str(disk.format), str(path), str(size)],
                             capture_output=True, text=True)
        if res.returncode:
            raise LaunchError(f"qemu-img could not create scratch disk {index}: {res.stderr.strip()}",
                              fix="check free space in " + str(self.private_dir))
        os.chmod(path, 0o600)
        return path

    # --------------------------------------------------------------- watching
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
            unregister(self.pid)
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
        self._advance(Trigger.EXITED if self._closing or code == 0 else Trigger.CRASHED)
        self._record_event("EXIT", {"exit_code": code}, source="vmlab")
        await self._end_qmp_after_exit()
        assert self._exited is not None
        self._exited.set()

    async def _end_qmp_after_exit(self) -> None:
        """QEMU is gone and its last events are recorded: collect QMP's end of file and stop the event pump now.
        Left for later (a VM whose QEMU exited and that nobody shuts down), asyncio prints "Task was destroyed
        but it is pending! ... vmlab-events" and QMP's EOFError whenever the VM object is collected, into
        whatever notebook cell runs then. QMP calls after this raise VMDied, as before."""
        if self._qmp is not None:
            try:
                await asyncio.wait_for(self._qmp.disconnect(), 2)
            except Exception as exc:      # the reader's EOFError, collected here on purpose
                log.debug("%s: disconnecting QMP after exit: %r", self.spec.name, exc)
        pumps = [t for t in self._tasks if t.get_name() == "vmlab-events" and t is not asyncio.current_task()]
        self._tasks = [t for t in self._tasks if t not in pumps]
        for t in pumps:
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.debug("%s: the event pump ended with %r", self.spec.name, exc)

    def _on_bye(self, why: str) -> None:
        self._record_event("GUEST_BYE", {"reason": why}, source="agent")

    async def _pump_events(self, listener: EventListener) -> None:
        async for ev in listener:
            ts = ev.get("timestamp")
            data = ev.get("data")
            self._record_event(str(ev["event"]), dict(data) if isinstance(data, dict) else {},
                               qemu_time=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                               if isinstance(ts, dict) and ts else None)

    # -------------------------------------------------------------- teardown
    def _reset_for_retry(self) -> None:
        """After a torn-down failed warm start: ready to launch again, cold."""
        self._advance(Trigger.RETRY)
        self._events.clear()
        self._console.clear()
        self._exited = asyncio.Event()
        self._closing = False
        self.pid = None
        self.exit_code = None

    async def _close_channels(self) -> None:
        """Disconnect QMP and the agent and stop the reader tasks; idempotent. Called once QEMU has exited
        (kill, quit) and by teardown, so no task is left pending and QMP's end-of-file is collected
        (otherwise asyncio prints "Task was destroyed but it is pending!" and "_GatheringFuture exception
        was never retrieved ... EOFError" when the loop's objects are collected, e.g. at interpreter exit)."""
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            try:
                await asyncio.wait_for(qmp.disconnect(), 2)
            except Exception as exc:      # QEMU gone: the reader's EOFError is collected here, on purpose
                log.debug("%s: disconnecting QMP: %r", self.spec.name, exc)
        if self._agent is not None:
            agent, self._agent = self._agent, None
            await agent.close()
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        self._tasks = [t for t in self._tasks if t is me]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                log.debug("%s: task %s ended with %r", self.spec.name, t.get_name(), exc)

    async def _teardown(self, force: bool) -> None:
        """Release everything; idempotent. ``force`` also kills QEMU.

        Failures here are logged (``VMLAB_LOG=debug``) and otherwise ignored: a
        half-gone VM must still be cleaned up as far as possible.
        """
        if force and self._proc and self._proc.poll() is None:
            self._closing = True
            self._proc.kill()
            if self._exited is not None:
                await self._wait_exit(5)
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except Exception as exc:
                log.debug("%s: QEMU (pid %s) did not exit: %r", self.spec.name, self.pid, exc)
            if self._exited is not None and not self._exited.is_set():
                await self._wait_exit(2)   # let EXIT be recorded before the readers go
        await self._close_channels()
        self._console.close()
        for s in self._socks:
            try:
                s.close()
            except Exception as exc:
                log.debug("%s: closing a socket failed: %r", self.spec.name, exc)
        self._socks = []
        _LIVE.discard(self)
        if self.pid:
            unregister(self.pid)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self.private_dir and not self.keep_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)
