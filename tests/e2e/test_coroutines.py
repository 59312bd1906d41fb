"""Coroutine callbacks awaited on the event loop (pynbd.server.coroutines): a plugin written
with ``async def`` serves many requests at once on one connection, past the worker thread
count; each failure is its request's; connection() is the right one in every step; the
thread model still holds when it is not PARALLEL."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import PYNBD, short_tmpdir, start_server
from rawclient import RawClient

from pynbd.protocol.constants import Cmd

PLUGIN = str(Path(__file__).parent / "plugins" / "asyncplug.py")
MIB = 1 << 20


@pytest.fixture
def async_server():
    d = short_tmpdir("pynbd-coro-")
    servers = []

    def start(*options: str, plugin: str = PLUGIN, **env: str):
        sock = str(d / f"s{len(servers)}.sock")
        srv = start_server([*PYNBD, "serve", "-f", "-U", sock, *options, plugin],
                           logdir=d / f"s{len(servers)}.log", sock=sock, env=env)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()
        assert "Traceback" not in s.stderr


def test_reads_writes_and_flush(async_server):
    srv = async_server()
    with RawClient(srv.sock) as c:
        c.negotiate(structured=True)
        data = os.urandom(65536)
        c.pwrite(4096, data)
        assert c.cmd(Cmd.FLUSH).error == 0
        assert c.pread(4096, 65536) == data
        assert c.pread(0, 4096) == bytes(4096)


def test_more_requests_in_flight_than_threads(async_server):
    """40 READs wait for each other: with 2 worker threads only, they never would."""
    srv = async_server("-t", "2", ASYNC_GATE="40")
    with RawClient(srv.sock) as c:
        c.negotiate()
        cookies = {c.request(Cmd.READ, MIB + i * 512, 512)[0] for i in range(40)}
        got = set()
        for _ in range(40):
            r = c.read_reply()
            assert r.error == 0 and r.data == b"G" * 512
            got.add(r.cookie)
        assert got == cookies


def test_each_failure_is_its_requests(async_server):
    srv = async_server()
    with RawClient(srv.sock) as c:
        c.negotiate(structured=True)
        bad, _ = c.request(Cmd.READ, 2 * MIB, 512)
        good, _ = c.request(Cmd.READ, 0, 512)
        replies = {r.cookie: r for r in (c.read_reply(), c.read_reply())}
        assert replies[bad].error == errno.EPERM
        assert replies[good].error == 0 and replies[good].data == bytes(512)
        assert c.pread(0, 512) == bytes(512)  # the connection goes on


def test_connection_is_the_callers_in_every_step(async_server):
    srv = async_server()
    with RawClient(srv.sock) as a, RawClient(srv.sock) as b:
        a.negotiate()
        b.negotiate()
        for _ in range(3):  # interleaved: both connections' coroutines step in turn
            a.request(Cmd.READ, 3 * MIB, 16)
            b.request(Cmd.READ, 3 * MIB, 16)
            ra, rb = a.read_reply(), b.read_reply()
            assert ra.error == rb.error == 0
            assert ra.data.strip() != rb.data.strip()
            assert ra.data.strip().isdigit() and rb.data.strip().isdigit()


@pytest.mark.parametrize(("model", "parallel"), [("PARALLEL", True),
                                                   ("SERIALIZE_REQUESTS", False)])
def test_thread_model_holds(async_server, model, parallel):
    srv = async_server(ASYNC_THREAD_MODEL=model)
    with RawClient(srv.sock) as c:
        c.negotiate()
        for i in range(8):
            c.request(Cmd.READ, 4 * MIB + i * 512, 512)
        for _ in range(8):
            assert c.read_reply().error == 0
        most = int(c.pread(5 * MIB, 16).strip())
        assert (most > 1) == parallel


def test_client_gone_with_requests_in_flight(async_server):
    srv = async_server()
    with RawClient(srv.sock) as c:
        c.negotiate()
        for i in range(8):
            c.request(Cmd.READ, 4 * MIB + i * 512, 512)
    with RawClient(srv.sock) as c:  # the server goes on
        c.negotiate()
        assert c.pread(0, 512) == bytes(512)


@pytest.mark.parametrize("copies", [False, True])
def test_start_pwrite_payloads(async_server, copies):
    """48 WRITEs of 64 KiB sent at once, each finishing a few loop turns later, read back
    intact: a start_pwrite that keeps its payload gets a copy of its own; one that says
    start_pwrite_copies gets the payload where it was received."""
    plugin = str(Path(__file__).parent / "plugins" / "startplug.py")
    srv = async_server(START_COPIES="1" if copies else "0", plugin=plugin)
    chunks = [os.urandom(65536) for _ in range(48)]
    with RawClient(srv.sock) as c:
        c.negotiate()
        c.send(b"".join(c.request(Cmd.WRITE, i * 65536, 65536, payload=d, send=False)[1]
                        for i, d in enumerate(chunks)))
        assert all(c.read_reply().error == 0 for _ in chunks)
        assert c.pread(0, len(chunks) * 65536) == b"".join(chunks)
        assert c.pread(4 * MIB - 4096, 16).strip() == \
            (b"lent 48" if copies else b"owned 48")


def test_start_pwrite_completions_in_a_batch(async_server):
    """WRITEs finished together inside pynbd.plugin.completions() are all answered (when
    the block ends), and the data reads back intact."""
    plugin = str(Path(__file__).parent / "plugins" / "startplug.py")
    srv = async_server(START_COPIES="1", START_BATCH="1", plugin=plugin)
    chunks = [os.urandom(65536) for _ in range(48)]
    with RawClient(srv.sock) as c:
        c.negotiate()
        for _ in range(2):
            c.send(b"".join(c.request(Cmd.WRITE, i * 65536, 65536, payload=d, send=False)[1]
                            for i, d in enumerate(chunks)))
            assert all(c.read_reply().error == 0 for _ in chunks)
        assert c.pread(0, len(chunks) * 65536) == b"".join(chunks)


def test_start_pwritev_pairs_writes_one_after_the_other(async_server):
    """A plugin with start_pwritev gets a WRITE and the next one, just after it on the
    disk, as one request; WRITEs out of order, a READ between and the last WRITE go alone;
    everything is answered and reads back intact."""
    plugin = str(Path(__file__).parent / "plugins" / "startplug.py")
    srv = async_server(START_COPIES="1", START_VEC="1", plugin=plugin)
    chunks = [os.urandom(65536) for _ in range(40)]
    order = list(range(32)) + [39, 37, 35, 33, 38, 36, 34]  # then 32 after a READ
    with RawClient(srv.sock) as c:
        c.negotiate()
        parts = [c.request(Cmd.WRITE, i * 65536, 65536, payload=chunks[i], send=False)[1]
                 for i in order]
        parts.append(c.request(Cmd.READ, 0, 512, send=False)[1])
        parts.append(c.request(Cmd.WRITE, 32 * 65536, 65536, payload=chunks[32],
                               send=False)[1])
        c.send(b"".join(parts))
        replies = [c.read_reply() for _ in range(len(order) + 2)]
        assert all(r.error == 0 for r in replies)
        assert c.pread(0, len(chunks) * 65536) == b"".join(chunks)
        lent, vec = c.pread(4 * MIB - 4096, 32).split()[1::2]
        assert int(lent) == 40 and 8 <= int(vec) <= 16


def test_start_pwritev_a_stalled_next_write(async_server):
    """A WRITE held for the next one goes alone when the client stops in the middle of that
    next WRITE: its reply comes before the rest is sent."""
    plugin = str(Path(__file__).parent / "plugins" / "startplug.py")
    srv = async_server(START_COPIES="1", START_VEC="1", plugin=plugin)
    first, second = os.urandom(65536), os.urandom(65536)
    with RawClient(srv.sock) as c:
        c.negotiate()
        one = c.request(Cmd.WRITE, 0, 65536, payload=first, send=False)[1]
        two = c.request(Cmd.WRITE, 65536, 65536, payload=second, send=False)[1]
        c.send(one + two[:40000])
        assert c.read_reply().error == 0
        c.send(two[40000:])
        assert c.read_reply().error == 0
        assert c.pread(0, 131072) == first + second
