"""Where ``pynbd serve`` logs (``--log=stderr|syslog|null``, ``-v``), in nbdkit's shape."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

__all__ = ["setup_logging"]

_SHAPE = "pynbd: %(level)s: %(message)s"


class _Formatter(logging.Formatter):
    """nbdkit's message shape: ``pynbd: error: MESSAGE`` (log scrapers match it)."""

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


class _SysLog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass  # syslog went away: losing a message beats a traceback on every error


def _syslog_available() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect("/dev/log")
        except OSError:
            return False
    return True


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _errors_handler(dest: str, verbose: bool) -> tuple[str, logging.Handler | None]:
    """The handler for warnings and errors, and the destination actually used."""
    if dest == "syslog":
        if not _syslog_available():
            dest = "stderr"  # no syslog daemon here: stderr is better than nothing
        else:
            handler: logging.Handler = _SysLog(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(_Formatter(f"pynbd[{os.getpid()}]: %(level)s: %(message)s"))
            handler.setLevel(logging.WARNING)
            return dest, handler
    if dest == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(_SHAPE))
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
        return dest, handler
    return dest, None  # null


def setup_logging(verbose: bool, log: str | None = None, background: bool = False) -> None:
    """--log: where errors go (stderr; syslog, the default once in the background; null).

    Debug messages (-v) always go to stderr, as nbdkit's.
    """
    root = logging.getLogger("pynbd")
    dest, errors = _errors_handler(log or ("syslog" if background else "stderr"), verbose)
    handlers = [errors] if errors is not None else []
    if verbose and dest != "stderr":
        debug = logging.StreamHandler(sys.stderr)
        debug.setFormatter(_Formatter(_SHAPE))
        debug.addFilter(_BelowWarning())
        handlers.append(debug)
    # No handler at all would make logging fall back to its "last resort" stderr handler.
    root.handlers[:] = handlers or [logging.NullHandler()]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False
