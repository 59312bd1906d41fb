"""The readahead filter: prefetch what sequential reads will want next. Its manual page is
:class:`ReadaheadFilter`'s docstring."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from pynbd.plugin import CacheMode, ConnectionInfo, Filter, ThreadModel, _set_connection
from pynbd.plugin import connection as current_connection

__all__ = ["ReadaheadFilter"]

log = logging.getLogger("pynbd.filters")

#: The smallest and largest readahead window (nbdkit >= 1.31.2's; not configurable there).
READAHEAD_MIN = 32768
READAHEAD_MAX = 4 * 1024 * 1024


class _Handle:
    """Per connection: what the layer below can cache, and the prefetching thread."""

    def __init__(self, thread_model: ThreadModel | None, info: ConnectionInfo | None) -> None:
        self.can_cache: CacheMode | None = None
        self.thread_model = thread_model
        self.info = info
        self.commands: queue.SimpleQueue[tuple[Any, int, int] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def working(self) -> bool:
        return self.can_cache == CacheMode.NATIVE and self.thread_model == ThreadModel.PARALLEL

    def send(self, next: Any, count: int, offset: int) -> None:
        """Queue a prefetch for the background thread (started on first use)."""
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="pynbd-readahead",
                                               daemon=True)
                self.thread.start()
        self.commands.put((next, count, offset))

    def _run(self) -> None:
        _set_connection(self.info)  # the layers below may ask which client this is
        while True:
            cmd = self.commands.get()
            if cmd is None:
                return
            next, count, offset = cmd
            try:
                next.cache(count, offset, 0)
            except Exception as e:  # noqa: BLE001 - readahead is advisory: nobody to tell
                log.debug("readahead: cache count=%d offset=%d: %s", count, offset, e)

    def stop(self) -> None:
        with self.lock:
            thread = self.thread
        if thread is not None:
            self.commands.put(None)
            thread.join()


class ReadaheadFilter(Filter):
    """NAME
        readahead - pynbd filter to prefetch data ahead of sequential reads

    SYNOPSIS
        pynbd serve --filter=readahead PLUGIN [PLUGIN-ARGS...]

        pynbd serve --filter=readahead --filter=cache PLUGIN [PLUGIN-ARGS...]

        pynbd serve --filter=readahead --filter=cow PLUGIN cow-on-cache=true

    DESCRIPTION
        readahead prefetches data while a client reads: with every read it asks the layer
        below, in the background, to cache (NBD_CMD_CACHE) the data that follows, so that
        sequential reads find it ready. Plugins that implement cache prefetch the data
        themselves; for the others put the cache filter after this one (or the cow filter
        with cow-on-cache=true), which then does about the same.

        The window prefetched adapts, as in nbdkit 1.31.2 and later: it starts at 32K,
        doubles (up to 4M) with each read that starts past what was last prefetched, stays
        while reads move forward, and falls back to 32K when a read goes backwards. The
        window is shared by all clients; each client has its own background thread.

        The scan filter is similar but reads the whole disk ahead, for clients known to
        read most of it sequentially.

        Limitations: the filter does nothing, and says so with a warning when a client
        connects, when the layer below cannot cache natively or when the thread model is
        not parallel (the prefetches run beside the client's requests). It is not needed
        when clients or the kernel read ahead already (then it may even slow things down).

    PARAMETERS
        There are none: every parameter goes to the plugin.

    EXAMPLES
        A slow web server's disk image, prefetched into a cache:

            pynbd serve --filter=readahead --filter=cache curl https://example.com/disk.img

        The same with a copy-on-write overlay, the image writable:

            pynbd serve --filter=readahead --filter=cow curl https://example.com/disk.img \\
                cow-on-cache=true
    """

    name = "readahead"
    version = "1.0"

    def __init__(self) -> None:
        # The adaptive window, shared by every connection (nbdkit's globals).
        self._window_lock = threading.Lock()
        self.window = READAHEAD_MIN
        self.last_offset = 0
        self.last_readahead = 0

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        info = current_connection()
        server = getattr(info, "server", None)
        tm = getattr(server, "thread_model", None)
        return _Handle(ThreadModel(tm) if tm is not None else None, info)

    def close(self, h: _Handle) -> None:
        h.stop()

    def can_cache(self, next: Any, h: _Handle) -> CacheMode:
        r = CacheMode(next.can_cache())
        h.can_cache = r
        if not h.working():
            log.error("readahead: warning: underlying plugin does not support NBD_CMD_CACHE "
                      "or PARALLEL thread model, so the filter won't do anything")
            if r != CacheMode.NATIVE and h.thread_model == ThreadModel.PARALLEL:
                log.error("readahead: try adding --filter=cache after this filter")
        return r

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        if h.working():
            size = next.get_size()
            ra_offset, ra_count = offset + count, 0
            with self._window_lock:
                if ra_offset < size:
                    ra_count = min(self.window, size - ra_offset)
                # A read past the last prefetch doubles the window; one moving forward
                # keeps it; one going back resets it.
                if self.last_readahead < offset:
                    self.window = min(self.window * 2, READAHEAD_MAX)
                elif self.last_offset >= offset:
                    self.window = READAHEAD_MIN
                self.last_offset = offset
                self.last_readahead = ra_offset + ra_count
            if ra_count:
                h.send(next, ra_count, ra_offset)
        return next.pread(count, offset, flags)
