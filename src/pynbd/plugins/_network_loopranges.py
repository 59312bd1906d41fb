"""The curl plugin's READs on the server's event loop: the range GETs of
:mod:`pynbd.plugins._network_ranges` without worker threads.

Each connection to the web server is an :class:`asyncio.BufferedProtocol`: the response
headers are received into a small buffer, then the body straight into the ``bytearray``
that goes back to the client (the protocol hands that buffer to the transport). Up to
``maxconns`` connections are kept open (the server's thread count, as with urllib3's pool);
requests beyond that wait for one to be free. A request the server answers with anything
but the 206 asked for, or that cannot reach it, is handed to ``fallback`` (urllib3 in a
worker thread), so errors read as they always do. A kept-alive connection the server
closed before answering is replaced once, transparently.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import Any

from pynbd.plugins._network_ranges import _HEAD_MAX, _check_head, _request, _Unusable, target

__all__ = ["LoopRangeReader"]

Done = Callable[[BaseException | None, Any], None]


class _Req:
    __slots__ = ("buf", "count", "data", "done", "offset", "retried", "url")

    def __init__(self, url: str, data: bytes, offset: int, count: int, done: Done) -> None:
        self.url = url
        self.data = data
        self.offset = offset
        self.count = count
        self.done = done
        self.buf = bytearray(count)
        self.retried = False


class _Conn(asyncio.BufferedProtocol):
    """One kept-alive HTTP/1.1 connection serving one request at a time."""

    def __init__(self, pool: LoopRangeReader) -> None:
        self.pool = pool
        self.transport: Any = None
        self.head = bytearray(_HEAD_MAX)
        self.hview = memoryview(self.head)
        self.hn = 0
        self.req: _Req | None = None
        self.body: memoryview | None = None
        self.got = 0
        self.keep = False
        self.used = False  # answered a request before: the server may have closed it since

    def send(self, req: _Req) -> None:
        self.req, self.hn, self.body, self.got = req, 0, None, 0
        self.transport.write(req.data)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.body is not None:
            return self.body[self.got:]
        if self.hn == _HEAD_MAX:  # unreachable: buffer_updated gives up before
            return memoryview(bytearray(1))
        return self.hview[self.hn:]

    def buffer_updated(self, nbytes: int) -> None:
        req = self.req
        if req is None:  # bytes nobody asked for: the connection is not usable
            self.transport.abort()
            return
        if self.body is not None:
            self.got += nbytes
            if self.got == req.count:
                self._finish(req)
            return
        start = max(0, self.hn - 3)
        self.hn += nbytes
        end = self.head.find(b"\r\n\r\n", start, self.hn)
        if end < 0:
            if self.hn == _HEAD_MAX:
                self._fail(req, retry=False)
            return
        try:
            self.keep = _check_head(bytes(self.head[:end]).decode("latin-1"), req.offset,
                                    req.count)
        except (_Unusable, ValueError):
            self._fail(req, retry=False)
            return
        rest = self.hn - end - 4
        if rest > req.count:
            self._fail(req, retry=False)
            return
        req.buf[:rest] = self.hview[end + 4:self.hn]
        self.body, self.got = memoryview(req.buf), rest
        if rest == req.count:
            self._finish(req)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        req, self.req = self.req, None
        self.pool.forget(self)
        if req is not None:
            # nothing received on a connection used before: the server had closed it
            retry = self.used and self.hn == 0 and self.body is None
            self.pool.failed(req, retry)

    def _finish(self, req: _Req) -> None:
        self.req, self.body = None, None
        self.used = True
        if self.keep:
            self.pool.release(self)
        else:
            self.pool.forget(self)
            self.transport.close()
        req.done(None, req.buf)

    def _fail(self, req: _Req, retry: bool) -> None:
        self.req = None
        self.pool.forget(self)
        self.transport.abort()
        self.pool.failed(req, retry)


class LoopRangeReader:
    """Range GETs from the event loop, for one plugin and one web server."""

    def __init__(self, unix_socket_path: str | None, tls: ssl.SSLContext | None,
                 maxconns: int, fallback: Callable[[str, int, int, Done], None]) -> None:
        self.unix = unix_socket_path
        self.tls = tls
        self.max = maxconns
        self.fallback = fallback
        self.key: Any = None  # (scheme, host, port) of the one server this reader serves
        self.conns: set[_Conn] = set()
        self.idle: list[_Conn] = []
        self.waiting: collections.deque[_Req] = collections.deque()
        self.connecting = 0
        self.closed = False

    def start(self, url: str, headers: dict[str, Any], offset: int, count: int,
              done: Done) -> None:
        """Read ``count`` bytes at ``offset``; ``done(None, data)`` or ``done(error,
        None)`` on the loop when it is over."""
        key, path, host = target(url)
        if self.key is None and key:
            self.key = key
        if not key or key != self.key or self.closed:
            self.fallback(url, offset, count, done)
            return
        req = _Req(url, _request(path, host, headers, offset, count), offset, count, done)
        self._dispatch(req)

    def _dispatch(self, req: _Req, fresh: bool = False) -> None:
        """Send on an idle connection, else a new one, else wait (``fresh``: a new one
        even over the limit, for a request retried because a kept-alive connection had been
        closed: it is not made to wait behind others)."""
        if self.idle and not fresh:
            self.idle.pop().send(req)
        elif fresh or len(self.conns) + self.connecting < self.max:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect(req))
        else:
            self.waiting.append(req)

    async def _connect(self, req: _Req) -> None:
        loop = asyncio.get_running_loop()
        scheme, host, port = self.key
        tls = self.tls if scheme == "https" else None
        try:
            if self.unix:
                _, conn = await loop.create_unix_connection(
                    lambda: _Conn(self), self.unix, ssl=tls,
                    server_hostname=host if tls else None)
            else:
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), host, port, ssl=tls,
                    server_hostname=host if tls else None)
        except (OSError, ssl.SSLError, ValueError):
            self.connecting -= 1
            self.fallback(req.url, req.offset, req.count, req.done)
            self._next()
            return
        self.connecting -= 1
        self.conns.add(conn)
        conn.send(req)

    def release(self, conn: _Conn) -> None:
        if self.closed:
            conn.transport.close()
        elif self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            if conn in self.idle:
                self.idle.remove(conn)
            self._next()

    def failed(self, req: _Req, retry: bool) -> None:
        if retry and not req.retried and not self.closed:
            req.retried = True
            self._dispatch(req, fresh=True)
        else:
            self.fallback(req.url, req.offset, req.count, req.done)
        self._next()

    def _next(self) -> None:
        """Room for a new connection: start one for the next waiting request."""
        if self.waiting and len(self.conns) + self.connecting < self.max:
            self._dispatch(self.waiting.popleft())

    def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
