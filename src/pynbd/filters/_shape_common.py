"""Helpers of the filters that change the shape of the disk (private).

Rounding, a reader-writer lock, and nbdkit's ``nbdkit_extents_aligned`` for offset,
partition, truncate, blocksize, blocksize-policy, swab, protect, extentlist, noextents,
cacheextents and ddrescue; nbdkit's parameter parsers (from :mod:`pynbd.filters._params`)
are re-exported for them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pynbd.filters._params import (
    INT64_MAX,
    UINT32_MAX,
    parse_int,
    parse_size,
    parse_unsigned,
    strtol,
)
from pynbd.plugin import Extent, Flag

__all__ = [
    "INT64_MAX",
    "UINT32_MAX",
    "RWLock",
    "extents_aligned",
    "is_power_of_2",
    "is_zero",
    "parse_int",
    "parse_size",
    "parse_unsigned",
    "round_down",
    "round_up",
    "shift_extents",
    "strtol",
]

#: Compared with 64 KiB pieces of a buffer: bytearray == buffer is one memcmp.
_ZERO_PIECE = bytearray(1 << 16)


def is_zero(buf: Any) -> bool:
    """Whether every byte of ``buf`` (any buffer) is zero."""
    mv = memoryview(buf).cast("B")
    step = len(_ZERO_PIECE)
    for i in range(0, len(mv), step):
        piece = mv[i:i + step]
        if len(piece) == step:
            if _ZERO_PIECE != piece:
                return False
        elif bytes(piece) != bytes(len(piece)):
            return False
    return True


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up(n: int, align: int) -> int:
    """``ROUND_UP`` for a power-of-2 ``align``."""
    return (n + align - 1) & ~(align - 1)


def round_down(n: int, align: int) -> int:
    """``ROUND_DOWN`` for a power-of-2 ``align``."""
    return n & ~(align - 1)


def shift_extents(extents: list[Extent], delta: int) -> list[Extent]:
    """The extents of the layer below seen ``delta`` bytes earlier (offset, partition)."""
    return [(off - delta, length, typ) for off, length, typ in extents]


def extents_aligned(next: Any, count: int, offset: int, flags: int,
                    align: int) -> list[Extent]:
    """``nbdkit_extents_aligned``: the extents below from ``offset`` (``count`` and
    ``offset`` aligned to ``align``), every one of them a multiple of ``align`` long.

    An unaligned extent past the first block is cut back to the block boundary (the client
    asks again from there); a first extent shorter than a block is merged with what follows
    into one block whose type is what all of them share (the bitwise and: 0, data, is the
    safe answer for a mixed block).
    """
    exts = list(next.extents(count, offset, flags))
    for i, (off, length, typ) in enumerate(exts):
        if length % align == 0:
            continue
        if off + length > offset + align:
            cut = round_down(length, align)
            return exts[:i] + ([(off, cut, typ)] if cut else [])
        # Only the first extent can end inside the first block.
        rest = exts[i + 1:]
        while length < align:
            if not rest:
                rest = list(next.extents(align - length, off + length, flags & ~Flag.REQ_ONE))
            length += rest[0][1]
            typ &= rest[0][2]
            rest.pop(0)
        return [(off, align, typ)]
    return exts


class RWLock:
    """A reader-writer lock: many holders of :meth:`shared`, or one of :meth:`exclusive`.

    A waiting writer keeps new readers out, so a stream of aligned writes cannot starve a
    read-modify-write cycle.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
