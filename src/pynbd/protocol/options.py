"""Option payloads: builders and strict parsers, shared by server and client.

Parsers raise :class:`~pynbd.errors.OptionError` with the spec's reply type
(``ERR_INVALID`` for malformed payloads, ``ERR_TOO_BIG`` for too many queries).
"""

from __future__ import annotations

import struct

from pynbd._record import Record
from pynbd.errors import OptionError, RemoteProtocolError
from pynbd.limits import MAX_META_QUERIES, MAX_STRING
from pynbd.protocol.constants import Info, Rep

__all__ = [
    "InfoReply",
    "build_info_block_size",
    "build_info_description",
    "build_info_export",
    "build_info_name",
    "build_info_request",
    "build_meta_request",
    "build_rep_meta_context",
    "build_rep_server",
    "decode_string",
    "parse_info_reply",
    "parse_info_request",
    "parse_meta_request",
    "parse_rep_meta_context",
    "parse_rep_server",
]

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


def decode_string(raw: bytes | memoryview, what: str) -> str:
    """Decode a protocol string: UTF-8, no NUL, at most MAX_STRING bytes."""
    if len(raw) > MAX_STRING:
        raise OptionError(Rep.ERR_INVALID, f"{what} is longer than {MAX_STRING} bytes")
    b = bytes(raw)
    if b"\0" in b:
        raise OptionError(Rep.ERR_INVALID, f"{what} contains a NUL byte")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(Rep.ERR_INVALID, f"{what} is not valid UTF-8") from None


def _encode_string(s: str) -> bytes:
    return s.encode("utf-8")


# INFO / GO --------------------------------------------------------------------------------


def build_info_request(name: str, infos: list[int] | tuple[int, ...] = ()) -> bytes:
    n = _encode_string(name)
    return b"".join(
        [_U32.pack(len(n)), n, _U16.pack(len(infos)), *(_U16.pack(i) for i in infos)]
    )


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """Parse INFO/GO data: u32 namelen, name, u16 n, n x u16 info types."""
    if len(data) < 6:
        raise OptionError(Rep.ERR_INVALID, "INFO/GO payload is too short")
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > len(data) - 6:
        raise OptionError(Rep.ERR_INVALID, "INFO/GO export name length is out of range")
    name = decode_string(data[4 : 4 + namelen], "export name")
    pos = 4 + namelen
    (n,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * n:
        raise OptionError(Rep.ERR_INVALID, "INFO/GO payload length does not match its contents")
    infos = [_U16.unpack_from(data, pos + 2 * i)[0] for i in range(n)]
    return name, infos


# LIST_META_CONTEXT / SET_META_CONTEXT -----------------------------------------------------


def build_meta_request(name: str, queries: list[str] | tuple[str, ...] = ()) -> bytes:
    n = _encode_string(name)
    parts = [_U32.pack(len(n)), n, _U32.pack(len(queries))]
    for q in queries:
        qb = _encode_string(q)
        parts += [_U32.pack(len(qb)), qb]
    return b"".join(parts)


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """Parse u32 namelen, name, u32 nqueries, nqueries x (u32 len, query)."""
    if len(data) < 8:
        raise OptionError(Rep.ERR_INVALID, "meta context payload is too short")
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > len(data) - 8:
        raise OptionError(Rep.ERR_INVALID, "meta context export name length is out of range")
    name = decode_string(data[4 : 4 + namelen], "export name")
    pos = 4 + namelen
    (nq,) = _U32.unpack_from(data, pos)
    pos += 4
    if nq > MAX_META_QUERIES:
        raise OptionError(Rep.ERR_TOO_BIG, f"more than {MAX_META_QUERIES} meta context queries")
    queries = []
    for _ in range(nq):
        if pos + 4 > len(data):
            raise OptionError(Rep.ERR_INVALID, "meta context query overruns the payload")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise OptionError(Rep.ERR_INVALID, "meta context query overruns the payload")
        queries.append(decode_string(data[pos : pos + qlen], "meta context query"))
        pos += qlen
    if pos != len(data):
        raise OptionError(Rep.ERR_INVALID, "meta context payload has trailing bytes")
    return name, queries


# Replies ----------------------------------------------------------------------------------


def build_rep_server(name: str, description: str = "") -> bytes:
    n = _encode_string(name)
    return _U32.pack(len(n)) + n + _encode_string(description)


def parse_rep_server(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise RemoteProtocolError("REP_SERVER payload is too short")
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > len(data) - 4:
        raise RemoteProtocolError("REP_SERVER name length is out of range")
    name = bytes(data[4 : 4 + namelen]).decode("utf-8", "replace")
    desc = bytes(data[4 + namelen :]).decode("utf-8", "replace")
    return name, desc


def build_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def build_info_name(name: str) -> bytes:
    return _U16.pack(Info.NAME) + _encode_string(name)


def build_info_description(desc: str) -> bytes:
    return _U16.pack(Info.DESCRIPTION) + _encode_string(desc)


def build_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


class InfoReply(Record):
    """One decoded REP_INFO. ``kind`` is the info type; unknown kinds keep ``raw``."""

    __slots__ = ("kind", "size", "flags", "name", "description", "block_size", "raw")  # noqa: RUF023 - repr order

    def __init__(self, kind: int, size: int | None = None, flags: int | None = None,
                 name: str | None = None, description: str | None = None,
                 block_size: tuple[int, int, int] | None = None, raw: bytes = b"") -> None:
        self.kind = kind
        self.size = size
        self.flags = flags
        self.name = name
        self.description = description
        self.block_size = block_size
        self.raw = raw


def parse_info_reply(data: bytes) -> InfoReply:
    if len(data) < 2:
        raise RemoteProtocolError("REP_INFO payload is too short")
    (kind,) = _U16.unpack_from(data, 0)
    if kind == Info.EXPORT:
        if len(data) != 12:
            raise RemoteProtocolError("INFO_EXPORT has the wrong length")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return InfoReply(kind, size=size, flags=flags)
    if kind == Info.BLOCK_SIZE:
        if len(data) != 14:
            raise RemoteProtocolError("INFO_BLOCK_SIZE has the wrong length")
        _, a, b, c = _INFO_BLOCK_SIZE.unpack(data)
        return InfoReply(kind, block_size=(a, b, c))
    text = bytes(data[2:]).decode("utf-8", "replace")
    if kind == Info.NAME:
        return InfoReply(kind, name=text)
    if kind == Info.DESCRIPTION:
        return InfoReply(kind, description=text)
    return InfoReply(kind, raw=bytes(data))


def build_rep_meta_context(ctx_id: int, name: str) -> bytes:
    return _U32.pack(ctx_id) + _encode_string(name)


def parse_rep_meta_context(data: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise RemoteProtocolError("REP_META_CONTEXT payload is too short")
    (ctx_id,) = _U32.unpack_from(data, 0)
    return ctx_id, bytes(data[4:]).decode("utf-8", "replace")
