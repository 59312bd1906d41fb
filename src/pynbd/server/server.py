"""The server: listeners, connection tasks, shutdown.

Every connection is a task in one :class:`asyncio.TaskGroup`; closing the server stops the
listeners, lets in-flight requests finish, and leaves no task, thread or socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pynbd.limits import (
    DEFAULT_THREADS,
    HANDSHAKE_TIMEOUT,
    MAX_BYTES_IN_FLIGHT,
    MAX_CONNECTIONS,
    MAX_SERVER_BYTES_IN_FLIGHT,
)
from pynbd.plugin import ThreadModel
from pynbd.protocol.constants import HandshakeFlag
from pynbd.server.backend import Chain
from pynbd.server.budget import Budget
from pynbd.server.connection import Connection
from pynbd.server.contexts import ContextRegistry
from pynbd.server.stream import FdStream

log = logging.getLogger("pynbd.server")

__all__ = ["Server", "ServerConfig"]

#: Send buffer asked for on each connection: large reads leave in fewer system calls
#: (the kernel caps it at net.core.wmem_max).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Seconds a shutdown waits for in-flight requests before cancelling them.
SHUTDOWN_GRACE = 10.0
#: Seconds to stop accepting after accept() fails for lack of resources (EMFILE...): the
#: listener stays readable, so retrying at once would spin the loop at 100% CPU.
ACCEPT_BACKOFF = 0.1
_ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass
class ServerConfig:
    readonly: bool = False
    threads: int = DEFAULT_THREADS
    no_sr: bool = False
    oldstyle: bool = False
    handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    export_name: str = ""
    max_connections: int = MAX_CONNECTIONS
    #: SO_KEEPALIVE on TCP connections (--keepalive): dead peers are found eventually.
    keepalive: bool = False
    #: Offer no meta contexts (--no-mc, nbdkit >= 1.38); structured replies stay on.
    no_mc: bool = False
    #: Seconds a client may take to finish the handshake (--timeout).
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Bytes one connection may hold (replies not yet sent, requests in flight) before it
    #: stops reading requests until its client catches up.
    max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT
    #: The same for all connections together (the server's memory budget).
    max_server_bytes_in_flight: int = MAX_SERVER_BYTES_IN_FLIGHT
    #: --tls: "off", "on" or "require"; ``tls_context`` is the ssl.SSLContext STARTTLS
    #: uses (None: STARTTLS is refused; with "require" it is always set).
    tls: str = "off"
    tls_context: Any = None


class Server:
    def __init__(self, chain: Chain, config: ServerConfig | None = None) -> None:
        self.chain = chain
        self.config = config or ServerConfig()
        self.thread_model = chain.thread_model
        if self.config.threads <= 1 and self.thread_model == ThreadModel.PARALLEL:
            self.thread_model = ThreadModel.SERIALIZE_REQUESTS
        self.contexts = _NoContexts() if self.config.no_mc else ContextRegistry()
        self.all_requests_lock = threading.Lock()
        #: What all connections together hold (see pynbd.server.budget).
        self.budget = Budget(self.config.max_server_bytes_in_flight)
        self._conn_lock: asyncio.Lock | None = None
        self.closing = False
        self._stop: asyncio.Event | None = None
        self._next_id = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._transmitting: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- thread model: serialize_connections -------------------------------------------
    async def acquire_connection_lock(self) -> None:
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        await self._conn_lock.acquire()

    def release_connection_lock(self) -> None:
        if self._conn_lock is not None and self._conn_lock.locked():
            self._conn_lock.release()

    def register_transmission(self, c: Connection) -> None:
        self._transmitting.add(c)

    def unregister_transmission(self, c: Connection) -> None:
        self._transmitting.discard(c)

    # ---- serving -----------------------------------------------------------------------
    def _setup(self) -> asyncio.AbstractEventLoop:
        from pynbd.plugin import _servers

        loop = asyncio.get_running_loop()
        self.loop = loop
        _servers.add(self)
        self.chain.set_loop(loop)
        self._stop = asyncio.Event()
        return loop

    def shutdown(self) -> None:
        """Ask the server to stop (thread-safe with respect to the loop via call_soon)."""
        if self._stop is not None:
            self._stop.set()

    async def serve(self, listeners: list[socket.socket]) -> None:
        """Accept connections on listening sockets until :meth:`shutdown`."""
        loop = self._setup()
        assert self._stop is not None
        async with asyncio.TaskGroup() as tg:
            for ls in listeners:
                ls.setblocking(False)
                loop.add_reader(ls.fileno(), self._accept, ls, tg)
            try:
                await self._stop.wait()
            finally:
                for ls in listeners:
                    loop.remove_reader(ls.fileno())
                await self._drain()

    async def serve_stream(self, stream: FdStream) -> None:
        """Serve exactly one connection on an existing stream (``-s``, or a given socket)."""
        self._setup()
        conn = Connection(self, stream, self._new_id())
        task = asyncio.ensure_future(conn.run())
        stop = asyncio.ensure_future(self._stop.wait())  # type: ignore[union-attr]
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                self._connections.add(task)
                await self._drain()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
            await task

    async def _drain(self) -> None:
        """Shutdown: refuse new work, let in-flight requests finish, then cancel the rest."""
        self.closing = True
        for c in list(self._transmitting):
            c.stop()
        tasks = [t for t in self._connections if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
            for t in pending:
                t.cancel()

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _accept(self, ls: socket.socket, tg: asyncio.TaskGroup) -> None:
        while True:
            try:
                sock, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: not our problem
            except OSError as e:
                log.error("accept: %s", e)
                if e.errno in _ACCEPT_BACKOFF_ERRNOS:
                    # Out of file descriptors or memory: the listener stays readable, so
                    # retrying at once would spin. Pause accepting for a moment.
                    self._pause_accepting(ls, tg)
                return
            if self.closing or len(self._connections) >= self.config.max_connections:
                log.error("refusing a connection: %s", "shutting down" if self.closing
                          else "too many connections")
                sock.close()
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.config.keepalive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            assert self.loop is not None
            stream = FdStream(self.loop, sock.fileno(), owner=sock, peer=str(addr))
            conn = Connection(self, stream, self._new_id())
            task = tg.create_task(_guarded(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _pause_accepting(self, ls: socket.socket, tg: asyncio.TaskGroup) -> None:
        assert self.loop is not None
        loop = self.loop
        loop.remove_reader(ls.fileno())

        def resume() -> None:
            if not self.closing and ls.fileno() >= 0:
                loop.add_reader(ls.fileno(), self._accept, ls, tg)

        loop.call_later(ACCEPT_BACKOFF, resume)


class _NoContexts(ContextRegistry):
    """--no-mc: LIST_META_CONTEXT lists nothing and SET_META_CONTEXT selects nothing."""

    def match(self, queries: list[str], listing: bool) -> list[str]:
        return []


async def _guarded(conn: Connection) -> None:
    """A connection's task: whatever escapes it is logged, never the end of the TaskGroup.

    An exception leaving a TaskGroup child cancels every sibling, which would end the whole
    server because one client hit a bug.
    """
    try:
        await conn.run()
    except Exception:  # logged: one client never ends the server
        log.exception("client %d: unexpected error", conn.id)


def bind_tcp(port: int, addr: str | None = None, family: int = socket.AF_UNSPEC) -> list[socket.socket]:
    """Listen on TCP: every address of ``addr`` (default: all, IPv4 and IPv6)."""
    infos = socket.getaddrinfo(addr, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks = []
    seen = set()
    err: OSError | None = None
    for fam, typ, proto, _, sa in infos:
        if (fam, sa) in seen:
            continue
        seen.add((fam, sa))
        s = socket.socket(fam, typ, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sa)
            s.listen(128)
        except OSError as e:
            s.close()
            err = e
            continue
        socks.append(s)
    if not socks:
        raise err or OSError(f"cannot listen on port {port}")
    return socks


def bind_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                import stat

                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
        s.bind(path)
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def bind_vsock(port: int) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError("AF_VSOCK is not supported on this platform")
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s
