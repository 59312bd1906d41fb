"""libnbd's errors: :class:`Error` (``nbd.Error``) and :class:`ClosedHandle`, and how a
failure of the client underneath reads in libnbd's words and errno."""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from pynbd.errors import CommandError, OptionError, ProtocolError, RemoteProtocolError
from pynbd.protocol.client import ExportSizeError
from pynbd.protocol.constants import Rep

__all__ = ["ClosedHandle", "Error", "HangUp", "failure_text", "go_failure_text", "mkerr",
           "option_errno"]


class Error(Exception):
    """Exception thrown when the underlying libnbd call fails.

    ``args == (message, errnum)``. Use ``.string`` for the printable message, ``.errnum`` for
    the numeric errno (0 if the error did not correspond to a system error) and ``.errno`` for
    its Python name (``"EINVAL"``), or None.
    """

    @property
    def string(self) -> Any:
        return self.args[0]

    @property
    def errnum(self) -> Any:
        return self.args[1]

    @property
    def errno(self) -> str | None:
        try:
            return _errno.errorcode[self.args[1]]
        except (KeyError, IndexError, TypeError):
            return None

    def __str__(self) -> str:
        if self.errno:
            return f"{self.string} ({self.errno})"
        return f"{self.string}"


class ClosedHandle(ValueError):
    """Raised by every method of an :class:`NBD` handle after :meth:`NBD.close`."""


def mkerr(ctx: str, msg: str, errnum: int = 0) -> Error:
    text = f"{ctx}: {msg}" if ctx else msg
    if errnum:
        text += ": " + os.strerror(errnum)
    return Error(text, errnum)


class HangUp(RemoteProtocolError):
    """The server closed the connection while negotiating (libnbd: "recv: server
    disconnected unexpectedly")."""


#: NBD_REP_ERR_* -> errno, as libnbd's option state machines map them.
REP_ERRNO: dict[int, int] = {
    Rep.ERR_POLICY: _errno.ENOTSUP, Rep.ERR_PLATFORM: _errno.ENOTSUP,
    Rep.ERR_INVALID: _errno.EINVAL, Rep.ERR_TOO_BIG: _errno.EINVAL,
    Rep.ERR_TLS_REQD: _errno.ENOTSUP, Rep.ERR_UNKNOWN: _errno.ENOENT,
    Rep.ERR_SHUTDOWN: _errno.ESHUTDOWN, Rep.ERR_BLOCK_SIZE_REQD: _errno.EINVAL,
    Rep.ERR_UNSUP: _errno.ENOTSUP,
}


def go_failure_text(reply: int, export: str) -> tuple[str, int]:
    """libnbd's message for a refused NBD_OPT_GO when not in option mode."""
    if reply in (Rep.ERR_POLICY, Rep.ERR_PLATFORM):
        return "handshake: server policy prevents NBD_OPT_GO", 0
    if reply in (Rep.ERR_INVALID, Rep.ERR_TOO_BIG):
        return "handshake: server rejected NBD_OPT_GO as invalid", _errno.EINVAL
    if reply == Rep.ERR_TLS_REQD:
        return "handshake: server requires TLS encryption first", _errno.ENOTSUP
    if reply == Rep.ERR_UNKNOWN:
        return f"handshake: server has no export named '{export}'", _errno.ENOENT
    if reply == Rep.ERR_SHUTDOWN:
        return "handshake: server is shutting down", _errno.ESHUTDOWN
    if reply == Rep.ERR_BLOCK_SIZE_REQD:
        return "handshake: server requires specific block sizes", _errno.EINVAL
    return f"handshake: unknown reply from NBD_OPT_GO: 0x{reply:x}", 0


def failure_text(exc: BaseException, *, connecting: bool = False) -> tuple[str, int]:
    """(message, errno) for an exception out of the engine that ended the connection."""
    if isinstance(exc, CommandError):
        return exc.message, exc.errno
    if type(exc).__name__ in ("TLSError", "TLSRefused"):  # pynbd.client.tls (imports ssl)
        return exc.libnbd_text, exc.errno  # type: ignore[attr-defined]
    if isinstance(exc, HangUp):
        return "recv: server disconnected unexpectedly", 0
    if isinstance(exc, ExportSizeError):  # libnbd >= 1.16.5's words (there from get_size)
        return str(exc), exc.errno
    if isinstance(exc, ProtocolError):
        return (f"handshake: {exc}" if connecting else f"protocol error: {exc}"), _errno.EPROTO
    if isinstance(exc, OSError) and exc.errno:
        return "recv", exc.errno
    if isinstance(exc, (ConnectionError, EOFError)):
        return "recv: server disconnected unexpectedly", 0
    return str(exc) or type(exc).__name__, 0


def option_errno(exc: OptionError, kind: str) -> int:
    """The errno of a refused option: GO and INFO map the reply; libnbd 1.14 reports every
    refused LIST or LIST_META_CONTEXT as ENOTSUP."""
    if kind in ("go", "info"):
        return REP_ERRNO.get(exc.reply, _errno.ENOTSUP)
    return _errno.ENOTSUP
