"""What a widget does when one of its handlers (a button click, a slider move, a background thread) fails.

Every failure is

1. shown to the learner in the widget (the ``show`` callable the widget passes: its error area),
2. logged through the ``vmlab`` logger with the traceback (``VMLAB_LOG=debug`` prints it), and
3. raised again in strict mode (``VMLAB_STRICT=1``; the tests and the notebook runs set it), so a broken
   handler fails the run instead of rendering "ok".

Two kinds of vmlab error are the widget doing its job, not a failure, and are only shown: :class:`StateError`
(the learner pressed a button the VM's state does not allow, e.g. the power button of a paused guest) and
:class:`SpecError` (the learner typed or chose something invalid). Strict mode does not raise those.

Use it as a decorator on a handler::

    @handler("start", show=show_in_status)      # show_in_status(text) puts the text in the error area
    def on_start(_button): ...

or call :func:`failed` from an ``except`` block that already exists::

    except Exception as exc:
        failed("touch memory", exc, show=self._show)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, TypeVar

from ..config import strict
from ..errors import SpecError, StateError
from ..i18n import tr
from ..log import get_logger

__all__ = ["EXPECTED", "FAILURES", "WidgetHandlerError", "describe", "failed", "handler"]

log = get_logger("vmlab.widgets")
EXPECTED = (StateError, SpecError)      # shown to the learner; not a failure, not raised in strict mode
F = TypeVar("F", bound=Callable[..., Any])
#: Every unexpected failure in this process, oldest first (at most 100): a notebook run reads it at the end, which
#: also catches failures in background threads (the control panel's boot, the device race) whatever cell they
#: happened under.
FAILURES: List[str] = []


class WidgetHandlerError(RuntimeError):
    """A widget handler failed (raised only in strict mode); the original exception is ``__cause__``."""


def describe(doing: str, exc: BaseException) -> str:
    """One line for the learner: what was being done, the message, the fix if vmlab gave one."""
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    fix = getattr(exc, "fix", None)
    return f"{tr(doing)}: {tr(msg)}" + (tr(" (fix: {fix})").format(fix=tr(fix)) if fix else "")


def failed(doing: str, exc: BaseException, show: Optional[Callable[[str], Any]] = None) -> str:
    """Report a handler's failure: show it, log it, raise in strict mode. Returns the text shown."""
    text = describe(doing, exc)
    if show is not None:
        try:
            show(text)
        except Exception as show_exc:      # the error area itself failed: still logged, still raised
            log.error("widget: showing the error of %r failed: %s", doing, show_exc)
    if isinstance(exc, EXPECTED):
        log.info("widget: %s", text)
        return text
    log.error("widget handler %r failed: %s", doing, text, exc_info=exc)
    if len(FAILURES) < 100:
        FAILURES.append(f"{type(exc).__name__} in {text}")
    if strict():
        raise WidgetHandlerError(f"widget handler {doing!r} failed (VMLAB_STRICT=1): {text}") from exc
    return text


def handler(doing: str, show: Optional[Callable[[str], Any]] = None) -> Callable[[F], F]:
    """Decorate a handler: its exceptions go through :func:`failed` (shown, logged, raised in strict mode)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                failed(doing, exc, show)
                return None
        return guarded  # type: ignore[return-value]
    return wrap
