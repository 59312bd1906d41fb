"""pynbd: a pure-Python Network Block Device toolkit (server, client and tools)."""

from __future__ import annotations

__version__ = "0.1.0"

from pynbd.errors import (  # noqa: E402
    CommandError, ConfigError, LocalProtocolError, NBDError, OptionError, ProtocolError,
    RemoteProtocolError,
)
from pynbd.plugin import Filter, Plugin  # noqa: E402

__all__ = [
    "__version__", "NBDError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "OptionError", "CommandError", "ConfigError", "Plugin", "Filter",
]
