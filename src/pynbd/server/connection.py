"""One client connection: negotiation, then transmission, then a clean end.

The phases are modules of their own: :mod:`~pynbd.server.negotiation` (options in, an open
export out), :mod:`~pynbd.server.transmission` (the hot path and its bounds, with the reply
bytes in :mod:`~pynbd.server.replies`, the request check in :mod:`~pynbd.server.export` and
the worker threads in :mod:`~pynbd.server.workers`). A :class:`Connection` runs them in
turn and owns what they share: the stream, the control-path thread pool, the thread
model's locks, and the export it closes at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any

from pynbd.errors import ProtocolError
from pynbd.limits import MAX_EXTENTS_PER_REPLY
from pynbd.plugin import ConnectionInfo, ThreadModel, _set_connection
from pynbd.server.export import Export, validate
from pynbd.server.negotiation import Negotiation
from pynbd.server.transmission import Transmission

if TYPE_CHECKING:
    from pynbd.server.server import Server
    from pynbd.server.stream import FdStream

log = logging.getLogger("pynbd.server")

__all__ = ["Connection", "Export", "validate"]


class Connection:
    def __init__(self, server: Server, stream: FdStream, conn_id: int) -> None:
        self.server = server
        self.stream = stream
        self.id = conn_id
        loop = stream.loop
        assert loop is not None, "a server's stream runs on its event loop"
        self.loop: asyncio.AbstractEventLoop = loop
        stream.budget = server.budget
        self.export: Export | None = None
        #: Whether this connection holds the server's SERIALIZE_CONNECTIONS lock.
        self.ctx_lock_held = False
        self._phase: Negotiation | Transmission | None = None
        self._stopping = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn_lock = threading.Lock()
        #: What plugins and filters see of this connection (pynbd.plugin.connection()).
        self.info = _connection_info(server, stream, conn_id)
        self.info._conn = self

    async def run(self) -> None:
        # Registered from the start, so a server shutdown also ends a negotiating client.
        self.server.register_transmission(self)
        try:
            _set_connection(self.info)
            try:
                await self.call_blocking(self.server.chain.preconnect,
                                         self.server.config.readonly)
            except Exception as e:  # noqa: BLE001 - a refused client: one line, then hang up
                log.error("client %d: refused by preconnect: %s", self.id,
                          getattr(e, "message", None) or e)
                return
            neg = self._phase = Negotiation(self)
            try:
                ok = await asyncio.wait_for(neg.run(), self.server.config.handshake_timeout)
            except TimeoutError:
                log.error("client %d: handshake timed out", self.id)
                return
            except ProtocolError as e:
                log.error("client %d: %s", self.id, e)
                return
            finally:
                self.export = neg.export
            if ok and self.export is not None:
                tx = self._phase = Transmission(self, self.export, neg.trailing)
                if self._stopping:
                    tx.stop()
                try:
                    await tx.run()
                finally:
                    await self._end_transmission(tx)
        except (ConnectionError, BrokenPipeError) as e:
            log.debug("client %d: connection lost: %s", self.id, e)
        except Exception:
            log.exception("client %d: internal error", self.id)
        finally:
            self.server.unregister_transmission(self)
            await self._cleanup()

    def stop(self) -> None:
        """Server shutdown: a negotiating client is disconnected at once (its pending read
        returns EOF); in transmission, in-flight requests finish, then the connection ends."""
        self._stopping = True
        if isinstance(self._phase, Transmission):
            self._phase.stop()
        else:
            self.stream.interrupt_read()

    async def _end_transmission(self, tx: Transmission) -> None:
        workers, tx._workers = tx._workers, None
        if workers is not None:
            await self.loop.run_in_executor(None, workers.stop)
        tx.close()

    async def _cleanup(self) -> None:
        self.stream.set_reader(None)
        ex, self.export = self.export, None
        if ex is not None:
            try:
                await self.call_blocking(ex.ctx.close)
            except Exception as e:  # noqa: BLE001
                log.error("client %d: %s: close: %s", self.id, self.server.chain.top.name, e)
        self.release_ctx_lock()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await self.loop.run_in_executor(None, pool.shutdown, True)
        self.stream.close()
        self._phase = None

    # ---- shared services -------------------------------------------------------------
    async def call_blocking(self, fn: Any, *args: Any) -> Any:
        """Run a control-path callback: on the loop for nonblocking chains, else a thread."""
        if self.server.chain.on_loop:
            _set_connection(self.info)
            return fn(*args)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.server.config.threads,
                thread_name_prefix=f"pynbd-conn{self.id}")
        return await self.loop.run_in_executor(self._pool, self.locked, fn, args)

    def locked(self, fn: Any, args: tuple[Any, ...]) -> Any:
        """Call ``fn(*args)`` under the thread model's lock (in a worker thread)."""
        _set_connection(self.info)
        tm = self.server.thread_model
        if tm <= ThreadModel.SERIALIZE_ALL_REQUESTS:
            with self.server.all_requests_lock:
                return fn(*args)
        if tm == ThreadModel.SERIALIZE_REQUESTS:
            with self._conn_lock:
                return fn(*args)
        return fn(*args)

    @property
    def closing(self) -> bool:
        """Whether this connection is ending (server shutdown, the client gone or broken,
        a plugin's disconnect): callbacks that wait give up."""
        if self._stopping:
            return True
        phase = self._phase
        return phase is None or bool(getattr(phase, "_stopping", False))

    def disconnect(self, force: bool) -> None:
        """A plugin asked to drop this client (nbdkit_disconnect): at once (force), or once
        the requests in flight are answered."""
        log.debug("client %d: disconnect requested by the plugin (force=%s)", self.id, force)
        self._stopping = True
        phase = self._phase
        if force:
            if isinstance(phase, Transmission):
                phase.fatal()
            self.stream.close()
        else:
            self.stop()

    def release_ctx_lock(self) -> None:
        if self.ctx_lock_held:
            self.server.release_connection_lock()
            self.ctx_lock_held = False

    def block_status(self, ex: Export, length: int, offset: int,
                     req_one: bool) -> list[tuple[int, list[tuple[int, int]]]]:
        """Extents of every selected meta context (runs where the plugin runs)."""
        out = []
        for ctx_id, name in ex.contexts.items():
            provider = self.server.contexts.get(name)
            ext = provider(ex.ctx, length, offset, req_one)
            if req_one:
                n, f = ext[0]
                ext = [(min(n, length), f)]
            elif len(ext) > MAX_EXTENTS_PER_REPLY:
                ext = ext[:MAX_EXTENTS_PER_REPLY]
            out.append((ctx_id, ext))
        return out


def _connection_info(server: Server, stream: FdStream, conn_id: int) -> ConnectionInfo:
    """Who is on the other end: the peer's address, and its credentials on a Unix socket."""
    import socket
    import struct

    info = ConnectionInfo(id=conn_id, peer=stream.peer, readonly=server.config.readonly,
                          server=server)
    sock = stream.owner
    if isinstance(sock, socket.socket):
        info.family = sock.family
        try:
            info.peer_address = sock.getpeername()
        except OSError:
            pass
        if sock.family == socket.AF_UNIX:
            try:
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                info.peer_pid, info.peer_uid, info.peer_gid = struct.unpack("3i", cred)
            except OSError:
                pass
    return info
