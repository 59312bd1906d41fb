"""NBD negotiation — the handshake and the options — and the export's properties, for the
asyncio engine and for blocking connections alike.

:class:`Negotiation` is written against a stream with ``async read_some()`` and
``write(bufs)``: the engine's :class:`pynbd.stream.FdStream` on an event loop, or a blocking
socket's (:mod:`pynbd.client.blocking`), whose ``read_some`` returns at once, so that the
coroutines never suspend and :func:`drive` runs them to the end without an event loop. This
module does not import asyncio.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence

from pynbd._record import Record
from pynbd.errors import (
    LocalProtocolError,
    NBDError,
    OptionError,
    RemoteProtocolError,
)
from pynbd.protocol import options as O
from pynbd.protocol.client import (
    NEED_DATA,
    ClientHandshake,
    ExportReply,
    Greeting,
    OldstyleGreeting,
    OptionReply,
    check_export_size,
)
from pynbd.protocol.constants import Info, Opt, Rep, TxFlag

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ExportInfo", "Negotiation", "drive", "uri_target"]


class ExportInfo(Record):
    """What negotiation learnt of the export: its name, size, transmission flags and, when
    the server says, description, canonical name and block sizes (minimum, preferred,
    maximum)."""

    __slots__ = ("name", "size", "eflags", "description", "canonical_name", "block_size")  # noqa: RUF023 - repr order

    def __init__(self, name: str = "", size: int = 0, eflags: int = 0,
                 description: str | None = None, canonical_name: str | None = None,
                 block_size: tuple[int, int, int] | None = None) -> None:
        self.name = name
        self.size = size
        self.eflags = eflags
        self.description = description
        self.canonical_name = canonical_name
        self.block_size = block_size


def uri_target(uri: str) -> dict[str, Any]:
    """Where an NBD URI says to connect: ``unix``, ``vsock`` (cid, port) or ``host`` and
    ``port``, ``export_name``, and ``tls`` (a :class:`pynbd.client.tls.TLSConfig` for an
    ``nbds*://`` URI, else None)."""
    from pynbd.protocol._uriparse import checked, split

    u = checked(split(uri))  # what parse_uri() holds, without building an NBDURI
    tls = None
    if u["tls"]:
        from pynbd.client.tls import TLSConfig

        tls = TLSConfig.from_uri(u)
    if u["transport"] == "unix":
        return {"unix": u["socket"], "export_name": u["export"], "tls": tls}
    if u["transport"] == "vsock":
        return {"vsock": (int(u["host"]), u["port"]), "export_name": u["export"], "tls": tls}
    return {"host": u["host"] or "localhost", "port": u["port"], "export_name": u["export"],
            "tls": tls}


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (every await it makes returns at once) to its end
    and return its result."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("a coroutine driven without an event loop waited")


class Negotiation:
    """The client side of NBD negotiation (mixed into a connection class that has a
    ``stream`` and the attributes set by :meth:`_init_negotiation`)."""

    stream: Any

    def _init_negotiation(self) -> None:
        self.hs = ClientHandshake()
        self.structured = False
        self.extended = False
        self.export = ExportInfo()
        self.meta_contexts: dict[int, str] = {}
        self._meta_requested: list[str] = []
        self.handshake_flags = 3
        self.request_structured = True
        self.request_extended = False
        self.request_block_size = True
        self.full_info = False
        self.opt_mode = False
        self.protocol = ""
        self.tls_negotiated = False
        #: The TLS asked for (pynbd.client.tls.TLSConfig; None: plain NBD) and the TCP host
        #: name connected to (what the server's certificate is checked against).
        self.tls: Any = None
        self.tls_host: str | None = None
        self.connected = False
        self.closed = False

    # ==================================================================================
    # negotiation
    async def _recv_event(self) -> Any:
        assert self.stream is not None
        while True:
            ev = self.hs.next_event()
            if ev is not NEED_DATA:
                return ev
            data = await self.stream.read_some()
            if not data:
                raise RemoteProtocolError("server closed the connection during the handshake")
            self.hs.receive_data(data)

    async def _handshake(self, export_name: str) -> None:
        assert self.stream is not None
        self.hs = ClientHandshake(self.handshake_flags)
        ev = await self._recv_event()
        if isinstance(ev, OldstyleGreeting):
            self._tls_not_offered("server is oldstyle")
            self.protocol = "oldstyle"
            self.export = ExportInfo("", ev.size, ev.eflags)
            self._enter_transmission()
            return
        assert isinstance(ev, Greeting)
        self.stream.write([self.hs.client_flags()])
        if not self.hs.fixed_newstyle:
            self._tls_not_offered("server is not using fixed newstyle")
            self.protocol = "newstyle"
            await self._export_name(export_name)
            return
        self.protocol = "newstyle-fixed"
        if self.tls is not None and self.tls.mode:
            await self.opt_starttls()
        if self.request_extended:
            try:
                await self.opt_extended_headers()
            except OptionError:
                pass
        if self.request_structured and not self.extended:
            try:
                await self.opt_structured_reply()
            except OptionError:
                pass
        if (self.structured or self.extended) and self._meta_requested:
            try:
                await self.opt_set_meta_context(self._meta_requested, export_name)
            except OptionError:
                self.meta_contexts = {}
        self.export.name = export_name
        if not self.opt_mode:
            await self.opt_go(export_name)

    async def _option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option and collect its replies up to the final one."""
        assert self.stream is not None
        if self.connected or self.closed:
            raise LocalProtocolError("not negotiating")
        self.stream.write([self.hs.option(opt, data)])
        replies = []
        while True:
            ev = await self._recv_event()
            assert isinstance(ev, OptionReply)
            replies.append(ev)
            if ev.type == Rep.ACK or ev.is_error:
                return replies

    @staticmethod
    def _check(replies: list[OptionReply], what: str) -> list[OptionReply]:
        last = replies[-1]
        if last.is_error:
            msg = last.data.decode("utf-8", "replace")
            if not msg and last.type == Rep.ERR_TLS_REQD:
                msg = "server requires TLS encryption first (use an nbds:// URI)"
            raise OptionError(last.type, f"{what}: {msg}" if msg else f"{what} failed")
        return replies[:-1]

    async def opt_structured_reply(self) -> None:
        self._check(await self._option(Opt.STRUCTURED_REPLY), "structured replies")
        self.structured = True

    async def opt_extended_headers(self) -> None:
        self._check(await self._option(Opt.EXTENDED_HEADERS), "extended headers")
        self.extended = True
        self.structured = True

    def _tls_not_offered(self, why: str) -> None:
        """No STARTTLS is possible: fine unless TLS is required (libnbd's words)."""
        if self.tls is not None and self.tls.mode == 2:
            from pynbd.client.tls import TLSRefused

            raise TLSRefused(f"handshake: {why}, but handle TLS setting is 'require' (2)")

    async def opt_starttls(self) -> bool:
        """NBD_OPT_STARTTLS, then the TLS handshake (:meth:`_start_tls`); True if TLS is on.
        A server that refuses fails the connection if TLS is required (:attr:`tls`), else
        the connection goes on in plain text (False)."""
        from pynbd.client.tls import TLSConfig, TLSRefused

        if self.tls is None:
            self.tls = TLSConfig()
        replies = await self._option(Opt.STARTTLS)
        last = replies[-1]
        if last.is_error or last.type != Rep.ACK:
            if self.tls.mode == 2:
                raise TLSRefused("handshake: server refused TLS, but handle TLS setting is "
                                 "'require' (2)")
            return False
        await self._start_tls()
        self.tls_negotiated = True
        return True

    async def _start_tls(self) -> None:
        """The TLS handshake on the connection, which then goes on over TLS (each connection
        class does it its own way)."""
        raise NBDError("this connection cannot do TLS")

    async def opt_list(self) -> list[tuple[str, str]]:
        out = []
        for r in self._check(await self._option(Opt.LIST), "list exports"):
            if r.type == Rep.SERVER:
                out.append(O.parse_rep_server(r.data))
        return out

    async def _info_or_go(self, opt: int, name: str) -> ExportInfo:
        infos: list[int] = [Info.NAME, Info.DESCRIPTION] if self.full_info else []
        if self.request_block_size:
            infos.append(Info.BLOCK_SIZE)
        replies = await self._option(opt, O.build_info_request(name, infos))
        last = replies[-1]
        if last.type == Rep.ERR_UNSUP and opt == Opt.GO:
            raise OptionError(last.type, "server does not support NBD_OPT_GO")
        info = ExportInfo(name)
        got_export = False
        for r in self._check(replies, "export " + repr(name)):
            if r.type != Rep.INFO:
                continue
            try:
                ir = O.parse_info_reply(r.data)
            except RemoteProtocolError:
                if len(r.data) >= 2 and int.from_bytes(r.data[:2], "big") == Info.EXPORT:
                    raise
                continue  # malformed optional info: ignore
            if ir.kind == Info.EXPORT:
                assert ir.size is not None and ir.flags is not None
                info.size, info.eflags = check_export_size(ir.size), ir.flags
                got_export = True
            elif ir.kind == Info.NAME:
                info.canonical_name = ir.name
            elif ir.kind == Info.DESCRIPTION:
                info.description = ir.description
            elif ir.kind == Info.BLOCK_SIZE and ir.block_size is not None:
                mn, pref, mx = ir.block_size
                if (mn & (mn - 1) == 0 and 1 <= mn <= 65536 and pref & (pref - 1) == 0
                        and pref >= max(mn, 512) and mx >= pref):
                    info.block_size = ir.block_size
        if not got_export:
            raise RemoteProtocolError("server did not send NBD_INFO_EXPORT")
        if not info.eflags & TxFlag.HAS_FLAGS:
            raise RemoteProtocolError("server sent transmission flags without HAS_FLAGS")
        return info

    async def opt_info(self, name: str = "") -> ExportInfo:
        return await self._info_or_go(Opt.INFO, name)

    async def opt_go(self, name: str | None = None) -> None:
        if name is None:
            name = self.export.name
        try:
            info = await self._info_or_go(Opt.GO, name)
        except OptionError as e:
            if e.reply == Rep.ERR_UNSUP:
                await self._export_name(name)
                return
            raise
        self.export = info
        if not (self.structured or self.extended):
            self.meta_contexts = {}
        self._enter_transmission()

    async def _export_name(self, name: str) -> None:
        assert self.stream is not None
        self.stream.write([self.hs.export_name(name)])
        ev = await self._recv_event()
        assert isinstance(ev, ExportReply)
        self.export = ExportInfo(name, ev.size, ev.eflags)
        self._enter_transmission()

    async def _meta(self, opt: int, queries: Sequence[str], name: str | None) -> list[tuple[int, str]]:
        data = O.build_meta_request(self.export.name if name is None else name, list(queries))
        out = []
        for r in self._check(await self._option(opt, data), "meta context"):
            if r.type == Rep.META_CONTEXT:
                out.append(O.parse_rep_meta_context(r.data))
        return out

    async def opt_list_meta_context(self, queries: Sequence[str] = (),
                                    name: str | None = None) -> list[str]:
        return [n for _, n in await self._meta(Opt.LIST_META_CONTEXT, queries, name)]

    async def opt_set_meta_context(self, queries: Sequence[str],
                                   name: str | None = None) -> list[str]:
        self.meta_contexts = {}
        got = await self._meta(Opt.SET_META_CONTEXT, queries, name)
        self.meta_contexts = dict(got)
        return [n for _, n in got]

    def _enter_transmission(self) -> None:
        trailing = self.hs.trailing_data
        if trailing:
            raise RemoteProtocolError("server sent data before the first request")
        self.connected = True

    # ==================================================================================
    # export properties
    @property
    def size(self) -> int:
        return self.export.size

    @property
    def eflags(self) -> int:
        return self.export.eflags

    def _flag(self, f: int) -> bool:
        return bool(self.export.eflags & f)

    def is_read_only(self) -> bool:
        return self._flag(TxFlag.READ_ONLY)

    def can_flush(self) -> bool:
        return self._flag(TxFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._flag(TxFlag.SEND_FUA)

    def is_rotational(self) -> bool:
        return self._flag(TxFlag.ROTATIONAL)

    def can_trim(self) -> bool:
        return self._flag(TxFlag.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._flag(TxFlag.SEND_WRITE_ZEROES)

    def can_df(self) -> bool:
        return self._flag(TxFlag.SEND_DF) and self.structured

    def can_multi_conn(self) -> bool:
        return self._flag(TxFlag.CAN_MULTI_CONN)

    def can_cache(self) -> bool:
        return self._flag(TxFlag.SEND_CACHE)

    def can_fast_zero(self) -> bool:
        return self._flag(TxFlag.SEND_FAST_ZERO) and self.can_zero()

    def can_meta_context(self, name: str) -> bool:
        return name in self.meta_contexts.values()

    def block_size(self) -> tuple[int, int, int]:
        return self.export.block_size or (1, 4096, 32 * 1024 * 1024)
