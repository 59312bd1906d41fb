"""The engine's stream over TLS: :class:`TlsStream`, an :class:`~pynbd.stream.FdStream` whose
reads and writes go through an :class:`ssl.SSLSocket` in non-blocking mode. Records are
decrypted by OpenSSL straight into the caller's buffer (a large read's payload lands in its
destination without a copy); queued small buffers are joined into one record before they are
sent, topped up from the start of a large one (a request header and its payload's start
share a record)."""

from __future__ import annotations

import errno as _errno
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pynbd.client.tls import TLSError
from pynbd.stream import BUFFER_COST, FdStream

__all__ = ["TlsStream"]

#: Small queued buffers are joined into one TLS record of up to this many bytes.
_JOIN = 16 * 1024


class TlsStream(FdStream):
    """An :class:`~pynbd.stream.FdStream` over a non-blocking SSL socket (see the module's
    documentation). ``readinto`` reads until the view is full or nothing more is there; the
    reader it calls is called again while OpenSSL holds decrypted bytes (the descriptor is not
    readable for them)."""

    def __init__(self, loop: Any, ssock: ssl.SSLSocket) -> None:
        ssock.setblocking(False)
        super().__init__(loop, ssock.fileno(), owner=ssock)
        self.ssock = ssock
        # the C methods themselves (ssl.py's recv_into and send add two Python calls and
        # their checks per 16 KiB record)
        sslobj: Any = getattr(ssock, "_sslobj", None) or ssock
        self._read: Callable[..., int] = sslobj.read
        self._write: Callable[[Any], int] = sslobj.write
        self._user_reader: Callable[[], None] | None = None
        self._retry: Any = None
        self._paused = False

    # ---- reading
    def set_reader(self, cb: Callable[[], None] | None) -> None:
        self._user_reader = cb
        super().set_reader(None if cb is None else self._on_readable)

    @property
    def reader(self) -> Callable[[], None] | None:
        return self._user_reader

    def _on_readable(self) -> None:
        cb = self._user_reader
        while cb is not None:
            cb()
            if (self.closed or self._paused or self._user_reader is not cb
                    or not self.ssock.pending()):
                return

    def pause_reading(self) -> None:
        self._paused = True
        super().pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        super().resume_reading()
        if self.loop is not None and self._user_reader is not None and self.buffered():
            self.loop.call_soon(self._on_readable)  # bytes OpenSSL holds: no readiness

    def buffered(self) -> int:
        """Decrypted bytes waiting in OpenSSL (not signalled by the descriptor)."""
        return 0 if self.closed else self.ssock.pending()

    def _recv(self, view: memoryview) -> int:
        """Decrypt into ``view`` until full, EOF or no more: bytes read (-1: none yet)."""
        read = self._read
        n, want = 0, len(view)
        while n < want:
            try:
                k = read(want - n, view[n:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                break
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                return n
            if k == 0:
                return n
            n += k
        return n if n else -1

    def readinto(self, view: memoryview) -> int:
        n = self._recv(view)
        if n < 0:
            raise BlockingIOError(_errno.EAGAIN, "no data")
        return n

    def readinto2(self, first: memoryview, then: memoryview) -> int:
        n = self._recv(first)
        if n < 0:
            raise BlockingIOError(_errno.EAGAIN, "no data")
        if n == len(first) and len(then):
            m = self._recv(then)
            if m > 0:
                n += m
        return n

    async def read_some(self, n: int = 65536) -> bytes:
        buf = bytearray(n)
        while True:
            if self._interrupted or self.closed:
                return b""
            try:
                k = self._recv(memoryview(buf))
            except (ConnectionResetError, BrokenPipeError):
                return b""
            except ssl.SSLError as e:
                raise TLSError(f"TLS: {e.reason or e}") from None
            if k >= 0:
                return bytes(buf[:k])
            await self._readable()

    # ---- writing
    def write_joined(self, data: bytes, parts: int) -> None:
        """Through OpenSSL, as :meth:`write` (never straight to the descriptor)."""
        self.write([data])

    def _flush(self) -> None:
        q = self._outq
        write = self._write
        while q:
            head = q[0]
            if head is not self._retry:
                if len(head) < _JOIN:
                    if len(q) > 1:
                        head = self._join()
                elif len(head) % _JOIN and len(q) > 1:
                    head = self._split()
            try:
                n = write(head)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError,
                    InterruptedError):
                self._retry = head  # OpenSSL wants the same buffer again
                break
            except (ssl.SSLError, OSError) as e:
                self._fail(e if isinstance(e, OSError) else OSError(_errno.EIO, str(e)))
                return
            self._retry = None
            self._outbytes -= n
            if n >= len(head):
                q.popleft()
                self._uncharge(n + BUFFER_COST)
            else:  # a partial write: the rest goes next
                q[0] = (head if type(head) is memoryview else memoryview(head))[n:]
                self._uncharge(n)
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

    def _join(self) -> bytes:
        """Join the small buffers at the head of the queue into one TLS record's worth,
        topped up from the front of a large one (a request header and the start of its
        payload go in one record)."""
        q = self._outq
        parts: list[Any] = []
        size = k = 0
        while q and size < _JOIN:
            b = q[0]
            room = _JOIN - size
            if len(b) > room:
                b = b if type(b) is memoryview else memoryview(b)
                parts.append(b[:room])
                q[0] = b[room:]
                size += room
                break
            parts.append(q.popleft())
            size += len(b)
            k += 1
        joined = b"".join(parts)
        q.appendleft(joined)
        self._uncharge((k - 1) * BUFFER_COST)
        return joined

    def _split(self) -> memoryview:
        """Cut the large buffer at the head of the queue after its last whole record: its
        tail joins what follows (a 256 KiB request and its header take 16 records, not 17
        with a small one, for the server to decrypt too)."""
        q = self._outq
        b = q[0]
        b = b if type(b) is memoryview else memoryview(b)
        whole = len(b) - len(b) % _JOIN
        q[0] = b[whole:]
        q.appendleft(b[:whole])
        self._uncharge(-BUFFER_COST)  # one buffer more in the queue
        return q[0]  # type: ignore[return-value]

    # ---- closing
    def detach(self) -> Any:
        """Stop using the socket and return the SSL socket (blocking is set by the caller)."""
        return super().detach()

    def close(self) -> None:
        if self.closed:
            return
        self._unwatch()
        ss = self.ssock
        try:
            ss.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        ss.close()
