"""The server's byte stream: :class:`pynbd.stream.FdStream` (shared with the client)."""

from pynbd.stream import FdStream

__all__ = ["FdStream"]
