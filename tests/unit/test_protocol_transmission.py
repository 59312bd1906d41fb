"""Transmission phase at byte level: the request encoder and the reply/chunk builders (the
reply decoder is tests/unit/test_protocol_replies.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol.constants import (
    EXT_REQUEST,
    EXT_REQUEST_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    ReplyFlag,
)
from pynbd.protocol.transmission import (
    block_status_chunk,
    build_request,
    chunk_header,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    request_has_payload,
    simple_reply,
)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
DONE = ReplyFlag.DONE


def sr_header(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    """A structured chunk header written by hand."""
    return (bytes.fromhex("668e33ef") + flags.to_bytes(2, "big") + rtype.to_bytes(2, "big")
            + cookie.to_bytes(8, "big") + length.to_bytes(4, "big"))


def ext_header(flags: int, rtype: int, cookie: int, offset: int, length: int) -> bytes:
    return (bytes.fromhex("6e8a278c") + flags.to_bytes(2, "big") + rtype.to_bytes(2, "big")
            + cookie.to_bytes(8, "big") + offset.to_bytes(8, "big") + length.to_bytes(8, "big"))


# requests ---------------------------------------------------------------------------------


def test_request_layout() -> None:
    raw = build_request(Cmd.WRITE, 0x0102030405060708, 0x1112131415161718, 0x21222324,
                        CmdFlag.FUA)
    assert raw == (bytes.fromhex("25609513") + b"\x00\x01" + b"\x00\x01"
                   + bytes.fromhex("0102030405060708") + bytes.fromhex("1112131415161718")
                   + bytes.fromhex("21222324"))
    assert len(raw) == 28


def test_extended_request_layout() -> None:
    raw = build_request(Cmd.BLOCK_STATUS, 1, 2, 2**40, CmdFlag.REQ_ONE, extended=True)
    assert raw == (bytes.fromhex("21e41c71") + b"\x00\x08" + b"\x00\x07"
                   + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + (2**40).to_bytes(8, "big"))
    assert len(raw) == 32


@settings(max_examples=200, deadline=None)
@given(flags=u16, cmd=u16, cookie=u64, offset=u64, length=u32)
def test_request_round_trip(flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
    raw = build_request(cmd, cookie, offset, length, flags)
    assert len(raw) == REQUEST.size == 28
    assert REQUEST.unpack(raw) == (REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    # the kernel's view: flags and type as one u32
    assert int.from_bytes(raw[4:8], "big") == (flags << 16) | cmd


@settings(max_examples=200, deadline=None)
@given(flags=u16, cmd=u16, cookie=u64, offset=u64, length=u64)
def test_extended_request_round_trip(flags: int, cmd: int, cookie: int, offset: int,
                                     length: int) -> None:
    raw = build_request(cmd, cookie, offset, length, flags, extended=True)
    assert len(raw) == EXT_REQUEST.size == 32
    assert EXT_REQUEST.unpack(raw) == (EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def test_payload_length_flag_only_with_extended_headers() -> None:
    """A request with a payload says so with NBD_CMD_FLAG_PAYLOAD_LEN under extended headers;
    compact headers have no such flag (the payload is implied by WRITE)."""
    ext = build_request(Cmd.WRITE, 1, 0, 512, CmdFlag.FUA, extended=True, payload=True)
    assert EXT_REQUEST.unpack(ext)[1] == CmdFlag.FUA | CmdFlag.PAYLOAD_LEN
    compact = build_request(Cmd.WRITE, 1, 0, 512, CmdFlag.FUA, payload=True)
    assert REQUEST.unpack(compact)[1] == CmdFlag.FUA
    assert build_request(Cmd.READ, 1, 0, 512, extended=True) == build_request(
        Cmd.READ, 1, 0, 512, extended=True, payload=False)


@pytest.mark.parametrize("cmd", list(Cmd) + [9, 0xFFFF])
@pytest.mark.parametrize("flags", [0, CmdFlag.FUA, CmdFlag.PAYLOAD_LEN,
                                   CmdFlag.PAYLOAD_LEN | CmdFlag.FUA])
def test_request_has_payload(cmd: int, flags: int) -> None:
    # compact headers: only WRITE carries a payload, whatever the flags say
    assert request_has_payload(cmd, flags, False) == (cmd == Cmd.WRITE)
    # extended headers: a payload exists iff PAYLOAD_LEN is set
    assert request_has_payload(cmd, flags, True) == bool(flags & CmdFlag.PAYLOAD_LEN)


# reply builders: exact bytes ------------------------------------------------------------------


def test_simple_reply_layout() -> None:
    assert simple_reply(Err.ENOSPC, 0xAABBCCDDEEFF0011) == (
        bytes.fromhex("67446698") + (28).to_bytes(4, "big") + bytes.fromhex("aabbccddeeff0011"))


def test_chunk_header_layouts() -> None:
    assert chunk_header(1, 5, 9, 12) == sr_header(1, 5, 9, 12)
    assert len(chunk_header(1, 5, 9, 12)) == 20
    assert chunk_header(1, 5, 9, 12, extended=True, offset=4096) == ext_header(1, 5, 9, 4096, 12)
    assert len(chunk_header(0, 0, 0, 0, extended=True)) == 32


def test_offset_data_header_layout() -> None:
    assert offset_data_header(3, 512, 100) == sr_header(DONE, 1, 3, 108) + (512).to_bytes(8, "big")
    assert offset_data_header(3, 512, 100, done=False, extended=True, req_offset=256) == (
        ext_header(0, 1, 3, 256, 108) + (512).to_bytes(8, "big"))


def test_offset_hole_layout() -> None:
    assert offset_hole_chunk(3, 4096, 512, done=False) == (
        sr_header(0, 2, 3, 12) + (4096).to_bytes(8, "big") + (512).to_bytes(4, "big"))


def test_error_chunk_layouts() -> None:
    assert error_chunk(4, Err.EIO, "bad") == (
        sr_header(DONE, 0x8001, 4, 9) + (5).to_bytes(4, "big") + b"\x00\x03bad")
    assert error_chunk(4, Err.EIO, "", offset=1024) == (
        sr_header(DONE, 0x8002, 4, 14) + (5).to_bytes(4, "big") + b"\x00\x00"
        + (1024).to_bytes(8, "big"))
    assert error_chunk(4, Err.EINVAL, "x", extended=True, req_offset=7) == (
        ext_header(DONE, 0x8001, 4, 7, 7) + (22).to_bytes(4, "big") + b"\x00\x01x")


def test_none_chunk_layout() -> None:
    assert none_chunk(0xFF) == sr_header(DONE, 0, 0xFF, 0)
    assert none_chunk(0xFF, extended=True, req_offset=5) == ext_header(DONE, 0, 0xFF, 5, 0)


def test_block_status_layouts() -> None:
    assert block_status_chunk(8, 1, [(4096, 3), (512, 0)], True) == (
        sr_header(DONE, 5, 8, 20) + (1).to_bytes(4, "big")
        + (4096).to_bytes(4, "big") + (3).to_bytes(4, "big")
        + (512).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    assert block_status_chunk(8, 2, [(2**33, 1)], False, extended=True, req_offset=9) == (
        ext_header(0, 6, 8, 9, 24) + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
        + (2**33).to_bytes(8, "big") + (1).to_bytes(8, "big"))


def test_error_chunk_message_is_capped_at_4096_bytes() -> None:
    raw = error_chunk(1, Err.EIO, "m" * 5000)
    msglen = int.from_bytes(raw[24:26], "big")
    assert msglen == 4096 and raw[26:] == b"m" * 4096
    assert int.from_bytes(raw[16:20], "big") == 6 + 4096  # the chunk's length


@pytest.mark.parametrize("message", ["\u20ac" * 2000, "a" + "\U0001f600" * 1100,
                                     "ab" * 2047 + "\u00e9"], ids=["euro", "emoji", "e-acute"])
def test_error_chunk_cap_keeps_valid_utf8(message: str) -> None:
    raw = error_chunk(1, Err.EIO, message)
    msglen = int.from_bytes(raw[24:26], "big")
    assert msglen <= 4096
    text = raw[26 : 26 + msglen].decode("utf-8")  # strict: never cut inside a character
    assert message.startswith(text)
    assert len(text.encode()) > 4096 - 4


def test_structured_header_struct_matches_builder() -> None:
    assert STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, 1, 2, 3, 4) == chunk_header(1, 2, 3, 4)
