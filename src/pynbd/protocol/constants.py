"""Wire constants of the NBD protocol, named as in the specification.

Every integer on the wire is big-endian. Unknown values received from a peer stay
plain ints (use :func:`name_of` to print them); they never raise.
"""

from __future__ import annotations

import errno as _errno
import struct
from enum import IntEnum, IntFlag

__all__ = [
    "CONTEXT_BASE_ALLOCATION",
    "EXPORT_NAME_REPLY",
    "EXT_REPLY",
    "EXT_REPLY_MAGIC",
    "EXT_REQUEST",
    "EXT_REQUEST_MAGIC",
    "GREETING",
    "IHAVEOPT",
    "NBDMAGIC",
    "NEED_DATA",
    "OLDSTYLE_GREETING",
    "OLDSTYLE_MAGIC",
    "OPT_HEADER",
    "OPT_REPLY_HEADER",
    "REPLY_MAGIC_OPT",
    "REQUEST",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY",
    "STRUCTURED_REPLY_MAGIC",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "Err",
    "HandshakeFlag",
    "Info",
    "Opt",
    "Rep",
    "ReplyFlag",
    "ReplyType",
    "State",
    "TxFlag",
    "errno_to_nbd",
    "name_of",
    "nbd_to_errno",
]

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC_OPT = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

CONTEXT_BASE_ALLOCATION = "base:allocation"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    """Transmission (export) flags."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Err(IntEnum):
    """Error numbers on the wire (never the platform's errno values)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(IntFlag):
    """base:allocation status bits."""

    HOLE = 1 << 0
    ZERO = 1 << 1


_ERRNO_TO_NBD = {
    0: Err.OK,
    _errno.EPERM: Err.EPERM,
    _errno.EROFS: Err.EPERM,
    _errno.EIO: Err.EIO,
    _errno.ENOMEM: Err.ENOMEM,
    _errno.EINVAL: Err.EINVAL,
    _errno.ENOSPC: Err.ENOSPC,
    _errno.EDQUOT: Err.ENOSPC,
    _errno.EFBIG: Err.ENOSPC,
    _errno.EOVERFLOW: Err.EOVERFLOW,
    _errno.ENOTSUP: Err.ENOTSUP,
    _errno.EOPNOTSUPP: Err.ENOTSUP,
    _errno.ESHUTDOWN: Err.ESHUTDOWN,
}

_NBD_TO_ERRNO = {
    Err.OK: 0,
    Err.EPERM: _errno.EPERM,
    Err.EIO: _errno.EIO,
    Err.ENOMEM: _errno.ENOMEM,
    Err.EINVAL: _errno.EINVAL,
    Err.ENOSPC: _errno.ENOSPC,
    Err.EOVERFLOW: _errno.EOVERFLOW,
    Err.ENOTSUP: _errno.ENOTSUP,
    Err.ESHUTDOWN: _errno.ESHUTDOWN,
}


def errno_to_nbd(err: int, *, fast_zero: bool = False, df: bool = False) -> int:
    """Map a local errno to the NBD error to put on the wire (nbdkit's rules).

    ENOTSUP is only sent for a FAST_ZERO request and EOVERFLOW only for a DF read;
    anything unknown becomes EINVAL.
    """
    nbd = _ERRNO_TO_NBD.get(err, Err.EINVAL)
    if nbd == Err.ENOTSUP and not fast_zero:
        return Err.EINVAL
    if nbd == Err.EOVERFLOW and not df:
        return Err.EINVAL
    return int(nbd)


def nbd_to_errno(err: int) -> int:
    """Map an NBD error from the wire to a local errno (unknown values become EINVAL)."""
    return _NBD_TO_ERRNO.get(err, _errno.EINVAL)  # type: ignore[call-overload]


def name_of(enum: type[IntEnum], value: int) -> str:
    """The spec's name of a value, or the number itself when it is unknown."""
    try:
        return enum(value).name
    except ValueError:
        return str(value)


# Precompiled wire structures (big-endian).
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OLDSTYLE_GREETING = struct.Struct(">QQQI124x")  # NBDMAGIC, OLDSTYLE_MAGIC, size, flags
OPT_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPT_REPLY_HEADER = struct.Struct(">QIII")  # REPLY_MAGIC_OPT, option, type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXT_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
EXT_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: What the sans-IO handshakes (``protocol.handshake``, ``protocol.client``) return when
#: they need more bytes before the next event.
NEED_DATA = NeedData()
