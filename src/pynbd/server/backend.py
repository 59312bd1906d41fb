"""The backend chain: filters over a plugin, and the per-connection context with emulation.

A :class:`Chain` is built once per server (filters outermost first, then the plugin) and
configured; its thread model is known after ``config_complete``. Each client connection opens
a :class:`Context` on the outermost layer (every layer opened outer to inner, then prepared
inner to outer). A context caches the export's properties (each ``can_*`` is asked at most
once per connection, as in nbdkit) and emulates what a layer lacks: WRITE_ZEROES by writing
zeroes, FUA by flush, CACHE by reading, extents as one data extent. Filters call the layer
below through a context too, so they get the same emulation.

Plugin methods may be coroutines; a context running in a worker thread bridges them onto the
event loop (the data path of a plugin alone in a PARALLEL chain awaits them on the loop
without a thread: :mod:`pynbd.server.coroutines`). Whether a chain runs on the loop or in worker threads is decided once
(:attr:`Chain.on_loop`). With ``debug`` every call through every layer is logged as nbdkit's
``-v`` logs it (``memory: pread count=512 offset=0``).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Filter,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
    ZeroMode,
    _overrides,
)

__all__ = ["Chain", "Context", "FilterLayer", "Layer", "PluginLayer"]

log = logging.getLogger("pynbd.server")

_DATA_METHODS = ("pread", "pread_into", "pwrite", "flush", "trim", "zero", "extents", "cache")
_ZERO_CHUNK = bytes(1 << 20)
_QUERIES = ("get_size", "export_description", "block_size", "can_write", "can_flush",
            "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_extents", "can_fua",
            "can_multi_conn", "can_cache")
_HOOKS = ("open", "prepare", "finalize", "preconnect", "list_exports", "default_export")


def _takes_argument(method: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


def _is_async(obj: object, name: str) -> bool:
    return inspect.iscoroutinefunction(getattr(obj, name, None))


class Layer:
    """One layer of the chain; methods take the layer's handle first."""

    name: str
    nonblocking: bool
    #: The strictest thread model of this layer and every layer below (after config).
    thread_model: ThreadModel = ThreadModel.PARALLEL
    loop: asyncio.AbstractEventLoop | None = None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        r = fn(*args)
        if r is None or type(r) in _PLAIN:  # the usual answers, never awaitable
            return r
        if inspect.isawaitable(r):
            loop = self.loop
            if loop is None:
                raise RuntimeError("a coroutine callback needs the server's event loop")
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("a coroutine callback was called on the event loop thread")
            return asyncio.run_coroutine_threadsafe(r, loop).result()  # type: ignore[arg-type]
        return r

    # Before a connection has a handle.
    def preconnect(self, readonly: bool) -> None:
        raise NotImplementedError

    def list_exports(self, readonly: bool, is_tls: bool) -> Any:
        raise NotImplementedError

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        raise NotImplementedError

    # The interface every layer offers; ``h`` is the layer's own handle.
    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        raise NotImplementedError

    def prepare(self, h: Any, readonly: bool) -> None:
        pass

    def finalize(self, h: Any) -> None:
        pass

    def below_context(self, h: Any) -> Context | None:
        """The context of the layer below, opened for the connection that owns ``h``."""
        return None

    def close(self, h: Any) -> None:
        raise NotImplementedError

    def query(self, h: Any, what: str) -> Any:
        raise NotImplementedError

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        raise NotImplementedError

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        raise NotImplementedError

    def flush(self, h: Any, flags: int) -> None:
        raise NotImplementedError

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NotImplementedError

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NotImplementedError

    def extents(self, h: Any, count: int, offset: int, flags: int) -> Any:
        raise NotImplementedError

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NotImplementedError


class PluginLayer(Layer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.name = plugin.name
        self.has_async = any(_is_async(plugin, m) for m in _DATA_METHODS + _QUERIES + _HOOKS)
        self.nonblocking = bool(plugin.nonblocking) and not self.has_async
        self.thread_model = ThreadModel(getattr(plugin, "thread_model", ThreadModel.PARALLEL))

    def preconnect(self, readonly: bool) -> None:
        self._call(self.plugin.preconnect, readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> Any:
        return self._call(self.plugin.list_exports, readonly, is_tls)

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        return self._call(self.plugin.default_export, readonly, is_tls)  # type: ignore[no-any-return]

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return self._call(self.plugin.open, readonly, export_name, is_tls)

    def close(self, h: Any) -> None:
        self._call(self.plugin.close, h)

    def query(self, h: Any, what: str) -> Any:
        return self._call(getattr(self.plugin, what), h)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._call(self.plugin.pread, h, count, offset, flags)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        # hot path: a write through a filter, benchmarks/view.py (no _call frame for the
        # usual None; anything else is handled by _call as before)
        r = self.plugin.pwrite(h, buf, offset, flags)
        if r is not None:
            self._call(lambda: r)

    def flush(self, h: Any, flags: int) -> None:
        self._call(self.plugin.flush, h, flags)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._call(self.plugin.trim, h, count, offset, flags)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._call(self.plugin.zero, h, count, offset, flags)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._call(self.plugin.extents, h, count, offset, flags)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._call(self.plugin.cache, h, count, offset, flags)


class FilterLayer(Layer):
    """A filter over the layer below. Its handle is (filter handle, context below)."""

    def __init__(self, flt: Filter, below: Layer) -> None:
        self.filter = flt
        self.below = below
        self.name = flt.name
        self.has_async = any(_is_async(flt, m) for m in _DATA_METHODS + _QUERIES + _HOOKS)
        self.nonblocking = bool(flt.nonblocking) and below.nonblocking and not self.has_async
        self.thread_model = min(ThreadModel(flt.thread_model), below.thread_model)
        self._has = {m: _overrides(flt, m, Filter) for m in _DATA_METHODS + _QUERIES}
        # Data calls a filter does not override go straight to the context below; those it
        # overrides with plain methods go straight to them (no dispatch by name per call).
        for m in _DATA_METHODS:
            if m == "pread_into":
                continue
            if not self._has[m]:
                setattr(self, m, _passthrough(m))
            elif not _is_async(flt, m):
                setattr(self, m, self._direct(getattr(flt, m), m))

    def _direct(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        call_ = self._call

        def call(h: Any, *args: Any) -> Any:
            r = fn(h[1], h[0], *args)
            if r is None or type(r) in _PLAIN:
                return r
            return call_(lambda: r)  # an awaitable, or something unusual: the slow path

        def call3(h: Any, a: Any, b: Any, c: Any) -> Any:
            # hot path: every data call through a filter but flush, benchmarks/view.py
            # (call's work without packing and unpacking *args)
            r = fn(h[1], h[0], a, b, c)
            if r is None or type(r) in _PLAIN:
                return r
            return call_(lambda: r)

        direct = call if method == "flush" else call3
        direct.__name__ = getattr(fn, "__name__", "call")
        return direct

    def preconnect(self, readonly: bool) -> None:
        self._call(self.filter.preconnect, self.below.preconnect, readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> Any:
        return self._call(self.filter.list_exports, self.below.list_exports, readonly, is_tls)

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        return self._call(  # type: ignore[no-any-return]
            self.filter.default_export, self.below.default_export, readonly, is_tls)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        below: list[Context] = []

        def next_open(ro: bool, name: str | None = None) -> None:
            name = export_name if name is None else name
            if below:
                raise CommandError(errno.EINVAL, f"{self.name}: next_open called twice")
            if name == "":  # nbdkit resolves the default export again at every layer
                name = self.below.default_export(ro, is_tls)
                if name is None:
                    raise CommandError(errno.ENOENT, 'default export ("") not permitted')
            below.append(Context.opened(self.below, ro, name, is_tls))

        try:
            fh = self._call(self.filter.open, next_open, readonly, export_name, is_tls)
        except BaseException:
            for ctx in below:
                ctx.close()
            raise
        if not below:
            if getattr(self.filter, "may_skip_next_open", False):
                return (fh, None)  # it answers every call itself (tls-fallback)
            raise CommandError(errno.EIO, f"{self.name}: open did not open the layer below")
        return (fh, below[0])

    def prepare(self, h: Any, readonly: bool) -> None:
        fh, nxt = h
        self._call(self.filter.prepare, nxt, fh, readonly)

    def below_context(self, h: Any) -> Context | None:
        return h[1]  # type: ignore[no-any-return]

    def finalize(self, h: Any) -> None:
        fh, nxt = h
        try:
            self._call(self.filter.finalize, nxt, fh)
        finally:
            if nxt is not None:
                nxt.finalize()

    def close(self, h: Any) -> None:
        fh, nxt = h
        try:
            self._call(self.filter.close, fh)
        finally:
            if nxt is not None:
                nxt.close()

    def query(self, h: Any, what: str) -> Any:
        fh, nxt = h
        if self._has.get(what):
            return self._call(getattr(self.filter, what), nxt, fh)
        return getattr(nxt, what)()

    def _data(self, what: str, h: Any, *args: Any) -> Any:
        fh, nxt = h
        return self._call(getattr(self.filter, what), nxt, fh, *args)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._data("pread", h, count, offset, flags)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._data("pwrite", h, buf, offset, flags)

    def flush(self, h: Any, flags: int) -> None:
        self._data("flush", h, flags)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._data("trim", h, count, offset, flags)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._data("zero", h, count, offset, flags)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._data("extents", h, count, offset, flags)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._data("cache", h, count, offset, flags)


def _passthrough(method: str) -> Callable[..., Any]:
    """A filter layer's data method that hands the call to the context below (which
    emulates what its layer lacks, as nbdkit's plugin layer does)."""
    def call(h: Any, *args: Any) -> Any:
        return getattr(h[1], method)(*args)

    def call3(h: Any, a: Any, b: Any, c: Any) -> Any:
        return getattr(h[1], method)(a, b, c)  # hot path: as _direct's call3

    direct = call if method == "flush" else call3
    direct.__name__ = method
    return direct


#: Types a callback's result has that are never awaitable: checked first, as
#: inspect.isawaitable costs as much as a small plugin call.
_PLAIN = frozenset({bytes, bytearray, memoryview, list, tuple, int, bool, str})
#: Flags as plain ints: ``int & IntFlag`` goes through enum's Python code.
_FUA, _FAST_ZERO = int(Flag.FUA), int(Flag.FAST_ZERO)


def _truth(v: Any) -> bool:
    return bool(v)


class Context:
    """A layer opened for one connection: cached properties plus emulation.

    This is also the ``next`` object filters receive: ``next.pread(count, offset, flags)``.
    """

    def __init__(self, layer: Layer, handle: Any, readonly: bool, export_name: str = "",
                 is_tls: bool = False) -> None:
        self.layer = layer
        self.handle = handle
        self.readonly = readonly
        self.export_name = export_name
        self.is_tls = is_tls
        self._cache: dict[str, Any] = {}
        #: This layer was found writable (by :meth:`pwrite`'s checks; forgotten on reopen).
        self._writes = False
        self._closed = False
        self._prepared = False
        self._finalized = False

    @classmethod
    def opened(cls, layer: Layer, readonly: bool, export_name: str, is_tls: bool) -> Context:
        return cls(layer, layer.open(readonly, export_name, is_tls), readonly, export_name,
                   is_tls)

    # ---- lifecycle ---------------------------------------------------------------------
    def prepare(self) -> None:
        """After every layer is open: prepare this one (and those below it first)."""
        if not self._prepared:
            self._prepared = True
            below = self.layer.below_context(self.handle)
            if below is not None:
                below.prepare()
            self.layer.prepare(self.handle, self.readonly)

    def finalize(self) -> None:
        """Before any layer is closed: finalize this one, then those below."""
        if self._prepared and not self._finalized:
            self._finalized = True
            self.layer.finalize(self.handle)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.finalize()
            finally:
                self.layer.close(self.handle)

    def reopen(self, readonly: bool | None = None) -> None:
        """Close this layer and open it again with the same arguments (or read-only with
        ``readonly=True``): the retry filter's way to start over with a fresh plugin
        connection. Cached properties are forgotten. If the open fails the context stays
        closed (a later reopen tries again; nothing is closed twice)."""
        if not self._closed:
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - the old handle is being thrown away
                log.debug("%s: close before reopen: %s", self.layer.name, e)
        if readonly is not None:
            self.readonly = readonly
        self._cache.clear()
        self._writes = False
        self.handle = self.layer.open(self.readonly, self.export_name, self.is_tls)
        self._closed = self._prepared = self._finalized = False
        self.prepare()

    # ---- properties --------------------------------------------------------------------
    def _q(self, what: str) -> Any:
        try:
            return self._cache[what]
        except KeyError:
            v = self.layer.query(self.handle, what)
            self._cache[what] = v
            return v

    def get_size(self) -> int:
        size = self._q("get_size")
        if not isinstance(size, int) or size < 0 or size > (1 << 63) - 1:
            raise CommandError(errno.EIO, f"{self.layer.name}: get_size returned {size!r}")
        return size

    def export_description(self) -> str | None:
        return self._q("export_description")  # type: ignore[no-any-return]

    def block_size(self) -> tuple[int, int, int] | None:
        bs = self._q("block_size")
        if not bs or tuple(bs) == (0, 0, 0):
            return None
        mn, pref, mx = (int(x) for x in bs)
        if not (1 <= mn <= 65536 and mn & (mn - 1) == 0 and pref >= max(mn, 512)
                and pref & (pref - 1) == 0 and mx >= pref and mx <= 0xFFFFFFFF):
            raise CommandError(errno.EIO, f"{self.layer.name}: invalid block_size {bs!r}")
        return (mn, pref, mx)

    def can_write(self) -> bool:
        return not self.readonly and _truth(self._q("can_write"))

    def can_flush(self) -> bool:
        return _truth(self._q("can_flush"))

    def is_rotational(self) -> bool:
        return _truth(self._q("is_rotational"))

    def can_trim(self) -> bool:
        return self.can_write() and _truth(self._q("can_trim"))

    def zero_mode(self) -> ZeroMode:
        """NONE (no WRITE_ZEROES), EMULATE (zeroes written) or NATIVE (the layer's zero)."""
        if not self.can_write():
            return ZeroMode.NONE
        v = self._q("can_zero")
        if isinstance(v, ZeroMode):
            return v
        return ZeroMode.NATIVE if _truth(v) else ZeroMode.EMULATE

    def can_zero(self) -> bool:
        """Whether the layer's zero is called (WRITE_ZEROES is advertised unless the mode is
        NONE: see :meth:`zero_mode`)."""
        return self.zero_mode() == ZeroMode.NATIVE

    def can_fast_zero(self) -> bool:
        """Asked of the layer whenever the export is writable (nbdkit asks the plugin's
        can_fast_zero even when can_zero is false; its default then says yes: such a fast
        zero fails fast)."""
        if not self.can_write():
            return False
        self.can_zero()  # asked first, as nbdkit asks it (a failure fails the connection)
        return _truth(self._q("can_fast_zero"))

    def can_extents(self) -> bool:
        return _truth(self._q("can_extents"))

    def can_fua(self) -> FuaMode:
        if not self.can_write():
            return FuaMode.NONE
        return FuaMode(int(self._q("can_fua")))

    def can_multi_conn(self) -> bool:
        return _truth(self._q("can_multi_conn"))

    def can_cache(self) -> CacheMode:
        return CacheMode(int(self._q("can_cache")))

    # ---- data --------------------------------------------------------------------------
    def pread(self, count: int, offset: int, flags: int = 0) -> Any:
        return self.layer.pread(self.handle, count, offset, flags)

    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        if not flags and self._writes:  # the usual write: no flag, the layer known writable
            self.layer.pwrite(self.handle, buf, offset, 0)
            return
        if not self.can_write():
            raise CommandError(errno.EROFS, "the export is read-only")
        self._writes = True
        if flags & _FUA and self.can_fua() == FuaMode.EMULATE:
            self.layer.pwrite(self.handle, buf, offset, flags & ~_FUA)
            self.layer.flush(self.handle, 0)
        else:
            self.layer.pwrite(self.handle, buf, offset, flags)

    def flush(self, flags: int = 0) -> None:
        if self.can_flush():
            self.layer.flush(self.handle, flags)

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        if not self.can_trim():
            return  # trim is advisory
        if flags & _FUA and self.can_fua() == FuaMode.EMULATE:
            self.layer.trim(self.handle, count, offset, flags & ~_FUA)
            self.layer.flush(self.handle, 0)
        else:
            self.layer.trim(self.handle, count, offset, flags)

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        if not self.can_write():
            raise CommandError(errno.EROFS, "the export is read-only")
        if self.zero_mode() == ZeroMode.NONE:
            raise CommandError(errno.EOPNOTSUPP, "zero is not supported")
        fua_emulated = bool(flags & _FUA) and self.can_fua() == FuaMode.EMULATE
        lflags = flags & ~_FUA if fua_emulated else flags
        if self.can_zero():
            try:
                self.layer.zero(self.handle, count, offset, lflags)
            except (OSError, CommandError) as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or flags & _FAST_ZERO:
                    raise
            else:
                if fua_emulated:
                    self.layer.flush(self.handle, 0)
                return
        if flags & _FAST_ZERO:
            raise CommandError(errno.ENOTSUP, "fast zero is not supported")
        wflags = lflags & _FUA
        pos, end = offset, offset + count
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            self.layer.pwrite(self.handle, memoryview(_ZERO_CHUNK)[:n], pos, wflags)
            pos += n
        if fua_emulated:
            self.layer.flush(self.handle, 0)

    def extents(self, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
        """Extents covering [offset, ...) as (offset, length, type), clipped to the request."""
        if not self.can_extents():
            return [(offset, count, 0)]
        raw = self.layer.extents(self.handle, count, offset, flags)
        return _normalise_extents(raw, offset, count, self.layer.name)

    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        mode = self.can_cache()
        if mode == CacheMode.NATIVE:
            self.layer.cache(self.handle, count, offset, flags)
        elif mode == CacheMode.EMULATE:
            pos, end = offset, offset + count
            while pos < end:
                n = min(1 << 20, end - pos)
                self.layer.pread(self.handle, n, pos, 0)
                pos += n


def _normalise_extents(raw: Any, offset: int, count: int,
                       who: str) -> list[tuple[int, int, int]]:
    """Check a layer's extents as nbdkit_add_extent does (ascending, contiguous, the first
    not after ``offset``, at least one); clip them to the request and merge equal types.
    A layer that breaks the rules fails the request with EINVAL and one error line (``who``,
    the layer, is named in the -v log)."""
    log.debug("%s: extents count=%d offset=%d returned", who, count, offset)
    out: list[tuple[int, int, int]] = []
    end = offset + count
    expect = None
    for e in raw or ():
        off, length, typ = int(e[0]), int(e[1]), int(e[2]) & (EXTENT_HOLE | EXTENT_ZERO)
        if expect is None and off > offset:
            _bad_extents(f"nbdkit_add_extent: first extent must not be > start ({offset})")
        if expect is not None and off != expect:
            _bad_extents("nbdkit_add_extent: extents must be added in ascending order and "
                         "must be contiguous")
        if length < 0:
            _bad_extents(f"nbdkit_add_extent: extent length must not be negative ({length})")
        expect = off + length
        if length == 0 or off + length <= offset:
            continue
        if off >= end:
            break
        if off < offset:
            length -= offset - off
            off = offset
        if off + length > end:
            length = end - off
        if out and out[-1][2] == typ:
            o, n, t = out[-1]
            out[-1] = (o, n + length, t)
        else:
            out.append((off, length, typ))
    if not out:
        _bad_extents("extents: plugin must return at least one extent")
    return out


def _bad_extents(message: str) -> None:
    """A layer broke the extents rules: nbdkit's message in the log, EINVAL to the client."""
    log.error("%s", message)
    raise CommandError(errno.EINVAL, message)


def _exports(res: Any) -> list[tuple[str, str]] | None:
    """A list_exports result as (name, description) pairs; None means the default export."""
    if res is None:
        return None
    out = []
    for item in res:
        if isinstance(item, str):
            out.append((item, ""))
        else:
            out.append((str(item[0]), str(item[1] or "") if len(item) > 1 else ""))
    return out


class Chain:
    """The configured stack: filters (outermost first) over a plugin.

    With ``debug`` (``pynbd serve -v``) every call through every layer is logged.
    """

    def __init__(self, plugin: Plugin, filters: list[Filter] | None = None,
                 debug: bool = False) -> None:
        self.plugin = plugin
        self.filters = list(filters or [])
        self.debug = debug
        bottom: Layer = PluginLayer(plugin)
        self.plugin_layer = bottom
        if debug:
            from pynbd.server._debuglayer import DebugLayer
            bottom = DebugLayer(bottom)
        self.top: Layer = bottom
        self.layers: list[Layer] = [bottom]
        for f in reversed(self.filters):
            layer: Layer = FilterLayer(f, self.top)
            if debug:
                layer = DebugLayer(layer)
            self.top = layer
            self.layers.append(layer)
        self._thread_model: ThreadModel | None = None

    def load(self) -> None:
        """Each layer's ``load``, plugin first (as nbdkit loads the plugin, then filters)."""
        for obj in self._inner_first():
            self._debug(obj.name, "load")
            obj.load()

    def set_debug_paths(self, controlpath: bool, datapath: bool) -> None:
        """``-D nbdkit.backend.controlpath=0`` / ``datapath=0``: silence one kind of -v line."""
        for layer in self.layers:
            if hasattr(layer, "controlpath"):
                layer.controlpath = controlpath  # type: ignore[attr-defined]
                layer.datapath = datapath  # type: ignore[attr-defined]

    def _debug(self, who: str, what: str) -> None:
        if self.debug:
            log.debug("%s: %s", who, what)

    # configuration, outermost first: each filter consumes its keys and passes the rest down
    def config(self, key: str, value: str) -> None:
        def at(i: int, k: str, v: str) -> None:
            if i < len(self.filters):
                self._debug(self.filters[i].name, f"config key={k}, value={v}")
                self.filters[i].config(lambda k2, v2: at(i + 1, k2, v2), k, v)
            else:
                self._debug(self.plugin.name, f"config key={k}, value={v}")
                self.plugin.config(k, v)

        at(0, key, value)

    def config_complete(self) -> None:
        """Each layer's config_complete (outer first); then the thread model is settled."""
        for obj in self._outer_first():
            self._debug(obj.name, "config_complete")
            obj.config_complete()
        self._thread_model = None
        self.thread_model  # noqa: B018 - asked now, before get_ready, as nbdkit asks it

    @property
    def thread_model(self) -> ThreadModel:
        """The strictest of every layer's model (asked once, after configuration)."""
        if self._thread_model is None:
            tm = min(ThreadModel(self.plugin.thread_model),
                     ThreadModel(self.plugin.get_thread_model()))
            for f in self.filters:
                tm = min(tm, ThreadModel(f.thread_model), ThreadModel(f.get_thread_model()))
            self._thread_model = tm
            self._debug("pynbd", f"using thread model: {tm.name.lower()}")
            self._refresh_nonblocking()
        return self._thread_model

    def _refresh_nonblocking(self) -> None:
        """Whether each layer runs on the loop, decided again once configured: a plugin may
        learn only from its configuration that its callbacks never block (nbdkit's python
        plugin does, from the script)."""
        for layer in self.layers:
            inner = getattr(layer, "inner", layer)
            if isinstance(inner, PluginLayer):
                inner.nonblocking = bool(inner.plugin.nonblocking) and not inner.has_async
            elif isinstance(inner, FilterLayer):
                inner.nonblocking = bool(inner.filter.nonblocking) and \
                    inner.below.nonblocking and not inner.has_async
            layer.nonblocking = inner.nonblocking

    def _inner_first(self) -> tuple[Plugin | Filter, ...]:
        return (self.plugin, *reversed(self.filters))

    def _outer_first(self) -> tuple[Plugin | Filter, ...]:
        return (*self.filters, self.plugin)

    def get_ready(self) -> None:
        """get_ready on each layer, plugin first; a filter's takes the thread model."""
        tm = self.thread_model
        for obj in self._inner_first():
            self._debug(obj.name, "get_ready")
            if isinstance(obj, Filter) and _takes_argument(obj.get_ready):
                obj.get_ready(tm)
            else:
                obj.get_ready()  # type: ignore[call-arg]

    def after_fork(self) -> None:
        for obj in self._inner_first():
            self._debug(obj.name, "after_fork")
            obj.after_fork()

    def cleanup(self) -> None:
        """cleanup then unload on every layer, outer first; every layer runs even if one
        fails (the first failure is raised once all ran)."""
        self._each("cleanup")
        self.unload()

    def unload(self) -> None:
        """unload on every layer, outer first (also when configuration failed)."""
        self._each("unload")

    def _each(self, method: str) -> None:
        first: BaseException | None = None
        for obj in self._outer_first():
            try:
                self._debug(obj.name, method)
                getattr(obj, method)()
            except Exception as e:  # noqa: BLE001
                first = first or e
        if first is not None:
            raise first

    def set_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        for layer in self.layers:
            layer.loop = loop
            inner = getattr(layer, "inner", None)
            if inner is not None:
                inner.loop = loop

    @property
    def on_loop(self) -> bool:
        """True when every callback is a plain method that never blocks."""
        return self.top.nonblocking

    # ---- per connection, through every filter --------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        self.top.preconnect(readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        """The exports to list, as (name, description); None for just the default one."""
        return _exports(self.top.list_exports(readonly, is_tls))

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        return self.top.default_export(readonly, is_tls)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Context:
        """Open every layer for a connection (outer to inner), then prepare them (inner to
        outer). The context returned is closed with :meth:`Context.close`."""
        ctx = Context.opened(self.top, readonly, export_name, is_tls)
        try:
            ctx.prepare()
        except BaseException:
            ctx.close()
            raise
        return ctx

    def check_config(self) -> None:
        if not isinstance(self.plugin, Plugin):
            raise ConfigError("not a plugin")
