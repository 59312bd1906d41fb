"""The pattern plugin: each 8-byte word holds its own offset. Its manual page is
:class:`PatternPlugin`'s docstring."""

from __future__ import annotations

import sys
from array import array
from typing import Any

from pynbd.plugin import CacheMode, Extent, Plugin, ThreadModel
from pynbd.plugins._common import SizeParameter

__all__ = ["PatternPlugin"]

# How reads are built, fast and without numpy. The word at offset o (a multiple of 8) is the
# big-endian u64 o. Split o into its low 16 bits, which repeat every 64 KiB, and its high 48
# bits, which are constant over each 64 KiB block. A template holds one 64 KiB block with the
# high bytes zero; a read copies the template (repeated as needed), then stores each non-zero
# high byte position with one strided slice assignment (buf[j::8] = ...), which runs in C.
# A 256 KiB read below 4 GiB needs two such stores: ~50 us here, against ~3 ms for
# array('Q', range(...)).
_PERIOD_WORDS = 8192  # 64 KiB of words: the low 16 bits of the offset
_PERIOD = _PERIOD_WORDS * 8


def _template() -> bytes:
    a = array("Q", range(0, _PERIOD, 8))
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


_TEMPLATE = _template()
#: Enough template for reads up to 1 MiB without repeating it per read.
_TEMPLATE_LONG = _TEMPLATE * 17


def pattern_bytes(count: int, offset: int) -> bytes | bytearray | memoryview:
    """The ``count`` bytes of the pattern at ``offset`` (what nbdkit's pattern plugin reads)."""
    if count <= 0:
        return b""
    w0 = offset >> 3
    w1 = (offset + count + 7) >> 3
    n = w1 - w0
    nbytes = n << 3
    start = (w0 % _PERIOD_WORDS) << 3
    if start + nbytes <= len(_TEMPLATE_LONG):
        buf = bytearray(memoryview(_TEMPLATE_LONG)[start:start + nbytes])
    else:
        reps = (start + nbytes + _PERIOD - 1) // _PERIOD
        buf = bytearray(memoryview(_TEMPLATE * reps)[start:start + nbytes])
    o0 = w0 << 3
    o1 = (w1 - 1) << 3
    # Byte j of a word (big-endian) holds bits 56-8j .. 63-8j; bytes 6 and 7 come from the
    # template, bytes 0..5 from the high part of the offset.
    for j in range(6):
        shift = 56 - 8 * j
        hi0 = o0 >> shift
        hi1 = o1 >> shift
        if hi1 == 0:
            continue  # zero for every word of this read (the template has zero here)
        if hi0 == hi1:
            src = bytes((hi0 & 0xFF,)) * n
        else:
            # The byte changes along the read: runs of equal values.
            parts = []
            w = w0
            while w < w1:
                v = (w << 3) >> shift
                nxt = (((v + 1) << shift) + 7) >> 3
                nxt = min(nxt, w1)
                parts.append(bytes((v & 0xFF,)) * (nxt - w))
                w = nxt
            src = b"".join(parts)
        buf[j::8] = src
    skip = offset - o0
    if skip == 0 and nbytes == count:
        return buf
    return memoryview(buf)[skip:skip + count]


class PatternPlugin(SizeParameter, Plugin):
    """NAME
        pattern - pynbd plugin to serve a fixed pattern of data for testing

    SYNOPSIS
        pynbd serve pattern [size=]SIZE

    DESCRIPTION
        pattern is a plugin for pynbd which serves a read-only disk whose contents are a
        fixed pattern: each 8-byte word holds its own offset, as a 64-bit big-endian
        integer. The word at offset 0 is 0, the word at offset 8 holds 8, the word at
        offset 16 holds 16, and so on, so reading any part of the disk tells where it was
        read from. Reads at unaligned offsets or of unaligned lengths return the matching
        slice of the pattern. The contents are byte for byte those of nbdkit's pattern
        plugin.

        It is useful for testing clients: a read from the wrong offset, a short read or a
        reordered reply shows at once. Block status reports the whole disk as data.

        This is nbdkit-pattern-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk, in bytes or with a suffix (512, 64K, 1M, 10G, 8E,
            2s...); at most 2^63-1. The default is 0. "size=" may be omitted (it is the
            magic parameter).

    EXAMPLES
        Dump the first words of a 1 MiB pattern disk:

            pynbd serve -U - pattern 1M --run 'nbddump "$uri" | head'

        A pattern disk of the largest size NBD allows:

            pynbd serve pattern size=9223372036854775807
    """

    name = "pattern"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = "[size=]<SIZE>         Size of the virtual disk (default 0)"

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return pattern_bytes(count, offset)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        return [(offset, count, 0)]
