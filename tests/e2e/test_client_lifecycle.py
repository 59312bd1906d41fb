"""pynbd's client engine against ``pynbd serve``: many requests in flight, every command, and
a clean close — no task, socket, descriptor, thread or child process left behind.
"""

from __future__ import annotations

import asyncio
import errno as E
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import run_async

from pynbd.client import AsyncClient, Client
from pynbd.errors import CommandError
from pynbd.protocol.constants import CmdFlag, State

PYNBD_S = [sys.executable, "-m", "pynbd", "serve", "-s"]


run = run_async


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def children() -> set[int]:
    """Our child processes, zombies included (every thread's /proc children list)."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def blocks(n: int, size: int) -> list[bytes]:
    return [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(n)]


# --------------------------------------------------------------------------- data


async def _every_other_command(c: AsyncClient, size: int, memory: bool) -> None:
    """FUA write, flush, DF read, zero (NO_HOLE, FAST_ZERO), trim, cache, block status
    (REQ_ONE too) near the end of a ``size`` disk (``memory``: the memory plugin's)."""
    tail = size - (1 << 20)
    await c.pwrite(b"F" * 8192, tail, CmdFlag.FUA)
    await c.flush()
    assert c.can_df()
    assert await c.pread(8192, tail, CmdFlag.DF) == b"F" * 8192
    await c.zero(4096, tail, CmdFlag.NO_HOLE)
    assert await c.pread(8192, tail) == bytes(4096) + b"F" * 4096
    if c.can_fast_zero():
        await c.zero(4096, tail + 4096, CmdFlag.FAST_ZERO)
    else:
        await c.zero(4096, tail + 4096)
    assert await c.pread(8192, tail) == bytes(8192)
    await c.pwrite(b"T" * 65536, tail)
    await c.trim(65536, tail)
    if c.can_cache():
        await c.cache(65536, 0)
    one = await c.block_status(1 << 20, 0, CmdFlag.REQ_ONE)
    assert len(one["base:allocation"]) == 1
    assert one["base:allocation"][0][0] <= 1 << 20
    ext = (await c.block_status(size, 0))["base:allocation"]
    assert ext[0][1] == 0 and sum(ln for ln, _ in ext) <= size + (1 << 20)
    if memory:
        last = await c.block_status(65536, size - 65536, CmdFlag.REQ_ONE)
        assert last["base:allocation"] == [(65536, State.HOLE | State.ZERO)]


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_many_in_flight_and_every_command(pynbd_server, plugin: str, tmp_path: Path) -> None:
    size = 4 << 20
    if plugin == "file":
        img = tmp_path / "disk.img"
        img.write_bytes(b"")
        os.truncate(img, size)
        srv = pynbd_server("file", img)
    else:
        srv = pynbd_server("memory", str(size))

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri)
        try:
            # 512 writes and 512 reads of 4 KiB, all queued at once (max_in_flight is 64)
            n, bs = 512, 4096
            data = blocks(n, bs)
            order = list(range(n))
            order = order[::2] + order[1::2]
            await asyncio.gather(*(c.pwrite(data[i], i * bs) for i in order))
            got = await asyncio.gather(*(c.pread(bs, i * bs) for i in order))
            want = hashlib.sha256(b"".join(data[i] for i in order)).hexdigest()
            assert hashlib.sha256(b"".join(got)).hexdigest() == want
            # mixed sizes into one caller buffer
            whole = bytearray(n * bs)
            mv = memoryview(whole)
            spans = []
            off = 0
            k = 0
            while off < n * bs:
                ln = min((k % 7 + 1) * 4096, n * bs - off)
                spans.append((off, ln))
                off += ln
                k += 1
            await asyncio.gather(*(c.pread_into(mv[o:o + ln], o) for o, ln in spans))
            assert whole == b"".join(data)
            await _every_other_command(c, size, plugin == "memory")
        finally:
            await c.close()

    run(go())
    if plugin == "file":
        raw = img.read_bytes()
        assert raw[:512 * 4096] == b"".join(blocks(512, 4096))


def test_close_waits_for_requests_in_flight(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M")

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri)
        futs = [asyncio.ensure_future(c.pwrite(bytes([i]) * 4096, i * 4096)) for i in range(64)]
        await asyncio.sleep(0)
        await c.close()
        assert all(f.done() and f.exception() is None for f in futs)
        c2 = await AsyncClient.connect(srv.uri)
        try:
            assert await c2.pread(4096, 63 * 4096) == bytes([63]) * 4096
        finally:
            await c2.close()

    run(go())


# --------------------------------------------------------------------------- clean close


def test_close_leaves_nothing(pynbd_server) -> None:
    """After close(): no engine task, the socket closed (no descriptor left), the engine
    unusable; close() again is a no-op."""
    srv = pynbd_server("memory", "1M")

    async def go() -> None:
        before = open_fds()
        c = await AsyncClient.connect(srv.uri)
        sock = c._owner
        assert sock is not None and sock.fileno() >= 0
        await asyncio.gather(*(c.pread(512, i * 512) for i in range(100)))
        await c.close()
        assert c.closed and not c.connected and sock.fileno() == -1
        assert open_fds() == before
        with pytest.raises(ConnectionError):
            await c.pread(512, 0)
        await c.close()

    run(go())


def test_detach_hands_the_connection_over(pynbd_server) -> None:
    """detach(): the caller goes on with the same NBD session on the returned (blocking)
    socket; the client is closed without NBD_CMD_DISC and refuses commands. A connection
    with a command in flight cannot be detached."""
    import struct

    srv = pynbd_server("memory", "1M")

    async def go() -> Any:
        c = await AsyncClient.connect(srv.uri, structured=False, meta_contexts=())
        await c.pwrite(b"\x5a" * 512, 4096)
        busy = asyncio.ensure_future(c.pread(512, 0))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="idle"):
            c.detach()
        await busy
        sock = c.detach()
        assert c.closed and c.export.size == 1 << 20
        with pytest.raises(ConnectionError):
            await c.pread(512, 0)
        return sock

    sock = run(go())
    try:
        assert sock.getblocking()
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 4096, 512))  # READ
        got = b""
        while len(got) < 16 + 512:
            got += sock.recv(16 + 512 - len(got))
        assert struct.unpack(">IIQ", got[:16]) == (0x67446698, 0, 7)
        assert got[16:] == b"\x5a" * 512
    finally:
        sock.close()


@pytest.mark.parametrize("server", ["pynbd", "nbdkit"])
def test_command_server_exits_on_close(server: str) -> None:
    if server == "nbdkit":
        from helpers import require

        argv = [require("nbdkit"), "-s", "memory", "1M"]
    else:
        argv = [*PYNBD_S, "memory", "1M"]

    async def go() -> Any:
        before = open_fds()
        c = await AsyncClient.connect(command=argv)
        proc = c._proc
        await c.pwrite(b"x" * 4096, 0)
        await c.close()
        assert open_fds() == before
        return proc

    proc = run(go())
    assert proc.returncode == 0, "the server should exit by itself after NBD_CMD_DISC"


def test_close_after_failure_reaps_the_server() -> None:
    """The server dies (SIGKILL): pending commands fail, close() still reaps the child."""

    async def go() -> Any:
        c = await AsyncClient.connect(command=[*PYNBD_S, "memory", "1M"])
        proc = c._proc
        await c.pwrite(b"x", 0)
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(ConnectionError):
            for _ in range(100):
                await asyncio.wait_for(c.pread(512, 0), 5)
        assert c.closed and c.failure is not None
        await c.close()
        assert c._proc is None
        return proc

    proc = run(go())
    assert proc.returncode == -signal.SIGKILL


def test_connect_timeout_reaps_a_silent_command() -> None:
    """A command that never greets: TimeoutError, and the child is terminated and reaped."""

    async def go() -> float:
        before = open_fds()
        kids = children()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await AsyncClient.connect(command=["sleep", "60"], timeout=0.2)
        assert open_fds() == before
        assert children() == kids  # no zombie: the child was waited for
        return time.monotonic() - t0

    took = run(go())
    assert took < 10


def test_handshake_failure_closes_socket(pynbd_server, tmp_path: Path) -> None:
    """A refused export: OptionError, nothing left open."""
    (tmp_path / "a").write_bytes(bytes(512))
    srv = pynbd_server("file", f"dir={tmp_path}")

    async def go() -> None:
        before = open_fds()
        from pynbd.errors import OptionError

        with pytest.raises(OptionError):
            await AsyncClient.connect(unix=srv.sock, export_name="no-such-export",
                                      timeout=5)
        assert open_fds() == before

    run(go())


# --------------------------------------------------------------------------- sync facade


def test_sync_client_leaves_no_thread(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M")
    baseline = threading.active_count()
    before = open_fds()
    with Client.connect(srv.uri) as c:
        assert threading.active_count() == baseline + 1
        c.pwrite(b"sync" * 1024, 0, CmdFlag.FUA)
        assert c.pread(4096, 0) == b"sync" * 1024
        c.request_timeout = 5  # forwarded to the engine
        assert c.engine.request_timeout == 5
        with pytest.raises(CommandError) as ei:
            c.pread(512, 1 << 20)
        assert ei.value.errno == E.EINVAL
        c.flush()
    assert threading.active_count() == baseline
    assert open_fds() == before
    c.close()  # again: a no-op
    # a failed connect leaves no thread either
    with pytest.raises(OSError):
        Client.connect(unix=str(Path(srv.sock).with_name("nothing.sock")))
    assert threading.active_count() == baseline
    # nor does a command= server
    with Client.connect(command=[*PYNBD_S, "memory", "64K"]) as c:
        proc = c.engine._proc
        assert c.pread(1, 0) == b"\0"
    assert threading.active_count() == baseline and proc.returncode == 0
    assert open_fds() == before


def test_extended_headers(pynbd_server) -> None:
    """No peer here speaks extended headers: our client against our server."""
    srv = pynbd_server("memory", "4M")

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri, extended=True) as c:
            assert c.extended and c.structured
            data = blocks(256, 4096)
            await asyncio.gather(*(c.pwrite(b, i * 4096) for i, b in enumerate(data)))
            got = await asyncio.gather(*(c.pread(4096, i * 4096) for i in range(256)))
            assert b"".join(got) == b"".join(data)
            bs = await c.block_status(4 << 20, 0)
            assert bs["base:allocation"][0] == (1 << 20, 0)
            one = await c.block_status(4 << 20, 0, CmdFlag.REQ_ONE)
            assert len(one["base:allocation"]) == 1
            await c.zero(4096, 0, CmdFlag.NO_HOLE)
            await c.trim(4096, 4096)
            await c.flush()
            assert await c.pread(4096, 0) == bytes(4096)

    run(go())


@pytest.mark.parametrize("kind", ["socket_activation", "command"])
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_libnbd_close_while_connecting_stops_the_server(tmp_path: Path, kind: str,
                                                        delay: float) -> None:
    """Closing a pynbd.libnbd handle whose aio connect is still waiting for a server that
    never answers leaves no server process behind."""
    import pynbd.libnbd as nbd

    pidfile = tmp_path / "pid"
    # a "server" that records its pid and never speaks NBD
    argv = ["/bin/sh", "-c", f'echo $$ > {pidfile}; exec sleep 60']
    h = nbd.NBD()
    if kind == "command":
        h.aio_connect_command(argv)
    else:
        h.aio_connect_systemd_socket_activation(argv)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.01)
    time.sleep(delay)
    assert h.aio_is_connecting()
    pid = int(pidfile.read_text())
    h.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            break
        if zombie:
            break
        assert time.monotonic() < deadline, f"server {pid} still running after close()"
        time.sleep(0.02)
