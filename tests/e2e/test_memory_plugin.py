"""The same wire-level checks against the built-in ``memory`` plugin.

Unlike the e2e plugin, memory answers on the event loop through the server's direct fast path
and hands out views of its own pages (zero copy), and it can be huge ("4E"): this is where
64-bit lengths and extents longer than a compact reply can carry are exercised.
"""

from __future__ import annotations

import random

import pytest
from rawclient import RawClient

from pynbd.protocol.constants import Cmd, CmdFlag, ReplyType, TxFlag
from pynbd.protocol.transmission import build_request

try:
    from pynbd.plugins import memory as _memory  # noqa: F401
except ImportError:  # a build without the memory plugin
    pytest.skip("the memory plugin is not available yet", allow_module_level=True)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EiB = 1 << 60
EINVAL, ENOSPC = 22, 28
REQ_ONE, PAYLOAD_LEN = int(CmdFlag.REQ_ONE), int(CmdFlag.PAYLOAD_LEN)


@pytest.fixture(scope="module")
def giant(_shared_factory):
    """One ``memory 4E`` server for the module (the e2e factory with another plugin)."""
    from helpers import PYNBD, start_server

    d = _shared_factory.dir
    sock = str(d / "giant.sock")
    srv = start_server([*PYNBD, "serve", "-f", "-U", sock, "memory", "4E"],
                       logdir=d / "giant.log", sock=sock)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr, srv.stderr


def connect(srv, **kw) -> RawClient:
    c = RawClient(srv.sock)
    c.negotiate(**kw)
    return c


def test_giant_disk_size_and_ends(giant):
    with connect(giant) as c:
        assert c.size == 4 * EiB
        assert c.eflags & TxFlag.SEND_TRIM and c.eflags & TxFlag.CAN_MULTI_CONN
        end = 4 * EiB
        c.pwrite(end - 4096, b"E" * 4096)
        assert c.pread(end - 4096, 4096) == b"E" * 4096
        assert c.cmd(Cmd.READ, end - 512, 1024).error == EINVAL
        assert c.cmd(Cmd.WRITE, end, 512, payload=b"x" * 512).error == ENOSPC
        assert c.pread(end - 8192, 4096) == bytes(4096)


def test_giant_block_status_compact_extents_fit(giant):
    """A hole far longer than 4 GiB must be cut to the request, not overflow a u32."""
    with connect(giant, structured=True, meta=["base:allocation"]) as c:
        for off, n, flags in ((0, 4096, 0), (0, 2**32 - 1, 0), (EiB, 2**32 - 512, REQ_ONE),
                              (3 * EiB, 65536, 0)):
            r = c.cmd(Cmd.BLOCK_STATUS, off, n, flags)
            assert r.error == 0, (off, n, flags)
            (chunk,) = r.chunks
            assert chunk.type == ReplyType.BLOCK_STATUS
            assert chunk.extents and all(0 < length for length, _ in chunk.extents)
            assert sum(length for length, _ in chunk.extents[:-1]) < n
            if flags:
                assert len(chunk.extents) == 1 and chunk.extents[0][0] <= n


def test_giant_extended_64bit_lengths(giant):
    with connect(giant, extended=True, meta=["base:allocation"]) as c:
        base = 2 * EiB
        c.pwrite(base + 5 * GiB, b"d" * 4096)
        r = c.cmd(Cmd.BLOCK_STATUS, base, 8 * GiB)  # a 64-bit effect length
        assert r.error == 0
        (chunk,) = r.chunks
        assert chunk.type == ReplyType.BLOCK_STATUS_EXT and chunk.offset == base
        assert chunk.extents[0] == (5 * GiB, 3)  # one hole of 5 GiB: too long for compact
        # TRIM and WRITE_ZEROES may exceed the maximum payload (and 4 GiB) under ext headers
        assert c.cmd(Cmd.WRITE_ZEROES, base + 4 * GiB, 2 * GiB).error == 0
        assert c.pread(base + 5 * GiB, 4096) == bytes(4096)
        c.pwrite(base + 5 * GiB, b"t" * 4096)
        assert c.cmd(Cmd.TRIM, base, 6 * GiB).error == 0
        # a READ with a 64-bit length over the maximum payload is refused, not attempted
        assert c.cmd(Cmd.READ, base, 5 * GiB).error == EINVAL


@pytest.mark.parametrize("structured", [False, True])
def test_memory_pipelined_and_vanishing(pynbd_server, structured):
    srv = pynbd_server("memory", "16M")
    rng = random.Random(7)
    with connect(srv, structured=structured) as c:
        blocks = [rng.randbytes(4096) for _ in range(300)]
        out = b"".join(c.request(Cmd.WRITE, i * 4096, 4096, payload=b, send=False)[1]
                       for i, b in enumerate(blocks))
        c.send(out)
        for _ in blocks:
            assert c.read_reply().error == 0
        reads = {}
        out = bytearray()
        for i in range(len(blocks)):
            cookie, req = c.request(Cmd.READ, i * 4096, 4096, send=False)
            reads[cookie] = i
            out += req
        # and one big read across many pages
        big, req = c.request(Cmd.READ, 0, len(blocks) * 4096, send=False)
        c.send(bytes(out + req))
        for _ in range(len(blocks) + 1):
            r = c.read_reply()
            assert r.error == 0
            if r.cookie == big:
                assert r.data == b"".join(blocks)
            else:
                assert r.data == blocks[reads.pop(r.cookie)]
        assert not reads
    # a client vanishing mid-write leaves no trace
    for n in (4096, 3 * MiB):
        v = RawClient(srv.sock)
        v.negotiate()
        v.send(build_request(Cmd.WRITE, 1, 8 * MiB, n) + b"v" * (n // 2))
        v.close()
    with connect(srv) as c:
        assert c.pread(8 * MiB, 3 * MiB) == bytes(3 * MiB)


def test_memory_cache_and_fast_zero(giant):
    with connect(giant, structured=True) as c:
        assert c.eflags & TxFlag.SEND_CACHE and c.eflags & TxFlag.SEND_FAST_ZERO
        base = 3 * EiB + 7 * GiB
        c.pwrite(base, b"f" * 65536)
        assert c.cmd(Cmd.CACHE, base, 65536).error == 0
        r = c.cmd(Cmd.WRITE_ZEROES, base, 65536, int(CmdFlag.FAST_ZERO))
        assert r.error in (0, 95)  # done fast, or ENOTSUP (and then nothing changed)
        expect = bytes(65536) if r.error == 0 else b"f" * 65536
        assert c.pread(base, 65536) == expect
        assert c.cmd(Cmd.WRITE_ZEROES, base, 65536).error == 0
        assert c.pread(base, 65536) == bytes(65536)


# ---- large writes whose payload arrives after the header -----------------------------------


def _split_write(c: RawClient, offset: int, data: bytes, first: int = 1000) -> int:
    """Send a WRITE as its header with ``first`` payload bytes, then the rest a moment later,
    so the server sees the header before the payload."""
    import time

    cookie, req = c.request(Cmd.WRITE, offset, len(data), payload=data, send=False)
    head = 28 + first
    c.send(req[:head])
    time.sleep(0.02)
    c.send(req[head:])
    return cookie


def test_memory_large_writes_arriving_late(pynbd_server):
    srv = pynbd_server("memory", "16M")
    rng = random.Random(11)
    a, b, c_, d = (rng.randbytes(256 * KiB) for _ in range(4))
    with connect(srv, structured=True) as c:
        base = 1 * MiB
        for data in (a, b):  # a fresh run, then one replacing it whole
            cookie = _split_write(c, base, data)
            r = c.read_reply()
            assert (r.cookie, r.error) == (cookie, 0)
            assert c.pread(base, 256 * KiB) == data
        # half over the last run, half over nothing
        _split_write(c, base + 128 * KiB, c_, first=0)
        assert c.read_reply().error == 0
        assert c.pread(base, 384 * KiB) == b[:128 * KiB] + c_
        assert c.pread(base - 4096, 4096) == bytes(4096)
        assert c.pread(base + 384 * KiB, 4096) == bytes(4096)
        # not page aligned: the ordinary path, same result
        _split_write(c, 5 * MiB + 100, d)
        assert c.read_reply().error == 0
        assert c.pread(5 * MiB + 100, 256 * KiB) == d
        # a trim inside a run
        assert c.cmd(Cmd.TRIM, base + 32 * KiB, 64 * KiB).error == 0
        assert c.pread(base, 384 * KiB) == (b[:32 * KiB] + bytes(64 * KiB) + b[96 * KiB:128 * KiB]
                                           + c_)
        # many in flight at once, and reads after them in the same stream
        blocks = [rng.randbytes(256 * KiB) for _ in range(12)]
        out = b"".join(c.request(Cmd.WRITE, 8 * MiB + i * 256 * KiB, 256 * KiB, payload=x,
                                 send=False)[1] for i, x in enumerate(blocks))
        cookie, req = c.request(Cmd.READ, 8 * MiB, 12 * 256 * KiB, send=False)
        c.send(out + req)
        for _ in blocks:
            assert c.read_reply().error == 0
        assert c.read_reply().data == b"".join(blocks)


def test_memory_vanishing_during_large_write_changes_nothing(pynbd_server):
    import time

    srv = pynbd_server("memory", "16M")
    old = random.Random(3).randbytes(256 * KiB)
    with connect(srv) as c:
        c.pwrite(2 * MiB, old)
        for sent in (0, 1000, 200 * KiB):
            v = RawClient(srv.sock)
            v.negotiate()
            v.send(build_request(Cmd.WRITE, 1, 2 * MiB, 256 * KiB) + b"v" * sent)
            time.sleep(0.02)
            v.close()
            assert c.pread(2 * MiB, 256 * KiB) == old
        # and a whole write after them lands
        new = random.Random(4).randbytes(256 * KiB)
        _split_write(c, 2 * MiB, new)
        assert c.read_reply().error == 0
        assert c.pread(2 * MiB, 256 * KiB) == new
