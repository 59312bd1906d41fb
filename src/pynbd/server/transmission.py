"""The transmission phase of one connection: the hot path, under bounds that always hold.

Receiving: requests are read into a receive buffer allocated when transmission starts, an
anonymous mapping of :data:`RECV_BUFFER` bytes: only the pages the client's traffic touches
become memory, and all of it goes back to the system when the connection ends. Requests
without payload are read at most :data:`RECV_WINDOW` bytes at a time, so a flood of headers
keeps to the first pages. Every complete request in the buffer is parsed in one pass
(:meth:`Transmission._process`), validated by :func:`~pynbd.server.export.validate` before
any plugin code runs, and answered in a batch written with one ``writev`` of headers and
``memoryview`` slices. A WRITE payload of up to :data:`INLINE_PAYLOAD` bytes is used where it
lies in the buffer; a larger one is counted against the bounds at its full declared length,
then received into a mapping of its own, whose pages become memory only as bytes arrive.

Bounds: a connection counts what it holds — replies queued but not yet sent, requests in
worker threads, large payloads being received — and stops reading requests (it never fails
one) while that count is at ``max_bytes_in_flight`` (:data:`~pynbd.limits.MAX_BYTES_IN_FLIGHT`),
while the server's :class:`~pynbd.server.budget.Budget` is spent, or while
:data:`~pynbd.limits.MAX_REQUESTS_IN_FLIGHT` requests wait in worker threads. The request
that crosses a bound is still served, so a connection holds at most its bound plus one
request. It goes on when its client has read half of what was queued (or the worker threads
caught up, or the server's budget has room again), starting with the requests it had
already received.

Plugins that never block run on the event loop; others run in the connection's worker
threads with the thread model's locks, so a slow request never stops the reading of the
next ones. A blocking plugin's ``pread_nowait`` is tried on the loop first. A plugin written
with ``async def`` (alone in the chain, PARALLEL) has its coroutines awaited in tasks on the
loop, as many at once as the client sends (:mod:`~pynbd.server.coroutines`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mmap
import struct
from typing import TYPE_CHECKING, Any

from pynbd.errors import ProtocolError
from pynbd.limits import MAX_PAYLOAD_ACCEPTED, MAX_REQUESTS_IN_FLIGHT
from pynbd.plugin import Plugin, ThreadModel, _defer, _set_connection
from pynbd.protocol.constants import (
    EXT_REQUEST,
    EXT_REQUEST_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)
from pynbd.server import replies
from pynbd.server.backend import PluginLayer
from pynbd.server.coroutines import AsyncPath, async_path
from pynbd.server.export import (
    BLOCK_STATUS,
    CACHE,
    DISC,
    EXTENDED,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    F_PAYLOAD_LEN,
    F_REQ_ONE,
    FLUSH,
    P_FAST_ZERO,
    P_FUA,
    P_MAY_TRIM,
    READ,
    SIMPLE,
    STRUCTURED,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    Export,
    validate,
)
from pynbd.server.workers import Workers
from pynbd.stream import BUFFER_COST

if TYPE_CHECKING:
    from pynbd.server.connection import Connection

__all__ = ["INLINE_PAYLOAD", "RECV_BUFFER", "RECV_WINDOW", "Transmission"]

log = logging.getLogger("pynbd.server")

#: WRITE payloads up to this size are used where they lie in the receive buffer; larger ones
#: get a buffer of their own (counted against the bounds before it exists).
INLINE_PAYLOAD = 1024 * 1024
#: The receive buffer: room for an inline payload and the requests around it. Only the
#: pages the traffic touches become memory.
RECV_BUFFER = 2 * 1024 * 1024
#: Most bytes read at once unless an inline payload needs more: ~9,000 request headers, so
#: a flood of headers keeps to the first pages of the receive buffer.
RECV_WINDOW = 256 * 1024
_simple = SIMPLE_REPLY.pack
_offset_data = struct.Struct(">IHHQIQ").pack  # structured reply header + data offset
_DATA_COST = 40 + 2 * BUFFER_COST  # what a data reply costs besides the data (at most)
_ASK = object()  # _read: no result yet, ask the plugin
_DONE, _OFFSET_DATA = int(ReplyFlag.DONE), int(ReplyType.OFFSET_DATA)
#: Returned for a request that filled the worker threads' queue: ends the parsing pass.
_FULL = 1 << 62
#: Longest a WRITE waits for the next one, just after it on the disk, to arrive (a plugin
#: with ``start_pwritev`` gets them as one request; the next one is normally in already).
HOLD_SECONDS = 0.002


class Transmission:
    """One connection's transmission phase over the export negotiation opened."""

    def __init__(self, conn: Connection, export: Export, trailing: bytes) -> None:
        self.conn = conn
        self.server = server = conn.server
        self.stream = conn.stream
        self.loop = conn.loop
        self.id = conn.id
        self.export = export
        self.style = export.style
        self.budget = server.budget
        self.max_held = server.config.max_bytes_in_flight
        self._plugin = server.chain.top.name
        export.build_rules()
        if export.extended:
            self._hdr, self._magic = EXT_REQUEST, EXT_REQUEST_MAGIC
        else:
            self._hdr, self._magic = REQUEST, REQUEST_MAGIC
        # The receive buffer; _want is how many bytes from _pos the parser waits for.
        self._size = max(RECV_BUFFER, len(trailing))
        self._buf = mmap.mmap(-1, self._size)
        self._view = memoryview(self._buf)
        self._view[:len(trailing)] = trailing
        self._pos, self._end, self._want = 0, len(trailing), self._hdr.size
        #: Most bytes read at once (a TLS stream decrypts a batch of records in one call)
        self._window = getattr(self.stream, "read_window", RECV_WINDOW)
        # A large WRITE payload being received: (buffer, bytes got, request, reserved).
        self._payload: memoryview | None = None
        self._payload_got = 0
        self._payload_req: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._payload_cost = 0
        self._out: list[Any] = []  # replies of this batch, written together
        self._held = 0  # bytes charged to the budget besides the stream's queue
        self._inflight = 0  # requests in worker threads
        self._reading = False
        self._blocked = False  # stopped by a bound; requests may wait in the buffer
        self._resume_soon = False  # _maybe_resume is scheduled
        self._stopping = False
        self._closed = False
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._workers: Workers | None = None
        self._on_loop = server.chain.on_loop
        self._pread: Any = None
        self._pwrite: Any = None
        self._nowait = False
        self._h: Any = None
        self._aio: AsyncPath | None = None
        self._task_results: list[tuple[Any, bool, Any]] = []
        self._task_drain = False  # _drain_tasks is scheduled
        #: A plugin's ``start_pwrite`` that borrows the payload, with the flags a plain WRITE
        #: carries when the export accepts it: :meth:`_write_lent` (else None).
        self._lent_write: Any = None
        self._lent_flags = 0
        #: The plugin's ``start_pwritev`` (several lent payloads, one after the other on the
        #: disk), and the WRITE held back for it: (item, payload), while the next request,
        #: a WRITE just after it, is still arriving (:meth:`_write_lent`).
        self._lent_writev: Any = None
        self._hold: Any = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._bind_plugin()

    def _bind_plugin(self) -> None:
        """The plugin methods the loop may call itself: every one of an on-loop chain (the
        plugin's own when it has no filters), a plugin's coroutine methods (awaited in tasks
        on the loop: :mod:`~pynbd.server.coroutines`), or a blocking plugin's
        ``pread_nowait`` when it has one, no filters and the PARALLEL thread model."""
        ctx = self.export.ctx
        layer = ctx.layer
        self._h = ctx.handle
        if not self._on_loop:
            self._aio = async_path(ctx, self.server.thread_model, self.conn.info)
        aio = self._aio
        if aio is not None:
            rule = self.export.rules.get(WRITE)
            if aio.start_pwrite is not None and aio.lends_payload and rule is not None:
                _mask, need, err = rule
                if not err:
                    self._lent_write, self._lent_flags = aio.start_pwrite, need
                    self._lent_writev = aio.start_pwritev
            return
        if self._on_loop:
            target: Any = layer.plugin if isinstance(layer, PluginLayer) else layer
            self._pread = target.pread
            self._pwrite = target.pwrite if ctx.can_write() else None
        elif isinstance(layer, PluginLayer) and not layer.has_async and \
                type(layer.plugin).pread_nowait is not Plugin.pread_nowait and \
                layer.thread_model == ThreadModel.PARALLEL and \
                self.server.thread_model == ThreadModel.PARALLEL:
            self._pread = layer.plugin.pread_nowait
            self._nowait = True

    # ---- life ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve requests until the client disconnects, a fatal error, or :meth:`stop`."""
        stream = self.stream
        stream.on_write_error = self._on_write_error
        stream.on_drained = self._on_drained
        if self._stopping:  # the server began shutting down while we negotiated
            return
        self._reading = True
        stream.set_reader(self._on_readable)
        if self._end:
            self._guarded(self._process)
            self._flush()
        await self._done
        await stream.drain()

    def stop(self) -> None:
        """Stop reading new requests; finish in-flight ones, then end (server shutdown)."""
        self._stopping = True
        self._pause()
        self.budget.cancel(self)
        self._maybe_done()

    def close(self) -> None:
        """Give back what the phase holds (after the worker threads stopped)."""
        self._closed = True
        self._hold = None  # never started: counted in _held below
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self.budget.cancel(self)
        if self._payload is not None:
            self._drop_payload()
        if self._held:  # requests whose results will never come back
            self.budget.release(self._held)
            self._held = 0
        try:
            self._view.release()
            self._buf.close()
        except BufferError:  # a plugin kept a view of the buffer: unmapped with that view
            pass

    def _on_write_error(self, e: OSError) -> None:
        log.debug("client %d: write failed: %s", self.id, e)
        self._fatal()

    def fatal(self) -> None:
        """Drop the connection now (a plugin's forced disconnect)."""
        self._fatal()

    def _fatal(self) -> None:
        """Hard disconnect: stop reading; in-flight work finishes but its replies are dropped."""
        self._stopping = True
        self._pause()
        self._maybe_done(force=True)

    def _maybe_done(self, force: bool = False) -> None:
        if not self._done.done() and (self._inflight == 0 or force):
            if force and self._inflight:
                return  # wait for in-flight callbacks: _completed calls us again
            self._done.set_result(None)

    def _eof(self) -> None:
        if self._payload is not None or self._end > self._pos:
            log.debug("client %d: disconnected in the middle of a request", self.id)
            if self._payload is not None:
                self._drop_payload()
        self._stopping = True
        self._pause()
        self._flush()
        self._maybe_done()

    # ---- bounds and back pressure ----------------------------------------------------
    def _room(self) -> int:
        """What may still be taken on: the connection's room or the server's, the less."""
        budget = self.budget
        room = self.max_held - self._held - self.stream.cost
        groom = budget.limit - budget.used
        return min(groom, room)

    def _charge(self, cost: int) -> None:
        self._held += cost
        self.budget.used += cost

    def _block(self, pos: int) -> None:
        """A bound is reached: stop reading until :meth:`_maybe_resume` finds room."""
        self._pos = pos
        self._blocked = True
        self._pause()
        if self.budget.used >= self.budget.limit:
            self.budget.wait(self, self._wake)

    def _wake(self) -> None:
        """The server's budget has room (called inside someone's accounting: defer)."""
        if not self._resume_soon:
            self._resume_soon = True
            self.loop.call_soon(self._maybe_resume)

    def _on_drained(self) -> None:
        if self._blocked:
            self._wake()

    def _maybe_resume(self) -> None:
        """Go on if every bound has room again (with hysteresis: half the connection's
        bounds), processing the requests already received first."""
        self._resume_soon = False
        if self._stopping or not self._blocked:
            return
        if self._inflight >= MAX_REQUESTS_IN_FLIGHT // 2 or \
                self._held + self.stream.cost >= self.max_held // 2:
            return  # a completion or the stream draining calls again
        if self.budget.used >= self.budget.limit:
            self.budget.wait(self, self._wake)
            return
        self._blocked = False
        if self._payload is None and self._end > self._pos:
            self._guarded(self._process)
            self._flush()
        if not self._blocked and not self._stopping:
            self._resume_reading()

    def _pause(self) -> None:
        if self._hold is not None:  # no more requests to pair it with
            self._start_held()
        if self._reading:
            self._reading = False
            self.stream.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and not self._stopping:
            self._reading = True
            self.stream.resume_reading()

    # ---- receiving -------------------------------------------------------------------
    def _on_readable(self) -> None:
        _set_connection(self.conn.info)
        self._guarded(self._receive)
        self._flush()

    def _guarded(self, step: Any) -> None:
        """Run a receiving step: a protocol error or a lost client ends the connection with
        one log line."""
        try:
            step()
        except BlockingIOError:
            return
        except OSError as e:  # reset, broken pipe...
            log.debug("client %d: read failed: %s", self.id, e)
            self._eof()
        except ProtocolError as e:
            log.error("client %d: %s", self.id, e)
            self._flush()
            self._fatal()
        except Exception:
            log.exception("client %d: internal error", self.id)
            self._flush()
            self._fatal()

    def _receive(self) -> None:
        if self._payload is not None:
            return self._receive_payload()
        end, size = self._end, self._size
        if end == size:  # defensive: _process keeps room after the unparsed rest
            if self._hold is not None:
                self._start_held()
            self._move_to_front(self._pos, end)
            end = self._end
        limit = end + self._window
        need = self._pos + self._want
        limit = max(limit, need)
        n = self.stream.readinto(self._view[end:min(size, limit)])
        if n == 0:
            return self._eof()
        self._end = end = end + n
        if end - self._pos >= self._want:  # else still waiting for the rest of a request
            self._process()
        return None

    def _receive_payload(self) -> None:
        pv = self._payload
        assert pv is not None
        n = self.stream.readinto(pv[self._payload_got:])
        if n == 0:
            return self._eof()
        self._payload_got += n
        if self._payload_got < len(pv):
            return None
        self._payload = None
        flags, cmd, cookie, offset, length = self._payload_req
        self._handle(flags, cmd, cookie, offset, length, pv, True)
        self._held -= self._payload_cost  # _handle counted what stays in flight
        self.budget.release(self._payload_cost)
        self._process()
        return None

    def _start_payload(self, req: tuple[int, int, int, int, int], start: int, end: int) -> None:
        """A WRITE payload too large for the receive buffer: counted in full, then received
        into an anonymous mapping whose pages become memory as the bytes arrive."""
        length = req[4]
        self._payload_cost = length + BUFFER_COST
        self._charge(self._payload_cost)
        pv = memoryview(mmap.mmap(-1, length))
        got = end - start
        pv[:got] = self._view[start:end]
        self._payload, self._payload_got, self._payload_req = pv, got, req

    def _drop_payload(self) -> None:
        self._payload = None
        self._held -= self._payload_cost
        self.budget.release(self._payload_cost)
        self._payload_cost = 0

    def _move_to_front(self, pos: int, end: int) -> None:
        rest = end - pos
        self._view[:rest] = self._view[pos:end]  # memmove, no temporary copy
        self._pos, self._end = 0, rest

    def _process(self) -> None:
        """Parse and dispatch every complete request in the buffer while the bounds allow.

        The hot loop, longer than the size budget on purpose: it runs once per request
        (over 150,000 a second in benchmarks/fio_server.py's 4k jobs) and every helper call
        per request shows: parsing and answering a 4k READ from the memory plugin cost
        ~860 ns here with one call per READ (:meth:`_read`) and ~1,010 ns with the reply
        encoded in two more calls (parse + dispatch of 4,096 pipelined READs, best of
        1,200 runs). READs go to :meth:`_read`, everything else to :meth:`_handle`; each
        returns what it took on, counted against ``room``.
        """
        # hot path: one pass per request, kept whole on purpose: benchmarks/fio_server.py
        if self._stopping:
            return
        view = self._view
        pos, end = self._pos, self._end
        hsize = self._hdr.size
        unpack = self._hdr.unpack_from
        want_magic = self._magic
        extended = self.export.extended
        plen = F_PAYLOAD_LEN if extended else 0  # a flag saying "a payload follows"
        wcmd = -1 if extended else WRITE  # the command that always carries one
        read = self._read
        write = self._handle if self._lent_write is None else self._write_lent
        room = self._room()
        want = hsize
        while end - pos >= hsize:
            if room <= 0:
                self._want = hsize
                return self._block(pos)
            magic, flags, cmd, cookie, offset, length = unpack(view, pos)
            if magic != want_magic:
                self._pos = self._end = 0
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == READ and not flags & plen:
                pos += hsize
                room -= read(flags, cookie, offset, length)
                continue
            if cmd == wcmd or flags & plen:
                if length > MAX_PAYLOAD_ACCEPTED:
                    self._pos = self._end = 0
                    raise ProtocolError(f"request payload of {length} bytes is over the limit")
                start = pos + hsize
                if end - start >= length:
                    pos = start + length
                    room -= write(flags, cmd, cookie, offset, length, view[start:pos], False)
                    continue
                if length <= INLINE_PAYLOAD:
                    want = hsize + length  # wait for the rest where it will land
                    break
                self._start_payload((flags, cmd, cookie, offset, length), start, end)
                pos = end
                break
            pos += hsize
            if cmd == DISC:
                log.debug("client %d: sent NBD_CMD_DISC", self.id)
                self._pos = self._end = 0
                self._stopping = True
                self._pause()
                self._maybe_done()
                return None
            room -= self._handle(flags, cmd, cookie, offset, length, None, False)
        held = self._hold
        if held is not None and not (
                want > hsize and cmd == WRITE and flags == self._lent_flags and
                offset == held[0][0][3] + held[0][0][4] and
                end - pos > 4096 and pos + want <= self._size):
            self._start_held()  # unless the next WRITE, just after it, is arriving in place
        self._want = want
        if pos >= end:
            self._pos = self._end = 0
        elif pos and (end - pos <= 4096 or pos + want > self._size):
            # keep a small rest (a partial header) at the front, and move a partial WRITE
            # only when its payload would not fit: megabytes are not shuffled every read
            self._move_to_front(pos, end)
        else:
            self._pos = pos
        if room <= 0 and self._payload is None:  # a payload being received is counted: finish it
            self._block(self._pos)
        return None

    # ---- requests --------------------------------------------------------------------
    def _read(self, flags: int, cookie: int, offset: int, length: int, buf: Any = _ASK) -> int:
        """The one READ path, request to reply: validate; the plugin on the loop when it may
        run there (a blocking plugin's ``pread_nowait`` first), else in a worker thread,
        whose result comes back here as ``buf``; then the data in one chunk, or EIO when
        the result is not ``length`` bytes. Returns what the reply costs until sent.

        One function, with the encoding of :func:`replies.data` for the two common styles
        inlined: it runs once per READ, and each call saved shows in the fio benchmarks.
        """
        if buf is _ASK:
            if self._hold is not None:
                self._start_held()
            err = validate(self.export, READ, flags, offset, length)
            if err:
                return replies.error(self._out, self.style, READ, cookie, offset, err)
            if not length:
                return replies.data(self._out, self.style, cookie, offset, b"", 0)
            pread = self._pread
            if pread is None and self._aio is not None:
                return self._aio_read(flags, cookie, offset, length)
            try:
                if pread is None:
                    raise BlockingIOError
                buf = pread(self._h, length, offset, 0)
            except BlockingIOError as e:
                if pread is not None and not self._nowait:
                    return self._failed(READ, flags, cookie, offset, e)
                return self._submit((READ, flags, cookie, offset, length),
                                    self.export.ctx.pread, (length, offset, 0),
                                    length + BUFFER_COST)
            except BaseException as e:  # noqa: BLE001 - the plugin's failure is the reply
                return self._failed(READ, flags, cookie, offset, e)
        try:
            n = len(buf)
        except TypeError:
            n = -1
        if n != length:
            err, msg = replies.short_read(self._plugin, self.id, length, buf)
            return replies.error(self._out, self.style, READ, cookie, offset, err, msg)
        style = self.style
        if style == SIMPLE:
            self._out += (_simple(SIMPLE_REPLY_MAGIC, 0, cookie), buf)
            return n + _DATA_COST
        if style == STRUCTURED:
            hdr = _offset_data(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, n + 8, offset)
            self._out += (hdr, buf)
            return n + _DATA_COST
        return replies.data(self._out, style, cookie, offset, buf, n)

    def _handle(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                payload: memoryview | None, owned: bool) -> int:
        """Every command but READ and DISC; returns what it took on."""
        if self._hold is not None:
            self._start_held()
        err = validate(self.export, cmd, flags, offset, length)
        if err:
            return replies.error(self._out, self.style, cmd, cookie, offset, err)
        if length == 0 and cmd != FLUSH:
            return replies.ok(self._out, self.style, cookie, offset)
        if cmd == WRITE and self._pwrite is not None and not flags & ~F_PAYLOAD_LEN:
            try:
                self._pwrite(self._h, payload, offset, 0)
            except BaseException as e:  # noqa: BLE001 - the plugin's failure is the reply
                return self._failed(cmd, flags, cookie, offset, e)
            return replies.ok(self._out, self.style, cookie, offset)
        aio = self._aio
        if aio is not None:
            job = (cmd, flags, cookie, offset, length)
            cost = BUFFER_COST + (length if cmd == WRITE else 0)
            start = aio.start_for(cmd, flags)
            if start is not None:
                if not owned and not aio.lends_payload:
                    payload = memoryview(bytes(payload))  # type: ignore[arg-type]
                return self._start_cb(job, cost, start, (self._h, payload, offset,
                                                         P_FUA if flags & F_FUA else 0))
        if cmd == WRITE and not self._on_loop and not owned:
            payload = memoryview(bytes(payload))  # type: ignore[arg-type]
        if aio is not None:
            coro = aio.call_for(cmd, flags, offset, length, payload)
            if coro is not None:
                return self._start(job, coro, cost)
        fn, args = self._call_for(cmd, flags, offset, length, payload)
        if self._on_loop:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - the plugin's failure is the reply
                return self._failed(cmd, flags, cookie, offset, e)
            return self._result(cmd, flags, cookie, offset, result)
        cost = BUFFER_COST + (length if cmd == WRITE else 0)
        return self._submit((cmd, flags, cookie, offset, length), fn, args, cost)

    def _write_lent(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                    payload: memoryview, owned: bool) -> int:
        """:meth:`_handle` of a request with a payload in the receive buffer, for a plugin
        whose ``start_pwrite`` borrows it: a valid plain WRITE goes straight to the plugin
        (or is held for the next one), anything else to :meth:`_handle`."""
        if cmd != WRITE or flags != self._lent_flags or not length or \
                validate(self.export, WRITE, flags, offset, length):
            return self._handle(flags, cmd, cookie, offset, length, payload, owned)
        cost = BUFFER_COST + length
        self._held += cost
        self.budget.used += cost
        self._inflight += 1
        item = ((WRITE, flags, cookie, offset, length), cost)
        held = self._hold
        if held is not None:  # the WRITE held back for this one
            self._hold = None
            job = held[0][0]
            if job[3] + job[4] == offset:
                self._start_lent(job[3], (held[0], item), [held[1], payload])
                return cost if self._inflight < MAX_REQUESTS_IN_FLIGHT else cost + _FULL
            self._start_lent(job[3], (held[0],), [held[1]])
        if self._lent_writev is not None:
            self._hold = held = (item, payload)  # _process starts it unless the next pairs
            if self._hold_timer is None:  # a client stalled in the next request: go on
                self._hold_timer = self.loop.call_later(HOLD_SECONDS, self._hold_expired, held)
        else:
            self._start_lent(offset, (item,), [payload])
        return cost if self._inflight < MAX_REQUESTS_IN_FLIGHT else cost + _FULL

    def _hold_expired(self, held: Any) -> None:
        self._hold_timer = None
        if self._hold is held and not self._closed:
            _set_connection(self.conn.info)
            self._start_held()
            self._flush()
        elif self._hold is not None:
            self._hold_timer = self.loop.call_later(HOLD_SECONDS, self._hold_expired, self._hold)

    def _start_held(self) -> None:
        item, payload = self._hold
        self._hold = None
        self._start_lent(item[0][3], (item,), [payload])

    def _start_lent(self, offset: int, items: tuple[Any, ...], payloads: list[Any]) -> None:
        """Start WRITEs lent to the plugin: one, or several one after the other on the
        disk (its ``start_pwritev``, one ``done`` for all)."""
        one = len(items) == 1
        done: Any = functools.partial(self._cb_done, items[0]) if one else \
            functools.partial(self._cb_done_all, items)
        try:
            if one:
                self._lent_write(self._h, payloads[0], offset, 0, done)
            else:
                self._lent_writev(self._h, payloads, offset, 0, done)
        except BaseException as e:  # noqa: BLE001 - the plugin's failure is the reply
            done(e, None)

    def _cb_done_all(self, items: tuple[Any, ...], err: BaseException | None, value: Any) -> None:
        for item in items:
            self._cb_done(item, err, value)

    def _call_for(self, cmd: int, flags: int, offset: int, length: int,
                  payload: memoryview | None) -> tuple[Any, tuple[Any, ...]]:
        """The context method and arguments for a validated command."""
        ctx = self.export.ctx
        pflags = P_FUA if flags & F_FUA else 0
        if cmd == WRITE:
            return ctx.pwrite, (payload, offset, pflags)
        if cmd == WRITE_ZEROES:
            if not flags & F_NO_HOLE:
                pflags |= P_MAY_TRIM
            if flags & F_FAST_ZERO:
                pflags |= P_FAST_ZERO
            return ctx.zero, (length, offset, pflags)
        if cmd == FLUSH:
            return ctx.flush, (0,)
        if cmd == TRIM:
            return ctx.trim, (length, offset, pflags)
        if cmd == CACHE:
            return ctx.cache, (length, offset, 0)
        assert cmd == BLOCK_STATUS  # validate() refuses anything else
        return self.conn.block_status, (self.export, length, offset, bool(flags & F_REQ_ONE))

    def _submit(self, job: tuple[int, int, int, int, int], fn: Any, args: tuple[Any, ...],
                cost: int) -> int:
        """Run a request in a worker thread; its ``cost`` is held until the result is in."""
        self._charge(cost)
        self._inflight += 1
        workers = self._workers
        if workers is None:
            conn = self.conn
            workers = self._workers = Workers(self.loop, self.server.config.threads,
                                              f"pynbd-conn{self.id}", conn.locked,
                                              self._completed)
        workers.submit((job, cost), fn, args)
        return cost if self._inflight < MAX_REQUESTS_IN_FLIGHT else cost + _FULL

    def _aio_read(self, flags: int, cookie: int, offset: int, length: int) -> int:
        """A READ of a plugin with coroutine methods: its ``start_pread`` or a task."""
        aio = self._aio
        assert aio is not None
        job = (READ, flags, cookie, offset, length)
        if aio.start_pread is not None:
            return self._start_cb(job, length + BUFFER_COST, aio.start_pread,
                                  (self._h, length, offset, 0))
        assert aio.pread is not None
        return self._start(job, aio.pread(self._h, length, offset, 0), length + BUFFER_COST)

    def _start_cb(self, job: tuple[int, int, int, int, int], cost: int, fn: Any,
                  args: tuple[Any, ...]) -> int:
        """Start a request with a plugin's ``start_*`` method; ``done`` brings the result."""
        self._charge(cost)
        self._inflight += 1
        done = functools.partial(self._cb_done, (job, cost))
        try:
            fn(*args, done)
        except BaseException as e:  # noqa: BLE001 - the plugin's failure is the reply
            done(e, None)
        return cost if self._inflight < MAX_REQUESTS_IN_FLIGHT else cost + _FULL

    def _cb_done(self, item: Any, err: BaseException | None, value: Any) -> None:
        if err is None:
            self._task_results.append((item, True, value))
        else:
            self._task_results.append((item, False, err))
        if not self._task_drain:
            self._task_drain = True
            if not _defer(self._drain_tasks):  # else at the end of the plugin's batch
                self.loop.call_soon(self._drain_tasks)

    def _start(self, job: tuple[int, int, int, int, int], coro: Any, cost: int) -> int:
        """Await a coroutine callback in a task on the loop; like :meth:`_submit`, its
        ``cost`` is held until the result is in."""
        self._charge(cost)
        self._inflight += 1
        assert self._aio is not None
        task = self.loop.create_task(coro, context=self._aio.context)
        task.add_done_callback(functools.partial(self._task_done, (job, cost)))
        return cost if self._inflight < MAX_REQUESTS_IN_FLIGHT else cost + _FULL

    def _task_done(self, item: Any, task: asyncio.Task[Any]) -> None:
        """A task's result, kept until every task done in this turn of the loop is in."""
        if task.cancelled():
            self._task_results.append((item, False, ConnectionError("request cancelled")))
        else:
            e = task.exception()
            self._task_results.append((item, e is None, task.result() if e is None else e))
        if not self._task_drain:
            self._task_drain = True
            self.loop.call_soon(self._drain_tasks)

    def _drain_tasks(self) -> None:
        self._task_drain = False
        batch, self._task_results = self._task_results, []
        self._completed(batch)

    def _completed(self, batch: list[tuple[Any, bool, Any]]) -> None:
        """Results from the worker threads, in a batch: one reply write for all of them."""
        if self._closed:  # close() gave back what they held
            return
        _set_connection(self.conn.info)
        live = not self.stream.closed and self.stream.write_error is None
        freed = 0
        self._inflight -= len(batch)
        out = self._out
        plain = self.style != EXTENDED  # a success without data: a simple reply
        for ((cmd, flags, cookie, offset, length), cost), ok, value in batch:
            freed += cost
            if not live:
                continue
            if not ok:
                self._failed(cmd, flags, cookie, offset, value)
            elif cmd == WRITE and plain:
                out.append(_simple(SIMPLE_REPLY_MAGIC, 0, cookie))
            elif cmd == READ:
                self._read(flags, cookie, offset, length, value)
            else:
                self._result(cmd, flags, cookie, offset, value)
        self._held -= freed
        self.budget.release(freed)
        if live:
            self._flush()
        if self._stopping:
            self._maybe_done()
        else:
            self._maybe_resume()

    def _result(self, cmd: int, flags: int, cookie: int, offset: int, result: Any) -> int:
        if cmd == BLOCK_STATUS:
            try:
                return replies.block_status(self._out, self.style, cookie, offset, result)
            except Exception as e:  # noqa: BLE001 - e.g. a context provider's bad extents
                return self._failed(cmd, flags, cookie, offset, e)
        return replies.ok(self._out, self.style, cookie, offset)

    def _failed(self, cmd: int, flags: int, cookie: int, offset: int, e: BaseException) -> int:
        err, msg = replies.failure(self._plugin, self.id, cmd, flags, e)
        return replies.error(self._out, self.style, cmd, cookie, offset, err, msg)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self.stream.write(out)
            if self._blocked:  # what stopped us may be written already
                self._wake()
