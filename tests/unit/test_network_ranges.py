"""The curl plugin's READ paths without urllib3, in worker threads
(pynbd.plugins._network_ranges) and on the event loop (pynbd.plugins._network_loopranges),
against a small scripted HTTP server on loopback: kept-alive connections and their limit, a
connection the server closed without saying, and every answer left to urllib3."""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pynbd.errors import CommandError
from pynbd.plugins._network_http import HttpSettings
from pynbd.plugins._network_loopranges import LoopRangeReader
from pynbd.plugins._network_ranges import RangeReader

DATA = bytes(range(256)) * 4096  # 1 MiB

Answer = Callable[[int, int], bytes]


def partial(start: int, end: int) -> bytes:
    body = DATA[start:end + 1]
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
            f"Content-Range: bytes {start}-{end}/{len(DATA)}\r\n\r\n").encode() + body


class Server:
    """Answers each GET with ``answer(start, end)``; closes after ``per_conn`` requests
    (without a Connection: close); counts connections."""

    def __init__(self, answer: Answer = partial, per_conn: int = 1000) -> None:
        self.answer = answer
        self.per_conn = per_conn
        self.connections = 0
        self.requests: list[bytes] = []
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen()
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            for _ in range(self.per_conn):
                while b"\r\n\r\n" not in buf:
                    got = c.recv(65536)
                    if not got:
                        return
                    buf += got
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                m = re.search(rb"Range: bytes=(\d+)-(\d+)", head)
                assert m is not None
                answer = self.answer(int(m[1]), int(m[2]))
                if answer:
                    c.sendall(answer)
                else:
                    return


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Server, RangeReader]]]:
    made: list[tuple[Server, RangeReader]] = []

    def make(answer: Answer = partial, per_conn: int = 1000,
             timeout: int = 0) -> tuple[Server, RangeReader]:
        srv = Server(answer, per_conn)
        rr = RangeReader(HttpSettings(timeout=timeout), None, 4)
        made.append((srv, rr))
        return srv, rr

    yield make
    for srv, rr in made:
        rr.close()
        srv.ls.close()


def url(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.port}/disk.img"


def test_reads_on_one_kept_alive_connection(serve):
    srv, rr = serve()
    for off in (0, 4096, 777, 1000000):
        assert rr.get(url(srv), {"Accept": "*/*"}, off, 4096 if off < 1000000 else 48576) \
            == DATA[off:off + (4096 if off < 1000000 else 48576)]
    assert srv.connections == 1
    head = srv.requests[0].decode()
    assert head.startswith("GET /disk.img HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}" in head and "Accept: */*" in head
    assert "Range: bytes=0-4095" in head and "Accept-Encoding: identity" in head


def test_headers_left_out(serve):
    from pynbd.plugins._network_http import SKIP

    srv, rr = serve()
    rr.get(url(srv), {"User-Agent": SKIP, "X-Token": "abc"}, 0, 16)
    head = srv.requests[0].decode()
    assert "User-Agent" not in head and "X-Token: abc" in head


def test_connection_closed_by_the_server_is_made_again(serve):
    srv, rr = serve(per_conn=1)
    for off in (0, 512, 1024):
        assert rr.get(url(srv), {}, off, 512) == DATA[off:off + 512]
    assert srv.connections == 3


@pytest.mark.parametrize("answer", [
    lambda s, e: b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + DATA[:16],
    lambda s, e: b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n",
    lambda s, e: partial(s + 1, e + 1),  # another range
    lambda s, e: partial(s, e).replace(b"Content-Length", b"Transfer-Encoding: chunked\r\nX"),
    lambda s, e: partial(s, e)[:-5],  # the body cut short (then the connection closed)
    lambda s, e: b"",  # the connection closed at once
])
def test_what_urllib3_answers_instead(serve, answer):
    srv, rr = serve(answer, per_conn=1)
    assert rr.get(url(srv), {}, 0, 512) is None


def test_no_such_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rr = RangeReader(HttpSettings(), None, 4)
    assert rr.get(f"http://127.0.0.1:{port}/x", {}, 0, 512) is None


def test_timeout(serve):
    ev = threading.Event()
    srv, rr = serve(lambda s, e: b"x"[:0] * ev.wait(5), timeout=1)  # silent, then gone
    with pytest.raises(CommandError) as ei:
        rr.get(url(srv), {}, 0, 512)
    ev.set()
    assert ei.value.errno == errno.ETIMEDOUT and "Timeout was reached" in ei.value.message


def test_other_schemes_are_not_served():
    rr = RangeReader(HttpSettings(), None, 4)
    assert rr.get("ftp://127.0.0.1/x", {}, 0, 512) is None


# ---- on the event loop -------------------------------------------------------------
def run(srv: Server, reads: list[tuple[int, int]], maxconns: int = 4) -> tuple[list[Any], list]:
    """The reads at once; each result and what went to the fallback."""
    fell: list[tuple[int, int]] = []

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()

        def fallback(url: str, offset: int, count: int, done: Any) -> None:
            fell.append((offset, count))
            loop.call_soon(done, None, b"F" * count)

        rr = LoopRangeReader(None, None, maxconns, fallback)
        futs = []
        for off, n in reads:
            f = loop.create_future()
            rr.start(f"http://127.0.0.1:{srv.port}/d", {"Accept": "*/*"}, off, n,
                     lambda e, v, f=f: f.set_exception(e) if e else f.set_result(v))
            futs.append(f)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futs), 10))
        finally:
            rr.close()

    return asyncio.run(main()), fell


@pytest.fixture
def server():
    made: list[Server] = []

    def make(answer=partial, per_conn=1000) -> Server:
        made.append(Server(answer, per_conn))
        return made[-1]

    yield make
    for s in made:
        s.ls.close()


def test_many_reads_on_few_connections(server):
    srv = server()
    reads = [(i * 4096 + i, 4096) for i in range(40)]
    got, fell = run(srv, reads, maxconns=3)
    assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in reads]
    assert not fell and srv.connections <= 3
    # Reads go out on several connections at once: which request the server saw first
    # depends on scheduling.
    assert any("Range: bytes=0-4095" in r.decode() for r in srv.requests)


def test_large_read(server):
    srv = server()
    got, fell = run(srv, [(5, 1000000)])
    assert bytes(got[0]) == DATA[5:1000005] and not fell


def test_closed_connections_are_made_again(server):
    srv = server(per_conn=1)
    reads = [(i * 512, 512) for i in range(6)]
    got, fell = run(srv, reads, maxconns=2)
    assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in reads] and not fell


@pytest.mark.parametrize("answer", [
    lambda s, e: b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + DATA[:16],
    lambda s, e: partial(s + 1, e + 1),
    lambda s, e: partial(s, e)[:-5],
    lambda s, e: b"",
])
def test_what_goes_to_the_fallback(server, answer):
    srv = server(answer, per_conn=1)
    got, fell = run(srv, [(0, 512), (512, 512)])
    assert got == [b"F" * 512, b"F" * 512]
    assert sorted(fell) == [(0, 512), (512, 512)]


def test_no_server_goes_to_the_fallback():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = Server.__new__(Server)
    srv.port = port
    got, fell = run(srv, [(0, 512)])
    assert got == [b"F" * 512] and fell == [(0, 512)]


def test_connection_close_is_obeyed(server):
    srv = server(lambda s, e: partial(s, e).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1),
                 per_conn=1)
    reads = [(i * 512, 512) for i in range(4)]
    got, fell = run(srv, reads, maxconns=1)
    assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in reads] and not fell
    assert srv.connections == 4
