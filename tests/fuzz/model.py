"""A model of the disk behind an export, to judge what a server answers."""

from __future__ import annotations

import bisect

__all__ = ["Disk"]


class Disk:
    """The bytes a server's export must hold, with the ranges whose contents are undefined.

    TRIM makes a range undefined until it is written again (the specification lets a server
    discard it, or part of it, or nothing); reads are compared where the contents are known.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self._starts: list[int] = []  # disjoint undefined ranges [start, end), sorted
        self._ends: list[int] = []

    # ---- changes ------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self._define(offset, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)
        self._define(offset, offset + length)

    def trim(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        s, e = offset, offset + length
        i = bisect.bisect_left(self._ends, s)
        j = i
        while j < len(self._starts) and self._starts[j] <= e:
            s, e = min(s, self._starts[j]), max(e, self._ends[j])
            j += 1
        self._starts[i:j] = [s]
        self._ends[i:j] = [e]

    def _define(self, s: int, e: int) -> None:
        if e <= s or not self._starts:
            return
        i = bisect.bisect_right(self._ends, s)
        j = i
        keep_s: list[int] = []
        keep_e: list[int] = []
        while j < len(self._starts) and self._starts[j] < e:
            a, b = self._starts[j], self._ends[j]
            if a < s:
                keep_s.append(a)
                keep_e.append(s)
            if b > e:
                keep_s.append(e)
                keep_e.append(b)
            j += 1
        self._starts[i:j] = keep_s
        self._ends[i:j] = keep_e

    # ---- questions ----------------------------------------------------------------------
    def known(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The defined parts of [offset, offset + length), as (start, end)."""
        out = []
        pos, end = offset, offset + length
        i = bisect.bisect_right(self._ends, pos)
        while pos < end:
            if i < len(self._starts) and self._starts[i] < end:
                a, b = self._starts[i], self._ends[i]
                if a > pos:
                    out.append((pos, a))
                pos = max(pos, b)
                i += 1
            else:
                out.append((pos, end))
                break
        return out

    def first_mismatch(self, offset: int, got: bytes) -> int | None:
        """The first defined offset where ``got`` (read at ``offset``) differs, or None."""
        for a, b in self.known(offset, len(got)):
            want = self.data[a:b]
            have = got[a - offset:b - offset]
            if want != have:
                k = next(i for i in range(b - a) if want[i] != have[i])
                return a + k
        return None

    def nonzero_in(self, offset: int, length: int) -> int | None:
        """The first defined offset in the range holding a nonzero byte, or None."""
        for a, b in self.known(offset, length):
            chunk = self.data[a:b]
            if chunk.count(0) != len(chunk):
                return a + next(i for i, v in enumerate(chunk) if v)
        return None
