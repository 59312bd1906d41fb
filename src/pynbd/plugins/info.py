"""The info plugin: a disk that tells the client about itself and the server. Its manual page
is :class:`InfoPlugin`'s docstring."""

from __future__ import annotations

import binascii
import errno
import logging
import socket
import struct
import time
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import CacheMode, Plugin, ThreadModel, connection

__all__ = ["InfoPlugin"]

log = logging.getLogger("pynbd.plugins.info")

_MODES = ("exportname", "base64exportname", "address", "time", "uptime", "conntime")
_TIME = struct.Struct(">QI")  # seconds (u64), microseconds (u32), big endian


class _Handle:
    __slots__ = ("data", "opened")

    def __init__(self, data: bytes, opened: float) -> None:
        self.data = data
        self.opened = opened


def _address() -> bytes:
    info = connection()
    family = getattr(info, "family", None)
    addr = getattr(info, "peer_address", None)
    if family == socket.AF_INET and addr:
        return f"{addr[0]}:{addr[1]}".encode()
    if family == socket.AF_INET6 and addr:
        return f"[{addr[0]}]:{addr[1]}".encode()
    if family == getattr(socket, "AF_VSOCK", -1) and addr:
        return f"vsock:{addr[0]}:{addr[1]}".encode()
    return b"unix"


class InfoPlugin(Plugin):
    """NAME
        info - pynbd plugin to serve information about the client and server

    SYNOPSIS
        pynbd serve info [mode=]exportname|base64exportname|address|time|uptime|conntime

    DESCRIPTION
        info is a test plugin which serves, as a read-only disk, information about the
        client and the server.

        In its default mode (exportname) the disk is the export name the client asked for
        ("reflection disk"); base64exportname is the same with the name base64-decoded, so
        any binary data can be sent (an export name is at most 4096 bytes). address serves
        the client's IP address and port as text ("127.0.0.1:40000", "[::1]:40000"; "unix"
        on a Unix socket). time, uptime and conntime serve 12 bytes: seconds (64-bit) and
        microseconds (32-bit), big endian, of the wall-clock time, the server's uptime, or
        the time since this connection was opened; read all 12 bytes in one request.

        The disk is read-only; put the cow filter on top to make it writable.

        Difference from nbdkit 1.32: uptime and conntime are measured with a monotonic
        clock, so they never jump when the system clock is set (nbdkit 1.32 uses the
        wall clock and documents the jumps as a bug).

        This is nbdkit-info-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [mode=]MODE
            One of exportname (the default), base64exportname, address, time, uptime and
            conntime. "mode=" may be omitted.

    EXAMPLES
        A reflection disk:

            pynbd serve info mode=exportname
            nbdsh -u 'nbd://localhost/hello' -c 'print(h.pread(h.get_size(), 0))'

        The client's address:

            pynbd serve info address

        The server's clock:

            pynbd serve -U - info time --run 'nbdcopy "$uri" - | od -An -tx1'
    """

    name = "info"
    version = "1.0"
    magic_config_key = "mode"
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = (
        "mode=exportname|base64exportname|address|time|uptime|conntime\n"
        "                          Plugin mode (default exportname).")

    def __init__(self) -> None:
        self._mode = "exportname"
        self._started = time.monotonic()

    def config(self, key: str, value: str) -> None:
        if key != "mode":
            raise ConfigError(f"unknown parameter '{key}'")
        if value.lower() not in _MODES:
            raise ConfigError(f"unknown mode: '{value}'")
        self._mode = value.lower()

    def dump_plugin(self) -> list[str]:
        return ["info_address=yes", "info_base64=yes"]

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        data = b""
        if self._mode == "exportname":
            data = export_name.encode("utf-8", "surrogateescape")
        elif self._mode == "base64exportname":
            try:
                data = binascii.a2b_base64(export_name.encode(), strict_mode=True)
            except (binascii.Error, UnicodeEncodeError):
                log.error("base64: Base64 decoding error.")
                raise CommandError(errno.EINVAL, "base64: Base64 decoding error.") from None
        elif self._mode == "address":
            data = _address()
        return _Handle(data, time.monotonic())

    def close(self, h: Any) -> None:
        pass

    def get_size(self, h: _Handle) -> int:
        if self._mode in ("time", "uptime", "conntime"):
            return _TIME.size
        return len(h.data)

    def can_multi_conn(self, h: Any) -> bool:
        return self._mode in ("exportname", "base64exportname")

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: _Handle, count: int, offset: int, flags: int) -> Any:
        if self._mode == "time":
            now = time.time()
        elif self._mode == "uptime":
            now = time.monotonic() - self._started
        elif self._mode == "conntime":
            now = time.monotonic() - h.opened
        else:
            return h.data[offset:offset + count]
        usec = int(now * 1_000_000)
        return _TIME.pack(usec // 1_000_000, usec % 1_000_000)[offset:offset + count]
