"""THE reply decoder (pynbd.protocol.replies) at byte level: generated reply streams for
generated requests, fed whole, in random pieces and one byte at a time, through a driver that
does what the clients do (buffer, sink, feed again); and every rejection, each on its own."""

from __future__ import annotations

import errno
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import RemoteProtocolError
from pynbd.protocol.constants import (
    EXT_REPLY,
    EXT_REPLY_MAGIC,
    EXT_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    ReplyFlag,
    ReplyType,
)
from pynbd.protocol.replies import MAX_CHUNK, Pending, ReplyDecoder
from pynbd.protocol.transmission import (
    block_status_chunk,
    chunk_header,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)

DONE = int(ReplyFlag.DONE)
CONTEXTS = {1: "base:allocation", 7: "qemu:dirty-bitmap:x"}


class Driver:
    """Feeds a decoder as the clients do: bytes into a buffer, ``feed``, and read data into
    the decoder's sink when it asks for it."""

    def __init__(self, structured: bool = True, extended: bool = False,
                 contexts: dict[int, str] | None = None) -> None:
        self.done: list[Pending] = []
        self.dec = ReplyDecoder(self.done.append, structured=structured, extended=extended,
                                contexts=CONTEXTS if contexts is None else contexts)
        self.buf = bytearray()
        self.got = 0  # bytes of the sink filled so far

    def expect(self, cookie: int, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               chunk_cb: Any = None) -> Pending:
        dest = memoryview(bytearray(b"\xee" * length)) if cmd == Cmd.READ else None
        p = Pending(cookie, cmd, offset, length, flags, dest, chunk_cb)
        self.dec.expect(p)
        return p

    def push(self, data: bytes) -> None:
        mv = memoryview(data)
        dec = self.dec
        while len(mv):
            sink = dec.sink
            if sink is not None:
                k = min(len(sink) - self.got, len(mv))
                sink[self.got:self.got + k] = mv[:k]
                self.got += k
                mv = mv[k:]
                if self.got == len(sink):
                    self.got = 0
                    dec.sink_filled()
                    self._feed()
                continue
            self.buf += mv
            mv = mv[len(mv):]
            self._feed()

    def _feed(self) -> None:
        view = memoryview(self.buf)
        try:
            pos = self.dec.feed(view, 0, len(self.buf))
        finally:
            view.release()
        del self.buf[:pos]
        if self.dec.sink is not None:
            assert not self.buf  # everything buffered went to the sink

    def push_bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.push(data[i:i + 1])


def one(data: bytes, *requests: tuple[Any, ...], structured: bool = True,
        extended: bool = False) -> Driver:
    d = Driver(structured, extended)
    for r in requests:
        d.expect(*r)
    d.push(data)
    return d


def rejected(data: bytes, *requests: tuple[Any, ...], structured: bool = True,
             extended: bool = False, match: str | None = None) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        one(data, *requests, structured=structured, extended=extended)


# ------------------------------------------------------------------- generated streams


@dataclass
class Req:
    """A request, the replies a server may send to it, and the outcome they mean."""

    cookie: int
    cmd: int
    offset: int
    length: int
    flags: int
    chunks: list[bytes]
    error: int = 0
    message: str = ""
    data: bytes | None = None
    result: dict[str, list[tuple[int, int]]] | None = None
    cb: list[tuple[int, int, int, int]] = field(default_factory=list)  # (off, n, status, err)


def _split(draw: st.DrawFn, n: int) -> list[int]:
    """Cut n into 1..5 positive pieces."""
    k = draw(st.integers(1, min(5, n)))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1,
                                unique=True))) if n > 1 else []
    return [b - a for a, b in itertools.pairwise([0, *cuts, n])]


@st.composite
def structured_read(draw: st.DrawFn, cookie: int, extended: bool) -> Req:
    length = draw(st.integers(1, 300))
    offset = draw(st.integers(0, 2**63 - 1 - length))
    ro = offset if extended else 0
    pieces, pos = [], 0
    data = bytearray(length)
    cb = []
    for n in _split(draw, length):
        if draw(st.booleans()):
            blob = draw(st.binary(min_size=n, max_size=n))
            data[pos:pos + n] = blob
            pieces.append(offset_data_header(cookie, offset + pos, n, False, extended, ro) + blob)
            cb.append((offset + pos, n, 1, 0))
        else:
            pieces.append(offset_hole_chunk(cookie, offset + pos, n, False, extended, ro))
            cb.append((offset + pos, n, 2, 0))
        pos += n
    order = draw(st.permutations(range(len(pieces))))
    chunks = [pieces[i] for i in order]
    cb = [cb[i] for i in order]
    failing = draw(st.integers(0, 3)) == 0
    if failing:
        err = draw(st.sampled_from([int(Err.EIO), int(Err.ENOSPC), 0, 12345]))
        msg = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
        eoff = draw(st.one_of(st.none(), st.integers(offset, offset + length - 1)))
        chunks = chunks[:draw(st.integers(0, len(chunks)))]
        cb = cb[:len(chunks)]
        chunks.append(error_chunk(cookie, err, msg, extended, ro, eoff))
        local = errno.EINVAL if err == 0 else {5: errno.EIO, 28: errno.ENOSPC}.get(
            err, errno.EINVAL)
        if eoff is not None:
            cb.append((eoff, 0, 3, local))
        return Req(cookie, Cmd.READ, offset, length, 0, chunks, local, msg, cb=cb)
    if draw(st.booleans()):
        chunks.append(none_chunk(cookie, extended, ro))
    else:  # DONE on the last chunk itself
        last = bytearray(chunks[-1])
        last[4:6] = DONE.to_bytes(2, "big")
        chunks[-1] = bytes(last)
    return Req(cookie, Cmd.READ, offset, length, 0, chunks, data=bytes(data), cb=cb)


@st.composite
def block_status(draw: st.DrawFn, cookie: int, extended: bool) -> Req:
    offset = draw(st.integers(0, 2**40))
    ro = offset if extended else 0
    top = 2**63 if extended else 2**32 - 1
    req_one = draw(st.booleans())
    result, chunks = {}, []
    ids = draw(st.permutations(sorted(CONTEXTS)))
    for i, ctx in enumerate(ids):
        n = 1 if req_one else draw(st.integers(1, 4))
        ents = draw(st.lists(st.tuples(st.integers(1, top), st.integers(0, 2**32 - 1)),
                             min_size=n, max_size=n))
        chunks.append(block_status_chunk(cookie, ctx, ents, i == len(ids) - 1, extended, ro))
        result[CONTEXTS[ctx]] = ents
    return Req(cookie, Cmd.BLOCK_STATUS, offset, 4096, int(CmdFlag.REQ_ONE) if req_one else 0,
               chunks, result=result)


@st.composite
def simple(draw: st.DrawFn, cookie: int, structured: bool) -> Req:
    cmd = draw(st.sampled_from([Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.READ]))
    err = draw(st.sampled_from([0, 0, int(Err.EPERM), int(Err.EIO), 2**32 - 1]))
    if structured and cmd == Cmd.READ and err == 0:
        cmd = Cmd.FLUSH
    length = draw(st.integers(0, 64))
    local = {0: 0, 1: errno.EPERM, 5: errno.EIO}.get(err, errno.EINVAL)
    if cmd == Cmd.READ and not err:
        blob = draw(st.binary(min_size=length, max_size=length))
        return Req(cookie, cmd, 0, length, 0, [simple_reply(0, cookie) + blob], data=blob,
                   cb=[(0, length, 1, 0)])
    return Req(cookie, cmd, 0, length, 0, [simple_reply(err, cookie)], local)


@st.composite
def streams(draw: st.DrawFn, structured: bool, extended: bool) -> tuple[list[Req], bytes]:
    n = draw(st.integers(1, 5))
    cookies = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    reqs = []
    for c in cookies:
        kinds = ["simple"] if not structured else ["read", "bs"] + ([] if extended else
                                                                   ["simple"])
        kind = draw(st.sampled_from(kinds))
        if kind == "read":
            reqs.append(draw(structured_read(c, extended)))
        elif kind == "bs":
            reqs.append(draw(block_status(c, extended)))
        else:
            reqs.append(draw(simple(c, structured)))
    # the replies of different requests interleave; each request's keep their order
    queues = [list(r.chunks) for r in reqs]
    rnd = random.Random(draw(st.integers(0, 2**32)))
    out = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        out.append(q.pop(0))
    return reqs, b"".join(out)


def _run_stream(reqs: list[Req], stream: bytes, structured: bool, extended: bool,
                how: str, cuts: list[int]) -> None:
    d = Driver(structured, extended)
    seen: dict[int, list[tuple[int, int, int, int]]] = {}
    pend = {}
    for r in reqs:
        log = seen.setdefault(r.cookie, [])
        cb = (lambda data, off, status, err, log=log: log.append((off, len(data), status, err))
              ) if r.cmd == Cmd.READ else None
        pend[r.cookie] = d.expect(r.cookie, r.cmd, r.offset, r.length, r.flags, cb)
    if how == "whole":
        d.push(stream)
    elif how == "bytes":
        d.push_bytewise(stream)
    else:
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in itertools.pairwise(points):
            d.push(stream[a:b])
    assert not d.dec.pending and d.dec.sink is None and not d.buf
    assert sorted(p.cookie for p in d.done) == sorted(r.cookie for r in reqs)
    for r in reqs:
        p = pend[r.cookie]
        assert (p.error, p.message if r.message else "") == (r.error, r.message)
        if r.data is not None:
            assert p.dest is not None and bytes(p.dest) == r.data
        if r.cmd == Cmd.BLOCK_STATUS and not r.error:
            assert p.result == r.result
        if r.cmd == Cmd.READ:
            assert seen[r.cookie] == r.cb


@pytest.mark.parametrize("how", ["whole", "pieces", "bytes"])
@pytest.mark.parametrize(("structured", "extended"), [(False, False), (True, False),
                                                      (True, True)],
                         ids=["simple", "structured", "extended"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_generated_streams(data: st.DataObject, cuts: list[int], structured: bool,
                           extended: bool, how: str) -> None:
    reqs, stream = data.draw(streams(structured, extended))
    _run_stream(reqs, stream, structured, extended, how, cuts)


# ------------------------------------------------------------------- the rules, one by one


def test_simple_read_data_goes_to_the_buffer_through_the_sink() -> None:
    d = Driver(structured=False)
    p = d.expect(9, Cmd.READ, 4096, 3)
    d.push(simple_reply(0, 9) + b"a")
    assert d.dec.sink is not None and len(d.dec.sink) == 2  # one byte was buffered
    d.push(b"bc")
    assert bytes(p.dest) == b"abc" and d.done == [p]  # type: ignore[arg-type]


def test_need_says_how_much_to_buffer() -> None:
    d = Driver()
    d.expect(1, Cmd.FLUSH)
    raw = error_chunk(1, Err.EIO, "xyz")
    view = memoryview(raw)
    assert d.dec.feed(view, 0, 10) == 0 and d.dec.need == 16
    assert d.dec.feed(view, 0, 16) == 0 and d.dec.need == 20
    assert d.dec.feed(view, 0, 20) == 0 and d.dec.need == len(raw)
    assert d.dec.feed(view, 0, len(raw)) == len(raw) and d.done[0].error == errno.EIO


def test_an_error_chunk_with_error_zero_reads_as_einval() -> None:
    d = one(error_chunk(1, 0, "forgot"), (1, Cmd.FLUSH))
    assert (d.done[0].error, d.done[0].message) == (errno.EINVAL, "forgot")


def test_unknown_wire_errors_read_as_einval() -> None:
    assert one(simple_reply(12345, 1), (1, Cmd.FLUSH), structured=False).done[0].error == \
        errno.EINVAL


def test_first_error_is_kept() -> None:
    d = one(error_chunk(1, Err.ENOSPC, "first", offset=None)[:-0 or None].replace(
        DONE.to_bytes(2, "big"), b"\0\0", 1) + error_chunk(1, Err.EIO, "second"),
        (1, Cmd.WRITE, 0, 512))
    assert (d.done[0].error, d.done[0].message) == (errno.ENOSPC, "first")


def test_chunk_callback_failure_fails_the_read() -> None:
    def boom(*a: Any) -> None:
        raise ValueError("no")

    d = Driver()
    p = d.expect(1, Cmd.READ, 0, 4, 0, boom)
    d.push(offset_data_header(1, 0, 4) + b"abcd")
    assert p.error == errno.EIO and "chunk callback failed" in p.message
    d = Driver()
    p = d.expect(1, Cmd.READ, 0, 4, 0, lambda *a: -1)
    d.push(offset_hole_chunk(1, 0, 4))
    assert p.error == errno.EIO


def test_unknown_error_chunk_types_are_accepted() -> None:
    payload = (5).to_bytes(4, "big") + b"\x00\x04oops" + b"future fields"
    raw = chunk_header(DONE, 0x8123, 7, len(payload)) + payload + none_chunk(8)
    d = one(raw, (7, Cmd.FLUSH), (8, Cmd.FLUSH))
    assert [(p.cookie, p.error, p.message) for p in d.done] == [(7, errno.EIO, "oops"),
                                                                  (8, 0, "")]


def test_unknown_reply_flags_are_ignored() -> None:
    d = one(chunk_header(0x8000 | DONE, 0, 1, 0), (1, Cmd.FLUSH))
    assert d.done[0].error == 0


def test_block_status_extent_past_the_request_is_kept() -> None:
    raw = block_status_chunk(1, 1, [(512, 0), (1 << 30, 3)], False) + \
        block_status_chunk(1, 7, [(4096, 1)], True)
    d = one(raw, (1, Cmd.BLOCK_STATUS, 0, 4096))
    assert d.done[0].result == {"base:allocation": [(512, 0), (1 << 30, 3)],
                                "qemu:dirty-bitmap:x": [(4096, 1)]}


def test_a_read_of_nothing_ends_with_none() -> None:
    d = one(none_chunk(1), (1, Cmd.READ, 0, 0))
    assert d.done[0].error == 0


def test_extended_header_request_offset_is_not_checked() -> None:
    """The offset echoed in an extended header is informative (the spec: the client MAY
    check it); the chunk's own fields are what count."""
    raw = EXT_REPLY.pack(EXT_REPLY_MAGIC, DONE, 0, 3, 2**63, 0)
    assert one(raw, (3, Cmd.FLUSH), extended=True).done[0].error == 0


REJECTIONS: list[tuple[str, bytes, tuple[Any, ...], dict[str, bool]]] = [
    ("bad reply magic", (0xDEADBEEF).to_bytes(4, "big") + bytes(28), (1, Cmd.FLUSH), {}),
    ("bad reply magic", REQUEST_MAGIC.to_bytes(4, "big") + bytes(28), (1, Cmd.FLUSH), {}),
    ("bad reply magic", EXT_REQUEST_MAGIC.to_bytes(4, "big") + bytes(28), (1, Cmd.FLUSH), {}),
    ("bad reply magic", none_chunk(1), (1, Cmd.FLUSH), {"structured": False}),
    ("bad reply magic", none_chunk(1, extended=True), (1, Cmd.FLUSH), {}),
    ("bad reply magic", none_chunk(1), (1, Cmd.FLUSH), {"extended": True}),
    ("bad reply magic", simple_reply(0, 1), (1, Cmd.FLUSH), {"extended": True}),
    ("unknown cookie", simple_reply(0, 2), (1, Cmd.FLUSH), {}),
    ("unknown cookie", none_chunk(2), (1, Cmd.FLUSH), {}),
    ("simple reply to a structured READ", simple_reply(0, 1) + bytes(8),
     (1, Cmd.READ, 0, 8), {}),
    ("simple reply to a successful BLOCK_STATUS", simple_reply(0, 1),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("malformed NONE", chunk_header(DONE, 0, 1, 1) + b"x", (1, Cmd.FLUSH), {}),
    ("malformed NONE", chunk_header(0, 0, 1, 0), (1, Cmd.FLUSH), {}),
    ("OFFSET_DATA", offset_data_header(1, 0, 4) + b"abcd", (1, Cmd.FLUSH), {}),
    ("OFFSET_DATA", chunk_header(DONE, 1, 1, 8) + bytes(8), (1, Cmd.READ, 0, 8), {}),
    ("outside the request", offset_data_header(1, 4, 8) + bytes(8), (1, Cmd.READ, 0, 8), {}),
    ("outside the request", offset_data_header(1, 0, 8) + bytes(8), (1, Cmd.READ, 4, 8), {}),
    ("OFFSET_HOLE", offset_hole_chunk(1, 0, 4), (1, Cmd.WRITE, 0, 4), {}),
    ("OFFSET_HOLE", chunk_header(DONE, 2, 1, 11) + bytes(11), (1, Cmd.READ, 0, 8), {}),
    ("outside the request", offset_hole_chunk(1, 0, 9), (1, Cmd.READ, 0, 8), {}),
    ("outside the request", offset_hole_chunk(1, 0, 0), (1, Cmd.READ, 0, 8), {}),
    ("overlap or leave a gap", offset_data_header(1, 0, 6, False) + bytes(6)
     + offset_hole_chunk(1, 4, 4), (1, Cmd.READ, 0, 8), {}),
    ("overlap or leave a gap", offset_hole_chunk(1, 4, 4), (1, Cmd.READ, 0, 8), {}),
    ("does not cover", offset_hole_chunk(1, 0, 4), (1, Cmd.READ, 0, 8), {}),
    ("does not cover", none_chunk(1), (1, Cmd.READ, 0, 8), {}),
    ("error chunk too short", chunk_header(DONE, 0x8001, 1, 5) + bytes(5), (1, Cmd.FLUSH), {}),
    ("overruns", chunk_header(DONE, 0x8001, 1, 9) + b"\0\0\0\5\0\4abc", (1, Cmd.FLUSH), {}),
    ("overruns", chunk_header(DONE, 0x8077, 1, 9) + b"\0\0\0\5\0\4abc", (1, Cmd.FLUSH), {}),
    ("does not match its message", chunk_header(DONE, 0x8001, 1, 10) + b"\0\0\0\5\0\1abcd",
     (1, Cmd.FLUSH), {}),
    ("does not match its message", chunk_header(DONE, 0x8002, 1, 6) + b"\0\0\0\5\0\0",
     (1, Cmd.FLUSH), {}),
    ("longer than 4096", chunk_header(DONE, 0x8001, 1, 6 + 4097) + b"\0\0\0\5\x10\x01"
     + b"m" * 4097, (1, Cmd.FLUSH), {}),
    ("ERROR_OFFSET chunk outside", error_chunk(1, 5, "", offset=8), (1, Cmd.READ, 0, 8), {}),
    ("ERROR_OFFSET chunk outside", error_chunk(1, 5, "", offset=3), (1, Cmd.READ, 4, 8), {}),
    ("block status chunk for another command", block_status_chunk(1, 1, [(512, 0)], True),
     (1, Cmd.READ, 0, 512), {}),
    ("malformed BLOCK_STATUS", chunk_header(DONE, 5, 1, 8) + bytes(8),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("malformed BLOCK_STATUS", chunk_header(DONE, 5, 1, 13) + bytes(13),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("malformed BLOCK_STATUS_EXT", chunk_header(DONE, 6, 1, 24) + b"\0\0\0\1\0\0\0\1"
     + (8).to_bytes(8, "big") + bytes(8), (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("malformed BLOCK_STATUS_EXT", chunk_header(DONE, 6, 1, 23, extended=True) + bytes(23),
     (1, Cmd.BLOCK_STATUS, 0, 8), {"extended": True}),
    ("malformed BLOCK_STATUS_EXT", chunk_header(DONE, 6, 1, 25, extended=True) + bytes(25),
     (1, Cmd.BLOCK_STATUS, 0, 8), {"extended": True}),
    ("count does not match", chunk_header(DONE, 6, 1, 24, extended=True)
     + b"\0\0\0\1\0\0\0\2" + (8).to_bytes(8, "big") + bytes(8),
     (1, Cmd.BLOCK_STATUS, 0, 8), {"extended": True}),
    ("malformed BLOCK_STATUS chunk", chunk_header(DONE, 5, 1, 12, extended=True)
     + b"\0\0\0\1" + (512).to_bytes(4, "big") + bytes(4), (1, Cmd.BLOCK_STATUS, 0, 8),
     {"extended": True}),
    ("unknown context id 3", block_status_chunk(1, 3, [(512, 0)], True),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("two block status chunks", block_status_chunk(1, 1, [(512, 0)], False)
     + block_status_chunk(1, 1, [(512, 0)], True), (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("zero-length extent", block_status_chunk(1, 1, [(512, 0), (0, 1)], True),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("REQ_ONE", block_status_chunk(1, 1, [(512, 0), (512, 1)], True),
     (1, Cmd.BLOCK_STATUS, 0, 8, int(CmdFlag.REQ_ONE)), {}),
    ("without extents for qemu:dirty-bitmap:x", block_status_chunk(1, 1, [(512, 0)], True),
     (1, Cmd.BLOCK_STATUS, 0, 8), {}),
    ("unknown reply chunk type 3", chunk_header(DONE, 3, 1, 0), (1, Cmd.FLUSH), {}),
    ("unknown reply chunk type 32767", chunk_header(DONE, 0x7FFF, 1, 6) + bytes(6),
     (1, Cmd.FLUSH), {}),
    ("too large", chunk_header(DONE, 0x8001, 1, MAX_CHUNK + 1), (1, Cmd.FLUSH), {}),
]


@pytest.mark.parametrize(("match", "data", "request_", "mode"), REJECTIONS,
                         ids=[f"{i}-{r[0]}" for i, r in enumerate(REJECTIONS)])
def test_rejections(match: str, data: bytes, request_: tuple[Any, ...],
                    mode: dict[str, bool]) -> None:
    rejected(data, request_, match=match, **mode)
    # ... one byte at a time too, and the request is still pending (the driver fails it)
    d = Driver(mode.get("structured", True), mode.get("extended", False))
    d.expect(*request_)
    with pytest.raises(RemoteProtocolError, match=match):
        d.push_bytewise(data)
    assert request_[0] in d.dec.pending


def test_magics_are_the_specs() -> None:
    assert (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXT_REPLY_MAGIC) == (
        0x67446698, 0x668E33EF, 0x6E8A278C)
    assert ReplyType.ERROR_OFFSET == 0x8002
