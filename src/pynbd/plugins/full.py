"""The full plugin: a disk that is always full. Its manual page is :class:`FullPlugin`'s
docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Flag,
    Plugin,
    ThreadModel,
    parse_size,
)
from pynbd.plugins._common import zeroes

__all__ = ["FullPlugin"]


class FullPlugin(Plugin):
    """NAME
        full - pynbd plugin for a disk that is always full

    SYNOPSIS
        pynbd serve full [size=]SIZE

    DESCRIPTION
        full is a plugin for pynbd which serves a disk that is always full, like /dev/full:
        reads return zeroes, and every write, trim and write-zeroes request fails with
        ENOSPC ("No space left on device"). A write-zeroes request with the FAST_ZERO flag
        fails with ENOTSUP instead, as nbdkit's does (zeroing is not fast, it is impossible).
        Block status reports the whole disk as a hole that reads as zeroes.

        It is useful for testing how clients handle ENOSPC.

        This is nbdkit-full-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk, in bytes or with a suffix (512, 64K, 1M, 10G, 8E,
            2s...); at most 2^63-1. This parameter is required; "size=" may be omitted (it
            is the magic parameter).

    EXAMPLES
        See how a copy handles a full destination:

            pynbd serve -U - full 1M --run 'nbdcopy disk.img "$uri"'
    """

    name = "full"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = "[size=]<SIZE>         (required) Size of the backing disk"

    def __init__(self) -> None:
        self._size: int | None = None

    def config(self, key: str, value: str) -> None:
        if key == "size":
            self._size = parse_size(value, "size")
        else:
            raise ConfigError(f"full: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self._size is None:
            raise ConfigError("full: size parameter is required")

    def get_size(self, h: Any) -> int:
        assert self._size is not None
        return self._size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_fast_zero(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return zeroes(count)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        raise CommandError(errno.ENOSPC)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise CommandError(errno.ENOSPC)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO:
            raise CommandError(errno.ENOTSUP, "full: zeroing is never fast (the disk is full)")
        raise CommandError(errno.ENOSPC)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        return [(offset, count, EXTENT_HOLE | EXTENT_ZERO)]
