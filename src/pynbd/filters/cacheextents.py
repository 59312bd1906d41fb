"""The cacheextents filter: keep the plugin's last extents answer. Its manual page is
:class:`CacheextentsFilter`'s docstring."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynbd.plugin import Extent, Filter, Flag

__all__ = ["CacheextentsFilter"]

log = logging.getLogger("pynbd.server")


class CacheextentsFilter(Filter):
    """NAME
        cacheextents - pynbd cacheextents filter: cache the plugin's last extents answer

    SYNOPSIS
        pynbd serve --filter=cacheextents PLUGIN [PLUGIN-ARGS...]

    DESCRIPTION
        cacheextents keeps the extents the plugin returned last, and answers a client's
        extent query from them when it starts inside the range they cover, without asking
        the plugin. The plugin is always asked for everything it can tell about the range
        requested, even when the client wants a single extent.

        This helps a client that walks the disk one extent at a time (qemu-img convert does)
        over a plugin that pays the same high price for one extent or many (VMware's VDDK,
        for one). With large extents it costs nothing.

        Any write, zero or trim request forgets the cached extents. The cache is shared by
        every client of the same export. Only extents are cached; to cache data too, put this
        filter between the cache filter and the plugin.

        This is nbdkit-cacheextents-filter(1) for pynbd. Unlike nbdkit 1.32's, the cache is
        kept per export name: a plugin serving several exports never answers for one export
        with another's extents.

    PARAMETERS
        cacheextents has no parameters: all are the plugin's.

    EXAMPLES
        Let qemu-img map a VDDK disk fast:

            pynbd serve -U - --filter=cacheextents --run 'qemu-img map $nbd' vddk ...
    """

    name = "cacheextents"
    version = "1.32.5"
    # The lock is never contended on the event loop; in worker threads it keeps one query
    # and the update of the cache together.
    nonblocking = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._export: str | None = None
        self._cached: list[Extent] = []
        self._start = self._end = 0

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> str:
        # The handle is the export name: the cache answers only for the export it holds.
        # (nbdkit 1.32 keeps one cache for all, so a plugin serving several exports may
        # get one export's extents answered with another's.)
        next_open(readonly, export_name)
        return export_name

    def extents(self, next: Any, h: str, count: int, offset: int,
                flags: int) -> list[Extent]:
        with self._lock:
            if self._cached and self._export == h and self._start <= offset < self._end:
                log.debug("cacheextents: returning from cache")
                return list(self._cached)
            log.debug("cacheextents: cache miss")
            exts = list(next.extents(count, offset, flags & ~Flag.REQ_ONE))
            self._cached = exts
            self._export = h
            self._start = exts[0][0]
            self._end = exts[-1][0] + exts[-1][1]
            return exts

    def _forget(self) -> None:
        with self._lock:
            self._cached = []

    def pwrite(self, next: Any, h: str, buf: Any, offset: int, flags: int) -> None:
        self._forget()
        next.pwrite(buf, offset, flags)

    def trim(self, next: Any, h: str, count: int, offset: int, flags: int) -> None:
        self._forget()
        next.trim(count, offset, flags)

    def zero(self, next: Any, h: str, count: int, offset: int, flags: int) -> None:
        self._forget()
        next.zero(count, offset, flags)
