"""The one exception tree of pynbd.

- :class:`ProtocolError` — the peer (or we) broke the protocol; fatal to the connection.
  :class:`LocalProtocolError` is our side's mistake, :class:`RemoteProtocolError` the peer's.
- :class:`OptionError` — a negotiation option failed; recoverable while negotiating.
- :class:`CommandError` — a transmission command failed; carries ``errno``; the connection lives.
- :class:`ConfigError` — a bad command line, plugin parameter or setting.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "CommandError",
    "ConfigError",
    "LocalProtocolError",
    "NBDError",
    "OptionError",
    "ProtocolError",
    "RemoteProtocolError",
]


class NBDError(Exception):
    """Base class of every pynbd error."""


class ProtocolError(NBDError):
    """The protocol was broken; the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """Our side was asked to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class OptionError(NBDError):
    """An option request failed with an ``NBD_REP_ERR_*`` reply."""

    def __init__(self, reply: int, message: str = "") -> None:
        super().__init__(message or f"option failed with reply {reply:#x}")
        self.reply = reply
        self.message = message


class CommandError(NBDError):
    """A command failed. ``errno`` is a local errno value (``errno.EINVAL``...)."""

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(self.message)

    @property
    def errname(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


class ConfigError(NBDError):
    """A bad command line, parameter or setting; the message is shown to the user as is."""
