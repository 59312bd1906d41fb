"""Transmission phase at byte level: request builders, reply/chunk builders and ReplyParser."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import RemoteProtocolError
from pynbd.protocol.constants import (
    EXT_REPLY,
    EXT_REPLY_MAGIC,
    EXT_REQUEST,
    EXT_REQUEST_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    ReplyFlag,
    ReplyType,
)
from pynbd.protocol.transmission import (
    Chunk,
    ReplyParser,
    SimpleReply,
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


def parse_all(parser: ReplyParser, chunks: list[bytes],
              read_length: dict[int, int] | None = None) -> list[SimpleReply | Chunk]:
    out: list[SimpleReply | Chunk] = []
    for c in chunks:
        parser.receive_data(c)
        while (r := parser.next_reply(read_length)) is not None:
            out.append(r)
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


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
    p = ReplyParser(structured=True)
    p.receive_data(raw)
    c = p.next_reply()
    assert isinstance(c, Chunk)
    assert c.message == "m" * 4096


@pytest.mark.parametrize("message", ["\u20ac" * 2000, "a" + "\U0001f600" * 1100,
                                     "ab" * 2047 + "\u00e9"], ids=["euro", "emoji", "e-acute"])
def test_error_chunk_cap_keeps_valid_utf8(message: str) -> None:
    raw = error_chunk(1, Err.EIO, message)
    msglen = int.from_bytes(raw[24:26], "big")
    assert msglen <= 4096
    text = raw[26 : 26 + msglen].decode("utf-8")  # strict: never cut inside a character
    assert message.startswith(text)
    assert len(text.encode()) > 4096 - 4


# reply parsing: round trips -------------------------------------------------------------------


@dataclass
class Expect:
    """What a parsed reply must look like, and the bytes that carry it."""

    raw: bytes
    kind: str  # "simple" or "chunk"
    fields: dict[str, object] = field(default_factory=dict)


def check(reply: SimpleReply | Chunk, exp: Expect) -> None:
    if exp.kind == "simple":
        assert isinstance(reply, SimpleReply)
    else:
        assert isinstance(reply, Chunk)
    for k, v in exp.fields.items():
        assert getattr(reply, k) == v, k


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


@st.composite
def chunk_specs(draw: st.DrawFn, extended: bool, cookie: int) -> Expect:
    req_offset = draw(u64) if extended else 0
    done = draw(st.booleans())
    flags = DONE if done else 0
    kind = draw(st.sampled_from(["data", "hole", "error", "error_offset", "bs", "none"]))
    common = {"cookie": cookie, "offset": req_offset}
    if kind == "data":
        off, data = draw(u64), draw(st.binary(min_size=1, max_size=40))
        raw = offset_data_header(cookie, off, len(data), done, extended, req_offset) + data
        return Expect(raw, "chunk", {**common, "flags": flags, "type": ReplyType.OFFSET_DATA,
                                     "data_offset": off, "data": data, "done": done})
    if kind == "hole":
        off, n = draw(u64), draw(st.integers(1, 2**32 - 1))
        raw = offset_hole_chunk(cookie, off, n, done, extended, req_offset)
        return Expect(raw, "chunk", {**common, "flags": flags, "type": ReplyType.OFFSET_HOLE,
                                     "data_offset": off, "hole_length": n})
    if kind in ("error", "error_offset"):
        err, msg = draw(st.integers(1, 2**32 - 1)), draw(_text)
        eoff = draw(u64) if kind == "error_offset" else None
        raw = error_chunk(cookie, err, msg, extended, req_offset, eoff)
        rtype = ReplyType.ERROR if eoff is None else ReplyType.ERROR_OFFSET
        return Expect(raw, "chunk", {**common, "flags": DONE, "type": rtype, "error": err,
                                     "message": msg, "error_offset": eoff, "done": True})
    if kind == "bs":
        ctx = draw(u32)
        ent = u64 if extended else u32
        extents = draw(st.lists(st.tuples(ent, ent), min_size=1, max_size=6))
        raw = block_status_chunk(cookie, ctx, extents, done, extended, req_offset)
        rtype = ReplyType.BLOCK_STATUS_EXT if extended else ReplyType.BLOCK_STATUS
        return Expect(raw, "chunk", {**common, "flags": flags, "type": rtype,
                                     "context_id": ctx, "extents": extents})
    raw = none_chunk(cookie, extended, req_offset)
    return Expect(raw, "chunk", {**common, "flags": DONE, "type": ReplyType.NONE,
                                 "payload": b"", "done": True})


@st.composite
def reply_streams(draw: st.DrawFn, structured: bool, extended: bool,
                  ) -> tuple[list[Expect], dict[int, int]]:
    n = draw(st.integers(1, 6))
    cookies = draw(st.lists(u64, min_size=n, max_size=n, unique=True))
    read_length: dict[int, int] = {}
    out = []
    for cookie in cookies:
        if not extended and (not structured or draw(st.booleans())):
            err = draw(st.sampled_from([0, 0, int(Err.EIO), int(Err.EINVAL), 2**32 - 1]))
            is_read = draw(st.booleans())
            data = draw(st.binary(max_size=40)) if is_read and err == 0 else b""
            if is_read:
                read_length[cookie] = len(data) if err == 0 else draw(st.integers(1, 99))
            out.append(Expect(simple_reply(err, cookie) + data, "simple",
                              {"error": err, "cookie": cookie, "data": data}))
        else:
            out.append(draw(chunk_specs(extended, cookie)))
    return out, read_length


def _check_stream(structured: bool, extended: bool, specs: list[Expect],
                  read_length: dict[int, int], cuts: list[int]) -> None:
    stream = b"".join(e.raw for e in specs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(points)]
    for feed in ([stream], pieces, bytewise(stream)):
        p = ReplyParser(structured=structured, extended=extended)
        got = parse_all(p, feed, read_length)
        assert len(got) == len(specs)
        for reply, exp in zip(got, specs):
            check(reply, exp)
        assert p.next_reply(read_length) is None


@settings(max_examples=100, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_simple_replies_round_trip(data: st.DataObject, cuts: list[int]) -> None:
    specs, rl = data.draw(reply_streams(False, False))
    _check_stream(False, False, specs, rl, cuts)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_structured_replies_round_trip(data: st.DataObject, cuts: list[int]) -> None:
    specs, rl = data.draw(reply_streams(True, False))
    _check_stream(True, False, specs, rl, cuts)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_extended_replies_round_trip(data: st.DataObject, cuts: list[int]) -> None:
    specs, rl = data.draw(reply_streams(True, True))
    _check_stream(True, True, specs, rl, cuts)


def test_concatenated_replies_one_byte_at_a_time() -> None:
    stream = (simple_reply(0, 1) + b"abcd"
              + offset_data_header(2, 4096, 3, done=False) + b"xyz"
              + offset_hole_chunk(2, 4099, 509, done=False)
              + error_chunk(2, Err.EIO, "disk on fire", offset=4100)
              + block_status_chunk(3, 1, [(512, 3), (1024, 0)], True)
              + simple_reply(Err.EPERM, 4)
              + none_chunk(5))
    p = ReplyParser(structured=True)
    got = []
    for b in bytewise(stream):
        p.receive_data(b)
        while (r := p.next_reply({1: 4, 4: 512})) is not None:
            got.append(r)
    assert len(got) == 7
    assert got[0] == SimpleReply(0, 1, b"abcd")
    assert got[5] == SimpleReply(Err.EPERM, 4, b"")  # an error never carries READ data
    chunks = [got[i] for i in (1, 2, 3, 4, 6)]
    assert all(isinstance(c, Chunk) for c in chunks)
    c1, c2, c3, c4, c6 = (c for c in chunks if isinstance(c, Chunk))
    assert (c1.cookie, c1.data_offset, c1.data, c1.done) == (2, 4096, b"xyz", False)
    assert (c2.type, c2.data_offset, c2.hole_length) == (2, 4099, 509)
    assert (c3.error, c3.message, c3.error_offset, c3.done) == (5, "disk on fire", 4100, True)
    assert (c4.context_id, c4.extents) == (1, [(512, 3), (1024, 0)])
    assert (c6.type, c6.cookie, c6.done) == (ReplyType.NONE, 5, True)


def test_parser_waits_for_header_and_payload() -> None:
    raw = offset_data_header(1, 0, 10) + b"0123456789"
    p = ReplyParser(structured=True)
    p.receive_data(raw[:3])
    assert p.next_reply() is None
    p.receive_data(raw[3:19])
    assert p.next_reply() is None  # header incomplete
    p.receive_data(raw[19:-1])
    assert p.next_reply() is None  # payload incomplete
    p.receive_data(raw[-1:])
    c = p.next_reply()
    assert isinstance(c, Chunk)
    assert c.data == b"0123456789"


def test_simple_read_reply_waits_for_its_data() -> None:
    p = ReplyParser()
    p.receive_data(simple_reply(0, 9) + b"ab")
    assert p.next_reply({9: 3}) is None
    p.receive_data(b"c")
    assert p.next_reply({9: 3}) == SimpleReply(0, 9, b"abc")


def test_simple_reply_allowed_with_structured_replies() -> None:
    p = ReplyParser(structured=True)
    p.receive_data(simple_reply(0, 1))
    assert p.next_reply() == SimpleReply(0, 1, b"")


# reply parsing: rejections --------------------------------------------------------------------


def _reject(data: bytes, structured: bool = True, extended: bool = False) -> None:
    p = ReplyParser(structured=structured, extended=extended)
    p.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        p.next_reply()


_KNOWN_MAGICS = {SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXT_REPLY_MAGIC}


@settings(max_examples=100, deadline=None)
@given(magic=u32.filter(lambda m: m not in _KNOWN_MAGICS), structured=st.booleans(),
       extended=st.booleans())
def test_bad_magic(magic: int, structured: bool, extended: bool) -> None:
    # detected from the first four bytes alone
    _reject(magic.to_bytes(4, "big"), structured, extended)


@pytest.mark.parametrize("magic", [REQUEST_MAGIC, EXT_REQUEST_MAGIC, 0x96744668, 0])
def test_request_and_reserved_magics_are_not_replies(magic: int) -> None:
    _reject(magic.to_bytes(4, "big") + bytes(28))


def test_structured_magic_without_structured_replies() -> None:
    _reject(none_chunk(1), structured=False)


def test_extended_magic_without_extended_headers() -> None:
    _reject(none_chunk(1, extended=True), structured=True)
    _reject(none_chunk(1, extended=True), structured=False)


def test_compact_replies_under_extended_headers() -> None:
    _reject(none_chunk(1), extended=True)
    _reject(simple_reply(0, 1), extended=True)  # simple replies are forbidden there


def test_none_chunk_with_payload() -> None:
    _reject(sr_header(DONE, 0, 1, 1) + b"\x00")
    _reject(ext_header(DONE, 0, 1, 0, 4) + bytes(4), extended=True)


def test_none_chunk_without_done() -> None:
    _reject(sr_header(0, 0, 1, 0))


@pytest.mark.parametrize("payload_len", [0, 3, 4, 5, 11, 13, 19, 4 + 8 * 3 + 1])
def test_malformed_block_status_lengths(payload_len: int) -> None:
    _reject(sr_header(DONE, 5, 1, payload_len) + bytes(payload_len))


@pytest.mark.parametrize("payload_len", [0, 7, 8, 9, 23, 25, 8 + 16 * 2 - 1])
def test_malformed_block_status_ext_lengths(payload_len: int) -> None:
    _reject(ext_header(DONE, 6, 1, 0, payload_len) + bytes(payload_len), extended=True)


@pytest.mark.parametrize("count", [0, 2, 0xFFFFFFFF])
def test_block_status_ext_count_mismatch(count: int) -> None:
    body = (1).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(16)
    _reject(ext_header(DONE, 6, 1, 0, len(body)) + body, extended=True)


def test_block_status_type_must_match_the_header_style() -> None:
    # type 5 only without extended headers, type 6 only with them
    _reject(ext_header(DONE, 5, 1, 0, 12) + bytes(12), extended=True)
    body = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(16)
    _reject(sr_header(DONE, 6, 1, len(body)) + body, structured=True)


@pytest.mark.parametrize("rtype", [3, 4, 7, 8, 0x100, 0x7FFF])
def test_unknown_non_error_chunk_types(rtype: int) -> None:
    _reject(sr_header(DONE, rtype, 1, 0))
    _reject(sr_header(DONE, rtype, 1, 6) + bytes(6))


@pytest.mark.parametrize("payload", [b"", bytes(8)])
def test_offset_data_too_short(payload: bytes) -> None:
    _reject(sr_header(DONE, 1, 1, len(payload)) + payload)


@pytest.mark.parametrize("n", [0, 11, 13, 20])
def test_offset_hole_wrong_length(n: int) -> None:
    _reject(sr_header(DONE, 2, 1, n) + bytes(n))


@pytest.mark.parametrize(("rtype", "payload"), [
    (0x8001, b""),
    (0x8001, bytes(5)),
    (0x8001, (5).to_bytes(4, "big") + b"\x00\x04abc"),        # msglen overruns
    (0x8001, (5).to_bytes(4, "big") + b"\x00\x01ab"),         # slop after the message
    (0x8002, (5).to_bytes(4, "big") + b"\x00\x00"),           # offset missing
    (0x8002, (5).to_bytes(4, "big") + b"\x00\x00" + bytes(7)),
    (0x8002, (5).to_bytes(4, "big") + b"\x00\x02ab" + bytes(8) + b"x"),
])
def test_malformed_error_chunks(rtype: int, payload: bytes) -> None:
    _reject(sr_header(DONE, rtype, 1, len(payload)) + payload)


@pytest.mark.parametrize("rtype", [0x8000, 0x8003, 0x9000, 0xFFFF])
def test_unknown_error_chunk_types_are_accepted(rtype: int) -> None:
    payload = (5).to_bytes(4, "big") + b"\x00\x04oops" + b"future fields"
    p = ReplyParser(structured=True)
    p.receive_data(sr_header(DONE, rtype, 7, len(payload)) + payload + none_chunk(8))
    c = p.next_reply()
    assert isinstance(c, Chunk)
    assert (c.type, c.cookie, c.error, c.message) == (rtype, 7, 5, "oops")
    # the stream stays in sync after it
    nxt = p.next_reply()
    assert isinstance(nxt, Chunk) and nxt.cookie == 8 and nxt.type == ReplyType.NONE


@pytest.mark.parametrize("payload", [
    b"", bytes(5),                                   # too short to hold error + msglen
    (5).to_bytes(4, "big") + b"\x00\x09oops",        # msglen overflows the chunk
])
def test_unknown_error_chunk_types_must_still_be_well_formed(payload: bytes) -> None:
    _reject(sr_header(DONE, 0x8003, 1, len(payload)) + payload)


def test_unknown_reply_flags_are_ignored() -> None:
    p = ReplyParser(structured=True)
    p.receive_data(sr_header(0x8000 | DONE, 0, 1, 0))
    c = p.next_reply()
    assert isinstance(c, Chunk) and c.done and c.flags == 0x8001


def test_extended_header_echoes_request_offset() -> None:
    p = ReplyParser(structured=True, extended=True)
    p.receive_data(EXT_REPLY.pack(EXT_REPLY_MAGIC, DONE, 0, 3, 2**63, 0))
    c = p.next_reply()
    assert isinstance(c, Chunk) and c.offset == 2**63 and c.cookie == 3


def test_structured_header_struct_matches_builder() -> None:
    assert STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, 1, 2, 3, 4) == chunk_header(1, 2, 3, 4)
