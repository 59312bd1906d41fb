"""pynbd: a pure-Python Network Block Device toolkit (server, client and tools)."""

from __future__ import annotations

__version__ = "0.1.0"

from pynbd.errors import (
    CommandError,
    ConfigError,
    LocalProtocolError,
    NBDError,
    OptionError,
    ProtocolError,
    RemoteProtocolError,
)
from pynbd.plugin import Filter, Plugin

__all__ = [
    "CommandError",
    "ConfigError",
    "Filter",
    "LocalProtocolError",
    "NBDError",
    "OptionError",
    "Plugin",
    "ProtocolError",
    "RemoteProtocolError",
    "__version__",
]
