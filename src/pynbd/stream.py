"""A non-blocking byte stream over one or two file descriptors.

On an event loop (``loop``) it watches its descriptors itself. Without one (``loop=None``)
whoever owns it drives it in its own thread: it waits for the descriptor (``poll``) and then
calls the reader, or :meth:`FdStream.flush` when :attr:`FdStream.pending` bytes wait, and
:meth:`FdStream.read_some` suspends its coroutine with a :class:`WantIO` for that owner to
wait on (``pynbd.libnbd``, which runs the client engine in the caller's thread).

Works the same for TCP, Unix and vsock sockets, a socket pair on stdin/stdout and two pipes
(``-s``): reads use ``os.readv`` straight into the caller's buffer, writes use ``os.writev`` of
the caller's buffers (header + memoryview slices, no joining), with a queue of its own when the
descriptor is full.

A stream counts what its queue costs in memory (:attr:`FdStream.cost`: the queued bytes plus
:data:`BUFFER_COST` per buffer) and, when given a :attr:`FdStream.budget` (the server's
:class:`~pynbd.server.budget.Budget`), charges that budget as buffers are queued and
releases it as they are written or dropped.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["BUFFER_COST", "FdStream", "WantIO"]

#: Memory counted per queued buffer besides its bytes: the memoryview queued (~180 bytes)
#: and the object it views. Without it a client that never reads would make the server
#: queue millions of 16-byte replies that cost ~250 bytes each and count as 16.
BUFFER_COST = 256

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class WantIO:
    """What a coroutine driven without an event loop awaits: ``fd`` ready for ``events``
    (``select.POLLIN``/``POLLOUT``). Its driver waits, then resumes the coroutine."""

    __slots__ = ("events", "fd")

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self.events = events

    def __await__(self) -> Any:
        yield self


_POLLIN = 1  # select.POLLIN, without importing select here


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FdStream:
    def __init__(self, loop: asyncio.AbstractEventLoop | None, rfd: int, wfd: int | None = None,
                 owner: Any = None, peer: str = "") -> None:
        self.loop = loop
        self.rfd = rfd
        self.wfd = rfd if wfd is None else wfd
        self.owner = owner  # keeps a socket object alive; closed with the stream
        self.peer = peer
        for fd in {self.rfd, self.wfd}:
            os.set_blocking(fd, False)
        self._outq: collections.deque[bytes | memoryview] = collections.deque()
        self._outbytes = 0
        #: Memory the queue holds: its bytes plus BUFFER_COST per buffer.
        self.cost = 0
        #: Charged with ``cost`` as it changes (anything with ``used`` and ``release(n)``).
        self.budget: Any = None
        self._writer_on = False
        self._reader: Callable[[], None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._read_waiter: asyncio.Future[None] | None = None
        self._interrupted = False
        self.closed = False
        self.write_error: OSError | None = None
        self.on_write_error: Callable[[OSError], None] | None = None
        self.on_drained: Callable[[], None] | None = None

    # ---- reading -----------------------------------------------------------------------
    def set_reader(self, cb: Callable[[], None] | None) -> None:
        """``cb()`` when the descriptor is readable (without a loop: the owner calls it)."""
        if self.closed:
            return
        loop = self.loop
        if self._reader is not None and loop is not None:
            loop.remove_reader(self.rfd)
        self._reader = cb
        if cb is not None and loop is not None:
            loop.add_reader(self.rfd, cb)

    @property
    def reader(self) -> Callable[[], None] | None:
        return self._reader

    def pause_reading(self) -> None:
        if self._reader is not None and not self.closed and self.loop is not None:
            self.loop.remove_reader(self.rfd)

    def resume_reading(self) -> None:
        if self._reader is not None and not self.closed and self.loop is not None:
            self.loop.add_reader(self.rfd, self._reader)

    def readinto(self, view: memoryview) -> int:
        """Read what is available into ``view``; 0 at EOF; BlockingIOError when none."""
        return os.readv(self.rfd, [view])

    def readinto2(self, first: memoryview, then: memoryview) -> int:
        """Scatter read: fill ``first``, then ``then`` (one system call)."""
        return os.readv(self.rfd, [first, then])

    async def read_some(self, n: int = 65536) -> bytes:
        """Await some bytes (b"" at EOF, or after :meth:`interrupt_read`). Used during
        negotiation only."""
        while True:
            if self._interrupted or self.closed:
                return b""
            try:
                return os.read(self.rfd, n)
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                return b""
            await self._readable()

    async def _readable(self) -> None:
        """Wait until the descriptor is readable (or :meth:`interrupt_read`)."""
        if self.loop is None:
            await WantIO(self.rfd, _POLLIN)
            return
        fut = self.loop.create_future()
        self._read_waiter = fut
        self.loop.add_reader(self.rfd, _wake, fut)
        try:
            await fut
        finally:
            self._read_waiter = None
            if not self.closed:
                self.loop.remove_reader(self.rfd)

    def interrupt_read(self) -> None:
        """Make the pending and every later :meth:`read_some` return b"" (shutdown)."""
        self._interrupted = True
        if self._read_waiter is not None:
            _wake(self._read_waiter)

    # ---- writing -----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Bytes queued but not yet written."""
        return self._outbytes

    def write(self, bufs: list[Any]) -> None:
        """Queue buffers and write as much as the descriptor takes now."""
        if self.closed or self.write_error is not None:
            return
        q = self._outq
        n = k = 0
        for b in bufs:
            if type(b) is not bytes:  # bytes are queued as they are (immutable, no view)
                if type(b) is not memoryview:
                    b = memoryview(b)  # pins a bytearray's size until written
                if b.ndim != 1 or b.itemsize != 1:
                    b = b.cast("B")
            nb = len(b)
            if nb:
                q.append(b)
                n += nb
                k += 1
        self._outbytes += n
        cost = n + k * BUFFER_COST
        self.cost += cost
        if self.budget is not None:
            self.budget.used += cost
        if not self._writer_on:
            self._flush()

    def write_joined(self, data: bytes, parts: int) -> None:
        """:meth:`write` of ``parts`` buffers (NBD requests) joined into ``data``.
        hot path (benchmarks/client_read.py): with nothing queued it is written at once, one
        system call and no queueing; what the descriptor does not take is queued."""
        if self._outq or self.closed or self.write_error is not None:
            self.write([data])
            return
        try:
            n = os.write(self.wfd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._fail(e)
            return
        if n < len(data):
            self.write([memoryview(data)[n:]])

    def _flush(self) -> None:
        q = self._outq
        while q:
            bufs = list(q) if len(q) <= _IOV_MAX else [q[i] for i in range(_IOV_MAX)]
            try:
                n = os.writev(self.wfd, bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._fail(e)
                return
            self._outbytes -= n
            queued = len(q)
            freed = n
            while n:
                head = q[0]
                if n >= len(head):
                    n -= len(head)
                    q.popleft()
                else:
                    q[0] = (head if type(head) is memoryview else memoryview(head))[n:]
                    n = 0
            self._uncharge(freed + (queued - len(q)) * BUFFER_COST)
        if q:
            if not self._writer_on and self.loop is not None:
                self._writer_on = True
                self.loop.add_writer(self.wfd, self._flush)
        else:
            if self._writer_on:
                self._writer_on = False
                self.loop.remove_writer(self.wfd)  # type: ignore[union-attr]
                if self.on_drained is not None:
                    self.on_drained()
            self._wake_drainers()

    def flush(self) -> None:
        """Write what is queued, as far as the descriptor takes it now (without a loop: the
        owner calls it when the descriptor is writable)."""
        if self._outq and not self.closed and self.write_error is None:
            self._flush()

    def _uncharge(self, cost: int) -> None:
        self.cost -= cost
        if self.budget is not None:
            self.budget.release(cost)

    def _drop_queue(self) -> None:
        self._outq.clear()
        self._outbytes = 0
        if self.cost:
            self._uncharge(self.cost)

    def _fail(self, e: OSError) -> None:
        self.write_error = e
        self._drop_queue()
        if self._writer_on:
            self._writer_on = False
            self.loop.remove_writer(self.wfd)  # type: ignore[union-attr]
        self._wake_drainers()
        if self.on_write_error is not None:
            self.on_write_error(e)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait until every queued byte was written (or writing failed)."""
        if self._outq and not self.closed and self.write_error is None:
            assert self.loop is not None, "drain() needs an event loop"
            fut = self.loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    # ---- closing -----------------------------------------------------------------------
    def _unwatch(self) -> None:
        self.closed = True
        self._drop_queue()
        if self._reader is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.rfd)
            self._reader = None
        if self._writer_on:
            self.loop.remove_writer(self.wfd)  # type: ignore[union-attr]
            self._writer_on = False
        self._wake_drainers()

    def detach(self) -> Any:
        """Stop using the descriptors without closing them and return the owner (the socket
        object, or None for a bare descriptor pair): the caller takes the connection over.
        Bytes still queued are not written."""
        self._unwatch()
        owner, self.owner = self.owner, None
        return owner

    def close(self) -> None:
        if self.closed:
            return
        self._unwatch()
        if isinstance(self.owner, socket.socket):
            try:
                self.owner.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.owner.close()
        else:
            for fd in {self.rfd, self.wfd}:
                try:
                    os.close(fd)
                except OSError:
                    pass
