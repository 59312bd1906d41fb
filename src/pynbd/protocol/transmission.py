"""Transmission phase, sans-IO: the request encoder (every client's) and the reply builders
(the server's).

The server's hot path parses requests with the precompiled structs and uses the ``*_header``
builders for replies. Clients encode requests with :func:`build_request` and decode replies
with :class:`pynbd.protocol.replies.ReplyDecoder`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pynbd._record import Record
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
    "Request",
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


class Request(Record):
    """A request header's fields (a plain class: a client that encodes requests starts
    without importing dataclasses)."""

    __slots__ = ("flags", "type", "cookie", "offset", "length")  # noqa: RUF023 - wire order

    def __init__(self, flags: int, type: int, cookie: int, offset: int, length: int) -> None:
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length


def request_has_payload(cmd: int, flags: int, extended: bool) -> bool:
    """Whether a request header is followed by ``length`` bytes of payload."""
    if extended:
        return bool(flags & CmdFlag.PAYLOAD_LEN)
    return cmd == Cmd.WRITE


_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_pack_request = REQUEST.pack
_pack_ext_request = EXT_REQUEST.pack


def build_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0,
                  extended: bool = False, payload: bool = False) -> bytes:
    """A request header: THE request encoder, every client's. With extended headers a
    request whose ``payload`` follows carries NBD_CMD_FLAG_PAYLOAD_LEN."""
    if extended:
        if payload:
            flags |= _PAYLOAD_LEN
        return _pack_ext_request(EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return _pack_request(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


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
