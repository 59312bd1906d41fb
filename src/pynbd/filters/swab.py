"""The swab filter: swap the bytes of 16, 32 or 64-bit words. Its manual page is
:class:`SwabFilter`'s docstring."""

from __future__ import annotations

import array
import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import UINT32_MAX, extents_aligned, parse_int, round_down
from pynbd.plugin import Extent, Filter

__all__ = ["SwabFilter"]

#: array typecodes by item size (2, 4 and 8 bytes: "H", "I" and "Q" on the usual platforms).
_TYPECODE = {array.array(code).itemsize: code for code in "QLIH"}


def swap(data: Any, width: int) -> Any:
    """``data`` with the bytes of each ``width``-byte word reversed (a new buffer)."""
    if width == 1:
        # nbdkit 1.32's pwrite copies nothing into its buffer for swab-bits=8 and writes
        # whatever malloc left there: the data is passed on unchanged here.
        return data
    words = array.array(_TYPECODE[width])
    words.frombytes(data)
    words.byteswap()
    return memoryview(words).cast("B")


class SwabFilter(Filter):
    """NAME
        swab - pynbd byte-swapping filter

    SYNOPSIS
        pynbd serve --filter=swab PLUGIN [PLUGIN-ARGS...] [swab-bits=8|16|32|64]

    DESCRIPTION
        swab swaps the bytes of the plugin: by default the two bytes of every 16-bit word, so
        the client reads bytes 1 0 3 2 5 4 ... where the plugin has 0 1 2 3 4 5 ... Writes
        are swapped the same way on their way down. One use is reading disks formatted on the
        Atari Falcon, whose IDE controller is wired in reverse byte order.

        Requests must be aligned to the word size: others fail with EINVAL ("swab: requests
        to this filter must be aligned"). The word size is advertised to clients as the
        minimum block size. For byte-level access put the blocksize filter in front of this
        one (before it on the command line): it turns unaligned requests into
        read-modify-write cycles of whole words. The size
        is rounded down to a whole number of words; the truncate filter (round-up=) can
        extend it again. Extents are reported in whole words (a word mixing data and holes
        is data).

        This is nbdkit-swab-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        swab-bits=8
            Swap nothing (the filter does nothing but round the size). nbdkit 1.32 writes
            uninitialised memory instead of the client's data with this setting; pynbd
            writes the data.

        swab-bits=16
            Swap the bytes of each 2-byte word (the default).

        swab-bits=32
            Reverse each 4-byte word: 0 1 2 3 4 5 6 7 becomes 3 2 1 0 7 6 5 4.

        swab-bits=64
            Reverse each 8-byte word: 0 1 2 3 4 5 6 7 becomes 7 6 5 4 3 2 1 0. This makes
            the pattern plugin's big-endian offsets little-endian.

    EXAMPLES
        Serve an Atari Falcon disk image byte-swapped:

            pynbd serve --filter=swab file disk.img

        Read and write any byte of it, one at a time if need be:

            pynbd serve --filter=blocksize --filter=swab file disk.img
    """

    name = "swab"
    version = "1.32.5"
    nonblocking = True
    config_help = "swab-bits=8|16|32|64       Size of byte swap (default 16)."

    def __init__(self) -> None:
        self.width = 2

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "swab-bits":
            bits = parse_int("swab-bits", value)
            if bits not in (8, 16, 32, 64):
                raise ConfigError("invalid swab-bits, must be 8, 16, 32 or 64")
            self.width = bits // 8
        else:
            next_config(key, value)

    def get_size(self, next: Any, h: Any) -> int:
        return round_down(next.get_size(), self.width)

    def block_size(self, next: Any, h: Any) -> tuple[int, int, int]:
        bs = next.block_size()
        if bs is None:  # the plugin has no constraints
            return (self.width, 512, UINT32_MAX)
        return (max(bs[0], self.width), bs[1], bs[2])

    def _aligned(self, count: int, offset: int) -> None:
        if (count | offset) % self.width:
            raise CommandError(errno.EINVAL, "swab: requests to this filter must be aligned")

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._aligned(count, offset)
        return swap(next.pread(count, offset, flags), self.width)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._aligned(len(buf), offset)
        next.pwrite(swap(buf, self.width), offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        next.trim(count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        next.zero(count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int,
                flags: int) -> list[Extent]:
        self._aligned(count, offset)
        return extents_aligned(next, count, offset, flags, self.width)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        next.cache(count, offset, flags)
