"""The offset filter: serve a byte range of the plugin. Its manual page is
:class:`OffsetFilter`'s docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError
from pynbd.filters._shape_common import parse_size, shift_extents
from pynbd.plugin import Extent, Filter

__all__ = ["OffsetFilter"]


class OffsetFilter(Filter):
    """NAME
        offset - pynbd offset filter: serve a byte range of the plugin

    SYNOPSIS
        pynbd serve --filter=offset PLUGIN [offset=OFFSET] [range=LENGTH] [PLUGIN-ARGS...]

    DESCRIPTION
        offset serves only the bytes [OFFSET .. OFFSET+LENGTH-1] of the plugin below it: the
        client sees a disk of LENGTH bytes whose byte 0 is the plugin's byte OFFSET. Reads,
        writes, trims, zeroes, cache requests and extents are moved by OFFSET.

        The range must lie inside the plugin: a client connecting to a plugin smaller than
        OFFSET+LENGTH (or than OFFSET, without range) is refused, with a message saying so.
        To make a plugin larger or smaller use the truncate filter; to serve a partition by
        its number use the partition filter.

        This is nbdkit-offset-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        offset=OFFSET
            Where the served range starts in the plugin (default 0). A size: 512, 1M, 2s...

        range=LENGTH
            How many bytes to serve (default: from OFFSET to the end of the plugin).

    EXAMPLES
        Serve 100 MiB of disk.img from 1 MiB on (disk.img must be at least 101 MiB):

            pynbd serve --filter=offset file disk.img offset=1M range=100M

        Serve the partition that parted reports from byte 65536, 104727040 bytes long:

            pynbd serve --filter=offset file disk.img offset=65536 range=104727040

        (pynbd serve --filter=partition file disk.img partition=1 finds it for you.)
    """

    name = "offset"
    version = "1.32.5"
    nonblocking = True
    config_help = (
        "offset=<OFFSET>            The start offset to serve (default 0).\n"
        "range=<LENGTH>             The total size to serve (default rest of file).")

    def __init__(self) -> None:
        self.offset = 0
        self.range: int | None = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "offset":
            self.offset = parse_size(value)
        elif key == "range":
            self.range = parse_size(value)
        else:
            next_config(key, value)

    def get_size(self, next: Any, h: Any) -> int:
        real = next.get_size()
        if self.range is not None:
            if self.offset > real - self.range:
                raise CommandError(errno.EIO, (
                    f"offset+range ({self.offset}+{self.range}) is larger than the real size "
                    f"({real}) of the underlying file or device"))
            return self.range
        if self.offset > real:
            raise CommandError(errno.EIO, (
                f"offset ({self.offset}) is larger than the real size ({real}) "
                "of the underlying file or device"))
        return real - self.offset  # type: ignore[no-any-return]

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return next.pread(count, offset + self.offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + self.offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + self.offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + self.offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        return shift_extents(next.extents(count, offset + self.offset, flags), self.offset)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + self.offset, flags)
