"""The null plugin: reads zeroes, discards writes. Its manual page is :class:`NullPlugin`'s
docstring."""

from __future__ import annotations

from typing import Any

from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    FuaMode,
    Plugin,
    ThreadModel,
)
from pynbd.plugins._common import SizeParameter, zeroes

__all__ = ["NullPlugin"]


class NullPlugin(SizeParameter, Plugin):
    """NAME
        null - pynbd bitbucket plugin

    SYNOPSIS
        pynbd serve null [[size=]SIZE]

    DESCRIPTION
        null is a plugin for pynbd which serves a disk that reads as zeroes and throws away
        everything written to it, like /dev/null. It is useful for testing clients and the
        server itself: it costs nothing to read or write, so it measures everything else.

        Every request succeeds: writes, trims, zeroes (fast zero included), flushes and
        cache requests do nothing. Block status reports the whole disk as a hole that reads
        as zeroes. Multi-conn is advertised (there is no state to keep consistent).

        This is nbdkit-null-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk, in bytes or with a suffix (512, 64K, 1M, 10G, 8E,
            2s...); at most 2^63-1. The default is 0, an empty disk. "size=" may be omitted
            (it is the magic parameter).

    EXAMPLES
        A 1 TiB disk that swallows writes, to measure a client's write speed:

            pynbd serve null 1T

        An empty disk:

            pynbd serve null
    """

    name = "null"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = "[size=]<SIZE>         Size of the backing disk (default 0)"

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_fast_zero(self, h: Any) -> bool:
        return True

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return zeroes(count)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        pass

    def flush(self, h: Any, flags: int) -> None:
        pass

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        return [(offset, count, EXTENT_HOLE | EXTENT_ZERO)]
