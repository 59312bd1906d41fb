"""The receive path under awkward framing: dribbled bytes, mixed sizes, large payloads,
half-closed and vanishing clients, block-size limits, --no-sr."""

from __future__ import annotations

import random
import socket
import time

import pytest
from rawclient import RawClient

from pynbd.protocol import options as O
from pynbd.protocol.constants import IHAVEOPT, OPT_HEADER, Cmd, Info, Opt, Rep
from pynbd.protocol.transmission import build_request

KiB, MiB = 1 << 10, 1 << 20
EINVAL = 22


def connect(srv, **kw) -> RawClient:
    c = RawClient(srv.sock)
    c.negotiate(**kw)
    return c


@pytest.mark.parametrize("blocking", [False, True])
def test_requests_dribbled_one_byte_at_a_time(serve, blocking):
    srv = serve(blocking=blocking)
    c = RawClient(srv.sock)
    # negotiation too, byte by byte
    c.greeting()
    msg = (3).to_bytes(4, "big")
    msg += OPT_HEADER.pack(IHAVEOPT, Opt.GO, 6) + O.build_info_request("")
    for b in msg:
        c.send(bytes([b]))
    while c.read_option_reply().rep != Rep.ACK:
        pass
    c.enter_transmission()
    w, write = c.request(Cmd.WRITE, 4096, 100, payload=bytes(range(100)), send=False)
    r, read = c.request(Cmd.READ, 4096, 100, send=False)
    for b in write + read:
        c.send(bytes([b]))
        time.sleep(0.0005)
    a, b = c.read_reply(), c.read_reply()
    assert {a.cookie, b.cookie} == {w, r}
    rr = a if a.cookie == r else b
    assert rr.error == 0 and rr.data == bytes(range(100))
    c.close()


@pytest.mark.parametrize("blocking", [False, True])
def test_pipelined_mixed_sizes(shared, blocking):
    """Writes of random sizes (some over the in-buffer limit of 1 MiB) in one send, each in its
    own region so order does not matter; then read everything back."""
    srv = shared(size="16M", blocking=blocking)
    rng = random.Random(1234 + blocking)
    region = MiB + 512 * KiB
    sizes = [rng.choice([1, 27, 512, 4095, 65536, 1000000, MiB - 28, MiB, MiB + 1, region])
             for _ in range(10)]
    with connect(srv, structured=True) as c:
        out = bytearray()
        expect = {}
        for i, n in enumerate(sizes):
            data = rng.randbytes(n)
            _cookie, req = c.request(Cmd.WRITE, i * region, n, payload=data, send=False)
            expect[i] = data
            out += req
            # a small request right after each write
            out += c.request(Cmd.FLUSH, send=False)[1]
        c.send(bytes(out))
        for _ in range(2 * len(sizes)):
            r = c.read_reply()
            assert r.error == 0
        for i, n in enumerate(sizes):
            assert c.pread(i * region, n) == expect[i], f"write {i} of {n} bytes"


def test_large_read_while_reading_slowly(shared):
    srv = shared(size="16M")
    with connect(srv) as c:
        data = random.Random(5).randbytes(12 * MiB)
        c.pwrite(MiB, data)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cookie, _ = c.request(Cmd.READ, MiB, 12 * MiB)
        time.sleep(0.2)  # the server's socket is full: it queues the rest
        r = c.read_reply()
        assert r.cookie == cookie and r.data == data


@pytest.mark.parametrize("blocking", [False, True])
def test_half_closed_client_gets_every_reply(shared, blocking):
    srv = shared(blocking=blocking)
    c = connect(srv)
    out = b"".join(c.request(Cmd.READ, i * 512, 512, send=False)[1] for i in range(20))
    c.send(out)
    c.sock.shutdown(socket.SHUT_WR)
    for _ in range(20):
        r = c.read_reply()
        assert r.error == 0 and r.data == bytes(512)
    assert c.expect_hangup() == b""
    c.close()


@pytest.mark.parametrize("blocking", [False, True])
def test_client_closing_with_replies_pending(shared, blocking):
    srv = shared(size="16M", blocking=blocking)
    for _ in range(3):
        c = connect(srv)
        c.send(b"".join(c.request(Cmd.READ, 0, 8 * MiB, send=False)[1] for _ in range(8)))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        c.close()  # reset: the server's writes fail with EPIPE/ECONNRESET
    with connect(srv) as c:  # the server lives (what is at offset 0 is other tests' business)
        assert len(c.pread(0, 8)) == 8


def test_block_size_limits(shared):
    srv = shared(params=["minblock=512"])
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        replies = c.go("", (Info.BLOCK_SIZE, 99, Info.NAME))  # unknown info types are ignored
        assert replies[-1].rep == Rep.ACK
        infos = {i.kind: i for i in (O.parse_info_reply(r.data) for r in replies[:-1])}
        assert infos[Info.BLOCK_SIZE].block_size == (512, 4096, 32 * MiB)
        assert set(infos) == {Info.EXPORT, Info.BLOCK_SIZE, Info.NAME}
        for cmd, off, n in ((Cmd.READ, 1, 512), (Cmd.READ, 0, 100), (Cmd.TRIM, 512, 1),
                            (Cmd.WRITE_ZEROES, 100, 512)):
            r = c.cmd(cmd, off, n)
            assert r.error == EINVAL
        r = c.cmd(Cmd.WRITE, 0, 100, payload=b"u" * 100)  # payload consumed
        assert r.error == EINVAL
        assert c.pread(0, 512) == bytes(512)


def test_no_sr_server(shared):
    srv = shared("--no-sr")
    with RawClient(srv.sock) as c:
        c.start()
        for opt in (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS):
            (r,) = c.option(opt)
            assert r.rep == Rep.ERR_UNSUP
        (r,) = c.option(Opt.SET_META_CONTEXT, O.build_meta_request("", ["base:allocation"]))
        assert r.rep == Rep.ERR_INVALID
        assert c.go()[-1].rep == Rep.ACK
        r = c.cmd(Cmd.READ, 0, 16)
        assert r.simple and r.data == bytes(16)
        assert c.cmd(Cmd.READ, 0, 16, 4).error == EINVAL  # DF without SR


def test_write_just_over_buffer_followed_by_requests(shared):
    """A WRITE whose payload takes its own buffer, with the next requests in the same send."""
    srv = shared(size="16M")
    with connect(srv) as c:
        data = random.Random(9).randbytes(3 * MiB + 7)
        w, wreq = c.request(Cmd.WRITE, 8 * MiB, len(data), payload=data, send=False)
        r, rreq = c.request(Cmd.READ, 8 * MiB + 3 * MiB, 7, send=False)
        x, xreq = c.request(0x55, send=False)
        c.send(wreq + rreq + xreq)
        replies = {rep.cookie: rep for rep in (c.read_reply() for _ in range(3))}
        assert replies[w].error == 0
        assert replies[r].error == 0 and replies[r].data == data[-7:]
        assert replies[x].error == EINVAL
        # write header split from its payload by a pause
        hdr = build_request(Cmd.WRITE, 77, 12 * MiB, 2 * MiB)
        c.send(hdr)
        time.sleep(0.05)
        c.send(b"q" * MiB)
        time.sleep(0.05)
        c.send(b"q" * MiB)
        assert c.read_reply().error == 0
        assert c.pread(12 * MiB, 2 * MiB) == b"q" * (2 * MiB)
