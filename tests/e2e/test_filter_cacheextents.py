"""The cacheextents filter in one process: a walk one extent at a time asks the plugin
once; writes forget the cache; exports do not share it."""

from __future__ import annotations

from typing import Any

from pynbd.filters.cacheextents import CacheextentsFilter
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Flag
from tests.e2e.shape_chain import Disk, manual_of, open_chain

HOLE = EXTENT_HOLE | EXTENT_ZERO
LIST = [(0, 4096, 0), (4096, 4096, HOLE), (8192, 8192, 0)]


def test_walk_asks_once() -> None:
    disk = Disk(16384, extents=LIST)
    _, ctx = open_chain(disk, (CacheextentsFilter, []))
    seen = []
    offset = 0
    while offset < 16384:  # qemu-img convert's walk: one extent at a time
        ext = ctx.extents(16384 - offset, offset, Flag.REQ_ONE)
        seen.append(ext[0])
        offset = ext[0][0] + ext[0][1]
    assert seen == LIST
    assert disk.named("extents") == [("extents", 16384, 0, 0)]  # REQ_ONE dropped


def test_writes_forget() -> None:
    disk = Disk(16384, extents=LIST)
    _, ctx = open_chain(disk, (CacheextentsFilter, []))
    for write in (lambda: ctx.pwrite(b"x", 5000), lambda: ctx.zero(10, 0),
                  lambda: ctx.trim(10, 0)):
        ctx.extents(16384, 0)
        ctx.extents(100, 200)  # from the cache
        write()
        ctx.extents(100, 200)  # asked again
    assert len(disk.named("extents")) == 6


class Exports(Disk):
    """Two exports whose extents differ."""

    def list_exports(self, readonly: bool, is_tls: bool) -> list:
        return [("a", ""), ("b", "")]

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return export_name

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list:
        self._note("extents", count, offset, flags)
        return [(0, 16384, 0 if h == "a" else HOLE)]


def test_exports_do_not_share_the_cache() -> None:
    disk = Exports(16384, extents=[])
    chain, a = open_chain(disk, (CacheextentsFilter, []), export="a")
    b = chain.open(False, "b", False)
    assert a.extents(16384, 0) == [(0, 16384, 0)]
    assert b.extents(16384, 0) == [(0, 16384, HOLE)]  # nbdkit 1.32 would say data here
    assert a.extents(16384, 0) == [(0, 16384, 0)]


def test_manual() -> None:
    assert "cacheextents" in manual_of("cacheextents")
