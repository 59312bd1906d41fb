"""The truncate filter: change the size of the plugin. Its manual page is
:class:`TruncateFilter`'s docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import (
    INT64_MAX,
    UINT32_MAX,
    is_power_of_2,
    is_zero,
    parse_size,
    round_down,
    round_up,
)
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Extent, Filter, Flag

__all__ = ["TruncateFilter"]


def _parse_round(key: str, value: str) -> int:
    r = parse_size(value)
    if r == 0:
        raise ConfigError(f"if set, the {key} parameter must be > 0")
    if r > UINT32_MAX:
        raise ConfigError(f"the {key} parameter is too large")
    if not is_power_of_2(r):
        raise ConfigError(f"the {key} parameter must be a power of 2")
    return r


class _Sizes:
    """Per connection: the plugin's size when the client connected, and the size served."""

    __slots__ = ("real", "size")

    def __init__(self) -> None:
        self.real = 0
        self.size = 0

    def below(self, count: int, offset: int) -> int:
        """How many of the ``count`` bytes at ``offset`` lie inside the plugin."""
        return max(0, min(count, self.real - offset))


class TruncateFilter(Filter):
    """NAME
        truncate - pynbd truncate filter: make the plugin smaller, larger or rounded

    SYNOPSIS
        pynbd serve --filter=truncate PLUGIN [truncate=SIZE] [round-up=N] [round-down=N]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        truncate changes the size the client sees:

        - truncate=SIZE sets it, smaller or larger than the plugin;
        - round-up=N rounds it up to the next multiple of N;
        - round-down=N rounds it down to a multiple of N.

        They apply in that order when several are given. Bytes past the end of the plugin
        read as zeroes and are reported as a hole in extents. They may be written only with
        zeroes (writes of zeroes, zero and trim requests succeed and change nothing); any
        other write there fails with ENOSPC ("No space left on device"). Zero requests are
        always advertised as fast: past the end there is nothing to do, and inside the plugin
        a fast zero the plugin cannot do fails with ENOTSUP.

        The plugin's size is read when a client connects and kept for that connection.

        A use: clients that cannot cope with a size not a multiple of 512 bytes, served with
        round-up=512. With the blocksize filter, which rounds the size down to its block size,
        round-up gives access to the last bytes again.

        This is nbdkit-truncate-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        truncate=SIZE
            The size served, in bytes (a size: 512, 64K, 10G...).

        round-up=N
            Round the size up to the next multiple of N, a power of 2 (a size, e.g. 4K).
            A size already a multiple of N is kept.

        round-down=N
            Round the size down to a multiple of N, a power of 2.

    EXAMPLES
        Serve a file as a 4K-sector device whose unaligned tail stays reachable:

            pynbd serve --filter=blocksize --filter=truncate file /path/to/file \\
                minblock=4k round-up=4k

        Make a 1 GiB plugin look 2 GiB large, the rest reading as zeroes:

            pynbd serve --filter=truncate memory 1G truncate=2G
    """

    name = "truncate"
    version = "1.32.5"
    nonblocking = True
    config_help = (
        "truncate=<SIZE>                The new size.\n"
        "round-up=<N>                   Round up to next multiple of N.\n"
        "round-down=<N>                 Round down to multiple of N.")

    def __init__(self) -> None:
        self.truncate: int | None = None
        self.round_up = 0
        self.round_down = 0

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "truncate":
            self.truncate = parse_size(value)
        elif key == "round-up":
            self.round_up = _parse_round(key, value)
        elif key == "round-down":
            self.round_down = _parse_round(key, value)
        else:
            next_config(key, value)

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> _Sizes:
        next_open(readonly, export_name)
        return _Sizes()

    def prepare(self, next: Any, h: _Sizes, readonly: bool) -> None:
        h.real = h.size = next.get_size()
        if self.truncate is not None:
            h.size = self.truncate
        if self.round_up:
            if round_up(h.size, self.round_up) > INT64_MAX:
                raise CommandError(errno.EIO, (
                    f"cannot round size {h.size} up to next boundary of {self.round_up}"))
            h.size = round_up(h.size, self.round_up)
        if self.round_down:
            h.size = round_down(h.size, self.round_down)

    def get_size(self, next: Any, h: _Sizes) -> int:
        return h.size

    def can_extents(self, next: Any, h: _Sizes) -> bool:
        next.can_extents()  # asked so that a failure shows now, as nbdkit does
        return True

    def can_fast_zero(self, next: Any, h: _Sizes) -> bool:
        next.can_fast_zero()
        return True

    def pread(self, next: Any, h: _Sizes, count: int, offset: int, flags: int) -> Any:
        n = h.below(count, offset)
        if n == count:
            return next.pread(count, offset, flags)
        buf = bytearray(count)
        if n:
            buf[:n] = next.pread(n, offset, flags)
        return buf

    def pwrite(self, next: Any, h: _Sizes, buf: Any, offset: int, flags: int) -> None:
        n = h.below(len(buf), offset)
        if n:
            next.pwrite(buf[:n] if n < len(buf) else buf, offset, flags)
        if n < len(buf) and not is_zero(memoryview(buf)[n:]):
            raise CommandError(errno.ENOSPC, "truncate: write beyond end of underlying device")

    def trim(self, next: Any, h: _Sizes, count: int, offset: int, flags: int) -> None:
        n = h.below(count, offset)
        if n:
            next.trim(n, offset, flags)

    def zero(self, next: Any, h: _Sizes, count: int, offset: int, flags: int) -> None:
        n = h.below(count, offset)
        if n:
            if flags & Flag.FAST_ZERO and not next.can_fast_zero():
                raise CommandError(errno.ENOTSUP, "fast zero is not supported")
            next.zero(n, offset, flags)

    def extents(self, next: Any, h: _Sizes, count: int, offset: int,
                flags: int) -> list[Extent]:
        if offset >= h.real:
            # To the size served: nbdkit 1.32 ends this hole at truncate= even when
            # round-up= took the size past it, and its server then dies on an assertion
            # (no extent) when a client asks about the bytes in between.
            return [(offset, h.size - offset, EXTENT_HOLE | EXTENT_ZERO)]
        # Only the plugin's part: the client asks again about the tail.
        return list(next.extents(h.below(count, offset), offset, flags))

    def cache(self, next: Any, h: _Sizes, count: int, offset: int, flags: int) -> None:
        n = h.below(count, offset)
        if n:
            next.cache(n, offset, flags)
