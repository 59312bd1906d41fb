"""libnbd's constants and flags, with libnbd's names and values (``nbd.TLS_DISABLE``,
``nbd.CMD_FLAG_FUA``, ``nbd.STRICT_MASK``...), and the limits libnbd 1.14 works within."""

from __future__ import annotations

__all__ = [
    "AIO_DIRECTION_BOTH",
    "AIO_DIRECTION_READ",
    "AIO_DIRECTION_WRITE",
    "ALLOW_TRANSPORT_MASK",
    "ALLOW_TRANSPORT_TCP",
    "ALLOW_TRANSPORT_UNIX",
    "ALLOW_TRANSPORT_VSOCK",
    "CMD_FLAG_DF",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_FUA",
    "CMD_FLAG_MASK",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "CONTEXT_BASE_ALLOCATION",
    "HANDSHAKE_FLAG_FIXED_NEWSTYLE",
    "HANDSHAKE_FLAG_MASK",
    "HANDSHAKE_FLAG_NO_ZEROES",
    "NAMESPACE_BASE",
    "READ_DATA",
    "READ_ERROR",
    "READ_HOLE",
    "SHUTDOWN_ABANDON_PENDING",
    "SHUTDOWN_MASK",
    "SIZE_MAXIMUM",
    "SIZE_MINIMUM",
    "SIZE_PAYLOAD",
    "SIZE_PREFERRED",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRICT_ALIGN",
    "STRICT_BOUNDS",
    "STRICT_COMMANDS",
    "STRICT_FLAGS",
    "STRICT_MASK",
    "STRICT_PAYLOAD",
    "STRICT_ZERO_SIZE",
    "TLS_ALLOW",
    "TLS_DISABLE",
    "TLS_REQUIRE",
]

TLS_DISABLE = 0
TLS_ALLOW = 1
TLS_REQUIRE = 2

SIZE_MINIMUM = 0
SIZE_PREFERRED = 1
SIZE_MAXIMUM = 2
SIZE_PAYLOAD = 3  # 1.16

CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_MASK = 0x1f

HANDSHAKE_FLAG_FIXED_NEWSTYLE = 0x01
HANDSHAKE_FLAG_NO_ZEROES = 0x02
HANDSHAKE_FLAG_MASK = 0x03

STRICT_COMMANDS = 0x01
STRICT_FLAGS = 0x02
STRICT_BOUNDS = 0x04
STRICT_ZERO_SIZE = 0x08
STRICT_ALIGN = 0x10
STRICT_PAYLOAD = 0x20  # 1.16; not part of the 1.14 mask (nor of the default)
STRICT_MASK = 0x1f

ALLOW_TRANSPORT_TCP = 0x01
ALLOW_TRANSPORT_UNIX = 0x02
ALLOW_TRANSPORT_VSOCK = 0x04
ALLOW_TRANSPORT_MASK = 0x07

SHUTDOWN_ABANDON_PENDING = 0x10000
SHUTDOWN_MASK = 0x10000

AIO_DIRECTION_READ = 1
AIO_DIRECTION_WRITE = 2
AIO_DIRECTION_BOTH = 3
READ_DATA = 1
READ_HOLE = 2
READ_ERROR = 3
NAMESPACE_BASE = "base:"
CONTEXT_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2

#: The libnbd release whose API and behaviour this package reproduces.
LIBNBD_VERSION = "1.14.2"
#: Every mask set_strict_mode accepts (1.14's bits plus 1.16's STRICT_PAYLOAD).
STRICT_ACCEPTED = STRICT_MASK | STRICT_PAYLOAD
#: How long close() lets commands in flight finish before NBD_CMD_DISC and the hang-up.
CLOSE_TIMEOUT = 10.0

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

#: NBD URI scheme -> (transport, TLS), as lib/uri.c compares them (case-sensitively).
URI_SCHEMES = {"nbd": ("tcp", False), "nbds": ("tcp", True), "nbd+unix": ("unix", False),
               "nbds+unix": ("unix", True), "nbd+vsock": ("vsock", False),
               "nbds+vsock": ("vsock", True)}
TRANSPORT_BIT = {"tcp": ALLOW_TRANSPORT_TCP, "unix": ALLOW_TRANSPORT_UNIX,
                 "vsock": ALLOW_TRANSPORT_VSOCK}
