"""The NBD wire format, written out again from the specification for the fuzzers.

The fuzzers judge pynbd's server and clients, so they do not use pynbd's own encoder and
decoder (those would agree with themselves whatever the specification says): every magic,
struct and rule here is taken from the NBD protocol document (docs/protocol.md and
/work/shared/reference/nbd-protocol.md name the same values).

:class:`ReplyReader` is a strict reader of a server's transmission replies: anything the
specification forbids raises :class:`Violation`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "CMD", "EOVERFLOW", "ERRNOS", "OPT", "REP", "Chunk", "ReplyReader", "SimpleReply",
    "Violation", "info_request", "meta_request", "option", "request",
]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

GREETING = struct.Struct(">QQH")
OPT_HEADER = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
EXT_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
EXT_CHUNK = struct.Struct(">IHHQQQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class OPT:
    EXPORT_NAME, ABORT, LIST, PEEK_EXPORT, STARTTLS, INFO, GO = 1, 2, 3, 4, 5, 6, 7
    STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS = 8, 9, 10, 11


class REP:
    ACK, SERVER, INFO, META_CONTEXT = 1, 2, 3, 4
    ERR = 1 << 31
    ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_PLATFORM = ERR + 1, ERR + 2, ERR + 3, ERR + 4
    ERR_TLS_REQD, ERR_UNKNOWN, ERR_SHUTDOWN = ERR + 5, ERR + 6, ERR + 7
    ERR_BLOCK_SIZE_REQD, ERR_TOO_BIG, ERR_EXT_HEADER_REQD = ERR + 8, ERR + 9, ERR + 10


class CMD:
    READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
    # command flags
    FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


class TX:
    """Transmission flags."""

    HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, ROTATIONAL, SEND_TRIM = 1, 2, 4, 8, 16, 32
    SEND_WRITE_ZEROES, SEND_DF, CAN_MULTI_CONN, SEND_RESIZE, SEND_CACHE = 64, 128, 256, 512, 1024
    SEND_FAST_ZERO, BLOCK_STATUS_PAYLOAD = 2048, 4096


class RT:
    """Structured reply chunk types."""

    NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, BLOCK_STATUS_EXT = 0, 1, 2, 5, 6
    ERROR, ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2


EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
#: Every error value the specification defines.
ERRNOS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})
DONE = 1
#: A chunk's message may be at most this long (the specification's string limit).
MAX_MESSAGE = 4096


class Violation(Exception):
    """The peer sent something the specification forbids."""


# --------------------------------------------------------------------------- building


def option(opt: int, data: bytes = b"") -> bytes:
    return OPT_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    n = name.encode()
    return U32.pack(len(n)) + n + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def meta_request(name: str, queries: list[str]) -> bytes:
    n = name.encode()
    out = U32.pack(len(n)) + n + U32.pack(len(queries))
    for q in queries:
        b = q.encode()
        out += U32.pack(len(b)) + b
    return out


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0,
            extended: bool = False) -> bytes:
    if extended:
        return EXT_REQUEST.pack(EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# --------------------------------------------------------------------------- reading replies


@dataclass
class SimpleReply:
    cookie: int
    error: int
    data: bytes = b""


@dataclass
class Chunk:
    cookie: int
    flags: int
    type: int
    payload: bytes
    offset: int = 0  # the echoed request offset (extended headers only)

    @property
    def done(self) -> bool:
        return bool(self.flags & DONE)


@dataclass
class Reply:
    """Every chunk of one structured reply, or one simple reply, decoded."""

    cookie: int
    error: int = 0
    message: str = ""
    simple: bool = False
    #: (start relative to the request, length, bytes or None for a hole)
    data: list[tuple[int, int, bytes | None]] = field(default_factory=list)
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error_offsets: list[int] = field(default_factory=list)


class ReplyReader:
    """Reads the replies to requests this side sent, strictly by the specification.

    ``expect(cookie, cmd, offset, length)`` before the reply can come; :meth:`feed` bytes;
    :meth:`replies` returns every reply completed so far (in arrival order of their end).
    """

    def __init__(self, structured: bool, extended: bool) -> None:
        self.structured = structured or extended
        self.extended = extended
        self.buf = bytearray()
        self.pending: dict[int, tuple[int, int, int]] = {}
        self.partial: dict[int, Reply] = {}
        self.done: list[Reply] = []

    def expect(self, cookie: int, cmd: int, offset: int, length: int) -> None:
        if cookie in self.pending:
            raise ValueError(f"cookie {cookie} already pending")
        self.pending[cookie] = (cmd, offset, length)

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self._one():
            pass

    def replies(self) -> list[Reply]:
        out, self.done = self.done, []
        return out

    def _one(self) -> bool:
        buf = self.buf
        if len(buf) < 4:
            return False
        (magic,) = U32.unpack_from(buf, 0)
        if magic == SIMPLE_MAGIC:
            return self._simple()
        if magic == STRUCTURED_MAGIC and self.structured and not self.extended:
            return self._chunk(CHUNK.size)
        if magic == EXT_REPLY_MAGIC and self.extended:
            return self._chunk(EXT_CHUNK.size)
        raise Violation(f"reply magic {magic:#x} (structured={self.structured}, "
                        f"extended={self.extended})")

    def _simple(self) -> bool:
        if self.extended:
            raise Violation("a simple reply after extended headers were negotiated")
        if len(self.buf) < SIMPLE.size:
            return False
        _, error, cookie = SIMPLE.unpack_from(self.buf, 0)
        req = self.pending.get(cookie)
        if req is None:
            raise Violation(f"simple reply for unknown cookie {cookie}")
        cmd, _off, length = req
        if cmd == CMD.READ and self.structured:
            raise Violation("a simple reply to a READ with structured replies")
        n = length if (cmd == CMD.READ and error == 0) else 0
        if len(self.buf) < SIMPLE.size + n:
            return False
        data = bytes(self.buf[SIMPLE.size:SIMPLE.size + n])
        del self.buf[:SIMPLE.size + n]
        del self.pending[cookie]
        r = Reply(cookie, error, simple=True)
        if n:
            r.data.append((0, n, data))
        self.done.append(r)
        return True

    def _chunk(self, hsize: int) -> bool:
        if len(self.buf) < hsize:
            return False
        if self.extended:
            _, flags, rtype, cookie, echo, length = EXT_CHUNK.unpack_from(self.buf, 0)
        else:
            _, flags, rtype, cookie, length = CHUNK.unpack_from(self.buf, 0)
            echo = None
        if cookie not in self.pending:
            raise Violation(f"chunk type {rtype} for unknown cookie {cookie}")
        if length > (64 << 20) + 16:
            raise Violation(f"chunk of {length} bytes")
        if len(self.buf) < hsize + length:
            return False
        payload = bytes(self.buf[hsize:hsize + length])
        del self.buf[:hsize + length]
        _, off, _ = self.pending[cookie]
        if echo is not None and echo != off:
            raise Violation(f"extended chunk echoes offset {echo}, request was at {off}")
        if flags & ~DONE:
            raise Violation(f"reply flags {flags:#x}")
        self._decode(Chunk(cookie, flags, rtype, payload))
        return True

    def _decode(self, c: Chunk) -> None:
        cmd, off, length = self.pending[c.cookie]
        r = self.partial.setdefault(c.cookie, Reply(c.cookie))
        decode_chunk(r, c, cmd, off, length, self.extended)
        if c.done:
            del self.partial[c.cookie]
            del self.pending[c.cookie]
            self.done.append(r)


def decode_chunk(r: Reply, c: Chunk, cmd: int, off: int, length: int, extended: bool) -> None:
    """Check one chunk against its request and file what it says into ``r``."""
    p, t = c.payload, c.type
    if t == RT.NONE:
        if p or not c.done:
            raise Violation("NONE chunk with a payload or without DONE")
    elif t in (RT.OFFSET_DATA, RT.OFFSET_HOLE):
        if cmd != CMD.READ:
            raise Violation(f"content chunk for command {cmd}")
        if t == RT.OFFSET_DATA:
            if len(p) < 9:
                raise Violation("OFFSET_DATA shorter than 9 bytes")
            start, n, data = U64.unpack_from(p)[0], len(p) - 8, p[8:]
        else:
            if len(p) != 12:
                raise Violation(f"OFFSET_HOLE of {len(p)} bytes")
            start, n = struct.unpack(">QI", p)
            data = None
            if n == 0:
                raise Violation("OFFSET_HOLE of length 0")
        if start < off or start + n > off + length:
            raise Violation(f"content chunk [{start}, +{n}) outside the request [{off}, +{length})")
        r.data.append((start - off, n, data))
    elif t in (RT.BLOCK_STATUS, RT.BLOCK_STATUS_EXT):
        decode_status(r, p, t, cmd, extended)
    elif t & (1 << 15):
        decode_error(r, p, t, off, length)
    else:
        raise Violation(f"unknown chunk type {t}")


def decode_status(r: Reply, p: bytes, t: int, cmd: int, extended: bool) -> None:
    if cmd != CMD.BLOCK_STATUS:
        raise Violation(f"status chunk for command {cmd}")
    if (t == RT.BLOCK_STATUS_EXT) != extended:
        raise Violation(f"status chunk type {t} with extended={extended}")
    if extended:
        if len(p) < 24 or (len(p) - 8) % 16:
            raise Violation(f"BLOCK_STATUS_EXT of {len(p)} bytes")
        ctx, count = struct.unpack_from(">II", p)
        ext = [struct.unpack_from(">QQ", p, 8 + 16 * i) for i in range((len(p) - 8) // 16)]
        if count != len(ext):
            raise Violation(f"BLOCK_STATUS_EXT count {count} for {len(ext)} descriptors")
    else:
        if len(p) < 12 or (len(p) - 4) % 8:
            raise Violation(f"BLOCK_STATUS of {len(p)} bytes")
        (ctx,) = U32.unpack_from(p)
        ext = [struct.unpack_from(">II", p, 4 + 8 * i) for i in range((len(p) - 4) // 8)]
    if ctx in r.status:
        raise Violation(f"two status chunks for context {ctx}")
    r.status[ctx] = [(int(n), int(f)) for n, f in ext]


def decode_error(r: Reply, p: bytes, t: int, off: int, length: int) -> None:
    if len(p) < 6:
        raise Violation(f"error chunk of {len(p)} bytes")
    err, mlen = struct.unpack_from(">IH", p)
    if err == 0:
        raise Violation("error chunk with error 0")
    extra = 8 if t == RT.ERROR_OFFSET else 0
    if t in (RT.ERROR, RT.ERROR_OFFSET) and 6 + mlen + extra != len(p):
        raise Violation(f"error chunk: message of {mlen} in {len(p)} bytes")
    if mlen > MAX_MESSAGE:
        raise Violation(f"error message of {mlen} bytes")
    if t == RT.ERROR_OFFSET:
        (eoff,) = U64.unpack_from(p, 6 + mlen)
        if not off <= eoff < off + length:
            raise Violation(f"ERROR_OFFSET {eoff} outside the request")
        r.error_offsets.append(eoff)
    r.error = r.error or err
    r.message = r.message or p[6:6 + mlen].decode("utf-8", "replace")


def read_data(r: Reply, length: int) -> bytes:
    """The bytes a successful READ reply carries; a Violation unless its chunks cover the
    request exactly once."""
    out = bytearray(length)
    pos = 0
    for start, n, data in sorted(r.data, key=lambda x: x[0]):
        if start != pos:
            raise Violation(f"READ reply {'overlaps' if start < pos else 'leaves a gap'} at {pos}")
        if data is not None:
            out[start:start + n] = data
        pos = start + n
    if pos != length:
        raise Violation(f"READ reply covers {pos} of {length} bytes")
    return bytes(out)
