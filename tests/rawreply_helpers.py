"""A raw reply parser for the tests' raw client (tests/e2e/rawclient.py): it splits a reply
stream into simple replies and structured chunks and decodes each chunk's fields, checking
only their framing. It is the tests' instrument for seeing exactly what a server sent; pynbd's
clients decode replies with pynbd.protocol.replies.ReplyDecoder, which also checks every reply
against its request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pynbd.errors import RemoteProtocolError
from pynbd.protocol.constants import (
    EXT_REPLY,
    EXT_REPLY_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)

__all__ = ["Chunk", "ReplyParser", "SimpleReply"]

_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")
_BS_ENTRY = struct.Struct(">II")
_BS_EXT_ENTRY = struct.Struct(">QQ")
_BS_EXT_HDR = struct.Struct(">II")


@dataclass
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes
    offset: int = 0  # echoed request offset (extended headers)
    # decoded fields
    data_offset: int = 0
    data: bytes = b""
    hole_length: int = 0
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    context_id: int = 0
    extents: list[tuple[int, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)


class ReplyParser:
    """Parse replies from bytes. ``read_length(cookie)`` tells how many data bytes a simple
    reply to a successful READ carries (the length is not on the wire)."""

    def __init__(self, structured: bool = False, extended: bool = False) -> None:
        self.structured = structured
        self.extended = extended
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self, read_length: dict[int, int] | None = None) -> SimpleReply | Chunk | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        magic = int.from_bytes(buf[:4], "big")
        if magic == SIMPLE_REPLY_MAGIC and not self.extended:
            if len(buf) < SIMPLE_REPLY.size:
                return None
            _, error, cookie = SIMPLE_REPLY.unpack_from(buf)
            n = (read_length or {}).get(cookie, 0) if error == 0 else 0
            if len(buf) < SIMPLE_REPLY.size + n:
                return None
            data = bytes(buf[SIMPLE_REPLY.size : SIMPLE_REPLY.size + n])
            del buf[: SIMPLE_REPLY.size + n]
            return SimpleReply(error, cookie, data)
        if magic == STRUCTURED_REPLY_MAGIC and self.structured and not self.extended:
            hdr = STRUCTURED_REPLY
            if len(buf) < hdr.size:
                return None
            _, flags, rtype, cookie, length = hdr.unpack_from(buf)
            req_off = 0
        elif magic == EXT_REPLY_MAGIC and self.extended:
            hdr = EXT_REPLY
            if len(buf) < hdr.size:
                return None
            _, flags, rtype, cookie, req_off, length = hdr.unpack_from(buf)
        else:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        if len(buf) < hdr.size + length:
            return None
        payload = bytes(buf[hdr.size : hdr.size + length])
        del buf[: hdr.size + length]
        return _decode_chunk(Chunk(flags, rtype, cookie, payload, req_off), self.extended)


def _decode_chunk(c: Chunk, extended: bool) -> Chunk:
    p = c.payload
    t = c.type
    if t == ReplyType.NONE:
        if p:
            raise RemoteProtocolError("NONE chunk with a payload")
        if not c.flags & ReplyFlag.DONE:
            raise RemoteProtocolError("NONE chunk without the DONE flag")
    elif t == ReplyType.OFFSET_DATA:
        if len(p) < 9:
            raise RemoteProtocolError("OFFSET_DATA chunk too short")
        c.data_offset = _U64.unpack_from(p)[0]
        c.data = p[8:]
    elif t == ReplyType.OFFSET_HOLE:
        if len(p) != 12:
            raise RemoteProtocolError("OFFSET_HOLE chunk has the wrong length")
        c.data_offset, c.hole_length = _HOLE.unpack(p)
    elif t == ReplyType.BLOCK_STATUS:
        if extended:
            raise RemoteProtocolError("BLOCK_STATUS chunk under extended headers")
        if len(p) < 12 or (len(p) - 4) % 8:
            raise RemoteProtocolError("BLOCK_STATUS chunk has a bad length")
        c.context_id = int.from_bytes(p[:4], "big")
        c.extents = [_BS_ENTRY.unpack_from(p, 4 + 8 * i) for i in range((len(p) - 4) // 8)]
    elif t == ReplyType.BLOCK_STATUS_EXT:
        if not extended:
            raise RemoteProtocolError("BLOCK_STATUS_EXT chunk without extended headers")
        if len(p) < 24 or (len(p) - 8) % 16:
            raise RemoteProtocolError("BLOCK_STATUS_EXT chunk has a bad length")
        c.context_id, n = _BS_EXT_HDR.unpack_from(p)
        c.extents = [_BS_EXT_ENTRY.unpack_from(p, 8 + 16 * i) for i in range((len(p) - 8) // 16)]
        if n != len(c.extents):
            raise RemoteProtocolError("BLOCK_STATUS_EXT count does not match its length")
    elif t & 0x8000:
        # Every error chunk type (known or not) starts with error, msglen, message; the
        # header length then covers the type's remaining fields.
        if len(p) < 6:
            raise RemoteProtocolError("error chunk too short")
        c.error, mlen = _ERR.unpack_from(p)
        if mlen > len(p) - 6:
            raise RemoteProtocolError("error chunk message overruns the chunk")
        c.message = p[6 : 6 + mlen].decode("utf-8", "replace")
        if t == ReplyType.ERROR_OFFSET:
            if len(p) != 6 + mlen + 8:
                raise RemoteProtocolError("ERROR_OFFSET chunk length does not match its message")
            c.error_offset = _U64.unpack_from(p, 6 + mlen)[0]
        elif t == ReplyType.ERROR and len(p) != 6 + mlen:
            raise RemoteProtocolError("ERROR chunk length does not match its message")
    else:
        raise RemoteProtocolError(f"unknown chunk type {t}")
    return c
