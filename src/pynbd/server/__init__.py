"""The NBD server: listeners, connections, validation and the backend chain."""

from pynbd.server.backend import Chain, Context
from pynbd.server.server import Server, ServerConfig

__all__ = ["Chain", "Context", "Server", "ServerConfig"]
