"""The asyncio NBD client engine: the one implementation behind every client face.

Many requests in flight (cookie -> pending command, one reader), replies in any order,
structured-reply reassembly straight into the caller's buffer (data is received into the
destination without an intermediate copy when it is not already buffered), caps on requests
and bytes in flight, strict checks before the wire.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import errno as E
import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Self

from pynbd.client.negotiate import ExportInfo, Negotiation, uri_target
from pynbd.client.reader import RECV_BUF, ReplyReader
from pynbd.client.strict import (
    CMD_FLAGS,
    STRICT_ALIGN,
    STRICT_ALL,
    STRICT_BOUNDS,
    STRICT_COMMANDS,
    STRICT_FLAGS,
    STRICT_PAYLOAD,
    STRICT_ZERO_SIZE,
    StrictRules,
)
from pynbd.errors import (
    CommandError,
    LocalProtocolError,
    ProtocolError,
)
from pynbd.protocol.client import (
    CState,
)
from pynbd.protocol.constants import (
    CONTEXT_BASE_ALLOCATION,
    Cmd,
    Opt,
)
from pynbd.protocol.replies import Pending, ReplyDecoder
from pynbd.protocol.transmission import build_request
from pynbd.stream import FdStream

__all__ = [
    "STRICT_ALIGN",
    "STRICT_ALL",
    "STRICT_BOUNDS",
    "STRICT_COMMANDS",
    "STRICT_FLAGS",
    "STRICT_PAYLOAD",
    "STRICT_ZERO_SIZE",
    "AsyncClient",
    "ChunkCallback",
    "ExportInfo",
    "PendingCommand",
]

# Plain ints on the hot path (enum operators are Python functions).
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_BS = int(Cmd.BLOCK_STATUS)
#: Requests in flight per connection before new ones wait.
DEFAULT_MAX_IN_FLIGHT = 64
#: Payload bytes in flight per connection before new requests wait.
DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
#: Seconds a command= server may take to exit after we hang up before it gets SIGTERM.
PROC_EXIT_GRACE = 2.0
#: Seconds a server we started may take to exit after SIGTERM before it gets SIGKILL.
PROC_TERM_WAIT = 5.0
#: Seconds close() waits for NBD_CMD_DISC to be written to a server that stopped reading.
CLOSE_DRAIN_TIMEOUT = 5.0

#: chunk(data: memoryview, offset: int, status: int, error: int) -> None; status 1=data 2=hole
ChunkCallback = Callable[[memoryview, int, int, int], Any]


_STOCK_CREATE_FUTURE = asyncio.base_events.BaseEventLoop.create_future


def _wake_fut(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Pending(Pending):
    """A command awaiting its reply: the decoder's record, with the future its caller
    awaits (or, for :meth:`AsyncClient.submit`, the function called when it is done) and
    the payload bytes it counts against :attr:`AsyncClient.max_bytes_in_flight`."""

    __slots__ = ("done", "failure", "fut", "nbytes")

    def __init__(self, cookie: int, cmd: int, offset: int, length: int, flags: int,
                 dest: memoryview | None, chunk_cb: ChunkCallback | None,
                 fut: asyncio.Future[Any] | None, nbytes: int,
                 done: Callable[[Pending], Any] | None = None) -> None:
        # hot path: the decoder's record set here at once (Pending.__init__, without a call)
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.flags = flags
        self.dest = dest
        self.chunk_cb = chunk_cb
        self.error = 0
        self.message = ""
        self.covered = None
        self.extents = None
        self.result = None
        self.fut = fut
        self.nbytes = nbytes
        self.done = done
        self.failure: BaseException | None = None


#: The engine's record of a command in flight (for :meth:`AsyncClient.queue`).
PendingCommand = _Pending


class _ReadStats:
    """What the reader counts: the bytes received in transmission."""

    __slots__ = ("bytes_received",)

    def __init__(self) -> None:
        self.bytes_received = 0


class AsyncClient(ReplyReader, Negotiation):
    """An NBD client connection. Create with :meth:`connect` (or the connect_* helpers)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stream: FdStream | None = None
        self._owner: Any = None
        self._proc: Any = None
        self._init_negotiation()
        self.strict: bool | int = True
        #: What strict mode checks for this export (pynbd.client.strict), once connected.
        self._rules: StrictRules | None = None
        self.failure: BaseException | None = None
        #: Seconds a command may wait for its reply (None: forever). When one times out the
        #: connection is failed: every pending command gets a TimeoutError.
        self.request_timeout: float | None = None
        self._proc_grace = 0.0  # seconds a started server may take to exit by itself
        # transmission: THE reply decoder (pynbd.protocol.replies); its ``pending`` maps
        # cookie -> _Pending for every command in flight
        self._dec = ReplyDecoder(self._finish)
        self._pending: dict[int, Any] = self._dec.pending
        self._next_cookie = 1
        self.max_in_flight = DEFAULT_MAX_IN_FLIGHT
        self.max_bytes_in_flight = DEFAULT_MAX_BYTES_IN_FLIGHT
        self._bytes_in_flight = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._buf = bytearray(RECV_BUF)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._sink_got = 0  # bytes of the decoder's sink already received
        self._rstats: Any = _ReadStats()
        self._out: list[Any] = []
        self._out_plain = True  # _out holds request headers only (no write payload)
        self._flush_scheduled = False
        self._flush_due = False  # a caller was woken: write what it queues in its turn
        self._new_future: Callable[[], asyncio.Future[Any]] = self._no_loop

    # ==================================================================================
    # connecting
    @classmethod
    async def connect(cls, uri: str | None = None, *, unix: str | None = None,
                      host: str | None = None, port: int = 10809,
                      vsock: tuple[int, int] | None = None, sock: socket.socket | None = None,
                      command: Sequence[str] | None = None,
                      socket_activation: Sequence[str] | None = None,
                      export_name: str = "", opt_mode: bool = False,
                      meta_contexts: Sequence[str] = (CONTEXT_BASE_ALLOCATION,),
                      structured: bool = True, extended: bool = False,
                      timeout: float | None = None, strict: bool | int = True,
                      request_timeout: float | None = None, tls: Any = None) -> AsyncClient:
        """Connect and negotiate. ``timeout`` bounds connecting and the whole handshake
        (TimeoutError); ``request_timeout`` sets :attr:`request_timeout`. ``strict`` is True
        (every check), False (none) or a mask of the ``STRICT_*`` bits (libnbd's values).
        ``tls``: a :class:`pynbd.client.tls.TLSConfig` (an ``nbds://`` URI brings its own)."""
        c = cls()
        c.tls = tls
        c.strict = strict
        c.request_timeout = request_timeout
        c.request_structured = structured
        c.request_extended = extended
        c._meta_requested = list(meta_contexts)
        c.opt_mode = opt_mode
        coro = c._connect(uri, unix, host, port, vsock, sock, command, socket_activation,
                          export_name)
        try:
            if timeout is not None:
                try:
                    await asyncio.wait_for(coro, timeout)
                except TimeoutError:
                    raise TimeoutError(
                        f"timed out after {timeout} s connecting to the NBD server") from None
            else:
                await coro
        except Exception:
            await c._aabandon()
            raise
        except BaseException:
            c._abandon()
            raise
        return c

    async def _connect(self, uri: str | None, unix: str | None, host: str | None, port: int,
                       vsock: tuple[int, int] | None, sock: socket.socket | None,
                       command: Sequence[str] | None, socket_activation: Sequence[str] | None,
                       export_name: str) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        if uri is not None:
            t = uri_target(uri)
            export_name = t["export_name"]
            unix, vsock = t.get("unix"), t.get("vsock")
            host, port = t.get("host"), t.get("port", port)
            if t["tls"] is not None:
                self.tls = t["tls"]
        self.tls_host = host if sock is None and unix is None and vsock is None else None
        if sock is None:
            if unix is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, unix)
                except BaseException:
                    sock.close()
                    raise
            elif vsock is not None:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, vsock)
                except BaseException:
                    sock.close()
                    raise
            elif command is not None:
                sock = self._start_command(list(command))
            elif socket_activation is not None:
                sock = await self._start_activation(list(socket_activation))
            elif host is not None:
                _r, w = await asyncio.open_connection(host, port)
                s = w.get_extra_info("socket")
                sock = socket.socket(fileno=os.dup(s.fileno()))
                w.transport.abort()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                raise ValueError("nothing to connect to: give a URI, unix=, host=, vsock=, "
                                 "sock=, command= or socket_activation=")
        sock.setblocking(False)
        self._owner = sock
        self.stream = FdStream(loop, sock.fileno(), owner=sock)
        await self._handshake(export_name)

    async def _start_tls(self) -> None:
        """After NBD_OPT_STARTTLS: the TLS handshake, then a TLS stream (client/tls.py)."""
        from pynbd.client.tls import handshake, wrap

        assert self.stream is not None
        self._owner = sock = self.stream.detach()
        self.stream = None
        ssock, peer = wrap(sock, self.tls, self.tls_host)
        self._owner = ssock
        await handshake(ssock, self._wait_fd, peer)
        self.stream = self._tls_stream(ssock)

    def _tls_stream(self, ssock: Any) -> Any:
        from pynbd.client.tls_stream import TlsStream

        return TlsStream(self.loop, ssock)

    async def _wait_fd(self, fd: int, events: int) -> None:
        loop = self.loop
        assert loop is not None
        fut = loop.create_future()
        add, remove = ((loop.add_reader, loop.remove_reader) if events & 1
                       else (loop.add_writer, loop.remove_writer))
        add(fd, _wake_fut, fut)
        try:
            await fut
        finally:
            remove(fd)

    def _start_command(self, argv: list[str]) -> socket.socket:
        from pynbd.client.spawn import start_command

        mine, theirs = socket.socketpair()
        try:
            self._proc = start_command(argv, theirs)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        # A server on a socket pair exits when we hang up: give it time before SIGTERM.
        self._proc_grace = PROC_EXIT_GRACE
        return mine

    async def _start_activation(self, argv: list[str]) -> socket.socket:
        """systemd socket activation: the server gets a listening Unix socket as fd 3
        (LISTEN_PID, LISTEN_FDS=1) and the client connects to it at once. This end keeps the
        listener open until connected, so a server that cannot start or exits early resets
        the connection instead of leaving it to a race."""
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="pynbd-sa-")
        path = os.path.join(d, "sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ls.bind(path)
            ls.listen(socket.SOMAXCONN)
            self._spawn_activated(argv, ls)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                assert self.loop is not None
                await self.loop.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        finally:
            ls.close()
            shutil.rmtree(d, ignore_errors=True)
        return sock

    def _spawn_activated(self, argv: list[str], ls: socket.socket) -> None:
        """Start the server of :meth:`_start_activation` with ``ls`` as its fd 3."""
        from pynbd.client.spawn import start_activated

        self._proc = start_activated(argv, ls)

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
        elif self._owner is not None:
            self._owner.close()

    @classmethod
    def adopt(cls, conn: Any) -> AsyncClient:
        """Go on, on the running event loop, with a connection negotiated in blocking calls
        (a :class:`pynbd.client.blocking.BlockingConnection`, which is closed afterwards
        without NBD_CMD_DISC): the same NBD session, its export and options as negotiated."""
        c = cls()
        c.loop = asyncio.get_running_loop()
        c.hs, c.export, c.protocol = conn.hs, conn.export, conn.protocol
        c.structured, c.extended = conn.structured, conn.extended
        c.meta_contexts = dict(conn.meta_contexts)
        c.tls, c.tls_negotiated = conn.tls, conn.tls_negotiated
        sock = conn.detach()
        sock.setblocking(False)
        c._owner = sock
        if conn.tls_negotiated:
            from pynbd.client.tls_stream import TlsStream

            c.stream = TlsStream(c.loop, sock)  # type: ignore[assignment]
        else:
            c.stream = FdStream(c.loop, sock.fileno(), owner=sock)
        c._enter_transmission()
        return c

    def detach(self) -> socket.socket:
        """Hand the negotiated connection over: return its socket (blocking) for the caller to
        go on with the same NBD session itself (simple or structured replies as negotiated;
        :attr:`export` and the ``can_*`` answers stay valid). Nothing may be in flight.
        This client is closed afterwards, without NBD_CMD_DISC."""
        st = self.stream
        if (self.closed or not self.connected or st is None or self._pending or st.pending
                or self._pos != self._end or not isinstance(st.owner, socket.socket)
                or self._proc is not None):
            raise RuntimeError("only an idle connection over a socket, to a server this "
                               "client did not start, can be detached")
        sock: socket.socket = st.detach()
        self.stream = None
        self._owner = None
        self.closed = True
        sock.setblocking(True)
        return sock

    @property
    def in_flight(self) -> int:
        """Commands sent (or queued to be sent) whose replies have not all arrived."""
        return len(self._pending)

    def send_now(self) -> None:
        """Write the requests queued so far now, rather than at the end of this event-loop
        iteration (where they go out together in one write). For callers that queue a batch
        and want it on the wire before they wait for anything."""
        if self._out and self._flush_scheduled:
            self._flush()

    def abort(self) -> None:
        """Drop the connection at once, without NBD_CMD_DISC: every pending command fails and
        a server started by ``command=``/``socket_activation=`` is killed. For giving up after
        a failure; :meth:`close` is the orderly way. Call it in the event loop's thread."""
        if not self.closed:
            self._shutdown(ConnectionError("the connection was aborted"))
        self._abandon()

    def _abandon(self) -> None:
        """Synchronous clean-up after a cancelled connect: close, kill the server at once."""
        self._close_stream()
        p, self._proc = self._proc, None
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.wait()

    async def _aabandon(self) -> None:
        self._close_stream()
        await self._reap()

    async def _reap(self) -> None:
        """Wait for a server we started: a grace period to exit by itself (a socket-pair
        server sees EOF), then SIGTERM, then SIGKILL. No thread: the exit is polled."""
        p = self._proc
        if p is None:
            return
        loop = asyncio.get_running_loop()

        async def wait(seconds: float) -> bool:
            deadline = loop.time() + seconds
            delay = 0.001
            while p.poll() is None and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            return p.poll() is not None

        try:
            if not await wait(self._proc_grace):
                p.terminate()
                await wait(PROC_TERM_WAIT)
        finally:
            self._proc = None
            if p.poll() is None:
                p.kill()
                p.wait()

    # ==================================================================================
    # negotiation (pynbd.client.negotiate.Negotiation), and what only the engine does
    async def opt_abort(self) -> None:
        try:
            await self._option(Opt.ABORT)
        except (ProtocolError, ConnectionError):
            pass
        await self.close()

    def _enter_transmission(self) -> None:
        super()._enter_transmission()
        assert self.stream is not None
        self._dec.structured = self.structured or self.extended
        self._dec.extended = self.extended
        self._dec.contexts = dict(self.meta_contexts)
        self._rules = StrictRules(self.export.eflags, self.export.size, self.export.block_size,
                                  self.structured or self.extended, bool(self.meta_contexts))
        self.stream.on_write_error = self._on_write_error
        self._use_stream(self.stream)
        loop = self.loop
        if loop is not None:
            # the stock loop's create_future, without its Python frame (hot path:
            # benchmarks/client_read.py); another loop's own futures otherwise
            self._new_future = (functools.partial(asyncio.Future, loop=loop)
                                if type(loop).create_future is _STOCK_CREATE_FUTURE
                                else loop.create_future)

    # ==================================================================================
    # commands
    def _no_loop(self) -> asyncio.Future[Any]:
        raise RuntimeError("the client has no event loop")

    def _strict_mask(self) -> int:
        st = self.strict
        if st is True:
            return STRICT_ALL
        if st is False or st is None:
            return 0
        return int(st)

    def _strict_check(self, cmd: int, offset: int, length: int, flags: int) -> None:
        if self.closed or self.failure is not None:
            raise ConnectionError("the connection is closed") from self.failure
        if not self.connected or self._rules is None:
            raise LocalProtocolError("not connected: finish negotiation with opt_go()")
        if not 0 <= flags <= 0xFFFF:
            raise CommandError(E.EINVAL, f"flags: invalid value for flag: 0x{flags:x}")
        if not 0 <= offset < 1 << 64 or not 0 <= length < 1 << (64 if self.extended else 32):
            raise CommandError(E.EINVAL, "offset or count out of range")
        st = self._strict_mask()
        if st:
            self._rules.check(cmd, offset, length, flags, CMD_FLAGS.get(cmd, 0), st)

    async def _submit(self, cmd: int, offset: int, length: int, flags: int = 0,
                      payload: Any = None, dest: memoryview | None = None,
                      chunk_cb: ChunkCallback | None = None) -> Any:
        self._strict_check(cmd, offset, length, flags)
        nbytes = length if cmd == _READ or cmd == _WRITE else 0
        if len(self._pending) >= self.max_in_flight or (
                self._bytes_in_flight + nbytes > self.max_bytes_in_flight and self._pending):
            await self._wait_slot(nbytes)
            if self.closed or self.failure is not None:
                # woken by a failure or close(): never queue onto a dead connection
                raise ConnectionError("the connection is closed") from self.failure
        assert self.loop is not None
        cookie = self._next_cookie
        self._next_cookie += 1
        fut = self.loop.create_future()
        p = _Pending(cookie, cmd, offset, length, flags, dest, chunk_cb, fut, nbytes)
        self._enqueue(p, payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        t = self.request_timeout
        if t is None:
            return await fut
        timer = self.loop.call_later(t, self._on_timeout, p, t)
        try:
            return await fut
        finally:
            timer.cancel()

    def _enqueue(self, p: _Pending, payload: Any) -> None:
        """Register ``p`` with the decoder and queue its request (and payload)."""
        self._pending[p.cookie] = p  # ReplyDecoder.expect, inlined
        self._bytes_in_flight += p.nbytes
        out = self._out
        out.append(build_request(p.cmd, p.cookie, p.offset, p.length, p.flags, self.extended,
                                 payload is not None))
        if payload is not None:
            out.append(payload)
            self._out_plain = False

    def submit(self, cmd: int, offset: int, length: int, flags: int = 0, payload: Any = None,
               dest: memoryview | None = None, chunk_cb: ChunkCallback | None = None,
               done: Callable[[Pending], Any] | None = None) -> int:
        """Queue a command at once, for a caller that drives the connection itself
        (:meth:`write_queued`, then the stream's reader when the socket is readable): no strict
        checks (the caller made them), no flow control, no future; ``done(p)`` runs when
        its reply is complete (``p.error``, ``p.message``, ``p.result``), or when the
        connection fails (``p.failure``, the exception). Returns the cookie."""
        if self.closed or self.failure is not None:
            raise ConnectionError("the connection is closed") from self.failure
        cookie = self._next_cookie
        self._next_cookie += 1
        nbytes = length if cmd == _READ or cmd == _WRITE else 0
        self._enqueue(_Pending(cookie, cmd, offset, length, flags, dest, chunk_cb, None, nbytes,
                               done), payload)
        return cookie

    def queue(self, p: _Pending, payload: Any = None) -> None:
        """:meth:`submit` for a caller that builds the record itself (a subclass of the
        engine's pending record with state of its own; ``fut`` None, ``done`` set), with the
        cookie it chose (unique among those in flight)."""
        if self.closed or self.failure is not None:
            raise ConnectionError("the connection is closed") from self.failure
        # hot path (pynbd.libnbd's aio calls): _enqueue, inlined
        self._pending[p.cookie] = p
        self._bytes_in_flight += p.nbytes
        out = self._out
        out.append(build_request(p.cmd, p.cookie, p.offset, p.length, p.flags, self.extended,
                                 payload is not None))
        if payload is not None:
            out.append(payload)
            self._out_plain = False

    def _on_timeout(self, p: _Pending, t: float) -> None:
        if p.fut is not None and not p.fut.done() and self._pending.get(p.cookie) is p:
            self._fail(TimeoutError(
                f"NBD command {p.cmd} (cookie {p.cookie:#x}) got no reply within {t} s; "
                "the connection was closed"))

    async def _wait_slot(self, nbytes: int) -> None:
        assert self.loop is not None
        while (len(self._pending) >= self.max_in_flight or (
                self._bytes_in_flight + nbytes > self.max_bytes_in_flight and self._pending)):
            if self.failure is not None or self.closed:
                raise ConnectionError("the connection is closed") from self.failure
            w = self.loop.create_future()
            self._waiters.append(w)
            try:
                await w
            except BaseException:
                # cancelled: hand a wake-up we may have been given on to the next waiter
                if w.done() and not w.cancelled():
                    self._wake_one()
                raise

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.pop(0)
            if not w.done():
                w.set_result(None)
                return

    def write_queued(self) -> None:
        """Write the requests queued (see :meth:`submit`)."""
        self._flush()

    def write_soon(self) -> None:
        """Write the requests queued (see :meth:`submit`) once this turn of the event loop
        is over: one write for every command queued meanwhile."""
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out and self.stream is not None:
            self._out = []
            if self._out_plain:
                # hot path: request headers only (reads...): one buffer, one iovec, and
                # no per-buffer queueing in the stream (benchmarks/client_read.py)
                self.stream.write_joined(out[0] if len(out) == 1 else b"".join(out), len(out))
            else:
                self.stream.write(out)
            self._out_plain = True

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        buf = bytearray(count)
        mv = memoryview(buf)
        fut = None if flags else self._read_now(mv, offset, None)
        if fut is None:
            await self._submit(_READ, offset, count, flags, dest=mv)
        else:
            await fut
        return buf

    async def pread_into(self, buf: Any, offset: int, flags: int = 0,
                         chunk_cb: ChunkCallback | None = None) -> None:
        if type(buf) is bytearray:  # bytes, writable: no cast, no check (hot path)
            mv = memoryview(buf)
        else:
            mv = memoryview(buf).cast("B")
            if mv.readonly:
                raise TypeError("pread_into needs a writable buffer")
        fut = None if flags else self._read_now(mv, offset, chunk_cb)
        if fut is None:
            await self._submit(_READ, offset, len(mv), flags, dest=mv, chunk_cb=chunk_cb)
        else:
            await fut

    def _read_now(self, mv: memoryview, offset: int,
                  chunk_cb: ChunkCallback | None) -> asyncio.Future[Any] | None:
        """A READ without flags queued at once, its future to await, when nothing stands
        in its way: every strict check passes (whatever the mask), a slot is free, no
        timeout; else None (and :meth:`_submit` does it all).
        hot path: the random job of benchmarks/client_read.py (one call, no coroutine)."""
        n = len(mv)
        r = self._rules
        pending = self._pending
        if (r is None or not r.read_ok(offset, n) or self.request_timeout is not None
                or not self.connected or self.closed or self.failure is not None
                or len(pending) >= self.max_in_flight
                or (self._bytes_in_flight + n > self.max_bytes_in_flight and pending)):
            return None
        cookie = self._next_cookie
        self._next_cookie = cookie + 1
        fut = self._new_future()
        pending[cookie] = _Pending(cookie, _READ, offset, n, 0, mv, chunk_cb, fut, n)
        self._bytes_in_flight += n
        self._out.append(build_request(_READ, cookie, offset, n, 0, self.extended))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)  # type: ignore[union-attr]
        return fut

    async def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        mv = memoryview(buf).cast("B")
        await self._submit(Cmd.WRITE, offset, len(mv), flags, payload=mv)

    async def flush(self, flags: int = 0) -> None:
        await self._submit(Cmd.FLUSH, 0, 0, flags)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        await self._submit(Cmd.TRIM, offset, count, flags)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        await self._submit(Cmd.WRITE_ZEROES, offset, count, flags)

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        await self._submit(Cmd.CACHE, offset, count, flags)

    async def block_status(self, count: int, offset: int,
                           flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        """Extents per selected context: {name: [(length, flags), ...]}."""
        res = await self._submit(Cmd.BLOCK_STATUS, offset, count, flags)
        return res  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Wait for in-flight commands, send NBD_CMD_DISC (NBD_OPT_ABORT while negotiating),
        close the connection and reap a server started by ``command=``/``socket_activation=``.
        Safe to call again, and after a failure."""
        if not self.closed:
            try:
                await self._goodbye()
            finally:
                self._shutdown(ConnectionError("the connection was closed"))
        await self._reap()

    async def _goodbye(self) -> None:
        stream = self.stream
        if stream is None or self.failure is not None:
            return
        if self.connected:
            pending = [p.fut for p in self._pending.values() if p.fut is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            if self.closed or self.failure is not None:
                return
            self._flush()
            stream.write([build_request(Cmd.DISC, self._next_cookie, 0, 0, 0, self.extended)])
        elif self.hs.state is CState.OPTIONS and self.hs.fixed_newstyle:
            stream.write([self.hs.option(Opt.ABORT)])  # the reply need not be read
        else:
            return
        try:
            await asyncio.wait_for(stream.drain(), CLOSE_DRAIN_TIMEOUT)
        except TimeoutError:
            pass

    def _shutdown(self, exc: BaseException) -> None:
        self.closed = True
        self.connected = False
        if self.stream is not None:
            self.stream.close()
        pending = list(self._pending.values())
        self._pending.clear()
        for p in pending:
            if p.fut is None:
                if p.done is not None:
                    p.failure = exc
                    p.done(p)
            elif not p.fut.done():
                p.fut.set_exception(exc)
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    def _fail(self, exc: BaseException) -> None:
        """A broken stream or protocol error: fail every pending command, never hang."""
        if self.failure is None:
            self.failure = exc
        self._shutdown(exc)

    def _on_write_error(self, e: OSError) -> None:
        self._fail(ConnectionError(f"write to the server failed: {e}"))

    def _finish(self, p: Any) -> None:
        """The decoder's ``on_done``: a command's reply is complete."""
        self._bytes_in_flight -= p.nbytes
        if self._waiters:
            self._wake_one()
        fut = p.fut
        if fut is None:
            p.done(p)
            return
        if fut.done():
            return
        if p.error:
            fut.set_exception(CommandError(p.error, p.message or os.strerror(p.error)))
        else:
            fut.set_result(p.result)
        # the reader writes what the woken callers queue in the turn they run (_flush_due)
        self._flush_due = True

    # ---- context manager -----------------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
