"""The ``vmlab`` logger: quiet by default, ``VMLAB_LOG=debug`` shows it on stderr.

Use it where a failure is deliberately swallowed (shutdown paths, best-effort cleanup) so the
reason can still be seen::

    from .log import logger
    logger.debug("closing the console log failed: %s", exc)

Nothing is printed unless ``VMLAB_LOG`` is ``debug``, ``info`` or ``warning`` (or the
application configures the ``vmlab`` logger itself, as with any library logger).
"""

from __future__ import annotations

import logging
from typing import Optional

from .config import log_level

__all__ = ["configure", "get_logger", "logger"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR}

logger = logging.getLogger("vmlab")
logger.addHandler(logging.NullHandler())     # a library: no "no handlers" warning, no output

_handler: Optional[logging.Handler] = None


def get_logger(name: str) -> logging.Logger:
    """A child of the ``vmlab`` logger (``get_logger(__name__)`` in a vmlab module)."""
    if name == "vmlab" or name.startswith("vmlab."):
        return logging.getLogger(name)
    return logger.getChild(name)


def configure(level: Optional[str] = None) -> Optional[int]:
    """Attach (or update) a stderr handler at ``level`` (default: ``$VMLAB_LOG``).

    Without a level nothing changes and None is returned. An unknown level name raises
    ValueError naming the accepted ones. Returns the numeric level set.
    """
    global _handler
    name = level if level is not None else log_level()
    if not name:
        return None
    value = LEVELS.get(name.strip().lower())
    if value is None:
        raise ValueError(f"VMLAB_LOG={name!r} is not a log level; use one of: "
                         "debug, info, warning")
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("vmlab %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(_handler)
    _handler.setLevel(value)
    logger.setLevel(value)
    return value


try:
    configure()
except ValueError as _exc:      # a typo in VMLAB_LOG must not break the import: say so, once
    configure("warning")
    logger.warning("%s", _exc)
