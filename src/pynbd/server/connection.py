"""One client connection: negotiation, then the transmission hot path.

Transmission reads into a preallocated buffer, parses every complete request in it, validates
each one in :func:`validate` before any plugin code runs, and answers a batch of replies with
one ``writev`` of headers and ``memoryview`` slices. A WRITE payload larger than what is
buffered is received straight into a buffer of its own. Plugins that never block run on the
event loop; others run in a per-connection pool of worker threads with the thread model's
locks, so a slow request never stops the reading of the next ones.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno as E
import logging
import queue
import struct
import threading
import traceback
from typing import TYPE_CHECKING, Any

from pynbd.errors import CommandError, OptionError, ProtocolError
from pynbd.limits import (
    MAX_BYTES_IN_FLIGHT,
    MAX_EXTENTS_PER_REPLY,
    MAX_OPTION_ROUNDS,
    MAX_OPTION_ROUNDS_PER_EXPORT,
    MAX_PAYLOAD_ACCEPTED,
    MAX_PAYLOAD_ADVERTISED,
    MAX_REQUESTS_IN_FLIGHT,
)
from pynbd.plugin import CacheMode, ConnectionInfo, Flag, FuaMode, ThreadModel, _set_connection
from pynbd.protocol import options as O
from pynbd.protocol.constants import (
    EXT_REPLY_MAGIC,
    EXT_REQUEST,
    EXT_REQUEST_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TxFlag,
    errno_to_nbd,
    name_of,
)
from pynbd.protocol.handshake import NEED_DATA, ClientFlags, OptionRequest, ServerHandshake
from pynbd.protocol.transmission import block_status_chunk, error_chunk, none_chunk

if TYPE_CHECKING:
    from pynbd.server.backend import Context
    from pynbd.server.server import Server
    from pynbd.server.stream import FdStream

log = logging.getLogger("pynbd.server")

__all__ = ["Connection", "Export", "validate"]

_U64 = struct.Struct(">Q")
_OFFSET_DATA = struct.Struct(">IHHQIQ")  # structured header + data offset
_EXT_OFFSET_DATA = struct.Struct(">IHHQQQQ")  # extended header + data offset
_BUF_SIZE = 2 * 1024 * 1024  # receive buffer per connection
_INLINE_PAYLOAD = 1024 * 1024  # larger WRITE payloads get a buffer of their own

_EINVAL, _EPERM, _ENOSPC = 22, 1, 28

# Plain ints on the hot path (enum arithmetic costs microseconds per request).
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _WZ, _BS = (int(c) for c in (
    Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS))
_F_FUA, _F_NO_HOLE, _F_DF, _F_REQ_ONE, _F_FAST_ZERO, _F_PAYLOAD_LEN = (int(f) for f in (
    CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO,
    CmdFlag.PAYLOAD_LEN))
_P_FUA, _P_MAY_TRIM, _P_FAST_ZERO = int(Flag.FUA), int(Flag.MAY_TRIM), int(Flag.FAST_ZERO)
_MAX_PAYLOAD = MAX_PAYLOAD_ACCEPTED

# Flags each command accepts in principle (FUA is valid on every command if advertised).
_CMD_FLAGS = {
    _READ: _F_FUA | _F_DF,
    _WRITE: _F_FUA,
    _FLUSH: _F_FUA,
    _TRIM: _F_FUA,
    _CACHE: _F_FUA,
    _WZ: _F_FUA | _F_NO_HOLE | _F_FAST_ZERO,
    _BS: _F_FUA | _F_REQ_ONE,
}


class Export:
    """What negotiation settled for the transmission phase."""

    __slots__ = (
        "contexts",
        "ctx",
        "eflags",
        "extended",
        "minimum",
        "name",
        "readonly",
        "rules",
        "size",
        "structured",
    )

    def __init__(self, ctx: Context, name: str, size: int, eflags: int, minimum: int,
                 structured: bool, extended: bool, contexts: dict[int, str]) -> None:
        self.ctx = ctx
        self.name = name
        self.size = size
        self.eflags = eflags
        self.minimum = minimum
        self.structured = structured
        self.extended = extended
        self.contexts = contexts
        self.readonly = bool(eflags & TxFlag.READ_ONLY)
        self.rules: dict[int, tuple[int, int, int]] = {}

    def build_rules(self) -> None:
        """Per command: (mask, need, err). The flags are valid iff ``(flags ^ need) & mask``
        is 0: every bit of ``need`` is set and no bit outside the allowed flags is. ``err`` is
        the error for the command itself, or 0.

        With extended headers a WRITE must carry PAYLOAD_LEN (no payload means no data to
        write) and no other command may (BLOCK_STATUS_PAYLOAD is not advertised): such a
        payload is consumed, then refused with EINVAL.
        """
        ef = self.eflags
        rules = {}
        for cmd, allowed in _CMD_FLAGS.items():
            if not ef & TxFlag.SEND_FUA:
                allowed &= ~_F_FUA
            if not self.structured:
                allowed &= ~_F_DF
            if not ef & TxFlag.SEND_FAST_ZERO:
                allowed &= ~_F_FAST_ZERO
            err = 0
            if cmd in (_WRITE, _TRIM, _WZ) and self.readonly:
                err = _EPERM
            elif (cmd == _TRIM and not ef & TxFlag.SEND_TRIM) or \
                    (cmd == _WZ and not ef & TxFlag.SEND_WRITE_ZEROES) or \
                    (cmd == _FLUSH and not ef & TxFlag.SEND_FLUSH) or \
                    (cmd == _CACHE and not ef & TxFlag.SEND_CACHE) or \
                    (cmd == _BS and not (self.structured and self.contexts)):
                err = _EINVAL
            need = _F_PAYLOAD_LEN if self.extended and cmd == _WRITE else 0
            rules[cmd] = ((~allowed & 0xFFFF) | need, need, err)
        self.rules = rules


def validate(ex: Export, cmd: int, flags: int, offset: int, length: int) -> int:
    """The one validation step before any plugin code: 0, or the NBD error to send.

    In order: unknown command; read-only export (EPERM); command not advertised; unknown or
    inapplicable flag; FLUSH with a range; READ over the accepted maximum; BLOCK_STATUS of
    length 0; out of bounds (ENOSPC for WRITE and WRITE_ZEROES, else EINVAL); misaligned to
    the advertised minimum block size (EINVAL).

    Zero-length policy (docs/protocol.md): READ, WRITE, TRIM, WRITE_ZEROES and CACHE of length
    0 inside the export succeed and do nothing; BLOCK_STATUS of length 0 is EINVAL (it cannot
    return a non-empty extent).
    """
    rule = ex.rules.get(cmd)
    if rule is None:
        return _EINVAL
    mask, need, err = rule
    if err:
        return err
    if (flags ^ need) & mask:
        return _EINVAL
    if cmd == _FLUSH:
        return _EINVAL if offset or length else 0
    if cmd == _READ:
        if length > _MAX_PAYLOAD:
            return _EINVAL
    elif cmd == _BS and length == 0:
        return _EINVAL
    if offset + length > ex.size:
        return _ENOSPC if cmd == _WRITE or cmd == _WZ else _EINVAL
    m = ex.minimum
    if m > 1 and (offset % m or length % m):
        return _EINVAL
    return 0


class _Workers:
    """Worker threads for one connection's blocking requests.

    Cheaper than an executor per request: jobs go through a SimpleQueue, results come back
    through a deque, and the event loop is woken once per batch of results (one self-pipe
    write), not once per request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, nthreads: int, name: str,
                 run: Any, on_results: Any) -> None:
        self.loop = loop
        self.max = nthreads
        self.name = name
        self.run = run  # run(fn, args) in a worker: the thread model's locks, then fn
        self.on_results = on_results  # on the loop: called with a list of (job, ok, value)
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.results: collections.deque[Any] = collections.deque()
        self.threads: list[threading.Thread] = []
        self.woken = False

    def submit(self, job: Any, fn: Any, args: tuple[Any, ...]) -> None:
        if not self.threads:  # all at once on first use: -t N requests in flight
            for i in range(self.max):
                t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                self.threads.append(t)
                t.start()
        self.jobs.put((job, fn, args))

    def _work(self) -> None:
        get = self.jobs.get
        results = self.results
        run = self.run
        while True:
            item = get()
            if item is None:
                return
            job, fn, args = item
            try:
                results.append((job, True, run(fn, args)))
            except BaseException as e:  # noqa: BLE001
                results.append((job, False, e))
            if not self.woken:
                self.woken = True
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody waits for the result
                    return

    def _drain(self) -> None:
        self.woken = False
        results = self.results
        batch = []
        while results:
            batch.append(results.popleft())
        if batch:
            self.on_results(batch)

    def stop(self) -> None:
        """Stop the threads once queued jobs are done (blocking: call it off the loop)."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


class _Direct:
    """Bound plugin methods for the fast path: a plugin with no filters whose methods run on
    the loop, or (``nowait``) a blocking plugin's ``pread_nowait`` tried on the loop first."""

    __slots__ = ("handle", "nowait", "pread", "pwrite")

    def __init__(self, ctx: Context, nowait: bool = False) -> None:
        from pynbd.plugin import Plugin
        from pynbd.server.backend import PluginLayer

        layer = ctx.layer
        self.pread: Any = None
        self.pwrite: Any = None
        self.handle = ctx.handle
        self.nowait = nowait
        if not isinstance(layer, PluginLayer) or layer.has_async:
            return
        plugin = layer.plugin
        if nowait:
            if type(plugin).pread_nowait is not Plugin.pread_nowait and \
                    layer.thread_model == ThreadModel.PARALLEL:
                self.pread = plugin.pread_nowait
        else:
            self.pread = plugin.pread
            self.pwrite = plugin.pwrite if ctx.can_write() else None


class Connection:
    def __init__(self, server: Server, stream: FdStream, conn_id: int) -> None:
        self.server = server
        self.stream = stream
        self.id = conn_id
        self.loop = stream.loop
        self.export: Export | None = None
        self._ctx_lock_held = False
        # negotiation state
        self._structured = False
        self._extended = False
        self._meta: dict[int, str] = {}
        self._meta_export: str | None = None
        # transmission state
        self._buf = bytearray(_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_req: tuple[int, int, int, int, int] | None = None
        self._out: list[Any] = []
        self._flush_scheduled = False
        self._inflight = 0
        self._inflight_bytes = 0
        self._reading = False
        self._stopping = False
        self._done: asyncio.Future[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._workers: _Workers | None = None
        self._conn_lock = threading.Lock()
        self._error: str | None = None
        self._direct: _Direct | None = None
        self._on_loop = False
        self.info = _connection_info(server, stream, conn_id)
        self.info._conn = self

    # ==================================================================================
    # lifecycle
    async def run(self) -> None:
        # Registered from the start, so a server shutdown also ends a negotiating client.
        self.server.register_transmission(self)
        try:
            _set_connection(self.info)
            try:
                await self._call_blocking(self.server.chain.preconnect,
                                          self.server.config.readonly)
            except Exception as e:  # noqa: BLE001 - a refused client: one line, then hang up
                log.error("client %d: refused by preconnect: %s", self.id,
                          getattr(e, "message", None) or e)
                return
            try:
                ok = await asyncio.wait_for(self._negotiate(),
                                            self.server.config.handshake_timeout)
            except TimeoutError:
                log.error("client %d: handshake timed out", self.id)
                return
            except ProtocolError as e:
                log.error("client %d: %s", self.id, e)
                return
            if ok and self.export is not None:
                await self._transmission()
        except (ConnectionError, BrokenPipeError) as e:
            log.debug("client %d: connection lost: %s", self.id, e)
        except Exception:
            log.exception("client %d: internal error", self.id)
        finally:
            self.server.unregister_transmission(self)
            await self._cleanup()

    async def _cleanup(self) -> None:
        self.stream.set_reader(None)
        ex = self.export
        self.export = None
        if ex is not None:
            try:
                await self._call_blocking(ex.ctx.close)
            except Exception as e:  # noqa: BLE001
                log.error("client %d: close: %s", self.id, e)
        if self._ctx_lock_held:
            self.server.release_connection_lock()
            self._ctx_lock_held = False
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await self.loop.run_in_executor(None, pool.shutdown, True)
        if self._workers is not None:
            workers, self._workers = self._workers, None
            await self.loop.run_in_executor(None, workers.stop)
        self.stream.close()

    async def _call_blocking(self, fn: Any, *args: Any) -> Any:
        """Run a control-path callback: on the loop for nonblocking chains, else a thread."""
        if self.server.chain.on_loop:
            _set_connection(self.info)
            return fn(*args)
        return await self.loop.run_in_executor(self._get_pool(), self._locked, fn, args)

    def _get_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.server.config.threads,
                thread_name_prefix=f"pynbd-conn{self.id}")
        return self._pool

    def _locked(self, fn: Any, args: tuple[Any, ...]) -> Any:
        _set_connection(self.info)
        tm = self.server.thread_model
        if tm <= ThreadModel.SERIALIZE_ALL_REQUESTS:
            with self.server.all_requests_lock:
                return fn(*args)
        if tm == ThreadModel.SERIALIZE_REQUESTS:
            with self._conn_lock:
                return fn(*args)
        return fn(*args)

    # ==================================================================================
    # negotiation
    async def _negotiate(self) -> bool:
        cfg = self.server.config
        stream = self.stream
        if cfg.oldstyle:
            try:
                ex = await self._open_export("", go=True)
            except Exception as e:  # noqa: BLE001 - no error can be expressed: hang up
                log.error("client %d: %s", self.id, self._open_failed("", e).message)
                return False
            stream.write([ServerHandshake.oldstyle_greeting(ex.size, ex.eflags)])
            self.export = ex
            return True
        hs = ServerHandshake(cfg.handshake_flags)
        stream.write([hs.greeting()])
        rounds = 0
        limit = MAX_OPTION_ROUNDS
        while True:
            ev = hs.next_event()
            if ev is NEED_DATA:
                data = await stream.read_some()
                if not data:
                    log.debug("client %d: closed the connection during negotiation", self.id)
                    return False
                hs.receive_data(data)
                continue
            if isinstance(ev, ClientFlags):
                continue
            assert isinstance(ev, OptionRequest)
            rounds += 1
            if rounds > limit:
                log.error("client %d: too many option rounds", self.id)
                return False
            opt, data = ev.opt, ev.data
            if self.server.closing and opt != Opt.ABORT:
                if opt == Opt.EXPORT_NAME:
                    return False
                stream.write([hs.reply(Rep.ERR_SHUTDOWN, b"server is shutting down")])
                continue
            if opt == Opt.EXPORT_NAME:
                if self._extended:
                    log.error("client %d: EXPORT_NAME after extended headers", self.id)
                    return False
                try:
                    name = O.decode_string(data, "export name")
                    ex = await self._open_export(name, go=True)
                except Exception as e:  # noqa: BLE001 - no error can be expressed: hang up
                    log.error("client %d: EXPORT_NAME: %s", self.id, e)
                    return False
                self._select_contexts(ex, name)
                stream.write([hs.export_name_reply(ex.size, ex.eflags & 0xFFFF)])
                self.export = ex
                self._pending_trailing = hs.trailing_data
                return True
            try:
                done = await self._option(hs, opt, data)
            except OptionError as e:
                msg = e.message.encode("utf-8")[:4096]
                stream.write([hs.reply(e.reply, msg)])
                continue
            if opt == Opt.LIST and isinstance(done, int):
                limit += MAX_OPTION_ROUNDS_PER_EXPORT * done
                continue
            if done is True:
                self._pending_trailing = hs.trailing_data
                return True
            if done is False:
                await stream.drain()
                return False

    async def _option(self, hs: ServerHandshake, opt: int, data: bytes) -> bool | int | None:
        """Answer one option. True = go to transmission, False = close, int = exports listed."""
        w = self.stream.write
        cfg = self.server.config
        if opt == Opt.ABORT:
            w([hs.reply(Rep.ACK)])
            return False
        if opt == Opt.LIST:
            if data:
                raise OptionError(Rep.ERR_INVALID, "LIST takes no data")
            try:
                exports = await self._list_exports()
            except Exception as e:  # noqa: BLE001
                log.error("client %d: list_exports: %s", self.id, e)
                raise OptionError(Rep.ERR_PLATFORM, f"cannot list exports: {e}") from None
            out = [hs.reply(Rep.SERVER, O.build_rep_server(n, d)) for n, d in exports]
            out.append(hs.reply(Rep.ACK))
            w(out)
            return len(exports)
        if opt == Opt.STARTTLS:
            if data:
                raise OptionError(Rep.ERR_INVALID, "STARTTLS takes no data")
            raise OptionError(Rep.ERR_POLICY, "TLS is not enabled on this server")
        if opt in (Opt.INFO, Opt.GO):
            name, infos = O.parse_info_request(data)
            go = opt == Opt.GO
            try:
                ex = await self._open_export(name, go=go)
            except Exception as e:  # noqa: BLE001 - a plugin's failure is the option's failure
                raise self._open_failed(name, e) from None
            try:
                out = [hs.reply(Rep.INFO, O.build_info_export(ex.size, ex.eflags))]
                if Info.NAME in infos:
                    out.append(hs.reply(Rep.INFO, O.build_info_name(ex.name)))
                if Info.DESCRIPTION in infos:
                    desc = await self._call_blocking(ex.ctx.export_description)
                    if desc:
                        out.append(hs.reply(Rep.INFO, O.build_info_description(desc)))
                bs = await self._call_blocking(ex.ctx.block_size)
                if Info.BLOCK_SIZE in infos or bs:
                    mn, pref, mx = bs or (1, 4096, MAX_PAYLOAD_ADVERTISED)
                    out.append(hs.reply(Rep.INFO, O.build_info_block_size(
                        mn, pref, min(mx, MAX_PAYLOAD_ADVERTISED))))
            except BaseException as e:
                await self._close_export(ex)
                if isinstance(e, Exception) and not isinstance(e, OptionError):
                    raise self._open_failed(name, e) from None
                raise
            if go:
                self._select_contexts(ex, name)
                out.append(hs.reply(Rep.ACK))
                w(out)
                self.export = ex
                return True
            out.append(hs.reply(Rep.ACK))
            w(out)
            try:
                await self._close_export(ex)
            except Exception as e:  # noqa: BLE001 - the reply is out; only log it
                log.error("client %d: close: %s", self.id, e)
            return None
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                raise OptionError(Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            if cfg.no_sr:
                raise OptionError(Rep.ERR_UNSUP, "structured replies are disabled")
            self._structured = True
            w([hs.reply(Rep.ACK)])
            return None
        if opt == Opt.EXTENDED_HEADERS:
            if data:
                raise OptionError(Rep.ERR_INVALID, "EXTENDED_HEADERS takes no data")
            if cfg.no_sr:
                raise OptionError(Rep.ERR_UNSUP, "extended headers are disabled")
            self._extended = True
            self._structured = True
            w([hs.reply(Rep.ACK)])
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if not (self._structured or self._extended):
                raise OptionError(Rep.ERR_INVALID, "meta contexts need structured replies")
            name, queries = O.parse_meta_request(data)
            names = self.server.contexts.match(queries, listing=opt == Opt.LIST_META_CONTEXT)
            out = []
            if opt == Opt.SET_META_CONTEXT:
                self._meta = {i + 1: n for i, n in enumerate(names)}
                self._meta_export = name
                out = [hs.reply(Rep.META_CONTEXT, O.build_rep_meta_context(i, n))
                       for i, n in self._meta.items()]
            else:
                out = [hs.reply(Rep.META_CONTEXT, O.build_rep_meta_context(0, n)) for n in names]
            out.append(hs.reply(Rep.ACK))
            w(out)
            return None
        raise OptionError(Rep.ERR_UNSUP, f"option {opt} is not supported")

    def _open_failed(self, name: str, e: Exception) -> OptionError:
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        if not isinstance(e, CommandError | OSError):
            log.error("client %d: opening export '%s': %s: %s", self.id, name,
                      type(e).__name__, e)
        return OptionError(Rep.ERR_UNKNOWN, f"cannot open export '{name}': {msg}")

    def _select_contexts(self, ex: Export, name: str) -> None:
        """The meta contexts of the last SET apply if it named the export now opened."""
        if self._meta_export is not None and self._meta_export != ex.name and \
                self._meta_export != name:
            self._meta = {}
        ex.contexts = dict(self._meta) if (self._structured or self._extended) else {}

    async def _list_exports(self) -> list[tuple[str, str]]:
        cfg = self.server.config
        chain = self.server.chain
        res = await self._call_blocking(chain.list_exports, cfg.readonly, self.info.tls)
        if res is None:
            default = await self._call_blocking(chain.default_export, cfg.readonly,
                                                self.info.tls)
            return [(default or "", "")]
        return res

    async def _open_export(self, name: str, go: bool) -> Export:
        server = self.server
        cfg = server.config
        chain = server.chain
        self.info.export_name = name
        if name == "":
            canon = await self._call_blocking(chain.default_export, cfg.readonly, self.info.tls)
            if canon is None:
                raise CommandError(E.ENOENT, "no default export")
        else:
            canon = name
        if server.thread_model == ThreadModel.SERIALIZE_CONNECTIONS and not self._ctx_lock_held:
            await server.acquire_connection_lock()
            self._ctx_lock_held = True
        try:
            ctx = await self._call_blocking(chain.open, cfg.readonly, canon, self.info.tls)
            try:
                ex = await self._call_blocking(self._describe, ctx, canon)
            except BaseException:
                await self._call_blocking(ctx.close)
                raise
        except BaseException:
            if self._ctx_lock_held and not go:
                server.release_connection_lock()
                self._ctx_lock_held = False
            raise
        if not go and self._ctx_lock_held:
            pass  # released in _close_export
        return ex

    async def _close_export(self, ex: Export) -> None:
        try:
            await self._call_blocking(ex.ctx.close)
        finally:
            if self._ctx_lock_held:
                self.server.release_connection_lock()
                self._ctx_lock_held = False

    def _describe(self, ctx: Context, name: str) -> Export:
        """Compute size and transmission flags (each capability asked once)."""
        size = ctx.get_size()
        structured = self._structured or self._extended
        f = TxFlag.HAS_FLAGS
        writable = ctx.can_write()
        if not writable:
            f |= TxFlag.READ_ONLY
        if ctx.can_flush():
            f |= TxFlag.SEND_FLUSH
        if writable and ctx.can_fua() != FuaMode.NONE:
            f |= TxFlag.SEND_FUA
        if ctx.is_rotational():
            f |= TxFlag.ROTATIONAL
        if ctx.can_trim():
            f |= TxFlag.SEND_TRIM
        if writable and ctx.zero_mode():
            f |= TxFlag.SEND_WRITE_ZEROES
            if ctx.can_fast_zero():
                f |= TxFlag.SEND_FAST_ZERO
        if structured:
            f |= TxFlag.SEND_DF
        if ctx.can_multi_conn() and self.server.thread_model > ThreadModel.SERIALIZE_CONNECTIONS:
            f |= TxFlag.CAN_MULTI_CONN
        if ctx.can_cache() != CacheMode.NONE:
            f |= TxFlag.SEND_CACHE
        bs = ctx.block_size()
        minimum = bs[0] if bs else 1
        return Export(ctx, name, size, int(f), minimum, structured, self._extended, {})

    # ==================================================================================
    # transmission
    async def _transmission(self) -> None:
        ex = self.export
        assert ex is not None
        self._done = self.loop.create_future()
        self.stream.on_write_error = self._on_write_error
        self.stream.on_drained = self._resume_if_idle
        trailing = getattr(self, "_pending_trailing", b"")
        if trailing:
            n = len(trailing)
            if n > len(self._buf):
                self._buf = bytearray(n)
                self._view = memoryview(self._buf)
            self._buf[:n] = trailing
            self._end = n
        self._on_loop = self.server.chain.on_loop
        ex.build_rules()
        self._direct = _Direct(ex.ctx, nowait=not self._on_loop)
        if self._direct.pread is not None and not self._on_loop and \
                self.server.thread_model != ThreadModel.PARALLEL:
            self._direct = None
        if self._direct is not None and self._direct.pread is None:
            self._direct = None
        if self._stopping:  # the server began shutting down while we negotiated
            return
        self._reading = True
        self.stream.set_reader(self._on_readable)
        if self._end:
            try:
                self._process()
            except ProtocolError as e:
                log.error("client %d: %s", self.id, e)
                self._fatal()
            self._flush()
        await self._done
        await self.stream.drain()

    def stop(self) -> None:
        """Stop reading new requests; finish in-flight ones, then close (server shutdown).

        A client still negotiating is disconnected at once (its pending read returns EOF).
        """
        self._stopping = True
        if self._done is None:
            self.stream.interrupt_read()
            return
        self._pause()
        self._maybe_done()

    def disconnect(self, force: bool) -> None:
        """A plugin asked to drop this client: at once (force), or after the requests in
        flight are answered."""
        log.debug("client %d: disconnect requested by the plugin (force=%s)", self.id, force)
        if force:
            self._fatal()
            self.stream.close()
        else:
            self.stop()

    def _on_write_error(self, e: OSError) -> None:
        self._error = f"write failed: {e}"
        self._fatal()

    def _fatal(self) -> None:
        """Hard disconnect: stop reading; in-flight work finishes but its replies are dropped."""
        self._stopping = True
        self._pause()
        self._maybe_done(force=True)

    def _maybe_done(self, force: bool = False) -> None:
        if self._done is not None and not self._done.done() and (self._inflight == 0 or force):
            if force and self._inflight:
                # wait for in-flight callbacks; _complete() calls us again
                return
            self._done.set_result(None)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self.stream.pause_reading()

    def _resume(self) -> None:
        if not self._reading and not self._stopping:
            self._reading = True
            self.stream.resume_reading()

    def _resume_if_idle(self) -> None:
        if self._inflight < MAX_REQUESTS_IN_FLIGHT // 2 and \
                self._inflight_bytes < MAX_BYTES_IN_FLIGHT // 2:
            self._resume()

    def _on_readable(self) -> None:
        _set_connection(self.info)
        try:
            if self._payload is not None:
                n = self.stream.readinto(self._payload_view[self._payload_got:])  # type: ignore[index]
                if n == 0:
                    return self._eof()
                self._payload_got += n
                if self._payload_got < len(self._payload):
                    return
                payload, self._payload, self._payload_view = self._payload, None, None
                req = self._payload_req
                assert req is not None
                self._handle(*req, memoryview(payload), True)
                self._process()
            else:
                if self._end == len(self._buf):  # never read into an empty view (that is EOF)
                    rest = self._end - self._pos
                    self._view[:rest] = self._view[self._pos:self._end]
                    self._pos, self._end = 0, rest
                n = self.stream.readinto(self._view[self._end:])
                if n == 0:
                    return self._eof()
                self._end += n
                self._process()
        except BlockingIOError:
            return
        except (ConnectionResetError, BrokenPipeError, OSError) as e:
            if isinstance(e, BlockingIOError):
                return
            log.debug("client %d: read failed: %s", self.id, e)
            return self._eof()
        except ProtocolError as e:
            log.error("client %d: %s", self.id, e)
            self._flush()
            return self._fatal()
        except Exception:
            log.exception("client %d: internal error", self.id)
            self._flush()
            return self._fatal()
        self._flush()

    def _eof(self) -> None:
        if self._payload is not None or self._end > self._pos:
            log.debug("client %d: disconnected in the middle of a request", self.id)
            self._payload = None
        self._stopping = True
        self._pause()
        self._flush()
        self._maybe_done()

    def _process(self) -> None:
        """Parse and dispatch every complete request in the buffer."""
        ex = self.export
        assert ex is not None
        buf = self._buf
        pos, end = self._pos, self._end
        if ex.extended:
            hdr, want_magic = EXT_REQUEST, EXT_REQUEST_MAGIC
        else:
            hdr, want_magic = REQUEST, REQUEST_MAGIC
        hsize = hdr.size
        unpack = hdr.unpack_from
        extended = ex.extended
        # The fast path, inlined: a plugin on the loop with no filters, compact headers, READ
        # and WRITE without flags. The same validate() decides; anything else goes to _handle.
        direct = self._direct
        fast = (direct is not None and not direct.nowait and not extended
                and not self.server.closing)
        if fast:
            assert direct is not None
            dpread, dpwrite, dh = direct.pread, direct.pwrite, direct.handle
            out = self._out
            spack = SIMPLE_REPLY.pack
            dpack = _OFFSET_DATA.pack
            structured = ex.structured
        view = self._view
        while end - pos >= hsize and not self._stopping:
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if magic != want_magic:
                self._pos = self._end = 0
                raise ProtocolError(f"bad request magic {magic:#x}")
            if (cmd == _WRITE and not extended) or (extended and flags & _F_PAYLOAD_LEN):
                if length > MAX_PAYLOAD_ACCEPTED:
                    self._pos = self._end = 0
                    raise ProtocolError(f"request payload of {length} bytes is over the limit")
                start = pos + hsize
                if end - start >= length:
                    pos = start + length
                    if fast and not flags and length and dpwrite is not None and \
                            not validate(ex, cmd, 0, offset, length):
                        try:
                            dpwrite(dh, view[start:pos], offset, 0)
                        except BaseException as e:  # noqa: BLE001
                            self._reply_exc(ex, cmd, 0, cookie, offset, e)
                        else:
                            out.append(spack(SIMPLE_REPLY_MAGIC, 0, cookie))
                        continue
                    self._handle(flags, cmd, cookie, offset, length, view[start:pos], False)
                    continue
                if hsize + length <= _INLINE_PAYLOAD:
                    # wait for the rest in the receive buffer (make room at its end)
                    if pos + hsize + length > len(buf):
                        rest = end - pos
                        self._view[:rest] = self._view[pos:end]  # memmove, no temporary copy
                        pos, end = 0, rest
                        self._end = end
                    break
                # a large payload goes straight into a buffer of its own
                got = end - start
                pb = bytearray(length)
                pb[:got] = self._view[start:end]
                self._payload = pb
                self._payload_view = memoryview(pb)
                self._payload_got = got
                self._payload_req = (flags, cmd, cookie, offset, length)
                pos = end
                break
            pos += hsize
            if cmd == _DISC:
                log.debug("client %d: sent NBD_CMD_DISC", self.id)
                self._pos = self._end = 0
                self._stopping = True
                self._pause()
                self._maybe_done()
                return
            if fast and cmd == _READ and not flags and length and \
                    not validate(ex, cmd, 0, offset, length):
                try:
                    data = dpread(dh, length, offset, 0)
                    if len(data) != length:
                        raise CommandError(E.EIO, "short read from plugin")
                except BaseException as e:  # noqa: BLE001
                    self._reply_exc(ex, cmd, 0, cookie, offset, e)
                    continue
                if structured:
                    out.append(dpack(STRUCTURED_REPLY_MAGIC, 1, 1, cookie, length + 8, offset))
                else:
                    out.append(spack(SIMPLE_REPLY_MAGIC, 0, cookie))
                out.append(data)
                continue
            self._handle(flags, cmd, cookie, offset, length, None, False)
        if pos >= end:
            self._pos = self._end = 0
        elif pos and (len(buf) - end < hsize or (pos > len(buf) // 2 and end - pos <= 4096)):
            # move the unparsed rest to the front when there is no room for a header, or
            # when it is small; a large partial WRITE is moved only if its payload would not
            # fit (above), so megabytes are not shuffled on every read
            rest = end - pos
            self._view[:rest] = self._view[pos:end]  # memmove, no temporary copy
            self._pos, self._end = 0, rest
        else:
            self._pos = pos
        if self._inflight >= MAX_REQUESTS_IN_FLIGHT or \
                self._inflight_bytes + self.stream.pending >= MAX_BYTES_IN_FLIGHT:
            self._pause()

    # ---- one request -------------------------------------------------------------------
    def _handle(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                payload: memoryview | None, owned: bool) -> None:
        ex = self.export
        assert ex is not None
        if self.server.closing:
            return self._reply_error(ex, cmd, cookie, offset, 108, "server is shutting down")
        err = validate(ex, cmd, flags, offset, length)
        if err:
            return self._reply_error(ex, cmd, cookie, offset, err, "")
        if length == 0 and cmd != _FLUSH:
            return self._reply_ok(ex, cmd, cookie, offset, b"" if cmd == _READ else None)
        direct = self._direct
        if direct is not None and not flags & ~_F_PAYLOAD_LEN:
            # fast path: a plugin running on the loop, no filters, no flags to emulate
            try:
                if cmd == _READ:
                    data = direct.pread(direct.handle, length, offset, 0)
                    if len(data) != length:
                        return self._reply_result(ex, cmd, flags, cookie, offset, length, data)
                    return self._reply_ok(ex, cmd, cookie, offset, data)
                if cmd == _WRITE and direct.pwrite is not None:
                    direct.pwrite(direct.handle, payload, offset, 0)
                    return self._reply_ok(ex, cmd, cookie, offset, None)
            except BlockingIOError as e:
                if not direct.nowait:
                    return self._reply_exc(ex, cmd, flags, cookie, offset, e)
                # not cached: read in a worker thread below
            except BaseException as e:  # noqa: BLE001
                return self._reply_exc(ex, cmd, flags, cookie, offset, e)
        pflags = _P_FUA if flags & _F_FUA else 0
        ctx = ex.ctx
        fn: Any
        args: tuple[Any, ...]
        if cmd == _READ:
            fn, args = ctx.pread, (length, offset, 0)
        elif cmd == _WRITE:
            if not self._on_loop and not owned:
                payload = memoryview(bytes(payload))  # type: ignore[arg-type]
            fn, args = ctx.pwrite, (payload, offset, pflags)
        elif cmd == _WZ:
            if not flags & _F_NO_HOLE:
                pflags |= _P_MAY_TRIM
            if flags & _F_FAST_ZERO:
                pflags |= _P_FAST_ZERO
            fn, args = ctx.zero, (length, offset, pflags)
        elif cmd == _FLUSH:
            fn, args = ctx.flush, (0,)
        elif cmd == _TRIM:
            fn, args = ctx.trim, (length, offset, pflags)
        elif cmd == _CACHE:
            fn, args = ctx.cache, (length, offset, 0)
        elif cmd == _BS:
            fn, args = self._block_status, (ex, length, offset, bool(flags & _F_REQ_ONE))
        else:  # validate() rejects anything else
            return self._reply_error(ex, cmd, cookie, offset, _EINVAL, "")
        if self._on_loop:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001
                return self._reply_exc(ex, cmd, flags, cookie, offset, e)
            return self._reply_result(ex, cmd, flags, cookie, offset, length, result)
        self._inflight += 1
        if cmd == _READ or cmd == _WRITE:
            self._inflight_bytes += length
        workers = self._workers
        if workers is None:
            workers = self._workers = _Workers(self.loop, self.server.config.threads,
                                               f"pynbd-conn{self.id}", self._locked,
                                               self._completed)
        workers.submit((ex, cmd, flags, cookie, offset, length), fn, args)

    def _completed(self, batch: list[tuple[Any, bool, Any]]) -> None:
        """Results of blocking requests, in a batch: one reply write for all of them."""
        _set_connection(self.info)
        live = not self.stream.closed and self.stream.write_error is None
        for (ex, cmd, flags, cookie, offset, length), ok, value in batch:
            self._inflight -= 1
            if cmd == _READ or cmd == _WRITE:
                self._inflight_bytes -= length
            if live:
                if ok:
                    self._reply_result(ex, cmd, flags, cookie, offset, length, value)
                else:
                    self._reply_exc(ex, cmd, flags, cookie, offset, value)
        if live:
            self._flush()
        if self._stopping:
            self._maybe_done()
        elif self._inflight < MAX_REQUESTS_IN_FLIGHT // 2 and \
                self._inflight_bytes + self.stream.pending < MAX_BYTES_IN_FLIGHT // 2:
            self._resume()

    def _block_status(self, ex: Export, length: int, offset: int,
                      req_one: bool) -> list[tuple[int, list[tuple[int, int]]]]:
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

    # ---- replies -----------------------------------------------------------------------
    def _reply_result(self, ex: Export, cmd: int, flags: int, cookie: int, offset: int,
                      length: int, result: Any) -> None:
        if cmd == _READ:
            try:
                n = len(result)
            except TypeError:
                n = -1
            if n != length:
                log.error("client %d: plugin returned %s for a read of %d bytes", self.id,
                          f"{n} bytes" if n >= 0 else type(result).__name__, length)
                return self._reply_error(ex, cmd, cookie, offset, 5, "short read from plugin")
            return self._reply_ok(ex, cmd, cookie, offset, result)
        if cmd == _BS:
            try:
                chunks = [block_status_chunk(cookie, ctx_id, ext, i == len(result) - 1,
                                             ex.extended, offset)
                          for i, (ctx_id, ext) in enumerate(result)]
            except Exception as e:  # noqa: BLE001 - e.g. a context provider's bad extents
                return self._reply_exc(ex, cmd, flags, cookie, offset, e)
            self._out += chunks
            return None
        return self._reply_ok(ex, cmd, cookie, offset, None)

    def _reply_ok(self, ex: Export, cmd: int, cookie: int, offset: int, data: Any) -> None:
        out = self._out
        if data is not None:
            n = len(data)
            if ex.extended:
                if n == 0:
                    out.append(none_chunk(cookie, True, offset))
                else:
                    out.append(_EXT_OFFSET_DATA.pack(EXT_REPLY_MAGIC, ReplyFlag.DONE,
                                                     ReplyType.OFFSET_DATA, cookie, offset,
                                                     n + 8, offset))
                    out.append(data)
            elif ex.structured:
                if n == 0:
                    out.append(none_chunk(cookie))
                else:
                    out.append(_OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                                 ReplyType.OFFSET_DATA, cookie, n + 8, offset))
                    out.append(data)
            else:
                out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
                if n:
                    out.append(data)
        elif ex.extended:
            out.append(none_chunk(cookie, True, offset))
        else:
            out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def _reply_error(self, ex: Export, cmd: int, cookie: int, offset: int, err: int,
                     msg: str) -> None:
        if ex.extended or (ex.structured and (cmd == _READ or cmd == _BS)):
            self._out.append(error_chunk(cookie, err, msg, ex.extended, offset))
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))

    def _reply_exc(self, ex: Export, cmd: int, flags: int, cookie: int, offset: int,
                   e: BaseException) -> None:
        name = self.server.chain.top.name
        if isinstance(e, CommandError | OSError) and e.errno:
            err = errno_to_nbd(e.errno, fast_zero=bool(flags & _F_FAST_ZERO),
                               df=bool(flags & _F_DF))
            msg = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
            if not (isinstance(e, CommandError) and e.errno == E.ENOTSUP):
                log.debug("%s: %s: %s", name, name_of(Cmd, cmd).lower(), msg)
        else:
            err = 5
            msg = f"{type(e).__name__}: {e}"
            log.error("%s: %s: error: %s", name, name_of(Cmd, cmd).lower(),
                      "".join(traceback.format_exception(e)).rstrip())
        self._reply_error(ex, cmd, cookie, offset, err, msg)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out:
            self._out = []
            self.stream.write(out)
            if self.stream.pending >= MAX_BYTES_IN_FLIGHT:
                self._pause()



def _connection_info(server: Server, stream: FdStream, conn_id: int) -> ConnectionInfo:
    """Who is on the other end: the peer's address, and its credentials on a Unix socket."""
    import socket

    info = ConnectionInfo(id=conn_id, peer=stream.peer, readonly=server.config.readonly,
                          server=server)
    sock = stream.owner
    if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            info.peer_pid, info.peer_uid, info.peer_gid = struct.unpack("3i", cred)
        except OSError:
            pass
    return info
