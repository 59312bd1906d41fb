"""An NBD connection driven in blocking system calls, one command at a time.

For workers that each own a connection in a thread or process of their own (``pynbd fuse``'s
worker processes, ``pynbd copy``'s threads): a command is one ``send`` and a reply received
straight into the caller's buffer, with no event loop in between. :meth:`BlockingConnection.
connect` negotiates in blocking calls with the engine's own negotiation
(:mod:`pynbd.client.negotiate`), without importing asyncio; a connection negotiated by
:class:`pynbd.client.AsyncClient` can also be handed over (:meth:`~BlockingConnection.
take_over`). Simple and structured replies are understood; extended headers are not.

Failures: a command the server refuses raises :class:`pynbd.errors.CommandError` (with the
errno); a broken connection or a protocol violation raises :class:`ServerGone`, and every
later command raises it too.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from pynbd.client.negotiate import Negotiation, drive, uri_target
from pynbd.errors import CommandError
from pynbd.protocol.constants import (
    CONTEXT_BASE_ALLOCATION,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    nbd_to_errno,
)

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

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
_ERROR_OFFSET = _ERROR_BIT | 2
#: The largest structured chunk that is not data (error messages, block status).
_MAX_META_CHUNK = 64 << 20


class ServerGone(ConnectionError):
    """The connection broke, or the server broke the protocol."""


class _Reply:
    """What is known of one request's reply while it comes in."""

    __slots__ = ("cmd", "contexts", "count", "covered", "data", "error", "message", "offset")

    def __init__(self, cmd: int, offset: int, count: int) -> None:
        self.cmd = cmd
        self.offset = offset
        self.count = count
        self.data: memoryview | None = None
        self.contexts: dict[str, list[tuple[int, int]]] | None = None
        self.error = 0
        self.message = ""
        #: (start, end) of what a structured read's chunks have answered, relative to offset
        self.covered: list[tuple[int, int]] = []


class _SocketStream:
    """What :class:`~pynbd.client.negotiate.Negotiation` reads and writes through, on a
    blocking socket: ``read_some`` returns at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def read_some(self, n: int = 65536) -> bytes:
        try:
            return self.sock.recv(n)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    def write(self, bufs: list[Any]) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in bufs))


class BlockingConnection(Negotiation):
    """One NBD connection on a blocking socket (see the module's documentation): made by
    :meth:`connect`, or taken over from a negotiated AsyncClient (:meth:`take_over`). The
    export's properties (``size``, ``can_zero()``, ``block_size()``...) are the engine's."""

    def __init__(self, sock: socket.socket) -> None:
        self._init_negotiation()
        sock.setblocking(True)
        self.sock = sock
        self.stream = _SocketStream(sock)
        self.cookie = 0
        self.failure: ServerGone | None = None
        #: cookie -> reply still coming; and replies complete but not yet collected
        self._open: dict[int, _Reply] = {}
        self._done: dict[int, _Reply] = {}
        self._hdr = bytearray(_CHUNK.size)
        self._hview = memoryview(self._hdr)

    @classmethod
    def connect(cls, uri: str | None = None, *, unix: str | None = None,
                host: str | None = None, port: int = 10809,
                vsock: tuple[int, int] | None = None, export_name: str = "",
                meta_contexts: Sequence[str] = (CONTEXT_BASE_ALLOCATION,),
                structured: bool = True) -> BlockingConnection:
        """Connect and negotiate in blocking calls (as
        :meth:`pynbd.client.AsyncClient.connect`, for a URI or a Unix, TCP or vsock
        address; never extended headers)."""
        if uri is not None:
            t = uri_target(uri)
            export_name = t["export_name"]
            unix, vsock = t.get("unix"), t.get("vsock")
            host, port = t.get("host"), t.get("port", port)
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = unix
        elif vsock is not None:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            target = vsock
        elif host is not None:
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = None
        else:
            raise ValueError("nothing to connect to: give a URI, unix=, host= or vsock=")
        try:
            if target is not None:
                sock.connect(target)
            c = cls(sock)
            c.request_structured = structured
            c._meta_requested = list(meta_contexts)
            drive(c._handshake(export_name))
        except BaseException:
            sock.close()
            raise
        return c

    @classmethod
    def take_over(cls, client: Any) -> BlockingConnection:
        """Detach a negotiated :class:`~pynbd.client.AsyncClient` and go on with its
        connection here."""
        if client.extended:
            raise ValueError("a blocking connection does not speak extended headers")
        hs, export, protocol = client.hs, client.export, client.protocol
        structured, contexts = client.structured, dict(client.meta_contexts)
        c = cls(client.detach())
        c.hs, c.export, c.protocol = hs, export, protocol
        c.structured, c.meta_contexts = structured, contexts
        c.connected = True
        return c

    # -- sending and receiving
    def send(self, cmd: int, offset: int, count: int, flags: int = 0,
             payload: Any = None, into: memoryview | None = None,
             track: bool = True) -> int:
        """Send one request (and its payload); returns its cookie. A read's data will be
        received ``into`` the given buffer (``count`` bytes) when its reply comes. Several
        requests may be outstanding; :meth:`reply` and :meth:`next_reply` collect them
        (``track=False``: the caller receives the reply itself)."""
        if self.failure is not None:
            raise self.failure
        self.cookie += 1
        if track:
            r = _Reply(cmd, offset, count)
            r.data = into
            self._open[self.cookie] = r
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

    def reply(self, cookie: int, data: memoryview | None = None, offset: int = 0,
              contexts: dict[str, list[tuple[int, int]]] | None = None) -> None:
        """Wait for the whole reply to ``cookie`` (other replies that complete meanwhile
        are kept for later): read data into ``data`` (the request was at ``offset``), block
        status into ``contexts``. Raises CommandError for an error."""
        r = self._open.get(cookie)
        if r is not None:
            if data is not None:
                r.data = data
            if contexts is not None:
                r.contexts = contexts
        while cookie not in self._done:
            self._step()
        self._raise(self._done.pop(cookie))

    def next_reply(self) -> int:
        """Wait for any outstanding request to be answered and return its cookie; then
        :meth:`outcome` tells how it went."""
        while not self._done:
            if not self._open:
                raise RuntimeError("no request is outstanding")
            self._step()
        return next(iter(self._done))

    def outcome(self, cookie: int) -> None:
        """Collect a reply :meth:`next_reply` returned: CommandError if it failed."""
        self._raise(self._done.pop(cookie))

    @staticmethod
    def _raise(r: _Reply) -> None:
        if r.error:
            raise CommandError(r.error, r.message)

    def _step(self) -> None:
        """Receive one simple reply, or one structured chunk, and file it."""
        hv = self._hview
        self.recv_into(hv[:_SIMPLE.size])  # a simple reply's header, or most of a chunk's
        (magic,) = struct.unpack_from(">I", self._hdr, 0)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = _SIMPLE.unpack_from(self._hdr, 0)
            r = self._open.pop(cookie, None)
            if r is None:
                raise self._gone("the server sent a reply that does not match a request")
            if error:
                r.error = nbd_to_errno(error) or 5
            elif r.cmd == READ:
                if self.structured:
                    raise self._gone("the server sent a simple reply to a structured read")
                if r.data is None:
                    raise self._gone("a simple reply to a read with nowhere to put it")
                self.recv_into(r.data[:r.count])
            self._done[cookie] = r
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._gone(f"the server sent a bad reply magic {magic:#x}")
        self.recv_into(hv, _SIMPLE.size)
        _, flags, rtype, cookie, length = _CHUNK.unpack_from(self._hdr, 0)
        r = self._open.get(cookie)
        if r is None:
            raise self._gone("the server sent a reply that does not match a request")
        data = r.data
        if rtype == _OFFSET_DATA and data is not None and length > 8:
            off = self._u64() - r.offset
            n = length - 8
            if off < 0 or off + n > data.nbytes:
                raise self._gone("the server sent data outside the request")
            self.recv_into(data[off:off + n])
            r.covered.append((off, off + n))
        elif length > _MAX_META_CHUNK:
            raise self._gone("the server sent a chunk that is too large")
        else:
            body = bytearray(length)
            self.recv_into(memoryview(body))
            if rtype == _NONE:
                if length or not flags & _FLAG_DONE:
                    raise self._gone("the server sent a NONE chunk that is not a bare end")
            elif rtype == _OFFSET_HOLE and data is not None and length == 12:
                hoff, hlen = _HOLE.unpack_from(body, 0)
                off = hoff - r.offset
                if hlen == 0 or off < 0 or off + hlen > data.nbytes:
                    raise self._gone("the server sent a hole outside the request")
                data[off:off + hlen] = bytes(hlen)
                r.covered.append((off, off + hlen))
            elif rtype == _BLOCK_STATUS and r.contexts is not None and length >= 4:
                (ctx,) = struct.unpack_from(">I", body, 0)
                entries = [struct.unpack_from(">II", body, i) for i in range(4, length - 7, 8)]
                name = self.meta_contexts.get(ctx)
                if name is not None:
                    r.contexts[name] = entries
            elif rtype & _ERROR_BIT:
                if length < 6:
                    raise self._gone("the server sent a short error chunk")
                err, mlen = _ERR.unpack_from(body, 0)
                if rtype == _ERROR_OFFSET:
                    if length != 6 + mlen + 8:
                        raise self._gone("the server sent a malformed error chunk")
                    (eoff,) = _U64.unpack_from(body, 6 + mlen)
                    if not r.offset <= eoff < r.offset + r.count:
                        raise self._gone("the server sent an error outside the request")
                r.error = r.error or nbd_to_errno(err) or 5
                r.message = r.message or bytes(body[6:6 + mlen]).decode("utf-8", "replace")
            else:
                raise self._gone(f"the server sent an unexpected chunk type {rtype}")
        if flags & _FLAG_DONE:
            if r.cmd == READ and not r.error:
                self._check_covered(r)
            self._done[cookie] = self._open.pop(cookie)

    def _check_covered(self, r: _Reply) -> None:
        """A successful structured read: its chunks answer every byte once."""
        pos = 0
        for start, end in sorted(r.covered):
            if start != pos:
                raise self._gone("the server's reply to a read overlaps or leaves a gap")
            pos = end
        if pos != r.count:
            raise self._gone("the server's reply to a read does not cover it")

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
        if self._open or self._done:
            raise RuntimeError("pread_simple needs no other request outstanding")
        cookie = self.send(READ, offset, count, track=False)  # its reply is received here
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
        magic, error, c = _SIMPLE.unpack_from(buf, 0)
        if magic != SIMPLE_REPLY_MAGIC or c != cookie:
            raise self._gone("the server sent a reply that does not match the request")
        if error:
            if got > _SIMPLE.size:
                raise self._gone("the server sent data with an error reply")
            raise CommandError(nbd_to_errno(error) or 5)
        if got < end:
            self.recv_into(buf[:end], got)

    def pread_into(self, data: memoryview, offset: int, flags: int = 0) -> None:
        self.reply(self.send(READ, offset, data.nbytes, flags, into=data))

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

    def detach(self) -> socket.socket:
        """Hand the connection over (nothing is in flight between commands): return the
        socket; this object is closed, without NBD_CMD_DISC."""
        if self.closed or self.failure is not None:
            raise RuntimeError("only a working connection can be detached")
        self.closed = True
        self.connected = False
        return self.sock

    def close(self) -> None:
        """Send NBD_CMD_DISC (if the connection still works) and close."""
        if self.closed:
            return
        self.closed = True
        self.connected = False
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
        self.closed = True
        self.connected = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
