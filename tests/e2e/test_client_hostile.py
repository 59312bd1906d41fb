"""pynbd's client engine against a hostile server.

A tiny in-test NBD server (:mod:`hostile_server`: a thread, blocking sockets, raw bytes built
with pynbd.protocol) does a correct handshake and then misbehaves. Every pending request must end with a clean
error (ProtocolError / ConnectionError / CommandError, or TimeoutError for a stalled stream):
never a hang, and never a half-filled buffer reported as success.
"""

from __future__ import annotations

import asyncio
import errno as E
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from helpers import run_async
from hostile_server import (
    DEADLINE,
    SIZE,
    Conn,
    Options,
    hostile,
)

from pynbd.client import AsyncClient
from pynbd.client.blocking import BlockingConnection, ServerGone
from pynbd.errors import CommandError, ProtocolError, RemoteProtocolError
from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from pynbd.protocol.handshake import ServerHandshake
from pynbd.protocol.transmission import (
    Request,
    block_status_chunk,
    chunk_header,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return run_async(coro, DEADLINE * 2)


async def in_flight(c: AsyncClient, ops: list[Awaitable[Any]]) -> list[Any]:
    """Run ops concurrently under the deadline, returning results or exceptions."""
    return await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), DEADLINE)


def check_fatal(c: AsyncClient, results: list[Any], kind: type[BaseException] = ProtocolError
                ) -> None:
    """Every request failed with `kind`, and the connection is dead."""
    for r in results:
        assert isinstance(r, kind), f"expected {kind.__name__}, got {r!r}"
    assert c.closed and isinstance(c.failure, kind)


async def three_reads(c: AsyncClient, bufs: list[bytearray] | None = None) -> list[Any]:
    """Three READs in flight: 1024 at 0, 512 at 4096, 4096 at 65536 (into bufs, if given)."""
    spans = [(0, 1024), (4096, 512), (65536, 4096)]
    if bufs is None:
        bufs = [bytearray(b"\xee" * n) for _, n in spans]
    return await in_flight(c, [c.pread_into(b, o) for b, (o, _) in zip(bufs, spans,
                                                                        strict=True)])


def serve_reads(conn: Conn, bad: Callable[[Conn, Request], None], n: int = 3) -> None:
    """Read n requests, then misbehave in reply to the first; the others get no answer."""
    reqs = conn.requests(n)
    bad(conn, reqs[0])


def fatal_read_case(bad: Callable[[Conn, Request], None], opts: Options | None = None,
                    kind: type[BaseException] = ProtocolError) -> None:
    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock)
        bufs = [bytearray(b"\xee" * n) for n in (1024, 512, 4096)]
        res = await three_reads(c, bufs)
        check_fatal(c, res, kind)
        with pytest.raises(ConnectionError):
            await c.pread(512, 0)
        await c.close()

    with hostile(lambda conn: serve_reads(conn, bad), opts) as h:
        run(go())
    blocking_fatal_read_case(bad, opts)


def blocking_fatal_read_case(bad: Callable[[Conn, Request], None],
                             opts: Options | None = None) -> None:
    """The same misbehaviour against pynbd.client.blocking: the read fails with ServerGone
    (not a timeout, not a half-filled success), and so does every later command."""
    structured = (opts or Options()).sr
    with hostile(lambda conn: serve_reads(conn, bad), opts) as h:
        c = BlockingConnection.connect(unix=h.sock, structured=structured)
        c.sock.settimeout(DEADLINE)
        try:
            spans = [(0, 1024), (4096, 512), (65536, 4096)]
            cookies = [c.send(0, o, n, into=memoryview(bytearray(b"\xee" * n)))
                       for o, n in spans]
            with pytest.raises(ServerGone) as ei:
                c.reply(cookies[0])
            assert "timed out" not in str(ei.value)
            with pytest.raises(ServerGone):
                c.pread_into(memoryview(bytearray(512)), 0)
        finally:
            c.close()


# --------------------------------------------------------------------------- fatal replies


def test_bad_reply_magic() -> None:
    fatal_read_case(lambda conn, r: conn.send(struct.pack(">IIQ", 0xDEADBEEF, 0, r.cookie)))


def test_bad_reply_magic_simple() -> None:
    fatal_read_case(lambda conn, r: conn.send(struct.pack(">IIQ", 0x668E33EF, 0, r.cookie)),
                    Options(sr=False))


def test_unknown_cookie() -> None:
    fatal_read_case(lambda conn, r: conn.send(none_chunk(r.cookie + 1000)))


def test_unknown_cookie_simple() -> None:
    fatal_read_case(lambda conn, r: conn.send(simple_reply(0, 0xABCDEF), bytes(1024)),
                    Options(sr=False))


def test_offset_data_outside_request() -> None:
    fatal_read_case(lambda conn, r: conn.send(
        offset_data_header(r.cookie, r.offset + r.length - 10, 20), b"x" * 20))


def test_offset_data_before_request() -> None:
    def scenario(conn: Conn) -> None:
        reqs = conn.requests(3)
        r = reqs[1]  # 512 bytes at 4096
        conn.send(offset_data_header(r.cookie, r.offset - 8, 16), b"y" * 16)

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock)
        check_fatal(c, await three_reads(c))
        await c.close()

    with hostile(scenario) as h:
        run(go())


def test_offset_data_past_request() -> None:
    fatal_read_case(lambda conn, r: conn.send(offset_data_header(r.cookie, r.offset + 1024, 8),
                                              b"y" * 8))


def test_hole_outside_request() -> None:
    fatal_read_case(lambda conn, r: conn.send(offset_hole_chunk(r.cookie, r.offset, r.length + 1)))


def test_zero_length_hole() -> None:
    fatal_read_case(lambda conn, r: conn.send(offset_hole_chunk(r.cookie, r.offset, 0)))


def test_overlapping_chunks() -> None:
    def bad(conn: Conn, r: Request) -> None:
        conn.send(offset_data_header(r.cookie, 0, 600, done=False), b"a" * 600,
                  offset_hole_chunk(r.cookie, 512, 512, done=False),
                  none_chunk(r.cookie))

    fatal_read_case(bad)


def test_read_reply_not_covering_request() -> None:
    """512 of 1024 bytes then DONE: the READ fails (no half-filled success)."""
    fatal_read_case(lambda conn, r: conn.send(offset_data_header(r.cookie, 0, 512), b"h" * 512))


def test_read_reply_gap() -> None:
    def bad(conn: Conn, r: Request) -> None:
        conn.send(offset_data_header(r.cookie, 0, 256, done=False), b"a" * 256,
                  offset_data_header(r.cookie, 512, 512), b"b" * 512)

    fatal_read_case(bad)


def test_none_without_done() -> None:
    fatal_read_case(lambda conn, r: conn.send(chunk_header(0, ReplyType.NONE, r.cookie, 0)))


def test_none_with_payload() -> None:
    fatal_read_case(lambda conn, r: conn.send(
        chunk_header(ReplyFlag.DONE, ReplyType.NONE, r.cookie, 4), b"junk"))


def test_simple_reply_to_structured_read() -> None:
    fatal_read_case(lambda conn, r: conn.send(simple_reply(0, r.cookie), bytes(r.length)))


def test_unknown_chunk_type() -> None:
    fatal_read_case(lambda conn, r: conn.send(
        chunk_header(ReplyFlag.DONE, 99, r.cookie, 4), b"abcd"))


def test_short_offset_data_chunk() -> None:
    fatal_read_case(lambda conn, r: conn.send(
        chunk_header(ReplyFlag.DONE, ReplyType.OFFSET_DATA, r.cookie, 4), b"abcd"))


def test_error_offset_outside_request() -> None:
    fatal_read_case(lambda conn, r: conn.send(
        error_chunk(r.cookie, 5, "bad", offset=r.offset + r.length)))


def test_error_offset_inside_request_is_a_command_error() -> None:
    """ERROR_OFFSET inside the request: the READ fails with EIO, the chunk callback hears of
    the offset, the connection lives."""

    def scenario(conn: Conn) -> None:
        r = conn.request()[0]
        conn.send(offset_data_header(r.cookie, 0, 512, done=False), b"a" * 512,
                  offset_hole_chunk(r.cookie, 512, 512, done=False),
                  error_chunk(r.cookie, 5, "bad sector", offset=700))
        r = conn.request()[0]
        conn.send(none_chunk(r.cookie))

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            seen: list[tuple[int, int, int]] = []
            buf = bytearray(1024)
            with pytest.raises(CommandError) as ei:
                await asyncio.wait_for(c.pread_into(
                    buf, 0, chunk_cb=lambda b, o, s, e: seen.append((o, s, e))), DEADLINE)
            assert ei.value.errno == E.EIO and "bad sector" in str(ei.value)
            assert (700, 3, E.EIO) in seen
            await asyncio.wait_for(c.flush(), DEADLINE)

    with hostile(scenario) as h:
        run(go())


def test_status_chunk_for_a_read() -> None:
    fatal_read_case(lambda conn, r: conn.send(block_status_chunk(r.cookie, 1, [(512, 0)], True)))


def test_closing_mid_reply_structured() -> None:
    def bad(conn: Conn, r: Request) -> None:
        conn.send(offset_data_header(r.cookie, 0, 1024), b"p" * 300)
        conn.close()

    fatal_read_case(bad, kind=ConnectionError)


def test_closing_mid_reply_simple() -> None:
    def bad(conn: Conn, r: Request) -> None:
        conn.send(simple_reply(0, r.cookie), b"q" * 1000)  # 1000 of 1024 bytes
        conn.close()

    fatal_read_case(bad, Options(sr=False), kind=ConnectionError)


def test_closing_mid_header() -> None:
    def bad(conn: Conn, r: Request) -> None:
        conn.send(chunk_header(ReplyFlag.DONE, ReplyType.NONE, r.cookie, 0)[:7])
        conn.close()

    fatal_read_case(bad, kind=ConnectionError)


def test_closing_between_replies() -> None:
    """One READ answered well, then the server hangs up: the others fail, the first
    succeeded with its data."""

    def scenario(conn: Conn) -> None:
        reqs = conn.requests(3)
        r = reqs[1]
        conn.send(offset_data_header(r.cookie, r.offset, r.length), b"k" * r.length)
        conn.close()

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock)
        res = await three_reads(c)
        assert res[1] is None
        assert isinstance(res[0], ConnectionError) and isinstance(res[2], ConnectionError)
        assert c.closed
        await c.close()

    with hostile(scenario) as h:
        run(go())


# --------------------------------------------------------------------------- block status


def status_case(bad: Callable[[Conn, Request], None], flags: int = 0,
                contexts: tuple[str, ...] = ("base:allocation",),
                kind: type[BaseException] = ProtocolError) -> None:
    def scenario(conn: Conn) -> None:
        reqs = conn.requests(2)
        bad(conn, reqs[0])

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock, meta_contexts=contexts)
        assert list(c.meta_contexts.values()) == list(contexts)
        res = await in_flight(c, [c.block_status(65536, 0, flags), c.pread(512, 0)])
        check_fatal(c, res, kind)
        await c.close()

    with hostile(scenario, Options(contexts=contexts)) as h:
        run(go())


def test_zero_length_extent() -> None:
    status_case(lambda conn, r: conn.send(block_status_chunk(r.cookie, 1, [(0, 0)], True)))


def test_zero_length_extent_after_good_ones() -> None:
    status_case(lambda conn, r: conn.send(
        block_status_chunk(r.cookie, 1, [(4096, 0), (0, 3)], True)))


def test_status_chunk_without_extents() -> None:
    status_case(lambda conn, r: conn.send(
        chunk_header(ReplyFlag.DONE, ReplyType.BLOCK_STATUS, r.cookie, 4), b"\0\0\0\1"))


def test_status_chunk_for_unknown_context() -> None:
    status_case(lambda conn, r: conn.send(block_status_chunk(r.cookie, 7, [(512, 0)], True)))


def test_two_status_chunks_for_one_context() -> None:
    status_case(lambda conn, r: conn.send(
        block_status_chunk(r.cookie, 1, [(512, 0)], False),
        block_status_chunk(r.cookie, 1, [(512, 0)], True)))


def test_req_one_with_two_extents() -> None:
    status_case(lambda conn, r: conn.send(
        block_status_chunk(r.cookie, 1, [(512, 0), (512, 3)], True)), flags=CmdFlag.REQ_ONE)


def test_status_missing_a_context() -> None:
    status_case(lambda conn, r: conn.send(block_status_chunk(r.cookie, 1, [(65536, 0)], True)),
                contexts=("base:allocation", "qemu:allocation-depth"))


def test_status_done_without_any_chunk() -> None:
    status_case(lambda conn, r: conn.send(none_chunk(r.cookie)))


def test_simple_success_reply_to_block_status() -> None:
    status_case(lambda conn, r: conn.send(simple_reply(0, r.cookie)))


def test_block_status_extent_past_request_kept() -> None:
    """Not hostile: the last extent may run past the request; it is handed over unclipped."""

    def scenario(conn: Conn) -> None:
        r = conn.request()[0]
        conn.send(block_status_chunk(r.cookie, 1, [(512, 0), (1 << 19, 3)], True))

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            assert await c.block_status(4096, 0) == {"base:allocation": [(512, 0), (1 << 19, 3)]}

    with hostile(scenario) as h:
        run(go())


# --------------------------------------------------------------------------- errors that are not fatal


def test_error_chunks_keep_the_connection() -> None:
    """An ERROR chunk with a message, an unknown error type (bit 15), a simple error reply to
    a non-READ: each fails its command only."""

    def scenario(conn: Conn) -> None:
        a, b, w, f = conn.requests(4)
        conn.send(error_chunk(a.cookie, 5, "disk on fire"))
        msg = b"strange"
        conn.send(chunk_header(ReplyFlag.DONE, 0x8123, b.cookie, 6 + len(msg) + 3),
                  struct.pack(">IH", 28, len(msg)), msg, b"xyz")
        conn.send(simple_reply(1, w.cookie))
        conn.send(none_chunk(f.cookie))
        r = conn.request()[0]
        conn.send(offset_hole_chunk(r.cookie, r.offset, r.length))

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            res = await in_flight(c, [c.pread(512, 0), c.pread(512, 512),
                                      c.pwrite(b"w", 0), c.flush()])
            assert isinstance(res[0], CommandError) and res[0].errno == E.EIO
            assert "disk on fire" in str(res[0])
            assert isinstance(res[1], CommandError) and res[1].errno == E.ENOSPC
            assert isinstance(res[2], CommandError) and res[2].errno == E.EPERM
            assert res[3] is None
            buf = bytearray(b"\xff" * 2048)
            await asyncio.wait_for(c.pread_into(buf, 8192), DEADLINE)
            assert buf == bytes(2048) and c.failure is None

    with hostile(scenario) as h:
        run(go())


def test_error_chunk_after_partial_data() -> None:
    """Data for half of a READ then an error: a CommandError, never a success."""

    def scenario(conn: Conn) -> None:
        r = conn.request()[0]
        conn.send(offset_data_header(r.cookie, 0, 512, done=False), b"d" * 512,
                  error_chunk(r.cookie, 5, "", offset=None))
        r = conn.request()[0]
        conn.send(none_chunk(r.cookie))

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            with pytest.raises(CommandError) as ei:
                await asyncio.wait_for(c.pread(1024, 0), DEADLINE)
            assert ei.value.errno == E.EIO
            await asyncio.wait_for(c.flush(), DEADLINE)

    with hostile(scenario) as h:
        run(go())


# --------------------------------------------------------------------------- handshake


@pytest.mark.parametrize("style", ["fixed", "plain", "oldstyle"])
def test_eflags_without_has_flags(style: str) -> None:
    opts = Options(eflags=TxFlag.SEND_FLUSH, style=style, go=style == "fixed")

    async def go() -> None:
        with pytest.raises(RemoteProtocolError, match="HAS_FLAGS"):
            await AsyncClient.connect(unix=h.sock, timeout=DEADLINE)

    with hostile(lambda conn: None, opts) as h:
        run(go())


def test_go_unsupported_falls_back_to_export_name() -> None:
    def scenario(conn: Conn) -> None:
        r = conn.request()[0]
        assert r.type == Cmd.READ
        conn.send(offset_data_header(r.cookie, r.offset, r.length), b"E" * r.length)

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            assert c.protocol == "newstyle-fixed" and c.size == SIZE and c.structured
            assert await c.pread(100, 0) == b"E" * 100

    with hostile(scenario, Options(go=False)) as h:
        run(go())


def test_data_before_the_first_request() -> None:
    async def go() -> None:
        with pytest.raises(RemoteProtocolError):
            await AsyncClient.connect(unix=h.sock, timeout=DEADLINE)

    with hostile(lambda conn: None, Options(after_go=none_chunk(1))) as h:
        run(go())


def test_structured_chunk_without_structured_replies() -> None:
    fatal_read_case(lambda conn, r: conn.send(none_chunk(r.cookie)), Options(sr=False))


def test_close_during_handshake() -> None:
    """Half a greeting, then the server hangs up."""

    def half(conn: Conn) -> None:
        conn.send(struct.pack(">Q", NBDMAGIC) + struct.pack(">Q", IHAVEOPT)[:3])
        raise EOFError

    async def go() -> None:
        with pytest.raises((ProtocolError, ConnectionError)):
            await AsyncClient.connect(unix=h.sock, timeout=DEADLINE)

    with hostile(lambda conn: None, Options(custom=half)) as h:
        run(go())


def test_bad_option_reply_magic() -> None:
    def bad(conn: Conn) -> None:
        conn.send(ServerHandshake().greeting())
        conn.recv_exact(4 + 16)  # client flags, the STRUCTURED_REPLY option
        conn.send(struct.pack(">QIII", 0x1234, Opt.STRUCTURED_REPLY, Rep.ACK, 0))
        conn.wait_eof()

    async def go() -> None:
        with pytest.raises(RemoteProtocolError, match="magic"):
            await AsyncClient.connect(unix=h.sock, timeout=DEADLINE)

    with hostile(lambda conn: None, Options(custom=bad)) as h:
        run(go())


# --------------------------------------------------------------------------- stalls and timeouts


def test_stalled_stream_request_timeout() -> None:
    """The server reads the requests and answers nothing: request_timeout fires, every
    pending command gets TimeoutError and the connection is failed."""

    def scenario(conn: Conn) -> None:
        conn.requests(3)
        conn.wait_eof()

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock)
        c.request_timeout = 0.3
        t0 = time.monotonic()
        res = await three_reads(c)
        assert time.monotonic() - t0 < 2
        check_fatal(c, res, TimeoutError)
        await c.close()

    with hostile(scenario) as h:
        run(go())


def test_stalled_mid_reply_request_timeout() -> None:
    """Half a reply, then silence: the timeout fires; the buffer is never reported filled."""

    def scenario(conn: Conn) -> None:
        r = conn.request()[0]
        conn.send(offset_data_header(r.cookie, 0, r.length), b"s" * (r.length // 2))
        conn.wait_eof()

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock, request_timeout=0.3)
        with pytest.raises(TimeoutError):
            await c.pread(4096, 0)
        assert c.closed
        await c.close()

    with hostile(scenario) as h:
        run(go())


def _greet_then_stall(conn: Conn) -> None:
    conn.send(ServerHandshake().greeting())
    conn.wait_eof()


def _plain_export_name_stall(conn: Conn) -> None:
    conn.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0))  # non-fixed newstyle
    conn.wait_eof()


@pytest.mark.parametrize("stall", [None, _greet_then_stall, _plain_export_name_stall],
                         ids=["no-greeting", "no-option-reply", "no-export-name-reply"])
def test_connect_timeout(stall: Callable[[Conn], None] | None) -> None:
    """A server that accepts and says nothing, stops answering options, or never answers
    EXPORT_NAME: connect(timeout=) raises TimeoutError and closes the socket."""

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await AsyncClient.connect(unix=h.sock, timeout=0.3)
        assert time.monotonic() - t0 < 2

    opts = Options(style="silent") if stall is None else Options(custom=stall)
    with hostile(lambda conn: None, opts) as h:
        run(go())


def test_waiting_for_a_slot_when_the_server_hangs_up() -> None:
    """More requests than max_in_flight: the ones waiting for a slot fail too."""

    def scenario(conn: Conn) -> None:
        conn.requests(2)
        conn.close()

    async def go() -> None:
        c = await AsyncClient.connect(unix=h.sock)
        c.max_in_flight = 2
        res = await in_flight(c, [c.pread(512, i * 512) for i in range(10)])
        assert all(isinstance(r, ConnectionError) for r in res), res
        await c.close()

    with hostile(scenario) as h:
        run(go())


def test_cancelled_waiter_does_not_lose_a_slot() -> None:
    """A request cancelled while waiting for a slot must not swallow the wake-up."""

    def scenario(conn: Conn) -> None:
        first = conn.request()[0]
        time.sleep(0.2)
        conn.send(offset_hole_chunk(first.cookie, first.offset, first.length))
        for _ in range(2):
            r = conn.request()[0]
            conn.send(offset_hole_chunk(r.cookie, r.offset, r.length))

    async def go() -> None:
        async with await AsyncClient.connect(unix=h.sock) as c:
            c.max_in_flight = 1
            a = asyncio.ensure_future(c.pread(512, 0))
            await asyncio.sleep(0.05)
            b = asyncio.ensure_future(c.pread(512, 512))
            d = asyncio.ensure_future(c.pread(512, 1024))
            await asyncio.sleep(0.05)
            b.cancel()
            await asyncio.wait_for(asyncio.gather(a, d), DEADLINE)
            assert b.cancelled()
            assert await asyncio.wait_for(c.pread(512, 0), DEADLINE) == bytes(512)

    with hostile(scenario) as h:
        run(go())
