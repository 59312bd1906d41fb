"""Regression tests for what the fuzzers found (docs/fuzzing.md lists them).

Each is marked ``xfail(strict=True)`` while the bug is open in code the fuzzers do not own;
once it is fixed the test passes, strict xfail turns that into a failure, and the mark (and
the finding's entry in tests/fuzz/findings.py) must go.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fuzz import wire as W
from fuzz.findings import KNOWN
from fuzz.probes import greedy_probe, idle_probe

#: No wait in these tests may take longer.
DEADLINE = 10.0
SIZE = 1 << 20
EFLAGS = 1 | 4 | 8 | 32 | 64 | 1024  # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES CACHE


# --------------------------------------------------------------------------- a scripted server


class Peer:
    """The server's side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(DEADLINE)
        self.buf = bytearray()

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.sock.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(self) -> tuple[int, int, int, int, int]:
        """(flags, type, cookie, offset, length) of the next request (payload consumed)."""
        magic, flags, cmd, cookie, off, n = W.REQUEST.unpack(self.recv_exact(28))
        assert magic == W.REQUEST_MAGIC
        if cmd == W.CMD.WRITE:
            self.recv_exact(n)
        return flags, cmd, cookie, off, n

    def chunk(self, flags: int, rtype: int, cookie: int, payload: bytes) -> bytes:
        return W.CHUNK.pack(W.STRUCTURED_MAGIC, flags, rtype, cookie, len(payload)) + payload

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def hold(self, seconds: float) -> None:
        """Keep the connection open (reading and dropping) for ``seconds``, or until EOF."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return
            except TimeoutError:
                return
            except OSError:
                return


def _handshake(p: Peer, size: int) -> None:
    p.send(W.GREETING.pack(W.NBDMAGIC, W.IHAVEOPT, 3))
    p.recv_exact(4)
    while True:
        _, opt, n = W.OPT_HEADER.unpack(p.recv_exact(16))
        data = p.recv_exact(n)

        def rep(r: int, d: bytes = b"", opt: int = opt) -> bytes:
            return W.OPT_REPLY.pack(W.OPT_REPLY_MAGIC, opt, r, len(d)) + d

        if opt == W.OPT.STRUCTURED_REPLY:
            p.send(rep(W.REP.ACK))
        elif opt == W.OPT.SET_META_CONTEXT:
            ok = b"base:allocation" in data
            p.send((rep(W.REP.META_CONTEXT, W.U32.pack(1) + b"base:allocation") if ok else b"")
                   + rep(W.REP.ACK))
        elif opt == W.OPT.GO:
            p.send(rep(W.REP.INFO, struct.pack(">HQH", 0, size, EFLAGS)), rep(W.REP.ACK))
            return
        else:
            p.send(rep(W.REP.ERR_UNSUP))


@contextmanager
def scripted(scenario: Callable[[Peer], None], size: int = SIZE) -> Iterator[str]:
    """A server on a Unix socket for one connection: handshake, then ``scenario``."""
    d = os.path.join("/tmp", f"pynbd-finding-{os.getpid()}-{threading.get_ident()}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "s.sock")
    if os.path.exists(path):
        os.unlink(path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    ls.settimeout(DEADLINE)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            s, _ = ls.accept()
        except OSError:
            return
        p = Peer(s)
        try:
            _handshake(p, size)
            scenario(p)
            p.hold(DEADLINE)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        ls.close()
        t.join(DEADLINE * 2)
        os.unlink(path)
        os.rmdir(d)
    assert not t.is_alive(), "scripted server stuck"
    if errors:
        raise errors[0]


def _documented(face: str) -> tuple[type[BaseException], ...]:
    from pynbd.errors import NBDError

    if face == "libnbd":
        import pynbd.libnbd as nbd

        return (nbd.Error,)
    return (NBDError, ConnectionError)


def _connect(face: str, path: str) -> Any:
    """Connect one client face; returns something with a close()."""
    if face == "async":
        from pynbd.client import AsyncClient

        async def go() -> Any:
            c = await AsyncClient.connect(unix=path, timeout=DEADLINE)
            await c.close()
            return c

        return asyncio.run(go())
    if face == "blocking":
        from pynbd.client.blocking import BlockingConnection

        c = BlockingConnection.connect(unix=path)
        c.close()
        return c
    import pynbd.libnbd as nbd

    h = nbd.NBD()
    h.connect_unix(path)
    h.close()
    return h


# --------------------------------------------------------------------------- the findings


def test_every_known_finding_has_its_test() -> None:
    names = {k.test for k in KNOWN}
    missing = [n for n in names if n not in globals()]
    assert not missing, f"findings.KNOWN names tests that do not exist: {missing}"


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 1], ids=["2^63", "2^64-1"])
@pytest.mark.parametrize("face", ["async", "blocking", "libnbd"])
def test_client_refuses_export_size_of_2_63_or_more(face: str, size: int) -> None:
    """The hostile-server fuzzer: every face connected to a server advertising 2^63 bytes
    or more, and reported that size."""
    with scripted(lambda p: None, size=size) as path, pytest.raises(_documented(face)):
        _connect(face, path)


def test_blocking_refuses_a_zero_length_extent() -> None:
    """The fuzzer: BlockingConnection.block_status returned [(0, 0), (512, 0)]."""
    from pynbd.client.blocking import BlockingConnection, ServerGone

    def scenario(p: Peer) -> None:
        _, cmd, cookie, _, _ = p.request()
        assert cmd == W.CMD.BLOCK_STATUS
        body = W.U32.pack(1) + struct.pack(">IIII", 0, 0, 512, 0)
        p.send(p.chunk(W.DONE, W.RT.BLOCK_STATUS, cookie, body))

    with scripted(scenario) as path:
        c = BlockingConnection.connect(unix=path)
        try:
            with pytest.raises(ServerGone):
                c.block_status(512, 0)
        finally:
            c.close()


def test_blocking_block_status_reply_while_waiting_for_another() -> None:
    """The fuzzer (a false alarm against a server that broke nothing): a READ and a
    BLOCK_STATUS in flight, the status answered first; reply(read) raised
    "the server sent an unexpected chunk type 5"."""
    from pynbd.client.blocking import BlockingConnection

    def scenario(p: Peer) -> None:
        (_, _, rc, roff, rn), (_, _, bc, _, bn) = p.request(), p.request()
        p.send(p.chunk(W.DONE, W.RT.BLOCK_STATUS, bc, W.U32.pack(1) + struct.pack(">II", bn, 0)),
               p.chunk(W.DONE, W.RT.OFFSET_DATA, rc, W.U64.pack(roff) + b"r" * rn))

    with scripted(scenario) as path:
        c = BlockingConnection.connect(unix=path)
        try:
            buf = bytearray(512)
            rck = c.send(W.CMD.READ, 0, 512, into=memoryview(buf))
            bck = c.send(W.CMD.BLOCK_STATUS, 0, 4096)
            c.reply(rck)
            ext: dict[str, list[tuple[int, int]]] = {}
            c.reply(bck, contexts=ext)
            assert buf == b"r" * 512 and ext == {"base:allocation": [(4096, 0)]}
        finally:
            c.close()


def test_blocking_reply_after_a_failure_raises_at_once() -> None:
    """Seen as the fuzzer's blocking cases that waited for the hostile server to hang up:
    after ServerGone for one reply, the next reply() must raise it at once, not wait on
    a stream it already knows is out of step."""
    from pynbd.client.blocking import BlockingConnection, ServerGone

    hold = 4.0

    def scenario(p: Peer) -> None:
        (_, _, c1, _, _), _ = p.request(), p.request()
        p.send(p.chunk(W.DONE, 99, c1, b"what"))  # an unknown chunk type: fatal
        p.hold(hold)
        p.sock.shutdown(socket.SHUT_RDWR)

    with scripted(scenario) as path:
        c = BlockingConnection.connect(unix=path)
        try:
            ck1 = c.send(W.CMD.READ, 0, 512, into=memoryview(bytearray(512)))
            ck2 = c.send(W.CMD.READ, 512, 512, into=memoryview(bytearray(512)))
            with pytest.raises(ServerGone):
                c.reply(ck1)
            t0 = time.monotonic()
            with pytest.raises(ServerGone):
                c.reply(ck2)
            assert time.monotonic() - t0 < hold / 4, "reply() waited for the server"
        finally:
            c.abort()


def test_libnbd_completes_every_command_when_the_connection_dies() -> None:
    """The fuzzer's libnbd hangs (inputs where a command "neither completed nor failed"
    15 s after the server hung up). 200 reads in flight, the server kills the connection:
    each must complete (with its error) while the caller polls, as in libnbd. The loss is a
    race between the loop thread posting failures and the caller draining them, so this
    tries up to 30 times and fails at the first loss."""
    import pynbd.libnbd as nbd

    def scenario(p: Peer) -> None:
        reqs = [p.request() for _ in range(64)]
        p.send(p.chunk(W.DONE, 99, reqs[0][2], b"what"))  # an unknown chunk type: fatal
        p.sock.shutdown(socket.SHUT_RDWR)

    for attempt in range(30):
        with scripted(scenario) as path:
            h = nbd.NBD()
            h.connect_unix(path)
            pending = {h.aio_pread(bytearray(512), 512 * i) for i in range(200)}
            t0 = time.monotonic()
            while pending and time.monotonic() - t0 < 3.0:
                for ck in list(pending):
                    try:
                        if h.aio_command_completed(ck):
                            pending.discard(ck)
                    except nbd.Error:
                        pending.discard(ck)
                try:
                    h.poll(100)
                except nbd.Error:  # the handle is dead: nothing left to poll for
                    time.sleep(0.01)
            assert not pending, f"attempt {attempt}: {len(pending)} of 200 reads never completed"
            h.close()


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_unread_replies_stay_within_the_connection_bound(pynbd_server: Any, sockdir: Any,
                                                         plugin: str) -> None:
    """The server fuzzer's probe: 600 pipelined reads of 1 MiB, no reply read: +600 MiB."""
    srv = pynbd_server(*_plugin(plugin, sockdir))
    assert greedy_probe(srv.sock, srv.pid) is None


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_idle_connections_cost_little(pynbd_server: Any, sockdir: Any, plugin: str) -> None:
    """The server fuzzer's probe: 100 connections idle after the greeting: +200 MiB."""
    srv = pynbd_server(*_plugin(plugin, sockdir))
    assert idle_probe(srv.sock, srv.pid) is None


def _plugin(plugin: str, sockdir: Any) -> list[str]:
    if plugin == "memory":
        return ["memory", "64M"]
    img = sockdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    return ["file", str(img)]
