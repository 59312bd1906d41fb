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

from pynbd.client.negotiate import Negotiation, drive, uri_target
from pynbd.errors import CommandError, RemoteProtocolError
from pynbd.protocol.constants import CONTEXT_BASE_ALLOCATION, SIMPLE_REPLY
from pynbd.protocol.replies import Pending, ReplyDecoder
from pynbd.protocol.transmission import build_request

_SSL_ERROR_EOF = 8  # ssl.SSL_ERROR_EOF (ssl is not imported for plain connections)

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["BlockingConnection", "ServerGone"]

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7

_SIMPLE_SIZE = SIMPLE_REPLY.size
#: The receive buffer's size between replies (it grows for a large chunk, then shrinks back).
_RBUF = 4096


class ServerGone(ConnectionError):
    """The connection broke, or the server broke the protocol."""


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
        #: THE reply decoder (pynbd.protocol.replies); replies complete but not yet
        #: collected wait in _done
        self._dec = ReplyDecoder(self._on_done)
        self._done: dict[int, Pending] = {}
        # What the decoder still needs of a reply: nothing more is ever received (the
        # connection may be handed over between commands).
        self._rbuf = bytearray(_RBUF)
        self._rview = memoryview(self._rbuf)
        self._rend = 0

    @classmethod
    def connect(cls, uri: str | None = None, *, unix: str | None = None,
                host: str | None = None, port: int = 10809,
                vsock: tuple[int, int] | None = None, sock: socket.socket | None = None,
                export_name: str = "",
                meta_contexts: Sequence[str] = (CONTEXT_BASE_ALLOCATION,),
                structured: bool = True, tls: Any = None) -> BlockingConnection:
        """Connect and negotiate in blocking calls (as
        :meth:`pynbd.client.AsyncClient.connect`, for a URI, a Unix, TCP or vsock address
        or a connected socket, ``sock``, which it then owns; never extended headers).
        ``tls``: a :class:`pynbd.client.tls.TLSConfig` (an ``nbds://`` URI brings its own)."""
        if uri is not None:
            t = uri_target(uri)
            export_name = t["export_name"]
            unix, vsock = t.get("unix"), t.get("vsock")
            host, port = t.get("host"), t.get("port", port)
            tls = t["tls"] or tls
        tls_host = host if sock is None and unix is None and vsock is None else None
        target: Any = None
        c = None
        if sock is not None:
            pass
        elif unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = unix
        elif vsock is not None:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            target = vsock
        elif host is not None:
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            raise ValueError("nothing to connect to: give a URI, unix=, host=, vsock= or sock=")
        try:
            if target is not None:
                sock.connect(target)
            c = cls(sock)
            c.tls, c.tls_host = tls, tls_host
            c.request_structured = structured
            c._meta_requested = list(meta_contexts)
            drive(c._handshake(export_name))
        except BaseException:
            sock.close()
            if c is not None:
                c.sock.close()
            raise
        return c

    async def _start_tls(self) -> None:
        """After NBD_OPT_STARTTLS: the TLS handshake (blocking), then on over TLS."""
        from pynbd.client.tls import blocking_handshake, wrap

        ssock, peer = wrap(self.sock, self.tls, self.tls_host)
        self.sock = ssock
        self.stream = _SocketStream(ssock)
        blocking_handshake(ssock, peer)

    @classmethod
    def take_over(cls, client: Any) -> BlockingConnection:
        """Detach a negotiated :class:`~pynbd.client.AsyncClient` and go on with its
        connection here."""
        if client.extended:
            raise ValueError("a blocking connection does not speak extended headers")
        hs, export, protocol = client.hs, client.export, client.protocol
        structured, contexts = client.structured, dict(client.meta_contexts)
        tls, negotiated = client.tls, client.tls_negotiated
        c = cls(client.detach())
        c.tls, c.tls_negotiated = tls, negotiated
        c.hs, c.export, c.protocol = hs, export, protocol
        c.structured, c.meta_contexts = structured, contexts
        c._enter_transmission()
        return c

    def _enter_transmission(self) -> None:
        super()._enter_transmission()
        dec = self._dec
        dec.structured = self.structured or self.extended
        dec.extended = self.extended
        dec.contexts = dict(self.meta_contexts)

    # -- sending and receiving
    def send(self, cmd: int, offset: int, count: int, flags: int = 0,
             payload: Any = None, into: memoryview | None = None) -> int:
        """Send one request (and its payload); returns its cookie. A read's data will be
        received ``into`` the given buffer (``count`` bytes) when its reply comes. Several
        requests may be outstanding; :meth:`reply` and :meth:`next_reply` collect them."""
        if self.failure is not None:
            raise self.failure
        self.cookie += 1
        if cmd != DISC:
            self._dec.expect(Pending(self.cookie, cmd, offset, count, flags, into))
        hdr = build_request(cmd, self.cookie, offset, count, flags)
        try:
            if payload is None:
                self.sock.sendall(hdr)
            elif self.tls_negotiated:  # an SSL socket has no sendmsg
                mv = memoryview(payload).cast("B")
                first = 16384 - len(hdr)  # the header and the payload's start: one record
                self.sock.sendall(hdr + mv[:first].tobytes())
                if mv.nbytes > first:
                    self.sock.sendall(mv[first:])
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
        # over TLS, the C method itself: ssl.py's recv_into adds four Python calls per
        # 16 KiB record (and the interpreter lock is held meanwhile, which the other
        # connections' threads wait for)
        sslobj = getattr(self.sock, "_sslobj", None)
        recv: Any = self.sock.recv_into if sslobj is None else sslobj.read
        try:
            while got < want:
                n = recv(view[got:]) if sslobj is None else recv(want - got, view[got:])
                if n == 0:
                    raise self._gone("the server closed the connection")
                got += n
        except ServerGone:
            raise
        except OSError as e:
            if sslobj is not None and e.args and e.args[0] == _SSL_ERROR_EOF:
                # no close_notify: what ssl.py's recv_into reports as 0 bytes
                raise self._gone("the server closed the connection") from None
            raise self._gone(f"recv: {e.strerror or e}") from None

    def _gone(self, why: str) -> ServerGone:
        if self.failure is None:
            self.failure = ServerGone(why)
        return self.failure

    def _on_done(self, p: Pending) -> None:
        self._done[p.cookie] = p

    def reply(self, cookie: int, data: memoryview | None = None, offset: int = 0,
              contexts: dict[str, list[tuple[int, int]]] | None = None) -> None:
        """Wait for the whole reply to ``cookie`` (other replies that complete meanwhile
        are kept for later): read data into ``data`` (when :meth:`send` was not given a
        buffer), block status into ``contexts``. Raises CommandError for an error."""
        p = self._dec.pending.get(cookie)
        if p is not None and data is not None:
            p.dest = data
        while cookie not in self._done:
            self._step()
        p = self._done.pop(cookie)
        if contexts is not None and p.result:
            contexts.update(p.result)
        self._raise(p)

    def next_reply(self) -> int:
        """Wait for any outstanding request to be answered and return its cookie; then
        :meth:`outcome` tells how it went."""
        while not self._done:
            if not self._dec.pending:
                raise RuntimeError("no request is outstanding")
            self._step()
        return next(iter(self._done))

    def outcome(self, cookie: int) -> None:
        """Collect a reply :meth:`next_reply` returned: CommandError if it failed."""
        self._raise(self._done.pop(cookie))

    @staticmethod
    def _raise(p: Pending) -> None:
        if p.error:
            raise CommandError(p.error, p.message)

    def _step(self) -> None:
        """Receive what the decoder needs next, exactly (a reply header, a chunk, read data
        straight into its buffer), and let it decode that."""
        if self.failure is not None:
            raise self.failure
        dec = self._dec
        try:
            sink = dec.sink
            if sink is not None:
                self.recv_into(sink)
                dec.sink_filled()
                return
            need = dec.need
            if need > len(self._rbuf):
                grown = bytearray(need)
                grown[:self._rend] = self._rbuf[:self._rend]
                self._rbuf, self._rview = grown, memoryview(grown)
            self.recv_into(self._rview[:need], self._rend)
            self._rend = need
            pos = dec.feed(self._rview, 0, need)
            if pos == need or dec.sink is not None:
                self._rend = 0
                if len(self._rbuf) > _RBUF:
                    self._rbuf = bytearray(_RBUF)
                    self._rview = memoryview(self._rbuf)
            elif pos:  # a whole reply decoded and part of the next one received: never
                raise self._gone("internal error: the reply decoder left bytes behind")
        except RemoteProtocolError as e:
            raise self._gone(str(e)) from None

    # -- commands
    def pread_simple(self, buf: memoryview, offset: int, count: int) -> None:
        """Read ``count`` bytes at ``offset`` into ``buf[16:16 + count]``, in one receive
        with the 16-byte simple reply header, which lands in ``buf[:16]`` (where a caller
        can put a header of its own and send the whole). Simple replies only."""
        if self.structured:
            raise ValueError("pread_simple needs simple replies")
        if self.failure is not None:
            raise self.failure
        dec = self._dec
        if dec.pending or self._done:
            raise RuntimeError("pread_simple needs no other request outstanding")
        end = _SIMPLE_SIZE + count
        cookie = self.send(READ, offset, count, into=buf[_SIMPLE_SIZE:end])
        try:
            # Only this reply can arrive: ask for all of it; an error is the header alone.
            got = self.sock.recv_into(buf[:end])
        except OSError as e:
            raise self._gone(f"recv: {e.strerror or e}") from None
        if got == 0:
            raise self._gone("the server closed the connection")
        if got < _SIMPLE_SIZE:
            self.recv_into(buf[:_SIMPLE_SIZE], got)
            got = _SIMPLE_SIZE
        try:
            dec.feed(buf, 0, _SIMPLE_SIZE)  # the header; the data is where it belongs
            if dec.sink is not None:  # success: the rest of the data, then the end
                if got < end:
                    self.recv_into(buf[:end], got)
                dec.sink_filled()
            elif cookie not in self._done:
                raise RemoteProtocolError("not a reply to the read")
        except RemoteProtocolError as e:
            raise self._gone(str(e)) from None
        p = self._done.pop(cookie)
        if p.error and got > _SIMPLE_SIZE:
            raise self._gone("the server sent data with an error reply")
        self._raise(p)

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
