"""Errors raised by vmlab.

Every error names the problem and, where there is one, the fix. Errors that
wrap another keep it as ``__cause__`` (``raise ... from exc``).

The tree::

    VMLabError                  base; .fix is the suggested remedy (or None)
     +-- SpecError              bad machine spec or argument (also a ValueError);
     |                          .field names the offending field. Raised before
     |                          QEMU starts.
     +-- SetupError             the host lacks something (QEMU, a tool, a package)
     |    +-- ImageError        the guest image cannot be built or is damaged
     |    +-- AccelUnavailable  the accelerator asked for cannot be used here
     +-- VMError                a running (or starting) VM failed; carries
     |    |                     .command, .stderr and .console_tail
     |    +-- LaunchError       QEMU exited while starting (.exit_code)
     |    +-- VMTimeout         a phase did not finish in time (.phase); also a
     |    |                     TimeoutError
     |    +-- VMDied            QEMU went away unexpectedly (.exit_code)
     |    +-- StateError        the operation is not valid in the current run state
     |    +-- GuestError        the guest agent reported a failure, or a command
     |                          run with check=True exited non-zero (.result)
     +-- ToolError              a host tool (qemu-img, mke2fs, gcc...) ran and failed;
     |    |                     .command, .exit_code, .stderr (its tail)
     |    +-- DiskError         a disk tool (qemu-img, qemu-io, e2fsprogs) failed
     +-- ExperimentError        an experiment failed part way; .rows keeps the
                                rows measured so far (a pandas DataFrame)

A tool that is missing altogether is a SetupError (the fix names the Debian
package); one that fails while building the guest image is an ImageError.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


class VMLabError(Exception):
    """Base class of every vmlab error."""

    def __init__(self, message: str, *, fix: Optional[str] = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class SpecError(VMLabError, ValueError):
    """A machine spec or an argument is invalid; raised before QEMU starts."""

    def __init__(self, field: str, message: str, *, fix: Optional[str] = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}", fix=fix)


class SetupError(VMLabError):
    """Something the host needs is missing or unusable."""


class ImageError(SetupError):
    """The guest image cannot be built, or a cached one is damaged."""


class AccelUnavailable(SetupError):
    """The accelerator asked for cannot be used on this host."""

    def __init__(self, accel: str, reason: str, *, fix: Optional[str] = None) -> None:
        self.accel = accel
        self.reason = reason
        super().__init__(f"accelerator {accel!r} is not available on this host: {reason}",
                         fix=fix)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class VMError(VMLabError):
    """A VM failed; carries what is needed to see why."""

    def __init__(self, message: str, *, fix: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, stderr: str = "",
                 console_tail: str = "", vm_name: str = "") -> None:
        self.command = list(command) if command else []
        self.stderr = stderr or ""
        self.console_tail = console_tail or ""
        self.vm_name = vm_name
        super().__init__(message, fix=fix)

    def __str__(self) -> str:
        text = super().__str__()
        if self.stderr.strip():
            text += "\n  QEMU stderr:\n    " + _tail(self.stderr, 10).replace("\n", "\n    ")
        if self.console_tail.strip():
            text += "\n  console tail:\n    " + _tail(self.console_tail, 15).replace("\n", "\n    ")
        if self.command:
            text += "\n  command: " + " ".join(self.command)
        return text


class LaunchError(VMError):
    """QEMU exited (or could not be executed) while the VM was starting."""

    def __init__(self, message: str, *, exit_code: Optional[int] = None, **kw: Any) -> None:
        self.exit_code = exit_code
        super().__init__(message, **kw)


class VMTimeout(VMError, TimeoutError):
    """A phase (boot, agent, command, event, shutdown...) did not finish in time."""

    def __init__(self, phase: str, seconds: float, **kw: Any) -> None:
        self.phase = phase
        self.seconds = seconds
        kw.setdefault("fix", "look at the console tail below; raise the timeout "
                             "if the host is slow (TCG is 10-50x slower than KVM)")
        super().__init__(f"timed out after {seconds:g} s waiting for {phase}", **kw)


class VMDied(VMError):
    """QEMU went away while the VM was in use."""

    def __init__(self, message: str, *, exit_code: Optional[int] = None, **kw: Any) -> None:
        self.exit_code = exit_code
        super().__init__(message, **kw)


class StateError(VMError):
    """The operation is not valid in the VM's current run state."""


class GuestError(VMError):
    """The guest agent reported an error, or a checked command failed."""

    def __init__(self, message: str, *, result: Any = None, **kw: Any) -> None:
        self.result = result
        super().__init__(message, **kw)


class ToolError(VMLabError):
    """A host tool ran and failed (non-zero exit, timeout); ``.stderr`` says why.

    The message ends with the tail of the tool's stderr (or stdout), indented.
    """

    def __init__(self, message: str, *, fix: Optional[str] = None, stderr: str = "",
                 command: Optional[Sequence[str]] = None, exit_code: Optional[int] = None) -> None:
        self.stderr = stderr or ""
        self.command = [str(c) for c in command] if command else []
        self.exit_code = exit_code
        detail = _tail(self.stderr, 15).strip()
        if detail:
            message += "\n    " + detail.replace("\n", "\n    ")
        super().__init__(message, fix=fix)


class DiskError(ToolError):
    """A disk tool (qemu-img, qemu-io, mke2fs, e2fsck, debugfs) failed; ``.stderr`` says why."""


class ExperimentError(VMLabError):
    """An experiment failed part way; ``rows`` keeps what was measured."""

    def __init__(self, message: str, *, rows: Any = None, fix: Optional[str] = None) -> None:
        self.rows = rows
        super().__init__(message, fix=fix)
