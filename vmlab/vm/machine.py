"""AsyncVM: one QEMU virtual machine, driven over QMP and the guest agent (asyncio).

It is assembled from the rooms of :mod:`vmlab.vm` (launch, guest, warm,
tracing, metrics over the shared :class:`~vmlab.vm.core.VMCore`); this module
adds what ties them together: the settings check, ``start`` and ``shutdown``,
and the lifecycle actions a lesson performs from the hypervisor side.

    async with AsyncVM(memory="256M") as vm:   # boots; shutdown is guaranteed
        print((await vm.run("uname -r")).stdout)
        await vm.pause(); await vm.resume()

:class:`vmlab.vm.VM` is the same machine for synchronous code and notebooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import SpecError, VMError, VMLabError, VMTimeout
from ..image import GuestImage, ensure_image
from ..log import get_logger
from ..spec import MachineSpec
from .accel import resolve_accel
from .console import Pattern
from .core import check_timeout
from .events import Event
from .guest import GuestMixin
from .launch import LaunchMixin
from .metrics import MetricsMixin
from .nested import NestedMixin
from .reaper import sweep_stale
from .state import LIVE, RunState, Trigger, require
from .tracing import TracingMixin
from .warm import WarmMixin, prune_snapshots, snapshot_path, warm_refusal

__all__ = ["AsyncVM", "kvm_probe_vm", "nested_probe_vm"]

log = get_logger(__name__)

_STARTED = tuple(LIVE | {RunState.OFF, RunState.FAILED})     # every state but CREATED


def _check_settings(spec: Optional[MachineSpec], image: Optional[GuestImage], warm: bool,
                    boot_timeout: Optional[float], fields: Dict[str, Any]) -> MachineSpec:
    """The validated spec for ``AsyncVM(spec, ..., **fields)``; SpecError naming what is wrong."""
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
    spec = spec.validated()
    why = warm_refusal(spec) if warm else ""
    if why:
        raise SpecError("warm", f"a warm start cannot restore this VM: {why}", fix="use warm=False")
    if boot_timeout is not None and not (isinstance(boot_timeout, (int, float)) and boot_timeout > 0):
        raise SpecError("boot_timeout", f"{boot_timeout!r} is not a positive number of seconds",
                        fix="e.g. boot_timeout=60")
    if image is not None and not (hasattr(image, "kernel") and hasattr(image, "initrd")):
        raise SpecError("image", f"{image!r} is not a guest image",
                        fix="leave image out (the lesson image is built and cached), or pass vmlab.image.ensure_image()")
    return spec


class AsyncVM(NestedMixin, GuestMixin, WarmMixin, TracingMixin, MetricsMixin, LaunchMixin):
    """One QEMU virtual machine, driven over QMP and the guest agent.

    ``AsyncVM(spec)`` or ``AsyncVM(memory="256M", cpus=2, ...)``; keyword-only
    ``image=`` (default: the cached lesson image), ``warm=`` (restore a saved
    booted guest), ``boot_timeout=`` and ``keep_dir=`` (keep the private dir).
    """

    def __init__(self, spec: Optional[MachineSpec] = None, *, image: Optional[GuestImage] = None,
                 warm: bool = False, boot_timeout: Optional[float] = None,
                 keep_dir: bool = False, **fields: Any) -> None:
        spec = _check_settings(spec, image, warm, boot_timeout, fields)
        super().__init__(spec, image=image, warm=warm, boot_timeout=boot_timeout, keep_dir=keep_dir)

    # ----------------------------------------------------------------- start
    @require(RunState.CREATED, doing="start VM {self.spec.name!r}",
             fix="create a new VM object to start another machine")
    async def start(self, paused: bool = False, wait: bool = True, incoming: Optional[str] = None) -> AsyncVM:
        """Launch QEMU and (unless ``paused`` or ``wait=False``) wait for the guest agent.

        With ``paused=True`` the vCPUs stay stopped (QEMU's ``-S``): boot it
        from the hypervisor side with :meth:`resume`. With ``incoming="defer"``
        QEMU waits for a live-migration stream (``-incoming defer``); the VM
        stays STARTING until :func:`vmlab.vm.migrate.migrate` brings a guest in.
        """
        if incoming is not None and incoming != "defer":
            raise SpecError("incoming", f"{incoming!r} is not a way to receive a guest",
                            fix='incoming="defer", then vmlab.vm.migrate.migrate(src, this_vm)')
        sweep_stale()
        t0 = time.monotonic()
        self._advance(Trigger.START)
        self._events.arm()
        self._exited = asyncio.Event()
        try:
            if self.accel is None:
                self.accel, self.accel_reason = await resolve_accel(self.spec.accel, kvm_probe_vm)
            image = self._image
            if image is None:
                image = self._image = await asyncio.get_running_loop().run_in_executor(None, ensure_image)
            if incoming is not None:
                # not a user setting (spec.extra_args refuses -incoming): added after validation, here only
                self.spec = dataclasses.replace(self.spec, extra_args=(*self.spec.extra_args, "-incoming", incoming))
                await self._launch(image, paused=False)
                self._advance(Trigger.RESTORING)
                return self
            snapshot = self.warm_snapshot = snapshot_path(self.spec, self.accel, image) if self.warm else None
            # a paused restore could not make a guest with disks read them again before it runs: boot those cold
            if snapshot is not None and snapshot.exists() and not (paused and self.spec.disks):
                with contextlib.suppress(OSError):
                    os.utime(snapshot)          # most recently used: pruned last
                try:
                    await self._launch(image, paused=paused, incoming=snapshot)
                    await self._finish_restore(paused)
                    self.warm_restored = True
                    if self.spec.nested and not paused:
                        await self._prove_nested(t0)
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
                    await self._save_warm_or_say_why(snapshot)
                if self.spec.nested:
                    await self._prove_nested(t0)
        except BaseException:
            await self._teardown(force=True)
            self._advance(Trigger.START_FAILED)
            raise
        return self

    async def _save_warm_or_say_why(self, snapshot: Path) -> None:
        try:
            await self._save_warm(snapshot)
            prune_snapshots(snapshot)
        except VMError as exc:
            if self.state is not RunState.RUNNING:
                raise
            # the snapshot is an optimisation: the booted guest is fine without it
            self.accel_reason += f" (warm snapshot not saved: {exc.message})"
            self._record_event("WARM_SKIPPED", {"reason": exc.message}, source="vmlab")

    def migrated_from(self, src: AsyncVM) -> None:
        """The guest of *src* now runs in this VM (a completed :func:`vmlab.vm.migrate.migrate`): RUNNING,
        the agent channel taken over (a guest already running sends no HELLO), both event logs told."""
        self._advance(Trigger.RESTORED)
        assert self._agent is not None
        self._agent.mark_reconnected()
        self._agent.kernel_release = src.kernel_release
        self.boot_seconds = src.boot_seconds
        self._record_event("MIGRATED_IN", {"from": src.spec.name}, source="vmlab")
        src._record_event("MIGRATED_OUT", {"to": self.spec.name}, source="vmlab")

    # ------------------------------------------------------------ lifecycle
    @require(RunState.RUNNING, doing="pause")
    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``)."""
        self._events.mark_action("pause")
        await self.qmp("stop")
        self._advance(Trigger.STOP)

    @require(RunState.PAUSED, doing="resume")
    async def resume(self, wait: bool = False) -> None:
        """Start the vCPUs (QMP ``cont``); ``wait=True`` also waits for the agent."""
        self._events.mark_action("resume")
        await self.qmp("cont")
        self._advance(Trigger.RESUME)
        if wait:
            await self.wait_ready()

    @require(RunState.RUNNING, RunState.PAUSED, doing="press the power button")
    async def powerdown(self) -> None:
        """Press the ACPI power button: the guest shuts itself down."""
        self._events.mark_action("powerdown")
        await self.qmp("system_powerdown")

    @require(RunState.RUNNING, RunState.PAUSED, doing="reset")
    async def reset(self) -> None:
        """Hard reset (the reset button): the guest reboots at once."""
        self._events.mark_action("reset")
        if self._agent:
            self._agent.forget_hello()
        await self.qmp("system_reset")

    @require(RunState.RUNNING, RunState.PAUSED, RunState.SHUTTING_DOWN, doing="quit")
    async def quit(self) -> None:
        """Pull the plug from the hypervisor side: QEMU exits at once (QMP ``quit``)."""
        self._events.mark_action("quit")
        self._closing = True
        try:
            await self.qmp("quit")
        except VMError as exc:      # QEMU may go before it answers: the exit below is what counts
            log.debug("%s: QMP quit: %s", self.spec.name, exc.message)
        if await self._wait_exit(10):
            await self._close_channels()     # nothing left pending once QEMU is gone (clean interpreter exit)

    @require(*_STARTED, doing="kill QEMU")
    async def kill(self) -> None:
        """SIGKILL the QEMU process (like pulling the plug, from the host OS)."""
        self._events.mark_action("kill")
        self._closing = True
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
        if await self._wait_exit(10):
            await self._close_channels()     # nothing left pending once QEMU is gone (clean interpreter exit)

    @require(*_STARTED, doing="wait for QEMU to exit")
    async def wait_exit(self, timeout: float = 60) -> int:
        """Wait for QEMU to exit by itself (after a guest poweroff, say)."""
        if not await self._wait_exit(timeout):
            raise VMTimeout("QEMU to exit", timeout, **self._err_kw())
        return self.exit_code if self.exit_code is not None else -1

    @require(*_STARTED, doing="wait for event {name}")
    async def wait_event(self, name: str, *, match: Optional[Dict[str, Any]] = None,
                         timeout: float = 30.0, since: Optional[int] = None) -> Event:
        """Wait for an event (QMP's, or vmlab's LAUNCH/READY/EXIT/GUEST_BYE).

        Looks from ``since`` (an index into ``events``; default: the last
        lifecycle action), so an event that came before you asked is found.
        ``match`` filters on the event's data, e.g. ``{"guest": True}``.
        """
        check_timeout(timeout, allow_none=False)
        return await self._events.wait_for(name, match=match, timeout=timeout, since=since, err_kw=self._err_kw)

    @require(*_STARTED, doing="wait for console output")
    async def expect(self, pattern: Pattern, timeout: float = 30.0, since: Optional[int] = None) -> re.Match[str]:
        """Wait until the console output matches ``pattern`` (a regex); returns the match.

        Searches from ``since`` (a console offset) or, by default, from the end
        of the previous ``expect`` match, like pexpect.
        """
        check_timeout(timeout, allow_none=False)
        return await self._console.expect(self, pattern, timeout, since)

    # ------------------------------------------------------------- shutdown
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the VM for sure: QMP quit, then SIGTERM, then SIGKILL, within ``timeout``."""
        if self.state is RunState.CREATED:
            return
        self._closing = True
        try:
            if self._proc and self._proc.poll() is None:
                deadline = time.monotonic() + timeout
                if self._qmp is not None and not self._gone():
                    try:
                        await asyncio.wait_for(self._qmp.execute("quit"), max(0.1, timeout / 2))
                    except Exception as exc:    # SIGTERM and SIGKILL follow
                        log.debug("%s: QMP quit during shutdown: %r", self.spec.name, exc)
                    await self._wait_exit(max(0.1, min(timeout / 2, deadline - time.monotonic())))
                if self._proc.poll() is None:
                    self._proc.terminate()
                    await self._wait_exit(max(0.1, min(timeout / 4, deadline - time.monotonic())))
                if self._proc.poll() is None:
                    self._proc.kill()
                    await self._wait_exit(5)
        finally:
            await self._teardown(force=False)
        self._advance(Trigger.STOPPED)

    async def close(self, timeout: float = 10.0) -> None:
        """The same as :meth:`shutdown`."""
        await self.shutdown(timeout)

    async def __aenter__(self) -> AsyncVM:
        if self.state is RunState.CREATED:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


def nested_probe_vm(image: GuestImage, timeout: float) -> AsyncVM:
    """The nested guest :mod:`vmlab.vm.nested` boots for doctor (under TCG: KVM inside it)."""
    return AsyncVM(accel="tcg", name="nested-probe", nested=True, image=image, boot_timeout=timeout)


def kvm_probe_vm(image: GuestImage, timeout: float) -> AsyncVM:
    """The VM :mod:`vmlab.vm.accel` boots to prove KVM (its accelerator is fixed: no probing)."""
    vm = AsyncVM(accel="kvm", name="kvm-probe", image=image, boot_timeout=timeout)
    vm.accel = "kvm"
    return vm
