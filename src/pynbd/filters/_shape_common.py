"""Helpers of the filters that change the shape of the disk (private).

offset, partition, truncate, blocksize, blocksize-policy, swab, protect, extentlist,
noextents, cacheextents and ddrescue parse their parameters with nbdkit's server helpers
(``nbdkit_parse_size``, ``nbdkit_parse_unsigned``, ``nbdkit_parse_int``,
``nbdkit_parse_uint64_t``): users and scripts rely on what those accept (leading blanks, a
sign, hex and octal for the integer forms) and on their messages, so the parsers here
reproduce both as nbdkit 1.32 does. Every error is a :class:`~pynbd.errors.ConfigError`
whose text is nbdkit's message.

Also here: rounding, a reader-writer lock, and nbdkit's ``nbdkit_extents_aligned``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pynbd.errors import ConfigError
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

INT64_MAX = (1 << 63) - 1
UINT32_MAX = (1 << 32) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
#: What ``%m`` prints for ERANGE.
_ERANGE_TEXT = os.strerror(34)
#: C's isspace() in the "C" locale.
_SPACE = " \t\n\v\f\r"
_HEX = "0123456789abcdefABCDEF"
_SIZE_SCALE = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
               "e": 1 << 60, "s": 512}


def strtol(text: str, base: int = 0) -> tuple[int, int]:
    """C's strtol/strtoull: (value, index after the number); the index is 0 when no number
    was found. ``base`` is 0 (``0x`` hex, ``0`` octal, else decimal) or 10. The value is the
    mathematical one: range checks are the caller's."""
    n = len(text)
    i = 0
    while i < n and text[i] in _SPACE:
        i += 1
    neg = i < n and text[i] == "-"
    if i < n and text[i] in "+-":
        i += 1
    digits = "0123456789"
    if base == 0:
        if text.startswith(("0x", "0X"), i) and i + 2 < n and text[i + 2] in _HEX:
            digits, base, i = _HEX, 16, i + 2
        elif text.startswith("0", i):
            digits, base = "01234567", 8
        else:
            base = 10
    j = i
    while j < n and text[j] in digits:
        j += 1
    if j == i:
        return 0, 0
    value = int(text[i:j], base)
    return (-value if neg else value), j


def parse_size(text: str) -> int:
    """``nbdkit_parse_size``: a decimal number with an optional suffix (b, k, M, G, T, P, E
    for powers of 1024, s for 512-byte sectors)."""
    value, end = strtol(text, 10)
    if end == 0:
        raise ConfigError(f"could not parse size string ({text})")
    if value < 0:
        raise ConfigError(f"size cannot be negative ({text})")
    if value > INT64_MAX:
        raise ConfigError(f"size ({text}) exceeds maximum value")
    suffix = text[end:]
    scale = 1
    if suffix:
        if suffix[0].lower() not in _SIZE_SCALE or len(suffix) > 1:
            raise ConfigError(f"could not parse size: unknown suffix '{suffix}'")
        scale = _SIZE_SCALE[suffix.lower()]
    if INT64_MAX // scale < value:
        raise ConfigError(f"overflow computing size ({text})")
    return value * scale


def _number_tail(what: str, text: str, end: int, out_of_range: bool) -> None:
    if out_of_range:
        raise ConfigError(f'{what}: could not parse number: "{text}": {_ERANGE_TEXT}')
    if end == 0:
        raise ConfigError(f"{what}: empty string where we expected a number")
    if end != len(text):
        raise ConfigError(f'{what}: could not parse number: "{text}": trailing garbage')


def parse_unsigned(what: str, text: str, bits: int = 32) -> int:
    """``nbdkit_parse_unsigned`` (bits=32) or ``nbdkit_parse_uint64_t`` (bits=64): decimal,
    ``0x`` hex or ``0`` octal; no minus sign."""
    text = text.lstrip(_SPACE)
    if text.startswith("-"):
        raise ConfigError(f"{what}: negative numbers are not allowed")
    value, end = strtol(text)
    _number_tail(what, text, end, value >= 1 << bits)
    return value


def parse_int(what: str, text: str) -> int:
    """``nbdkit_parse_int``: a C int, decimal, ``0x`` hex or ``0`` octal."""
    value, end = strtol(text)
    _number_tail(what, text, end, not _INT_MIN <= value <= _INT_MAX)
    return value


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
