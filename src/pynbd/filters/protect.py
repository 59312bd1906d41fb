"""The protect filter: make ranges of the plugin read-only. Its manual page is
:class:`ProtectFilter`'s docstring."""

from __future__ import annotations

import bisect
import errno
import logging
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import INT64_MAX, is_zero, parse_unsigned
from pynbd.plugin import Filter

__all__ = ["ProtectFilter"]

log = logging.getLogger("pynbd.server")

#: A protected range: first byte, last byte (inclusive), the parameter that asked for it.
Range = tuple[int, int, str]


def parse_range(value: str) -> list[Range]:
    """``START-END`` (one range) or ``~START-END`` (what lies outside it: up to two)."""
    negate = value.startswith("~")
    text = value[1:] if negate else value
    start_text, dash, end_text = text.partition("-")
    if not dash:
        raise ConfigError(f"cannot parse range, missing '-': {value}")
    start = parse_unsigned("range", start_text, 64) if start_text else 0
    end = parse_unsigned("range", end_text, 64) if end_text else INT64_MAX
    if end < start:
        raise ConfigError(f"invalid range, end < start: {value}")
    if not negate:
        return [(start, end, value)]
    out = []
    if start > 0:
        out.append((0, start - 1, value))
    if end < INT64_MAX:
        out.append((end + 1, INT64_MAX, value))
    return out


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, with overlapping and adjacent ranges joined (keeping the first's name)."""
    out: list[Range] = []
    for start, end, what in sorted(ranges, key=lambda r: r[0]):
        if out and out[-1][1] + 1 >= start:
            # nbdkit 1.32 takes the later range's end here, so a range inside another cuts
            # the outer one short (protect=0-100 protect=10-20 leaves 21-100 writable).
            prev = out[-1]
            out[-1] = (prev[0], max(prev[1], end), prev[2])
        else:
            out.append((start, end, what))
    return out


class ProtectFilter(Filter):
    """NAME
        protect - pynbd protect filter: write-protect ranges of the plugin

    SYNOPSIS
        pynbd serve --filter=protect PLUGIN protect=START-END [protect=...] [PLUGIN-ARGS...]

    DESCRIPTION
        protect keeps clients from changing some ranges of bytes of the plugin, while the
        export stays writable elsewhere. Reads are never affected. A write, zero or trim
        request touching a protected range succeeds only if it leaves the range as it is
        (writing the bytes already there, zeroing bytes already zero); otherwise it fails
        with EPERM ("Operation not permitted") and nothing of it is written.

        One use is to keep a client from faking a header (qcow2's, say) at the start of a
        raw disk, since such headers have been used in exploits.

        To make the whole export read-only use pynbd serve -r. To serve only part of the
        plugin use the offset or partition filters; to choose which clients may connect, the
        ip filter.

        This is nbdkit-protect-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        protect=START-END
            Protect the bytes from START to END, both included. START and END are decimal,
            octal (0NN) or hexadecimal (0xNN); an empty START is the start of the disk, an
            empty END its end. Give the parameter several times to protect several ranges.

        protect=~START-END
            Protect everything except the bytes from START to END.

    EXAMPLES
        Protect the boot code of an MBR disk but let the partition table change:

            pynbd serve --filter=protect file disk.img protect=0-0x1bd

        Let clients write to the first partition only (fdisk -l shows it from sector 2048
        to 12580863), not to the partition table or any other partition:

            pynbd serve --filter=protect file disk.img \\
                protect=~$((2048*512))-$((12580863*512+511))
    """

    name = "protect"
    version = "1.32.5"
    nonblocking = True
    config_help = "protect=<START>-<END>      Protect range of bytes START-END (inclusive)."

    def __init__(self) -> None:
        self._given: list[Range] = []
        self.ranges: list[Range] = []
        self._starts: list[int] = []

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "protect":
            self._given += parse_range(value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        self.ranges = merge(self._given)
        self._starts = [r[0] for r in self.ranges]

    def _check(self, next: Any, count: int, offset: int, buf: Any) -> None:
        """EPERM if the request would change a protected byte: the plugin's bytes there
        must equal ``buf``'s (or be zero, for zero and trim: ``buf`` None)."""
        end = offset + count  # exclusive
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self.ranges):
            start, last, what = self.ranges[i]
            if start >= end:
                break
            lo, hi = max(start, offset), min(last + 1, end)
            if lo < hi:
                old = next.pread(hi - lo, lo, 0)
                if buf is None:
                    same = is_zero(old)
                else:
                    same = bytearray(old) == memoryview(buf)[lo - offset:hi - offset]
                if not same:
                    raise CommandError(
                        errno.EPERM, f"protect filter prevented write to protected range {what}")
                log.debug("protect: checking protected region offset %d length %d",
                          lo, hi - lo)
            i += 1

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._check(next, len(buf), offset, buf)
        next.pwrite(buf, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check(next, count, offset, None)
        next.trim(count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check(next, count, offset, None)
        next.zero(count, offset, flags)
