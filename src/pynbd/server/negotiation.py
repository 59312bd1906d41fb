"""The negotiation phase of one connection: options in, an opened :class:`Export` out.

:class:`Negotiation` drives the sans-IO :class:`~pynbd.protocol.handshake.ServerHandshake`
over the connection's stream, answers each option, and hands the export chosen by GO or
EXPORT_NAME (and the bytes the client already sent after it) to the transmission phase.

Bounds: at most :data:`~pynbd.limits.MAX_OPTION_ROUNDS` options, raised once per connection
by :data:`~pynbd.limits.MAX_OPTION_ROUNDS_PER_EXPORT` for each export the first LIST
returned (as nbdkit: a client may INFO every export listed, not LIST forever).
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pynbd.errors import CommandError, OptionError
from pynbd.limits import MAX_OPTION_ROUNDS, MAX_OPTION_ROUNDS_PER_EXPORT, MAX_PAYLOAD_ADVERTISED
from pynbd.plugin import CacheMode, FuaMode, ThreadModel
from pynbd.protocol import options as O
from pynbd.protocol.constants import Info, Opt, Rep, TxFlag
from pynbd.protocol.handshake import NEED_DATA, ClientFlags, OptionRequest, ServerHandshake
from pynbd.server.export import Export
from pynbd.server.tls import start_tls

if TYPE_CHECKING:
    from pynbd.server.backend import Context
    from pynbd.server.connection import Connection

__all__ = ["Negotiation"]

log = logging.getLogger("pynbd.server")

#: An option's answer: True = go to transmission, False = hang up, None = next option.
_Outcome = bool | None


class Negotiation:
    """One connection's option haggling, from the greeting to an open export (or not)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.server = conn.server
        self.stream = conn.stream
        self.id = conn.id
        self.structured = False
        self.extended = False
        self.meta: dict[int, str] = {}
        self.meta_export: str | None = None
        #: The export GO or EXPORT_NAME opened, for the transmission phase.
        self.export: Export | None = None
        #: Bytes received after the final option: the first requests.
        self.trailing = b""
        #: Option rounds allowed; the first LIST raises it, once.
        self.max_rounds = MAX_OPTION_ROUNDS
        self._listed = False
        self._options: dict[int, Callable[[ServerHandshake, int, bytes], Awaitable[_Outcome]]] = {
            Opt.ABORT: self._abort,
            Opt.LIST: self._list,
            Opt.STARTTLS: self._starttls,
            Opt.INFO: self._info_go,
            Opt.GO: self._info_go,
            Opt.STRUCTURED_REPLY: self._structured_reply,
            Opt.EXTENDED_HEADERS: self._extended_headers,
            Opt.LIST_META_CONTEXT: self._meta_context,
            Opt.SET_META_CONTEXT: self._meta_context,
        }

    async def run(self) -> bool:
        """Negotiate; True when :attr:`export` is open and transmission may start."""
        cfg = self.server.config
        if cfg.oldstyle:
            return await self._oldstyle()
        hs = ServerHandshake(cfg.handshake_flags)
        self.stream.write([hs.greeting()])
        rounds = 0
        while True:
            ev = hs.next_event()
            if ev is NEED_DATA:
                data = await self.stream.read_some()
                if not data:
                    log.debug("client %d: closed the connection during negotiation", self.id)
                    return False
                hs.receive_data(data)
                continue
            if isinstance(ev, ClientFlags):
                continue
            assert isinstance(ev, OptionRequest)
            rounds += 1
            if rounds > self.max_rounds:
                log.error("client %d: client spent too much time negotiating without "
                          "selecting an export", self.id)
                return False
            outcome = await self._answer(hs, ev.opt, ev.data)
            if outcome is True:
                self.trailing = hs.trailing_data
                return True
            if outcome is False:
                await self.stream.drain()
                return False

    async def _answer(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        """Answer one option; an OptionError becomes its error reply."""
        if self.server.closing and opt != Opt.ABORT:
            if opt == Opt.EXPORT_NAME:
                return False
            self.stream.write([hs.reply(Rep.ERR_SHUTDOWN, b"server is shutting down")])
            return None
        if self.server.config.tls == "require" and not self.conn.info.tls and \
                opt not in (Opt.STARTTLS, Opt.ABORT):
            return self._tls_required(hs, opt)
        if opt == Opt.EXPORT_NAME:
            return await self._export_name(hs, data)
        handler = self._options.get(opt)
        try:
            if handler is None:
                raise OptionError(Rep.ERR_UNSUP, f"option {opt} is not supported")
            return await handler(hs, opt, data)
        except OptionError as e:
            self.stream.write([hs.reply(e.reply, e.message.encode("utf-8")[:4096])])
            return None

    # ---- the options -------------------------------------------------------------------
    async def _oldstyle(self) -> bool:
        try:
            ex = await self.open_export("", go=True)
        except Exception as e:  # noqa: BLE001 - no error can be expressed: hang up
            self._open_failed("", e, hangup=True)
            return False
        self.stream.write([ServerHandshake.oldstyle_greeting(ex.size, ex.eflags)])
        self.export = ex
        return True

    async def _export_name(self, hs: ServerHandshake, data: bytes) -> _Outcome:
        if self.extended:
            log.error("client %d: EXPORT_NAME after extended headers", self.id)
            return False
        try:
            name = O.decode_string(data, "export name")
        except OptionError as e:
            log.error("client %d: EXPORT_NAME: %s", self.id, e.message)
            return False
        try:
            ex = await self.open_export(name, go=True)
        except Exception as e:  # noqa: BLE001 - no error can be expressed: hang up
            self._open_failed(name, e, hangup=True)
            return False
        self._select_contexts(ex, name)
        self.stream.write([hs.export_name_reply(ex.size, ex.eflags & 0xFFFF)])
        self.export = ex
        self.trailing = hs.trailing_data
        return True

    async def _abort(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        self.stream.write([hs.reply(Rep.ACK)])
        return False

    async def _list(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        if data:
            raise OptionError(Rep.ERR_INVALID, "LIST takes no data")
        try:
            exports = await self._list_exports()
        except Exception as e:  # noqa: BLE001
            log.error("client %d: %s: list_exports: %s: %s", self.id,
                      self.server.chain.top.name, type(e).__name__, e)
            raise OptionError(Rep.ERR_PLATFORM, f"cannot list exports: {e}") from None
        out = [hs.reply(Rep.SERVER, O.build_rep_server(n, d)) for n, d in exports]
        out.append(hs.reply(Rep.ACK))
        self.stream.write(out)
        if not self._listed:  # INFO for each export listed, but LIST cannot raise it again
            self._listed = True
            self.max_rounds += MAX_OPTION_ROUNDS_PER_EXPORT * len(exports)
        return None

    def _tls_required(self, hs: ServerHandshake, opt: int) -> _Outcome:
        """--tls=require before STARTTLS: nothing but the refusal (no export is opened,
        listed or named); EXPORT_NAME cannot be refused, so the client is hung up on."""
        if opt == Opt.EXPORT_NAME:
            log.error("client %d: NBD_OPT_EXPORT_NAME before TLS was negotiated "
                      "(--tls=require): disconnecting", self.id)
            return False
        self.stream.write([hs.reply(Rep.ERR_TLS_REQD)])  # no message, as nbdkit
        return None

    async def _starttls(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        if data:
            raise OptionError(Rep.ERR_INVALID, "STARTTLS takes no data")
        if self.conn.info.tls:
            raise OptionError(Rep.ERR_INVALID, "TLS is already negotiated")
        ctx = self.server.config.tls_context
        if ctx is None:  # --tls=off (or on without certificates); no message, as nbdkit
            self.stream.write([hs.reply(Rep.ERR_POLICY)])
            return None
        self.stream.write([hs.reply(Rep.ACK)])
        try:
            stream = await start_tls(self.stream, ctx)
        except (ssl.SSLError, OSError) as e:
            log.error("client %d: TLS handshake failed: %s", self.id,
                      getattr(e, "reason", None) or e)
            await self.stream.drain()  # the TLS alert, if any
            return False
        self.stream = self.conn.stream = stream
        self.conn.info.tls = True
        hs.tls_done()
        # The spec: everything negotiated before STARTTLS is forgotten.
        self.structured = self.extended = False
        self.meta, self.meta_export = {}, None
        log.debug("client %d: TLS negotiated (%s, %s)", self.id, stream.ssl.version(),
                  (stream.ssl.cipher() or ("?",))[0])
        return None

    async def _info_go(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        name, infos = O.parse_info_request(data)
        go = opt == Opt.GO
        try:
            ex = await self.open_export(name, go=go)
        except Exception as e:  # noqa: BLE001 - a plugin's failure is the option's failure
            raise self._open_failed(name, e) from None
        try:
            out = await self._info_replies(hs, ex, infos)
        except BaseException as e:
            await self.close_export(ex)
            if isinstance(e, Exception) and not isinstance(e, OptionError):
                raise self._open_failed(name, e) from None
            raise
        out.append(hs.reply(Rep.ACK))
        if go:
            self._select_contexts(ex, name)
            self.stream.write(out)
            self.export = ex
            return True
        self.stream.write(out)
        try:
            await self.close_export(ex)
        except Exception as e:  # noqa: BLE001 - the reply is out; only log it
            log.error("client %d: close: %s", self.id, e)
        return None

    async def _info_replies(self, hs: ServerHandshake, ex: Export, infos: Any) -> list[bytes]:
        call = self.conn.call_blocking
        out = [hs.reply(Rep.INFO, O.build_info_export(ex.size, ex.eflags))]
        if Info.NAME in infos:
            out.append(hs.reply(Rep.INFO, O.build_info_name(ex.name)))
        if Info.DESCRIPTION in infos:
            desc = await call(ex.ctx.export_description)
            if desc is not None:
                out.append(hs.reply(Rep.INFO, O.build_info_description(desc)))
        bs = await call(ex.ctx.block_size)
        if Info.BLOCK_SIZE in infos or bs:
            mn, pref, mx = bs or (1, 4096, MAX_PAYLOAD_ADVERTISED)
            out.append(hs.reply(Rep.INFO, O.build_info_block_size(
                mn, pref, min(mx, MAX_PAYLOAD_ADVERTISED))))
        return out

    async def _structured_reply(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        if data:
            raise OptionError(Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
        if self.server.config.no_sr:
            raise OptionError(Rep.ERR_UNSUP, "structured replies are disabled")
        self.structured = True
        self.stream.write([hs.reply(Rep.ACK)])
        return None

    async def _extended_headers(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        if data:
            raise OptionError(Rep.ERR_INVALID, "EXTENDED_HEADERS takes no data")
        if self.server.config.no_sr:
            raise OptionError(Rep.ERR_UNSUP, "extended headers are disabled")
        self.extended = self.structured = True
        self.stream.write([hs.reply(Rep.ACK)])
        return None

    async def _meta_context(self, hs: ServerHandshake, opt: int, data: bytes) -> _Outcome:
        if not self.structured:
            raise OptionError(Rep.ERR_INVALID, "meta contexts need structured replies")
        setting = opt == Opt.SET_META_CONTEXT
        name, queries = O.parse_meta_request(data)
        names = self.server.contexts.match(queries, listing=not setting)
        if setting:
            self.meta = {i + 1: n for i, n in enumerate(names)}
            self.meta_export = name
            out = [hs.reply(Rep.META_CONTEXT, O.build_rep_meta_context(i, n))
                   for i, n in self.meta.items()]
        else:
            out = [hs.reply(Rep.META_CONTEXT, O.build_rep_meta_context(0, n)) for n in names]
        out.append(hs.reply(Rep.ACK))
        self.stream.write(out)
        return None

    # ---- exports -----------------------------------------------------------------------
    def _open_failed(self, name: str, e: Exception, hangup: bool = False) -> OptionError:
        """A failure to open an export: NBD_REP_ERR_UNKNOWN for the client (as nbdkit).

        One log line: always when the client must be hung up on (EXPORT_NAME, oldstyle: it
        gets no message), else only for a plugin's bug (not an errno the plugin meant).
        """
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        if not isinstance(e, CommandError | OSError):
            log.error("client %d: %s: opening export '%s': %s: %s", self.id,
                      self.server.chain.top.name, name, type(e).__name__, e)
        elif hangup:
            log.error("client %d: opening export '%s': %s", self.id, name, msg)
        return OptionError(Rep.ERR_UNKNOWN, f"cannot open export '{name}': {msg}")

    def _select_contexts(self, ex: Export, name: str) -> None:
        """The meta contexts of the last SET apply if it named the export now opened."""
        if self.meta_export is not None and self.meta_export != ex.name and \
                self.meta_export != name:
            self.meta = {}
        ex.contexts = dict(self.meta) if self.structured else {}

    async def _list_exports(self) -> list[tuple[str, str]]:
        """The exports to list, asked through every filter; the default export alone when
        the layers list none."""
        readonly = self.server.config.readonly
        chain = self.server.chain
        call = self.conn.call_blocking
        tls = self.conn.info.tls
        res = await call(chain.list_exports, readonly, tls)
        if res is None:
            default = await call(chain.default_export, readonly, tls)
            return [(default or "", "")]
        return res

    async def open_export(self, name: str, go: bool) -> Export:
        """Open the chain for export ``name`` and describe it.

        Under SERIALIZE_CONNECTIONS the server-wide connection lock is taken first; an
        export opened by INFO gives it back in :meth:`close_export`, one opened by GO keeps
        it until the connection ends.
        """
        conn = self.conn
        server = self.server
        readonly = server.config.readonly
        chain = server.chain
        call = conn.call_blocking
        tls = conn.info.tls
        conn.info.export_name = name
        if name == "":
            canon = await call(chain.default_export, readonly, tls)
            if canon is None:
                raise CommandError(errno.ENOENT, "no default export")
        else:
            canon = name
        if server.thread_model == ThreadModel.SERIALIZE_CONNECTIONS and not conn.ctx_lock_held:
            await server.acquire_connection_lock()
            conn.ctx_lock_held = True
        try:
            ctx = await call(chain.open, readonly, canon, tls)
            try:
                return await call(self._describe, ctx, canon)
            except BaseException:
                await call(ctx.close)
                raise
        except BaseException:
            if not go:
                conn.release_ctx_lock()
            raise

    async def close_export(self, ex: Export) -> None:
        try:
            await self.conn.call_blocking(ex.ctx.close)
        finally:
            self.conn.release_ctx_lock()

    def _describe(self, ctx: Context, name: str) -> Export:
        """Compute size and transmission flags (each capability asked once)."""
        size = ctx.get_size()
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
        if self.structured:
            f |= TxFlag.SEND_DF
        if ctx.can_multi_conn() and self.server.thread_model > ThreadModel.SERIALIZE_CONNECTIONS:
            f |= TxFlag.CAN_MULTI_CONN
        if ctx.can_cache() != CacheMode.NONE:
            f |= TxFlag.SEND_CACHE
        bs = ctx.block_size()
        minimum = bs[0] if bs else 1
        return Export(ctx, name, size, int(f), minimum, self.structured, self.extended, {})
