"""Option payloads: builders, strict parsers and their error replies, at byte level."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import OptionError, RemoteProtocolError
from pynbd.limits import MAX_META_QUERIES, MAX_STRING
from pynbd.protocol.constants import Info, Rep
from pynbd.protocol.options import (
    InfoReply,
    build_info_block_size,
    build_info_description,
    build_info_export,
    build_info_name,
    build_info_request,
    build_meta_request,
    build_rep_meta_context,
    build_rep_server,
    decode_string,
    parse_info_reply,
    parse_info_request,
    parse_meta_request,
    parse_rep_meta_context,
    parse_rep_server,
)

assert MAX_STRING == 4096  # the spec's MUST; the tests below spell the numbers out

_chars = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])


def _fit(s: str, limit: int = 4096) -> str:
    """Cut a string to at most ``limit`` UTF-8 bytes on a character boundary."""
    return s.encode("utf-8")[:limit].decode("utf-8", "ignore")


#: protocol strings: any Unicode without NUL, up to 4096 UTF-8 bytes (long ones are built by
#: repeating a short random piece, which keeps generation fast)
names = st.one_of(
    st.text(_chars, max_size=64),
    st.tuples(st.text(_chars, min_size=1, max_size=8), st.integers(1, 4096)).map(
        lambda t: _fit(t[0] * t[1])),
    st.sampled_from(["a" * 4096, "\u20ac" * 1365 + "a", "\U0001f600" * 1024]),
)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def u32b(n: int) -> bytes:
    return n.to_bytes(4, "big")


def u16b(n: int) -> bytes:
    return n.to_bytes(2, "big")


def invalid(exc: pytest.ExceptionInfo[OptionError]) -> None:
    assert exc.value.reply == Rep.ERR_INVALID


# decode_string ------------------------------------------------------------------------------


def test_decode_string_accepts_4096_bytes() -> None:
    assert decode_string(b"a" * 4096, "x") == "a" * 4096
    assert decode_string("\u20ac".encode() * 1365 + b"a", "x") == "\u20ac" * 1365 + "a"
    assert decode_string(memoryview(b"disk"), "x") == "disk"
    assert decode_string(b"", "x") == ""


@pytest.mark.parametrize("raw", [
    b"a" * 4097, b"\x00", b"a\x00b", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80",
])
def test_decode_string_rejects(raw: bytes) -> None:
    with pytest.raises(OptionError) as e:
        decode_string(raw, "name")
    invalid(e)


# INFO / GO requests ---------------------------------------------------------------------------


def test_info_request_layout() -> None:
    assert build_info_request("disk", [Info.NAME, Info.BLOCK_SIZE]) == (
        b"\x00\x00\x00\x04disk" b"\x00\x02" b"\x00\x01" b"\x00\x03")
    assert build_info_request("") == b"\x00\x00\x00\x00\x00\x00"
    assert build_info_request("\u00e9") == b"\x00\x00\x00\x02\xc3\xa9\x00\x00"


@settings(max_examples=100, deadline=None)
@given(name=names, infos=st.lists(u16, max_size=40))
def test_info_request_round_trip(name: str, infos: list[int]) -> None:
    raw = build_info_request(name, infos)
    nb = name.encode()
    assert len(raw) == 4 + len(nb) + 2 + 2 * len(infos)
    assert raw[:4] == u32b(len(nb))
    assert parse_info_request(raw) == (name, infos)


@settings(max_examples=100, deadline=None)
@given(name=st.text(_chars, max_size=20), infos=st.lists(u16, max_size=5), data=st.data())
def test_info_request_every_truncation_or_extension_is_invalid(
        name: str, infos: list[int], data: st.DataObject) -> None:
    raw = build_info_request(name, infos)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(OptionError) as e:
        parse_info_request(raw[:cut])
    invalid(e)
    extra = data.draw(st.binary(min_size=1, max_size=5))
    with pytest.raises(OptionError) as e:
        parse_info_request(raw + extra)
    invalid(e)


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\x00\x00\x00\x00",                       # too short (< 6)
    u32b(1) + b"\x00\x00",                          # namelen overruns: needs 7 bytes
    u32b(5) + b"abcd" + b"\x00\x00",               # namelen overruns by one
    u32b(0xFFFFFFFF) + b"\x00\x00",                # huge namelen
    u32b(0) + u16b(1),                              # one info promised, none given
    u32b(0) + u16b(2) + u16b(0),                    # two promised, one given
    u32b(0) + u16b(0) + b"\x00",                    # trailing byte
    u32b(0) + u16b(1) + u16b(3) + b"\x00\x00",      # trailing info
    u32b(1) + b"\x00" + u16b(0),                    # NUL name
    u32b(3) + b"a\x00b" + u16b(0),                  # NUL inside the name
    u32b(1) + b"\xff" + u16b(0),                    # invalid UTF-8
    u32b(2) + b"\xed\xa0" + u16b(0),                # truncated sequence
    u32b(4097) + b"a" * 4097 + u16b(0),             # name over 4096 bytes
])
def test_info_request_malformed(raw: bytes) -> None:
    with pytest.raises(OptionError) as e:
        parse_info_request(raw)
    invalid(e)


def test_info_request_name_of_exactly_4096_bytes() -> None:
    raw = u32b(4096) + b"n" * 4096 + u16b(1) + u16b(0)
    assert parse_info_request(raw) == ("n" * 4096, [0])


# META_CONTEXT requests ------------------------------------------------------------------------


def test_meta_request_layout() -> None:
    assert build_meta_request("d", ["base:allocation", "qemu:"]) == (
        u32b(1) + b"d" + u32b(2) + u32b(15) + b"base:allocation" + u32b(5) + b"qemu:")
    assert build_meta_request("") == bytes(8)


@settings(max_examples=100, deadline=None)
@given(name=names, queries=st.lists(st.one_of(st.text(_chars, max_size=40), names), max_size=6))
def test_meta_request_round_trip(name: str, queries: list[str]) -> None:
    raw = build_meta_request(name, queries)
    assert len(raw) == 8 + len(name.encode()) + sum(4 + len(q.encode()) for q in queries)
    assert parse_meta_request(raw) == (name, queries)


@settings(max_examples=100, deadline=None)
@given(name=st.text(_chars, max_size=10), queries=st.lists(st.text(_chars, max_size=10),
                                                          max_size=5), data=st.data())
def test_meta_request_every_truncation_or_extension_is_invalid(
        name: str, queries: list[str], data: st.DataObject) -> None:
    raw = build_meta_request(name, queries)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(OptionError) as e:
        parse_meta_request(raw[:cut])
    invalid(e)
    extra = data.draw(st.binary(min_size=1, max_size=5))
    with pytest.raises(OptionError) as e:
        parse_meta_request(raw + extra)
    invalid(e)


@pytest.mark.parametrize("raw", [
    b"",
    bytes(7),                                              # too short (< 8)
    u32b(1) + b"a" + b"\x00\x00\x00",                       # namelen overruns the count
    u32b(0xFFFFFFFF) + u32b(0),                            # huge namelen
    u32b(0) + u32b(1),                                     # a query promised, none given
    u32b(0) + u32b(1) + b"\x00\x00",                       # query length truncated
    u32b(0) + u32b(1) + u32b(5) + b"base",                 # query overruns by one
    u32b(0) + u32b(1) + u32b(0xFFFFFFFF) + b"x",           # huge query length
    u32b(0) + u32b(2) + u32b(1) + b"a",                    # second query missing
    u32b(0) + u32b(0) + b"\x00",                           # trailing bytes
    u32b(0) + u32b(1) + u32b(1) + b"a" + b"zz",            # trailing after the queries
    u32b(2) + b"a\x00" + u32b(0),                          # NUL in the name
    u32b(0) + u32b(1) + u32b(6) + b"base:\x00",            # NUL in a query
    u32b(1) + b"\x80" + u32b(0),                           # invalid UTF-8 name
    u32b(0) + u32b(1) + u32b(2) + b"\xc3(",                # invalid UTF-8 query
    u32b(4097) + b"e" * 4097 + u32b(0),                    # name over 4096 bytes
    u32b(0) + u32b(1) + u32b(4097) + b"q" * 4097,          # query over 4096 bytes
])
def test_meta_request_malformed(raw: bytes) -> None:
    with pytest.raises(OptionError) as e:
        parse_meta_request(raw)
    invalid(e)


def test_meta_request_strings_of_exactly_4096_bytes() -> None:
    raw = u32b(4096) + b"e" * 4096 + u32b(1) + u32b(4096) + b"q" * 4096
    assert parse_meta_request(raw) == ("e" * 4096, ["q" * 4096])


def test_meta_request_query_limit() -> None:
    ok = build_meta_request("", ["base:"] * MAX_META_QUERIES)
    assert parse_meta_request(ok) == ("", ["base:"] * MAX_META_QUERIES)
    too_many = build_meta_request("", ["base:"] * (MAX_META_QUERIES + 1))
    with pytest.raises(OptionError) as e:
        parse_meta_request(too_many)
    assert e.value.reply == Rep.ERR_TOO_BIG


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=48))
def test_parsers_never_crash_on_garbage(raw: bytes) -> None:
    # Whatever the bytes, the parsers either decode them canonically or answer with an
    # option error; never an IndexError or struct.error.
    try:
        name, infos = parse_info_request(raw)
    except OptionError as e:
        assert e.reply == Rep.ERR_INVALID
    else:
        assert build_info_request(name, infos) == raw
    try:
        name, queries = parse_meta_request(raw)
    except OptionError as e:
        assert e.reply in (Rep.ERR_INVALID, Rep.ERR_TOO_BIG)
    else:
        assert build_meta_request(name, queries) == raw


# REP_SERVER -----------------------------------------------------------------------------------


def test_rep_server_layout() -> None:
    assert build_rep_server("disk") == u32b(4) + b"disk"
    assert build_rep_server("disk", "my disk") == u32b(4) + b"disk" + b"my disk"
    assert build_rep_server("") == u32b(0)


@settings(max_examples=100, deadline=None)
@given(name=names, desc=st.text(_chars, max_size=100))
def test_rep_server_round_trip(name: str, desc: str) -> None:
    raw = build_rep_server(name, desc)
    assert raw[:4] == u32b(len(name.encode()))
    assert parse_rep_server(raw) == (name, desc)


@pytest.mark.parametrize("raw", [b"", b"\x00\x00\x00", u32b(1), u32b(5) + b"disk",
                                 u32b(0xFFFFFFFF) + b"x"])
def test_rep_server_malformed(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_rep_server(raw)


# REP_INFO ---------------------------------------------------------------------------------------


def test_info_export_is_exactly_12_bytes() -> None:
    raw = build_info_export(0x0102030405060708, 0x1234)
    assert raw == b"\x00\x00" + bytes.fromhex("0102030405060708") + b"\x12\x34"
    assert len(raw) == 12


def test_info_block_size_is_exactly_14_bytes() -> None:
    raw = build_info_block_size(512, 4096, 32 << 20)
    assert raw == b"\x00\x03" + u32b(512) + u32b(4096) + u32b(32 << 20)
    assert len(raw) == 14


def test_info_name_and_description_layout() -> None:
    assert build_info_name("d\u00e9") == b"\x00\x01d\xc3\xa9"
    assert build_info_description("") == b"\x00\x02"


@settings(max_examples=100, deadline=None)
@given(size=u64, flags=u16, bs=st.tuples(u32, u32, u32), name=names,
       desc=st.text(_chars, max_size=200))
def test_info_replies_round_trip(size: int, flags: int, bs: tuple[int, int, int], name: str,
                                 desc: str) -> None:
    assert parse_info_reply(build_info_export(size, flags)) == InfoReply(
        Info.EXPORT, size=size, flags=flags)
    assert parse_info_reply(build_info_block_size(*bs)) == InfoReply(
        Info.BLOCK_SIZE, block_size=bs)
    assert parse_info_reply(build_info_name(name)) == InfoReply(Info.NAME, name=name)
    assert parse_info_reply(build_info_description(desc)) == InfoReply(
        Info.DESCRIPTION, description=desc)


@pytest.mark.parametrize("raw", [
    b"", b"\x00",
    b"\x00\x00" + bytes(9), b"\x00\x00" + bytes(11),    # INFO_EXPORT of 11 and 13 bytes
    b"\x00\x00",
    b"\x00\x03" + bytes(11), b"\x00\x03" + bytes(13),   # INFO_BLOCK_SIZE of 13 and 15 bytes
    b"\x00\x03",
])
def test_info_reply_wrong_lengths(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_info_reply(raw)


def test_unknown_info_reply_is_kept_raw() -> None:
    raw = b"\x00\x63" + b"future"
    assert parse_info_reply(raw) == InfoReply(99, raw=raw)
    assert parse_info_reply(b"\xff\xff") == InfoReply(0xFFFF, raw=b"\xff\xff")


# REP_META_CONTEXT -------------------------------------------------------------------------------


def test_rep_meta_context_layout() -> None:
    assert build_rep_meta_context(7, "base:allocation") == u32b(7) + b"base:allocation"


@settings(max_examples=100, deadline=None)
@given(ctx_id=u32, name=names)
def test_rep_meta_context_round_trip(ctx_id: int, name: str) -> None:
    raw = build_rep_meta_context(ctx_id, name)
    assert len(raw) == 4 + len(name.encode())
    assert parse_rep_meta_context(raw) == (ctx_id, name)


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x00\x00"])
def test_rep_meta_context_too_short(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_rep_meta_context(raw)


def test_option_error_carries_the_reply() -> None:
    with pytest.raises(OptionError) as e:
        parse_info_request(b"")
    assert e.value.reply == Rep.ERR_INVALID
    assert e.value.reply == 2**31 + 3
    assert e.value.message
