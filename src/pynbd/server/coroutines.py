"""Coroutine callbacks awaited on the event loop: the data path of a plugin written with
``async def`` (the nbd plugin, rbd, ...), without a worker thread.

A plugin's coroutine method would otherwise run through a worker thread that hands it to
the loop and waits for it (:meth:`pynbd.server.backend.Layer._call`): two thread hops per
request, and no more requests in flight than there are threads. When the chain is the
plugin alone, under the PARALLEL thread model (so no lock to take), a request whose method
is a coroutine function becomes a task on the loop instead; its result comes back to the
transmission phase like a worker thread's, in a batch.

A plugin may also offer ``start_pread(h, count, offset, flags, done)`` and
``start_pwrite(h, buf, offset, flags, done)``: plain methods, called on the loop, that start
the request and return at once; ``done(error, value)`` is called on the loop when it is
over (``error`` None, ``value`` the data read; or the exception it failed with); ``done``
calls made inside ``with pynbd.plugin.completions():`` are answered when the block ends, in
one write (else in the next turn of the loop). They are
used instead of the coroutines where the chain allows the coroutines: no task and no
future per request (the nbd plugin's requests go to its server this way). A WRITE's payload
is the plugin's to keep (a copy out of the receive buffer), unless the plugin sets
``start_pwrite_copies = True``, promising to be done with it when ``start_pwrite`` returns
(the rbd plugin: librbd copies the data as it takes the request); then the payload is lent
where it was received, without that copy. Such a plugin may also offer
``start_pwritev(h, bufs, offset, flags, done)``: a plain WRITE is then held back while the
next request, a WRITE just after it on the disk, is still arriving (a few milliseconds at
most: :data:`~pynbd.server.transmission.HOLD_SECONDS`), and the two come as one call, their lent
payloads in order, one ``done`` answering both (the rbd plugin: one rbd_aio_writev, one
librbd request instead of two). A blocking plugin
may offer ``start_pread`` too (an attribute it may set only once configured: the curl
plugin's reads then go to the web server from the loop, its other calls to worker threads).
So may the outermost filter, as ``start_pread(next, h, count, offset, flags, done)``, when
the chain below it is PARALLEL too (the xz filter: a read of a block already decompressed
is answered on the loop, and the reads waiting for one block are answered together when
it is done); its other calls go to worker threads.

What the per-connection :class:`~pynbd.server.backend.Context` would emulate for such a
request (FUA by a flush, CACHE by reads, WRITE_ZEROES by writes, extents) still goes through
the context in a worker thread: :meth:`AsyncPath.call_for` returns None for it.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from pynbd.plugin import CacheMode, FuaMode, Plugin, ThreadModel, _task_connection
from pynbd.server.backend import Context, FilterLayer, Layer, PluginLayer
from pynbd.server.export import CACHE, F_FUA, FLUSH, P_FUA, TRIM, WRITE

__all__ = ["AsyncPath", "async_path"]

_AsyncMethod = Callable[..., Coroutine[Any, Any, Any]]


def _coroutine_method(plugin: Plugin | None, name: str) -> _AsyncMethod | None:
    m = getattr(plugin, name, None)
    return m if inspect.iscoroutinefunction(m) else None


def async_path(ctx: Context, server_model: ThreadModel, info: Any) -> AsyncPath | None:
    """The loop's way to a plugin's coroutine methods, or None when requests must go to
    worker threads: filters or ``-v`` in the chain, a thread model other than PARALLEL, no
    coroutine ``pread`` nor ``start_pread``."""
    layer: Layer = ctx.layer
    if isinstance(layer, FilterLayer):
        return _filter_path(ctx, layer, server_model, info)
    if not isinstance(layer, PluginLayer) or \
            not (layer.has_async or getattr(layer.plugin, "start_pread", None)):
        return None
    if layer.thread_model != ThreadModel.PARALLEL or server_model != ThreadModel.PARALLEL:
        return None
    path = AsyncPath(ctx, layer.plugin, info)
    return path if path.pread is not None or path.start_pread is not None else None


def _filter_path(ctx: Context, layer: FilterLayer, server_model: ThreadModel,
                 info: Any) -> AsyncPath | None:
    """The outermost filter's ``start_pread``, bound to this connection's handles."""
    start = getattr(layer.filter, "start_pread", None)
    if start is None or layer.has_async or layer.thread_model != ThreadModel.PARALLEL or \
            server_model != ThreadModel.PARALLEL:
        return None
    fh, nxt = ctx.handle

    def start_pread(h: Any, count: int, offset: int, flags: int,
                    done: Callable[..., None]) -> None:
        start(nxt, fh, count, offset, flags, done)

    return AsyncPath(ctx, None, info, start_pread)


class AsyncPath:
    """A plugin's coroutine data methods (or a filter's ``start_pread``), for one
    connection."""

    def __init__(self, ctx: Context, plugin: Plugin | None, info: Any,
                 start_pread: Callable[..., None] | None = None) -> None:
        self.ctx = ctx
        self.pread = _coroutine_method(plugin, "pread")
        self._pwrite = _coroutine_method(plugin, "pwrite")
        self._flush = _coroutine_method(plugin, "flush")
        self._trim = _coroutine_method(plugin, "trim")
        self._cache = _coroutine_method(plugin, "cache")
        self.start_pread: Callable[..., None] | None = \
            start_pread or getattr(plugin, "start_pread", None)
        self.start_pwrite: Callable[..., None] | None = getattr(plugin, "start_pwrite", None)
        #: The plugin's ``start_pwrite`` is done with the payload when it returns (it copied
        #: what it needs): it gets the payload where it was received, not a copy of it.
        self.lends_payload = bool(getattr(plugin, "start_pwrite_copies", False))
        #: ``start_pwritev(h, bufs, offset, flags, done)``: lent payloads written one after
        #: the other from ``offset``, one request to the plugin (its ``done`` answers all).
        self.start_pwritev: Callable[..., None] | None = \
            getattr(plugin, "start_pwritev", None) if self.lends_payload else None
        #: The context every task of this connection runs in: pynbd.plugin.connection()
        #: answers this connection in its steps, whatever ran on the loop in between.
        self.context = contextvars.copy_context()
        self.context.run(_task_connection.set, info)

    def start_for(self, cmd: int, flags: int) -> Callable[..., None] | None:
        """The ``start_*`` method serving a validated WRITE, if the plugin has one and the
        context has nothing to emulate for it."""
        if cmd == WRITE and self.start_pwrite is not None:
            if flags & F_FUA and self.ctx.can_fua() != FuaMode.NATIVE:
                return None
            return self.start_pwrite
        return None

    def call_for(self, cmd: int, flags: int, offset: int, length: int,
                 payload: Any) -> Coroutine[Any, Any, Any] | None:
        """The coroutine serving a validated command other than READ, or None when the
        context has to emulate part of it (then it runs in a worker thread)."""
        ctx = self.ctx
        h = ctx.handle
        fua = bool(flags & F_FUA)
        if cmd == WRITE and self._pwrite is not None:
            if fua and ctx.can_fua() != FuaMode.NATIVE:
                return None
            return self._pwrite(h, payload, offset, P_FUA if fua else 0)
        if cmd == FLUSH and self._flush is not None and ctx.can_flush():
            return self._flush(h, 0)
        if cmd == TRIM and self._trim is not None and ctx.can_trim():
            if fua and ctx.can_fua() != FuaMode.NATIVE:
                return None
            return self._trim(h, length, offset, P_FUA if fua else 0)
        if cmd == CACHE and self._cache is not None and ctx.can_cache() == CacheMode.NATIVE:
            return self._cache(h, length, offset, 0)
        return None
