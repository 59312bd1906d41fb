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
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["FdStream", "WantIO"]

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
        self._outq: collections.deque[memoryview] = collections.deque()
        self._outbytes = 0
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
            if self.loop is None:
                await WantIO(self.rfd, _POLLIN)
                continue
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
        for b in bufs:
            mv = b if type(b) is memoryview else memoryview(b)
            if mv.nbytes:
                if mv.ndim != 1 or mv.itemsize != 1:
                    mv = mv.cast("B")
                q.append(mv)
                self._outbytes += mv.nbytes
        if not self._writer_on:
            self._flush()

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
            while n:
                head = q[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    q.popleft()
                else:
                    q[0] = head[n:]
                    n = 0
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

    def _fail(self, e: OSError) -> None:
        self.write_error = e
        self._outq.clear()
        self._outbytes = 0
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
