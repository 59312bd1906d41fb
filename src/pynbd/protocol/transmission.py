"""Transmission phase: request parsing and reply building, sans-IO.

The server's hot path parses requests with the precompiled structs and uses the ``*_header``
builders for replies; the client uses the request builders and :class:`ReplyParser`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pynbd.errors import RemoteProtocolError
from pynbd.protocol.constants import (
    EXT_REPLY,
    EXT_REPLY_MAGIC,
    EXT_REQUEST,
    EXT_REQUEST_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
)

__all__ = [
    "Chunk",
    "ReplyParser",
    "Request",
    "SimpleReply",
    "block_status_chunk",
    "build_request",
    "chunk_header",
    "error_chunk",
    "none_chunk",
    "offset_data_header",
    "offset_hole_chunk",
    "request_has_payload",
    "simple_reply",
]

_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")
_BS_ENTRY = struct.Struct(">II")
_BS_EXT_ENTRY = struct.Struct(">QQ")
_BS_EXT_HDR = struct.Struct(">II")


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def request_has_payload(cmd: int, flags: int, extended: bool) -> bool:
    """Whether a request header is followed by ``length`` bytes of payload."""
    if extended:
        return bool(flags & CmdFlag.PAYLOAD_LEN)
    return cmd == Cmd.WRITE


def build_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0,
                  extended: bool = False) -> bytes:
    if extended:
        return EXT_REQUEST.pack(EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# Replies -----------------------------------------------------------------------------------


def simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, rtype: int, cookie: int, length: int, extended: bool = False,
                 offset: int = 0) -> bytes:
    if extended:
        return EXT_REPLY.pack(EXT_REPLY_MAGIC, flags, rtype, cookie, offset, length)
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def offset_data_header(cookie: int, offset: int, datalen: int, done: bool = True,
                       extended: bool = False, req_offset: int = 0) -> bytes:
    """Header of an OFFSET_DATA chunk; ``datalen`` bytes of data follow it."""
    return chunk_header(ReplyFlag.DONE if done else 0, ReplyType.OFFSET_DATA, cookie,
                        8 + datalen, extended, req_offset) + _U64.pack(offset)


def offset_hole_chunk(cookie: int, offset: int, length: int, done: bool = True,
                      extended: bool = False, req_offset: int = 0) -> bytes:
    return chunk_header(ReplyFlag.DONE if done else 0, ReplyType.OFFSET_HOLE, cookie, 12,
                        extended, req_offset) + _HOLE.pack(offset, length)


def error_chunk(cookie: int, error: int, message: str = "", extended: bool = False,
                req_offset: int = 0, offset: int | None = None) -> bytes:
    msg = message.encode("utf-8")
    if len(msg) > 4096:  # the spec's string limit; never cut inside a UTF-8 sequence
        msg = msg[:4096].decode("utf-8", "ignore").encode("utf-8")
    if offset is None:
        payload = _ERR.pack(error, len(msg)) + msg
        rtype = ReplyType.ERROR
    else:
        payload = _ERR.pack(error, len(msg)) + msg + _U64.pack(offset)
        rtype = ReplyType.ERROR_OFFSET
    return chunk_header(ReplyFlag.DONE, rtype, cookie, len(payload), extended, req_offset) + payload


def none_chunk(cookie: int, extended: bool = False, req_offset: int = 0) -> bytes:
    return chunk_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0, extended, req_offset)


def block_status_chunk(cookie: int, ctx_id: int, extents: Iterable[tuple[int, int]],
                       done: bool, extended: bool = False, req_offset: int = 0) -> bytes:
    """A BLOCK_STATUS (compact) or BLOCK_STATUS_EXT (extended headers) chunk."""
    ext = list(extents)
    if extended:
        body = _BS_EXT_HDR.pack(ctx_id, len(ext)) + b"".join(
            _BS_EXT_ENTRY.pack(n, f) for n, f in ext)
        rtype = ReplyType.BLOCK_STATUS_EXT
    else:
        body = ctx_id.to_bytes(4, "big") + b"".join(_BS_ENTRY.pack(n, f) for n, f in ext)
        rtype = ReplyType.BLOCK_STATUS
    return chunk_header(ReplyFlag.DONE if done else 0, rtype, cookie, len(body), extended,
                        req_offset) + body


# Reply parsing (client side) ---------------------------------------------------------------


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
