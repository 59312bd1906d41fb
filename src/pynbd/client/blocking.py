"""An NBD connection driven in blocking system calls, one command at a time.

For workers that each own a connection in a thread or process of their own (``pynbd fuse``'s
worker processes, ``pynbd copy``'s threads): a command is one ``send`` and a reply received
straight into the caller's buffer, with no event loop in between. The connection is made and
negotiated by :class:`pynbd.client.AsyncClient` and handed over with
:meth:`~pynbd.client.AsyncClient.detach`; simple and structured replies are understood
(extended headers are not: do not negotiate them for a connection meant for this).

Failures: a command the server refuses raises :class:`pynbd.errors.CommandError` (with the
errno); a broken connection or a protocol violation raises :class:`ServerGone`, and every
later command raises it too.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from pynbd.errors import CommandError
from pynbd.protocol.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    nbd_to_errno,
)

__all__ = ["BlockingConnection", "ServerGone"]

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7

_REQUEST = struct.Struct(">IHHQQI")  # magic flags type cookie offset length
_SIMPLE = struct.Struct(">IIQ")  # magic error cookie
_CHUNK = struct.Struct(">IHHQI")  # magic flags type cookie length
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")
_FLAG_DONE = 1
_NONE, _OFFSET_DATA, _OFFSET_HOLE, _BLOCK_STATUS = 0, 1, 2, 5
_ERROR_BIT = 1 << 15
#: The largest structured chunk that is not data (error messages, block status).
_MAX_META_CHUNK = 64 << 20


class ServerGone(ConnectionError):
    """The connection broke, or the server broke the protocol."""


class BlockingConnection:
    """One negotiated NBD connection on a blocking socket (see the module's documentation).

    ``structured``: whether structured replies were negotiated; ``contexts``: the
    negotiated metadata contexts (id -> name), for :meth:`block_status`."""

    def __init__(self, sock: socket.socket, *, structured: bool,
                 contexts: dict[int, str] | None = None) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.structured = structured
        self.contexts = dict(contexts or {})
        self.cookie = 0
        self.failure: ServerGone | None = None
        self._hdr = bytearray(_CHUNK.size)
        self._hview = memoryview(self._hdr)

    @classmethod
    def take_over(cls, client: Any) -> BlockingConnection:
        """Detach a negotiated :class:`~pynbd.client.AsyncClient` and go on with its
        connection here."""
        if client.extended:
            raise ValueError("a blocking connection does not speak extended headers")
        structured, contexts = client.structured, dict(client.meta_contexts)
        return cls(client.detach(), structured=structured, contexts=contexts)

    # -- sending and receiving
    def send(self, cmd: int, offset: int, count: int, flags: int = 0,
             payload: Any = None) -> int:
        """Send one request (and its payload); returns its cookie."""
        if self.failure is not None:
            raise self.failure
        self.cookie += 1
        hdr = _REQUEST.pack(REQUEST_MAGIC, flags, cmd, self.cookie, offset, count)
        try:
            if payload is None:
                self.sock.sendall(hdr)
            else:
                parts = [memoryview(hdr), memoryview(payload).cast("B")]
                while parts:
                    n = self.sock.sendmsg(parts)
                    while parts and n >= parts[0].nbytes:
                        n -= parts[0].nbytes
                        parts.pop(0)
                    if n:
                        parts[0] = parts[0][n:]
        except OSError as e:
            raise self._gone(f"send: {e.strerror or e}") from None
        return self.cookie

    def recv_into(self, view: memoryview, got: int = 0) -> None:
        """Fill ``view[got:]`` from the socket."""
        want = view.nbytes
        sock = self.sock
        try:
            while got < want:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise self._gone("the server closed the connection")
                got += n
        except ServerGone:
            raise
        except OSError as e:
            raise self._gone(f"recv: {e.strerror or e}") from None

    def _gone(self, why: str) -> ServerGone:
        if self.failure is None:
            self.failure = ServerGone(why)
        return self.failure

    def _simple(self, cookie: int) -> int:
        """After a 16-byte simple reply header landed in _hdr: its error as an errno."""
        magic, error, c = _SIMPLE.unpack_from(self._hdr, 0)
        if magic != SIMPLE_REPLY_MAGIC or c != cookie:
            raise self._gone("the server sent a reply that does not match the request")
        return nbd_to_errno(error) if error else 0

    def reply(self, cookie: int, data: memoryview | None = None, offset: int = 0,
              contexts: dict[str, list[tuple[int, int]]] | None = None) -> None:
        """Receive the whole reply to ``cookie``: read data into ``data`` (the request was
        at ``offset``), block status into ``contexts``. Raises CommandError for an error."""
        hv = self._hview
        self.recv_into(hv[:_SIMPLE.size])  # a simple reply's header, or most of a chunk's
        (magic,) = struct.unpack_from(">I", self._hdr, 0)
        if magic == SIMPLE_REPLY_MAGIC:
            err = self._simple(cookie)
            if err:
                raise CommandError(err)
            if data is not None:
                self.recv_into(data)
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._gone(f"the server sent a bad reply magic {magic:#x}")
        error = 0
        message = ""
        got = _SIMPLE.size
        while True:
            self.recv_into(hv, got)
            _, flags, rtype, c, length = _CHUNK.unpack_from(self._hdr, 0)
            if c != cookie:
                raise self._gone("the server sent a reply that does not match the request")
            if rtype == _OFFSET_DATA and data is not None and length >= 8:
                off = self._u64() - offset
                n = length - 8
                if off < 0 or off + n > data.nbytes:
                    raise self._gone("the server sent data outside the request")
                self.recv_into(data[off:off + n])
            elif length > _MAX_META_CHUNK:
                raise self._gone("the server sent a chunk that is too large")
            else:
                body = bytearray(length)
                self.recv_into(memoryview(body))
                if rtype == _OFFSET_HOLE and data is not None and length == 12:
                    hoff, hlen = _HOLE.unpack_from(body, 0)
                    off = hoff - offset
                    if off < 0 or off + hlen > data.nbytes:
                        raise self._gone("the server sent a hole outside the request")
                    data[off:off + hlen] = bytes(hlen)
                elif rtype == _BLOCK_STATUS and contexts is not None and length >= 4:
                    (ctx,) = struct.unpack_from(">I", body, 0)
                    entries = [struct.unpack_from(">II", body, i)
                               for i in range(4, length - 7, 8)]
                    name = self.contexts.get(ctx)
                    if name is not None:
                        contexts[name] = entries
                elif rtype & _ERROR_BIT:
                    if length < 6:
                        raise self._gone("the server sent a short error chunk")
                    err, mlen = _ERR.unpack_from(body, 0)
                    error = error or nbd_to_errno(err) or 5
                    message = message or bytes(body[6:6 + mlen]).decode("utf-8", "replace")
                elif rtype != _NONE:
                    raise self._gone(f"the server sent an unexpected chunk type {rtype}")
            if flags & _FLAG_DONE:
                break
            self.recv_into(hv)
            got = hv.nbytes
            (magic,) = struct.unpack_from(">I", self._hdr, 0)
            if magic != STRUCTURED_REPLY_MAGIC:
                raise self._gone(f"the server sent a bad reply magic {magic:#x}")
        if error:
            raise CommandError(error, message)

    def _u64(self) -> int:
        self.recv_into(self._hview[:8])
        return int(_U64.unpack_from(self._hdr, 0)[0])

    # -- commands
    def pread_simple(self, buf: memoryview, offset: int, count: int) -> None:
        """Read ``count`` bytes at ``offset`` into ``buf[16:16 + count]``, in one receive
        with the 16-byte simple reply header, which lands in ``buf[:16]`` (where a caller
        can put a header of its own and send the whole). Simple replies only."""
        if self.structured:
            raise ValueError("pread_simple needs simple replies")
        cookie = self.send(READ, offset, count)
        end = _SIMPLE.size + count
        try:
            # Only this reply can arrive: ask for all of it; an error is the header alone.
            got = self.sock.recv_into(buf[:end])
        except OSError as e:
            raise self._gone(f"recv: {e.strerror or e}") from None
        if got == 0:
            raise self._gone("the server closed the connection")
        if got < _SIMPLE.size:
            self.recv_into(buf[:_SIMPLE.size], got)
            got = _SIMPLE.size
        self._hdr[:_SIMPLE.size] = buf[:_SIMPLE.size]
        err = self._simple(cookie)
        if err:
            if got > _SIMPLE.size:
                raise self._gone("the server sent data with an error reply")
            raise CommandError(err)
        self.recv_into(buf[:end], got)

    def pread_into(self, data: memoryview, offset: int, flags: int = 0) -> None:
        self.reply(self.send(READ, offset, data.nbytes, flags), data, offset)

    def pwrite(self, data: Any, offset: int, flags: int = 0) -> None:
        n = memoryview(data).nbytes
        self.reply(self.send(WRITE, offset, n, flags, data))

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self.reply(self.send(WRITE_ZEROES, offset, count, flags))

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self.reply(self.send(TRIM, offset, count, flags))

    def flush(self) -> None:
        self.reply(self.send(FLUSH, 0, 0))

    def block_status(self, count: int, offset: int,
                     flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        self.reply(self.send(BLOCK_STATUS, offset, count, flags), contexts=out)
        return out

    def close(self) -> None:
        """Send NBD_CMD_DISC (if the connection still works) and close."""
        if self.failure is None:
            try:
                self.send(DISC, 0, 0)
                self.sock.shutdown(socket.SHUT_WR)
            except (OSError, ServerGone):
                pass
        self.sock.close()

    def abort(self) -> None:
        """Close at once: a thread blocked on this connection returns with an error."""
        self._gone("the connection was aborted")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
