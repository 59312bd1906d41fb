"""ServerHandshake at byte level: greeting, client flags, option framing, replies, transitions."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import LocalProtocolError, RemoteProtocolError
from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    REPLY_MAGIC_OPT,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    HandshakeFlag,
    Opt,
    Rep,
)
from pynbd.protocol.handshake import (
    NEED_DATA,
    TRANSITIONS,
    ClientFlags,
    HState,
    OptionRequest,
    ServerHandshake,
)

FIXED = 1
NOZ = 2
BOTH = FIXED | NOZ


def opt(option: int, data: bytes = b"", magic: int = IHAVEOPT) -> bytes:
    """Raw bytes of one option request, built by hand (not with the module's structs)."""
    return magic.to_bytes(8, "big") + option.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data


def flags(f: int) -> bytes:
    return f.to_bytes(4, "big")


def info_data(name: bytes = b"", infos: Iterable[int] = ()) -> bytes:
    infos = list(infos)
    return (len(name).to_bytes(4, "big") + name + len(infos).to_bytes(2, "big")
            + b"".join(i.to_bytes(2, "big") for i in infos))


def reply_bytes(option: int, rep: int, data: bytes = b"") -> bytes:
    return (bytes.fromhex("0003e889045565a9") + option.to_bytes(4, "big") + rep.to_bytes(4, "big")
            + len(data).to_bytes(4, "big") + data)


Event = ClientFlags | OptionRequest


def default_responder(hs: ServerHandshake, ev: OptionRequest) -> bytes:
    """ACK ABORT and GO, refuse everything else with ERR_UNSUP."""
    if ev.opt == Opt.EXPORT_NAME:
        return hs.export_name_reply(1 << 20, 1)
    if ev.opt in (Opt.ABORT, Opt.GO):
        return hs.reply(Rep.ACK)
    return hs.reply(Rep.ERR_UNSUP, b"no")


def drive(hs: ServerHandshake, chunks: Iterable[bytes],
          respond: Callable[[ServerHandshake, OptionRequest], bytes] = default_responder,
          ) -> tuple[list[Event], bytes]:
    """Feed chunks, collect every event, answer every option. Returns (events, output)."""
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        if hs.state in (HState.TRANSMISSION, HState.CLOSED):
            break
        hs.receive_data(chunk)
        while hs.state not in (HState.TRANSMISSION, HState.CLOSED):
            ev = hs.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)  # type: ignore[arg-type]
            if isinstance(ev, OptionRequest):
                out += respond(hs, ev)
    return events, out


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def ready(server_flags: int = BOTH, client_flags: int = BOTH, **kw: int) -> ServerHandshake:
    """A handshake that has accepted the client flags and waits for options."""
    hs = ServerHandshake(server_flags, **kw)
    hs.receive_data(flags(client_flags))
    assert hs.next_event() == ClientFlags(client_flags)
    assert hs.state is HState.OPTIONS
    return hs


# greeting ---------------------------------------------------------------------------------


def test_greeting_bytes_default() -> None:
    hs = ServerHandshake()
    g = hs.greeting()
    assert g == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert len(g) == 18
    assert hs.state is HState.AWAIT_CLIENT_FLAGS


@pytest.mark.parametrize(("server_flags", "tail"), [
    (0, b"\x00\x00"), (FIXED, b"\x00\x01"), (NOZ, b"\x00\x02"), (BOTH, b"\x00\x03"),
])
def test_greeting_bytes_masked(server_flags: int, tail: bytes) -> None:
    assert ServerHandshake(server_flags).greeting() == b"NBDMAGICIHAVEOPT" + tail


def test_oldstyle_greeting_bytes() -> None:
    g = ServerHandshake.oldstyle_greeting(0x1122334455667788, 0xABCD)
    assert len(g) == 152
    assert g[:8] == NBDMAGIC.to_bytes(8, "big")
    assert g[8:16] == OLDSTYLE_MAGIC.to_bytes(8, "big")
    assert g[16:24] == bytes.fromhex("1122334455667788")
    # u32 flags = handshake flags (none in oldstyle) << 16 | transmission flags
    assert g[24:28] == bytes.fromhex("0000abcd")
    assert g[28:] == bytes(124)


def test_oldstyle_greeting_masks_flags_to_16_bits() -> None:
    g = ServerHandshake.oldstyle_greeting(0, 0x30001)
    assert g[24:28] == b"\x00\x00\x00\x01"


# client flags -----------------------------------------------------------------------------


@pytest.mark.parametrize("client_flags", [0, FIXED, NOZ, BOTH])
def test_client_flags_accepted(client_flags: int) -> None:
    hs = ServerHandshake(BOTH)
    hs.receive_data(flags(client_flags))
    assert hs.next_event() == ClientFlags(client_flags)
    assert hs.state is HState.OPTIONS
    assert hs.client_flags == client_flags
    assert hs.fixed_newstyle == bool(client_flags & FIXED)
    assert hs.no_zeroes == bool(client_flags & NOZ)


def test_client_flags_need_four_bytes() -> None:
    hs = ServerHandshake()
    for b in flags(BOTH)[:3]:
        hs.receive_data(bytes([b]))
        assert hs.next_event() is NEED_DATA
        assert hs.state is HState.AWAIT_CLIENT_FLAGS
    hs.receive_data(flags(BOTH)[3:])
    assert hs.next_event() == ClientFlags(BOTH)


@pytest.mark.parametrize("bad", [1 << 2, 1 << 15, 1 << 16, 1 << 31, BOTH | 1 << 7, 0xFFFFFFFF])
def test_unknown_client_flag_is_fatal(bad: int) -> None:
    hs = ServerHandshake(BOTH)
    hs.receive_data(flags(bad))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()
    assert hs.state is not HState.OPTIONS


@pytest.mark.parametrize(("server_flags", "client_flags"), [
    (FIXED, NOZ),       # server masked NO_ZEROES
    (FIXED, BOTH),
    (NOZ, FIXED),       # server masked FIXED_NEWSTYLE
    (0, FIXED),
    (0, NOZ),
])
def test_client_flag_not_offered_is_fatal(server_flags: int, client_flags: int) -> None:
    hs = ServerHandshake(server_flags)
    hs.receive_data(flags(client_flags))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()
    assert hs.state is not HState.OPTIONS


# option framing ---------------------------------------------------------------------------


def test_option_event_fields() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.LIST, b"xyz"))
    assert hs.next_event() == OptionRequest(Opt.LIST, b"xyz")
    assert hs.state is HState.OPTION_PENDING


def test_unknown_option_number_is_an_event() -> None:
    hs = ready()
    hs.receive_data(opt(0xDEADBEEF, b"\x00" * 5))
    ev = hs.next_event()
    assert ev == OptionRequest(0xDEADBEEF, b"\x00" * 5)
    out = hs.reply(Rep.ERR_UNSUP)
    assert out == reply_bytes(0xDEADBEEF, Rep.ERR_UNSUP)
    assert hs.state is HState.OPTIONS


def test_option_header_and_data_need_all_bytes() -> None:
    hs = ready()
    raw = opt(Opt.INFO, info_data(b"disk", [3]))
    for i in range(len(raw) - 1):
        hs.receive_data(raw[i : i + 1])
        assert hs.next_event() is NEED_DATA
        assert hs.state is HState.OPTIONS
    hs.receive_data(raw[-1:])
    assert hs.next_event() == OptionRequest(Opt.INFO, info_data(b"disk", [3]))


SESSION = (
    flags(BOTH)
    + opt(Opt.STRUCTURED_REPLY)
    + opt(Opt.LIST)
    + opt(Opt.INFO, info_data(b"", [0, 3]))
    + opt(99, b"\x01\x02\x03")
    + opt(Opt.SET_META_CONTEXT, b"\x00" * 8)
    + opt(Opt.GO, info_data("dïsk".encode(), [1, 2, 3]))
)
SESSION_EVENTS = [
    ClientFlags(BOTH),
    OptionRequest(Opt.STRUCTURED_REPLY, b""),
    OptionRequest(Opt.LIST, b""),
    OptionRequest(Opt.INFO, info_data(b"", [0, 3])),
    OptionRequest(99, b"\x01\x02\x03"),
    OptionRequest(Opt.SET_META_CONTEXT, b"\x00" * 8),
    OptionRequest(Opt.GO, info_data("dïsk".encode(), [1, 2, 3])),
]
SESSION_OUTPUT = (
    reply_bytes(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"no")
    + reply_bytes(Opt.LIST, Rep.ERR_UNSUP, b"no")
    + reply_bytes(Opt.INFO, Rep.ERR_UNSUP, b"no")
    + reply_bytes(99, Rep.ERR_UNSUP, b"no")
    + reply_bytes(Opt.SET_META_CONTEXT, Rep.ERR_UNSUP, b"no")
    + reply_bytes(Opt.GO, Rep.ACK)
)


def test_session_whole_input_at_once() -> None:
    hs = ServerHandshake()
    events, out = drive(hs, [SESSION])
    assert events == SESSION_EVENTS
    assert out == SESSION_OUTPUT
    assert hs.state is HState.TRANSMISSION
    assert hs.trailing_data == b""


def test_session_one_byte_at_a_time() -> None:
    hs = ServerHandshake()
    events, out = drive(hs, one_byte_at_a_time(SESSION))
    assert events == SESSION_EVENTS
    assert out == SESSION_OUTPUT
    assert hs.state is HState.TRANSMISSION
    assert hs.trailing_data == b""


_plain_opts = st.sampled_from([Opt.LIST, Opt.INFO, Opt.STRUCTURED_REPLY, Opt.PEEK_EXPORT,
                               Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT,
                               Opt.EXTENDED_HEADERS]) | st.integers(12, 2**32 - 1)


@settings(max_examples=100, deadline=None)
@given(
    options=st.lists(st.tuples(_plain_opts, st.binary(max_size=64)), max_size=6),
    go_data=st.binary(max_size=32),
    trailing=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_any_split_gives_the_same_events(options: list[tuple[int, bytes]], go_data: bytes,
                                         trailing: bytes, cuts: list[int]) -> None:
    stream = flags(BOTH) + b"".join(opt(o, d) for o, d in options) + opt(Opt.GO, go_data)
    stream += trailing
    expected = [ClientFlags(BOTH)] + [OptionRequest(o, d) for o, d in options]
    expected.append(OptionRequest(Opt.GO, go_data))

    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    go_end = len(stream) - len(trailing)
    results = []
    for feed in ([stream], chunks, one_byte_at_a_time(stream)):
        hs = ServerHandshake()
        events, out = drive(hs, feed)
        assert events == expected
        assert hs.state is HState.TRANSMISSION
        results.append(out)
        # drive() stops feeding at TRANSMISSION: whatever came in the chunk that completed
        # GO, past GO's last byte, must be handed over as trailing_data, nothing more or less
        end = 0
        for c in feed:
            end += len(c)
            if end >= go_end:
                break
        assert hs.trailing_data == stream[go_end:end]
    assert results[0] == results[1] == results[2]
    assert results[0].endswith(reply_bytes(Opt.GO, Rep.ACK))


@pytest.mark.parametrize("magic", [0, IHAVEOPT ^ 1, NBDMAGIC, REPLY_MAGIC_OPT, 0xFFFFFFFFFFFFFFFF])
def test_bad_option_magic(magic: int) -> None:
    hs = ready()
    hs.receive_data(opt(Opt.GO, info_data(), magic=magic))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


def test_bad_option_magic_detected_from_the_header_alone() -> None:
    hs = ready()
    raw = opt(Opt.LIST, b"x" * 100, magic=0x1234)
    hs.receive_data(raw[:16])
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


def test_option_length_at_the_limit_is_accepted() -> None:
    hs = ready(max_option_length=16)
    hs.receive_data(opt(Opt.LIST, b"a" * 16))
    assert hs.next_event() == OptionRequest(Opt.LIST, b"a" * 16)


@pytest.mark.parametrize("length", [17, 1000, 2**32 - 1])
def test_option_length_over_the_limit(length: int) -> None:
    hs = ready(max_option_length=16)
    # only the header: the server must refuse before waiting for (or buffering) the data
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.LIST, length))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


def test_default_option_limit_is_enforced() -> None:
    from pynbd.limits import MAX_OPTION_LENGTH
    hs = ready()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.LIST, MAX_OPTION_LENGTH + 1))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


# non-fixed newstyle -----------------------------------------------------------------------


@pytest.mark.parametrize("option", [Opt.ABORT, Opt.LIST, Opt.GO, Opt.INFO, Opt.STARTTLS, 99])
@pytest.mark.parametrize("server_flags", [0, FIXED, BOTH])
def test_non_fixed_client_may_only_send_export_name(option: int, server_flags: int) -> None:
    hs = ready(server_flags, 0)
    assert not hs.fixed_newstyle
    hs.receive_data(opt(option, b""))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


def test_non_fixed_client_export_name() -> None:
    hs = ready(0, 0)
    hs.receive_data(opt(Opt.EXPORT_NAME, b"disk"))
    assert hs.next_event() == OptionRequest(Opt.EXPORT_NAME, b"disk")
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ERR_UNSUP)  # no option reply can be expressed to EXPORT_NAME
    out = hs.export_name_reply(0x100000, 0x0003)
    assert out == bytes.fromhex("0000000000100000" "0003") + bytes(124)
    assert hs.state is HState.TRANSMISSION


# EXPORT_NAME ------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_flags", "client_flags", "length"), [
    (BOTH, BOTH, 10),
    (BOTH, FIXED, 134),
    (FIXED, FIXED, 134),
    (BOTH, NOZ, 10),
    (NOZ, NOZ, 10),
    (0, 0, 134),
])
def test_export_name_reply_zeroes(server_flags: int, client_flags: int, length: int) -> None:
    hs = ready(server_flags, client_flags)
    hs.receive_data(opt(Opt.EXPORT_NAME, b""))
    assert hs.next_event() == OptionRequest(Opt.EXPORT_NAME, b"")
    out = hs.export_name_reply(0x0102030405060708, 0x8D)
    assert len(out) == length
    assert out[:10] == bytes.fromhex("0102030405060708" "008d")
    assert out[10:] == bytes(length - 10)
    assert hs.state is HState.TRANSMISSION


def test_export_name_reply_needs_both_sides_no_zeroes_even_if_flags_were_forced() -> None:
    # Guard the "both sides" rule in export_name_reply itself: even if client_flags claims
    # C_NO_ZEROES, a server that did not offer NO_ZEROES pads.
    hs = ready(FIXED, FIXED)
    hs.client_flags = BOTH
    hs.receive_data(opt(Opt.EXPORT_NAME, b"x"))
    hs.next_event()
    assert len(hs.export_name_reply(1, 1)) == 134


def test_export_name_trailing_data() -> None:
    hs = ready()
    req = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 7, 0, 512)
    hs.receive_data(opt(Opt.EXPORT_NAME, b"a") + req[:5])
    assert hs.next_event() == OptionRequest(Opt.EXPORT_NAME, b"a")
    hs.receive_data(req[5:])
    assert hs.next_event() is NEED_DATA
    hs.export_name_reply(4096, 1)
    assert hs.trailing_data == req
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"more")


def test_export_name_reply_without_pending_export_name() -> None:
    hs = ready()
    with pytest.raises(LocalProtocolError):
        hs.export_name_reply(1, 1)
    hs.receive_data(opt(Opt.GO, info_data()))
    hs.next_event()
    with pytest.raises(LocalProtocolError):
        hs.export_name_reply(1, 1)
    assert hs.state is HState.OPTION_PENDING


# option replies ---------------------------------------------------------------------------


def test_reply_framing_bytes() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.LIST))
    hs.next_event()
    out = hs.reply(Rep.SERVER, b"\x00\x00\x00\x04disk")
    assert out == (bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x03"
                   + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x08" + b"\x00\x00\x00\x04disk")
    assert hs.state is HState.OPTION_PENDING
    out = hs.reply(Rep.ACK)
    assert out == bytes.fromhex("0003e889045565a9" "00000003" "00000001" "00000000")
    assert hs.state is HState.OPTIONS


@pytest.mark.parametrize("rep", [r for r in Rep if r >= 2**31] + [2**31, 2**32 - 1])
def test_error_replies_end_the_option(rep: int) -> None:
    hs = ready()
    hs.receive_data(opt(Opt.INFO, info_data()))
    hs.next_event()
    out = hs.reply(rep, b"why")
    assert out == reply_bytes(Opt.INFO, rep, b"why")
    assert hs.state is HState.OPTIONS
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)


@pytest.mark.parametrize("rep", [Rep.SERVER, Rep.INFO, Rep.META_CONTEXT, 5, 2**31 - 1])
def test_non_final_replies_keep_the_option_pending(rep: int) -> None:
    hs = ready()
    hs.receive_data(opt(Opt.GO, info_data()))
    hs.next_event()
    for _ in range(3):
        assert hs.reply(rep, b"d") == reply_bytes(Opt.GO, rep, b"d")
        assert hs.state is HState.OPTION_PENDING
    hs.reply(Rep.ACK)
    assert hs.state is HState.TRANSMISSION


def test_no_pipelining_next_option_waits_for_the_reply() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.LIST) + opt(Opt.STRUCTURED_REPLY))
    assert hs.next_event() == OptionRequest(Opt.LIST, b"")
    assert hs.next_event() is NEED_DATA
    assert hs.next_event() is NEED_DATA
    hs.reply(Rep.ACK)
    assert hs.next_event() == OptionRequest(Opt.STRUCTURED_REPLY, b"")


def test_info_ack_stays_in_negotiation() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.INFO, info_data()))
    hs.next_event()
    hs.reply(Rep.INFO, b"\x00\x00" + bytes(10))
    hs.reply(Rep.ACK)
    assert hs.state is HState.OPTIONS
    hs.receive_data(opt(Opt.GO, info_data()))
    assert hs.next_event() == OptionRequest(Opt.GO, info_data())


# GO -----------------------------------------------------------------------------------------


def test_go_ack_enters_transmission_with_trailing_data() -> None:
    hs = ready()
    req1 = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 4096)
    req2 = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 2, 0, 3) + b"abc"
    hs.receive_data(opt(Opt.GO, info_data(b"d")) + req1)
    assert hs.next_event() == OptionRequest(Opt.GO, info_data(b"d"))
    hs.receive_data(req2)
    assert hs.next_event() is NEED_DATA
    out = hs.reply(Rep.INFO, b"\x00\x00" + bytes(10)) + hs.reply(Rep.ACK)
    assert out.endswith(reply_bytes(Opt.GO, Rep.ACK))  # no padding after the GO ACK
    assert hs.state is HState.TRANSMISSION
    assert hs.trailing_data == req1 + req2
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)


def test_go_ack_without_trailing_data() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.GO, info_data()))
    hs.next_event()
    hs.reply(Rep.ACK)
    assert hs.state is HState.TRANSMISSION
    assert hs.trailing_data == b""


def test_go_error_keeps_negotiating_and_keeps_buffered_bytes() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.GO, info_data(b"nope")) + opt(Opt.GO, info_data(b"ok")))
    hs.next_event()
    hs.reply(Rep.ERR_UNKNOWN, b"no such export")
    assert hs.state is HState.OPTIONS
    assert hs.trailing_data == b""
    assert hs.next_event() == OptionRequest(Opt.GO, info_data(b"ok"))


# ABORT ------------------------------------------------------------------------------------


def test_abort_ack_closes() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.ABORT))
    assert hs.next_event() == OptionRequest(Opt.ABORT, b"")
    assert hs.reply(Rep.ACK) == reply_bytes(Opt.ABORT, Rep.ACK)
    assert hs.state is HState.CLOSED
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)
    assert hs.next_event() is NEED_DATA


def test_abort_one_byte_at_a_time() -> None:
    hs = ServerHandshake()
    events, out = drive(hs, one_byte_at_a_time(flags(FIXED) + opt(Opt.ABORT) + b"junk"))
    assert events == [ClientFlags(FIXED), OptionRequest(Opt.ABORT, b"")]
    assert out == reply_bytes(Opt.ABORT, Rep.ACK)
    assert hs.state is HState.CLOSED


# STARTTLS -----------------------------------------------------------------------------------


def test_starttls_ack_then_tls_done() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.STARTTLS))
    hs.next_event()
    assert hs.reply(Rep.ACK) == reply_bytes(Opt.STARTTLS, Rep.ACK)
    assert hs.state is HState.TLS_HANDSHAKE
    assert hs.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)
    hs.tls_done()
    assert hs.state is HState.OPTIONS
    hs.receive_data(opt(Opt.GO, info_data()))
    assert hs.next_event() == OptionRequest(Opt.GO, info_data())


def test_starttls_ack_with_pipelined_data_is_fatal() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.STARTTLS) + b"\x16\x03\x01")  # e.g. a TLS ClientHello sent too early
    hs.next_event()
    with pytest.raises(RemoteProtocolError):
        hs.reply(Rep.ACK)


def test_starttls_refused_with_pipelined_option_is_fine() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.STARTTLS) + opt(Opt.LIST))
    hs.next_event()
    hs.reply(Rep.ERR_POLICY)
    assert hs.state is HState.OPTIONS
    assert hs.next_event() == OptionRequest(Opt.LIST, b"")


# transitions ------------------------------------------------------------------------------


def test_reply_with_nothing_pending() -> None:
    hs = ServerHandshake()
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)  # before the client flags
    hs = ready()
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ACK)
    with pytest.raises(LocalProtocolError):
        hs.reply(Rep.ERR_UNSUP)
    assert hs.state is HState.OPTIONS


def test_tls_done_without_starttls() -> None:
    hs = ready()
    with pytest.raises(LocalProtocolError):
        hs.tls_done()
    assert hs.state is HState.OPTIONS


_INPUTS = sorted({inp for (_, inp) in TRANSITIONS} | {"tls-done", "bogus"})


@pytest.mark.parametrize("state", list(HState))
@pytest.mark.parametrize("inp", _INPUTS)
def test_transition_table_is_the_only_authority(state: HState, inp: str) -> None:
    hs = ServerHandshake()
    hs.state = state
    if (state, inp) in TRANSITIONS:
        hs._go(inp)
        assert hs.state is TRANSITIONS[(state, inp)]
    else:
        with pytest.raises(LocalProtocolError):
            hs._go(inp)
        assert hs.state is state


def test_transition_table_contents() -> None:
    S = HState
    assert TRANSITIONS == {
        (S.AWAIT_CLIENT_FLAGS, "client-flags"): S.OPTIONS,
        (S.OPTIONS, "option"): S.OPTION_PENDING,
        (S.OPTION_PENDING, "reply-partial"): S.OPTION_PENDING,
        (S.OPTION_PENDING, "reply-final"): S.OPTIONS,
        (S.OPTION_PENDING, "go-ack"): S.TRANSMISSION,
        (S.OPTION_PENDING, "export-name-ok"): S.TRANSMISSION,
        (S.OPTION_PENDING, "abort-ack"): S.CLOSED,
        (S.OPTION_PENDING, "starttls-ack"): S.TLS_HANDSHAKE,
        (S.TLS_HANDSHAKE, "tls-done"): S.OPTIONS,
    }
    # nothing leaves TRANSMISSION or CLOSED
    assert not [k for k in TRANSITIONS if k[0] in (S.TRANSMISSION, S.CLOSED)]


def test_close_from_any_state() -> None:
    hs = ready()
    hs.receive_data(opt(Opt.LIST))
    hs.next_event()
    hs.close()
    assert hs.state is HState.CLOSED
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")


def test_handshake_flags_enum_values_used() -> None:
    hs = ServerHandshake(HandshakeFlag.FIXED_NEWSTYLE)
    assert hs.handshake_flags == 1
    assert type(hs.handshake_flags) is int
