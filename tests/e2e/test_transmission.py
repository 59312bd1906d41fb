"""End-to-end transmission: raw requests against a real ``pynbd serve`` (spec §1.6-1.9, §4 rules 7-19).

Shared servers are 1 MiB; each test that writes uses its own region (``REGION[name]``) so
tests sharing a server never read each other's data.
"""

from __future__ import annotations

import struct

import pytest
from rawclient import RawClient

from pynbd.limits import MAX_PAYLOAD_ACCEPTED
from pynbd.protocol.constants import (
    EXT_REQUEST_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    ReplyType,
    TxFlag,
)
from pynbd.protocol.transmission import build_request

KiB, MiB = 1 << 10, 1 << 20
EINVAL, EPERM, ENOSPC, EIO = 22, 1, 28, 5
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = (
    int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF), int(CmdFlag.REQ_ONE),
    int(CmdFlag.FAST_ZERO), int(CmdFlag.PAYLOAD_LEN))

# Disjoint 64 KiB regions of the shared 1 MiB export, one per writing test.
_names = ["basic", "enospc", "flags", "zero_len", "sr", "ext", "pipeline", "twoclients",
          "vanish", "write_fua"]
REGION = {n: (i + 1) * 64 * KiB for i, n in enumerate(_names)}

MODES = [pytest.param({}, id="simple"), pytest.param({"structured": True}, id="sr"),
         pytest.param({"extended": True}, id="ext")]


def slot(mode: dict) -> int:
    """0, 1, 2 for simple, structured, extended: where in its region a mode's test writes."""
    return 2 if mode.get("extended") else 1 if mode.get("structured") else 0


def connect(srv, **kw) -> RawClient:
    c = RawClient(srv.sock)
    c.negotiate(**kw)
    return c


def check_error(r, err: int, c: RawClient, cmd: int) -> None:
    """The reply is the error ``err``, in the form the negotiated mode demands."""
    assert r.error == err, f"expected {err}, got {r.error}"
    assert r.data == b""
    if c.extended:
        assert not r.simple
    elif c.structured and cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
        # §4 rule 14: under SR every READ error is a structured ERROR chunk, never simple
        assert not r.simple
        (chunk,) = r.chunks
        assert chunk.type == ReplyType.ERROR and chunk.done
    else:
        assert r.simple


# ---- basic I/O -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_write_read_flush_trim_zero(shared, mode):
    srv = shared()
    base = REGION["basic"] + 16 * KiB * slot(mode)
    with connect(srv, **mode) as c:
        assert c.eflags & TxFlag.SEND_FLUSH and c.eflags & TxFlag.SEND_FUA
        assert c.eflags & TxFlag.SEND_TRIM and c.eflags & TxFlag.SEND_WRITE_ZEROES
        assert bool(c.eflags & TxFlag.SEND_DF) == bool(mode)
        data = bytes(range(256)) * 16
        c.pwrite(base, data)
        c.pwrite(base + 4096, data, flags=FUA)
        assert c.pread(base, 8192) == data * 2
        assert c.cmd(Cmd.FLUSH).error == 0
        assert c.cmd(Cmd.WRITE_ZEROES, base, 512, NO_HOLE).error == 0
        assert c.cmd(Cmd.TRIM, base + 4096, 512, FUA).error == 0
        assert c.pread(base, 8192) == bytes(512) + data[512:] + bytes(512) + data[512:]
        assert c.cmd(Cmd.READ, base, 16, FUA).error == 0  # FUA on READ: accepted
        if c.structured:
            r = c.cmd(Cmd.READ, base, 64 * KiB if c.extended else 16 * KiB, DF)
            assert r.error == 0 and len(r.chunks) == 1  # DF: one content chunk


# ---- framing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bad_request_magic_hangs_up(shared, mode):
    srv = shared()
    with connect(srv, **mode) as c:
        hdr = bytearray(build_request(Cmd.READ, 1, 0, 512, 0, c.extended))
        # the other header style's magic is just as wrong (§4 rule 1)
        magic = REQUEST_MAGIC if c.extended else EXT_REQUEST_MAGIC
        hdr[:4] = struct.pack(">I", magic)
        c.send(bytes(hdr))
        assert c.expect_hangup() == b""


@pytest.mark.parametrize("mode", MODES)
def test_unknown_command_einval_connection_lives(shared, mode):
    srv = shared()
    with connect(srv, **mode) as c:
        for cmd in (Cmd.RESIZE, 9, 0x7FFF, 0xFFFF):
            check_error(c.cmd(cmd, 0, 512), EINVAL, c, cmd)
        if c.extended:  # an unknown command with a payload: consumed, then EINVAL
            check_error(c.cmd(0x77, 0, 100, PAYLOAD_LEN, b"p" * 100), EINVAL, c, 0x77)
        assert c.pread(0, 512) == bytes(512)


def test_write_payload_over_limit_hangs_up(shared):
    srv = shared()
    with connect(srv) as c:
        c.send(build_request(Cmd.WRITE, 1, 0, MAX_PAYLOAD_ACCEPTED + 1))
        assert c.expect_hangup() == b""
    with connect(srv, extended=True) as c:
        c.send(build_request(Cmd.WRITE, 1, 0, MAX_PAYLOAD_ACCEPTED + 1, PAYLOAD_LEN, True))
        assert c.expect_hangup() == b""


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_out_of_range(shared, mode):
    srv = shared()
    size = MiB
    with connect(srv, **mode) as c:
        assert c.size == size
        wf = PAYLOAD_LEN if c.extended else 0
        for off, n in ((size, 512), (size - 512, 1024), (2**63, 512), (2**64 - 512, 512)):
            check_error(c.cmd(Cmd.READ, off, n), EINVAL, c, Cmd.READ)
            check_error(c.cmd(Cmd.TRIM, off, n), EINVAL, c, Cmd.TRIM)
            check_error(c.cmd(Cmd.WRITE_ZEROES, off, n), ENOSPC, c, Cmd.WRITE_ZEROES)
            # the payload is consumed: the next request on the connection still works
            check_error(c.cmd(Cmd.WRITE, off, n, wf, b"w" * n), ENOSPC, c, Cmd.WRITE)
            assert c.pread(size - 512, 512) == bytes(512)
        if c.structured:
            c2 = RawClient(srv.sock)
            c2.negotiate(**mode, meta=["base:allocation"])
            check_error(c2.cmd(Cmd.BLOCK_STATUS, size, 512), EINVAL, c2, Cmd.BLOCK_STATUS)
            c2.close()


@pytest.mark.parametrize("mode", MODES)
def test_read_only(shared, mode):
    srv = shared("-r")
    with connect(srv, **mode) as c:
        assert c.eflags & TxFlag.READ_ONLY
        assert not c.eflags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FUA)
        wf = PAYLOAD_LEN if c.extended else 0
        for _ in range(2):
            check_error(c.cmd(Cmd.WRITE, 0, 4096, wf, b"x" * 4096), EPERM, c, Cmd.WRITE)
            check_error(c.cmd(Cmd.TRIM, 0, 4096), EPERM, c, Cmd.TRIM)
            check_error(c.cmd(Cmd.WRITE_ZEROES, 0, 4096), EPERM, c, Cmd.WRITE_ZEROES)
            # even out of range or with odd flags, a read-only export says EPERM
            check_error(c.cmd(Cmd.WRITE, MiB, 8, wf | NO_HOLE, b"y" * 8), EPERM, c, Cmd.WRITE)
        # no SEND_FUA on a read-only export: FUA is an unadvertised flag even on READ
        check_error(c.cmd(Cmd.READ, 0, 512, FUA), EINVAL, c, Cmd.READ)
        assert c.pread(0, 4096) == bytes(4096)


@pytest.mark.parametrize("mode", MODES)
def test_flags_invalid_for_command(shared, mode):
    srv = shared()
    base = REGION["flags"] + 4096 * slot(mode)
    with connect(srv, **mode) as c:
        assert not c.eflags & TxFlag.SEND_FAST_ZERO  # the plugin zeroes natively, not fast
        wf = PAYLOAD_LEN if c.extended else 0
        bad = [
            (Cmd.READ, 1 << 6), (Cmd.READ, 1 << 15), (Cmd.READ, NO_HOLE), (Cmd.READ, REQ_ONE),
            (Cmd.READ, FAST_ZERO), (Cmd.TRIM, NO_HOLE), (Cmd.TRIM, DF),
            (Cmd.WRITE_ZEROES, FAST_ZERO),  # not advertised
            (Cmd.WRITE_ZEROES, REQ_ONE), (Cmd.FLUSH, NO_HOLE),
        ]
        if not c.structured:
            bad.append((Cmd.READ, DF))  # DF without SR
        for cmd, flags in bad:
            off, n = (0, 0) if cmd == Cmd.FLUSH else (base, 512)
            check_error(c.cmd(cmd, off, n, flags), EINVAL, c, cmd)
        for flags in (NO_HOLE, DF, REQ_ONE, 1 << 9):
            check_error(c.cmd(Cmd.WRITE, base, 512, wf | flags, b"f" * 512), EINVAL, c, Cmd.WRITE)
        if c.extended:
            # PAYLOAD_LEN is only for WRITE; a WRITE without it has no data
            check_error(c.cmd(Cmd.READ, base, 8, PAYLOAD_LEN, b"12345678"), EINVAL, c, Cmd.READ)
            check_error(c.cmd(Cmd.WRITE, base, 512), EINVAL, c, Cmd.WRITE)
        assert c.pread(base, 512) == bytes(512)  # nothing was written


@pytest.mark.parametrize("mode", MODES)
def test_flush_with_range_einval(shared, mode):
    srv = shared()
    with connect(srv, **mode) as c:
        check_error(c.cmd(Cmd.FLUSH, 512, 0), EINVAL, c, Cmd.FLUSH)
        check_error(c.cmd(Cmd.FLUSH, 0, 512), EINVAL, c, Cmd.FLUSH)
        assert c.cmd(Cmd.FLUSH, 0, 0, FUA).error == 0
        check_error(c.cmd(Cmd.CACHE, 0, 512), EINVAL, c, Cmd.CACHE)  # not advertised


def test_read_over_64m_einval(shared):
    srv = shared()
    for mode in ({}, {"structured": True}, {"extended": True}):
        with connect(srv, **mode) as c:
            check_error(c.cmd(Cmd.READ, 0, MAX_PAYLOAD_ACCEPTED + 1), EINVAL, c, Cmd.READ)
            check_error(c.cmd(Cmd.READ, 0, 2**32 - 1), EINVAL, c, Cmd.READ)
            assert c.pread(0, 16) == bytes(16)


@pytest.mark.parametrize("mode", MODES)
def test_zero_length_policy(shared, mode):
    srv = shared()
    base = REGION["zero_len"]
    with connect(srv, **mode) as c:
        wf = PAYLOAD_LEN if c.extended else 0
        r = c.cmd(Cmd.READ, base, 0)
        assert r.error == 0 and r.data == b""
        for cmd, flags in ((Cmd.WRITE, wf), (Cmd.TRIM, 0), (Cmd.WRITE_ZEROES, 0)):
            assert c.cmd(cmd, base, 0, flags).error == 0
        # at the very end of the export too
        assert c.cmd(Cmd.READ, MiB, 0).error == 0
        if c.structured:
            c2 = connect(srv, **mode, meta=["base:allocation"])
            check_error(c2.cmd(Cmd.BLOCK_STATUS, base, 0), EINVAL, c2, Cmd.BLOCK_STATUS)
            c2.close()
        assert c.pread(base, 8) == bytes(8)


# ---- structured replies and block status -----------------------------------------------------


def test_block_status_needs_sr_and_contexts(shared):
    srv = shared()
    with connect(srv) as c:  # no SR
        check_error(c.cmd(Cmd.BLOCK_STATUS, 0, 4096), EINVAL, c, Cmd.BLOCK_STATUS)
        assert c.pread(0, 8) == bytes(8)
    with connect(srv, structured=True) as c:  # SR but no context
        check_error(c.cmd(Cmd.BLOCK_STATUS, 0, 4096), EINVAL, c, Cmd.BLOCK_STATUS)
    with RawClient(srv.sock) as c:  # contexts set for another export name
        c.start()
        c.structured_reply()
        c.set_meta(["base:allocation"], name="other")
        c.go("")
        check_error(c.cmd(Cmd.BLOCK_STATUS, 0, 4096), EINVAL, c, Cmd.BLOCK_STATUS)


@pytest.mark.parametrize("extended", [False, True])
def test_block_status(serve, extended):
    srv = serve()
    with RawClient(srv.sock) as c:
        c.negotiate(structured=True, extended=extended, meta=["base:allocation"])
        c.pwrite(128 * KiB, b"d" * 100)
        r = c.cmd(Cmd.BLOCK_STATUS, 0, 256 * KiB)
        (chunk,) = r.chunks
        assert r.error == 0 and chunk.done and chunk.context_id == 1
        assert chunk.type == (ReplyType.BLOCK_STATUS_EXT if extended else ReplyType.BLOCK_STATUS)
        assert chunk.extents == [(128 * KiB, 3), (64 * KiB, 0), (64 * KiB, 3)]
        # REQ_ONE: exactly one extent, no longer than the request
        for off, n in ((0, 4096), (128 * KiB, 1000), (100, 200 * KiB)):
            r = c.cmd(Cmd.BLOCK_STATUS, off, n, REQ_ONE)
            (chunk,) = r.chunks
            assert len(chunk.extents) == 1
            length, _ = chunk.extents[0]
            assert 0 < length <= n
        # without REQ_ONE the extents may not run past the export; the first cover < length
        r = c.cmd(Cmd.BLOCK_STATUS, MiB - 4096, 4096)
        assert sum(n for n, _ in r.chunks[0].extents) == 4096
        if extended:
            assert all(ch.offset == MiB - 4096 for ch in r.chunks)  # request offset echoed


@pytest.mark.parametrize("structured", [False, True])
def test_sr_read_errors_are_chunks(shared, structured):
    srv = shared()
    with connect(srv, structured=structured) as c:
        for off, n, flags in ((MiB, 512, 0), (0, 512, 1 << 10), (0, 512, REQ_ONE),
                              (0, MAX_PAYLOAD_ACCEPTED + 1, 0), (MiB - 1, 2, DF)):
            r = c.cmd(Cmd.READ, off, n, flags)
            check_error(r, EINVAL, c, Cmd.READ)
            assert r.simple == (not structured)
        # and a good read under SR is one OFFSET_DATA chunk with DONE
        r = c.cmd(Cmd.READ, 0, 4096)
        if structured:
            (chunk,) = r.chunks
            assert chunk.type == ReplyType.OFFSET_DATA and chunk.done and chunk.data_offset == 0
        assert r.data == bytes(4096)


def test_extended_headers_wire_format(shared):
    """32-byte requests and replies; NONE chunk for payload-free success; offset echoed."""
    srv = shared()
    base = REGION["ext"]
    with connect(srv, extended=True) as c:
        # raw bytes, no helpers: a 32-byte WRITE header with PAYLOAD_LEN, then 512 bytes
        hdr = struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, PAYLOAD_LEN, Cmd.WRITE, 0xABCDEF, base, 512)
        assert len(hdr) == 32
        c.send(hdr + b"e" * 512)
        raw = c.recv_exact(32)
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", raw)
        assert (magic, flags, rtype, cookie, offset, length) == (
            0x6E8A278C, 1, ReplyType.NONE, 0xABCDEF, base, 0)
        for cmd, off, n in ((Cmd.FLUSH, 0, 0), (Cmd.TRIM, base + 4096, 512),
                            (Cmd.WRITE_ZEROES, base + 8192, 512)):
            r = c.cmd(cmd, off, n)
            (chunk,) = r.chunks
            assert r.error == 0 and chunk.type == ReplyType.NONE and chunk.done
            assert chunk.offset == off
        r = c.cmd(Cmd.READ, base, 512)
        (chunk,) = r.chunks
        assert chunk.type == ReplyType.OFFSET_DATA and chunk.offset == base
        assert r.data == b"e" * 512
        # errors are chunks too, echoing the offset
        r = c.cmd(Cmd.WRITE_ZEROES, MiB, 512)
        assert r.error == ENOSPC and r.chunks[0].type == ReplyType.ERROR
        assert r.chunks[0].offset == MiB


# ---- disconnects, pipelining, concurrency ----------------------------------------------------


@pytest.mark.parametrize("blocking", [False, True])
@pytest.mark.parametrize("payload", [4096, 2 * MiB], ids=["4k", "2M"])
def test_client_vanishing_mid_write_writes_nothing(shared, blocking, payload):
    srv = shared(size="8M", blocking=blocking)  # also used by test_pipelined_writes_then_reads
    off = 4 * MiB if payload < MiB else 6 * MiB
    other = connect(srv)  # another client, connected throughout
    c = connect(srv)
    c.send(build_request(Cmd.WRITE, 1, off, payload) + b"v" * (payload // 2))
    c.close()
    # the server keeps serving the other client, and nothing was written
    assert other.pread(off, payload) == bytes(payload)
    other.close()
    with connect(srv) as c:
        assert c.pread(off, payload) == bytes(payload)


@pytest.mark.parametrize("blocking", [False, True])
def test_pipelined_writes_then_reads(shared, blocking):
    srv = shared(size="8M", blocking=blocking)
    n = 500
    with connect(srv, structured=blocking) as c:
        blocks = {i: bytes([i % 251 + 1]) * 4096 for i in range(n)}
        out = bytearray()
        writes = {}
        for i in range(n):
            cookie, data = c.request(Cmd.WRITE, i * 4096, 4096, payload=blocks[i], send=False)
            writes[cookie] = i
            out += data
        c.send(bytes(out))  # ~2 MiB in one send
        got = {}
        for _ in range(n):
            r = c.read_reply()
            assert r.error == 0 and r.cookie in writes and r.cookie not in got
            got[r.cookie] = r
        out = bytearray()
        reads = {}
        for i in reversed(range(n)):
            cookie, data = c.request(Cmd.READ, i * 4096, 4096, send=False)
            reads[cookie] = i
            out += data
        c.send(bytes(out))
        seen = set()
        for _ in range(n):
            r = c.read_reply()
            assert r.cookie in reads and r.cookie not in seen
            seen.add(r.cookie)
            assert r.error == 0 and r.data == blocks[reads[r.cookie]]


def test_slow_request_does_not_block_later_ones(shared):
    slow = 8192
    srv = shared(blocking=True, params=[f"slow={slow}", "delay=1.0"])
    with connect(srv, structured=True) as c:
        a, data_a = c.request(Cmd.READ, slow, 512, send=False)
        b, data_b = c.request(Cmd.READ, 0, 512, send=False)
        c.send(data_a + data_b)
        first, second = c.read_reply(), c.read_reply()
        assert (first.cookie, second.cookie) == (b, a)
        assert first.error == second.error == 0


def test_disc_finishes_in_flight_then_closes(shared):
    slow = 12288
    srv = shared(blocking=True, params=[f"slow={slow}", "delay=0.5"])
    with connect(srv) as c:
        a, data_a = c.request(Cmd.READ, slow, 512, send=False)
        _, disc = c.request(Cmd.DISC, send=False)
        # anything after DISC is ignored (the client must not send it)
        _, late = c.request(Cmd.READ, 0, 512, send=False)
        c.send(data_a + disc + late)
        r = c.read_reply()
        assert r.cookie == a and r.error == 0 and r.data == bytes(512)
        assert c.expect_hangup() == b""
    with connect(srv) as c:
        assert c.pread(0, 8) == bytes(8)


def test_two_concurrent_clients(shared):
    srv = shared()
    base = REGION["twoclients"]
    a, b = connect(srv), connect(srv, structured=True)
    try:
        for i in range(16):
            (a if i % 2 else b).pwrite(base + i * 512, bytes([i + 1]) * 512)
        ca, _ = a.request(Cmd.READ, base, 8192)
        cb, _ = b.request(Cmd.READ, base, 8192)
        ra, rb = a.read_reply(), b.read_reply()
        expect = b"".join(bytes([i + 1]) * 512 for i in range(16))
        assert (ra.cookie, ra.data) == (ca, expect)
        assert (rb.cookie, rb.data) == (cb, expect)
    finally:
        a.close()
        b.close()


def test_hangup_mid_header_then_server_still_serves(shared):
    srv = shared()
    c = connect(srv)
    c.send(build_request(Cmd.READ, 1, 0, 512)[:10])
    c.close()
    with connect(srv) as c:
        assert c.pread(0, 8) == bytes(8)
