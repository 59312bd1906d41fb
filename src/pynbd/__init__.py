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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pynbd.plugin import Filter, Plugin


def __getattr__(name: str) -> object:
    # The plugin API is loaded when first used, so the client and tools start faster.
    if name in ("Filter", "Plugin"):
        from pynbd import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'pynbd' has no attribute {name!r}")

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
