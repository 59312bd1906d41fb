"""The ddrescue filter: fail reads of what GNU ddrescue could not rescue. Its manual page is
:class:`DdrescueFilter`'s docstring."""

from __future__ import annotations

import bisect
import errno
import logging
import re
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import INT64_MAX, strtol
from pynbd.plugin import CacheMode, Filter

__all__ = ["DdrescueFilter", "merge", "parse_mapfile"]

log = logging.getLogger("pynbd.server")

_INT64_MIN = -(1 << 63)
_WS = re.compile(r"[ \t\n\v\f\r]*")


def _scan_line(line: str) -> tuple[int, int, str] | None:
    """sscanf(line, "%" SCNi64 "\\t%" SCNi64 "\\t%c"): two integers (decimal, 0x hex or 0
    octal, signed, clamped to int64 as strtoll does) and a character, whitespace between;
    None when the line does not match."""
    values = []
    pos = 0
    for _ in range(2):
        pos = _WS.match(line, pos).end()  # type: ignore[union-attr]
        value, used = strtol(line[pos:])
        if used == 0:
            return None
        values.append(min(max(value, _INT64_MIN), INT64_MAX))
        pos += used
    pos = _WS.match(line, pos).end()  # type: ignore[union-attr]
    if pos >= len(line):
        return None
    return values[0], values[1], line[pos]


def parse_mapfile(path: str) -> list[tuple[int, int]]:
    """The rescued blocks ('+') of a ddrescue mapfile as (start, end) pairs, end exclusive.

    Comment lines start with '#'; the first other non-empty line is the status line; lines
    that do not parse are skipped, as nbdkit does."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").split("\n")
    except OSError as e:
        raise ConfigError(f"{path}: ddrescue: fopen: {e.strerror}") from None
    rescued: list[tuple[int, int]] = []
    status_seen = False
    for line in lines:
        if line.startswith("#"):
            continue
        if line and not status_seen:
            status_seen = True
            log.debug("%s: skipping status line: '%s'", path, line)
            continue
        scanned = _scan_line(line)
        if scanned is None:
            continue
        offset, length, status = scanned
        if offset < 0:
            raise ConfigError("block offset must not be negative")
        if length < 0:
            raise ConfigError("block length must not be negative")
        # A block of size 0 rescued nothing (nbdkit 1.32 takes its last byte to be start-1
        # compared unsigned, and then serves every read from its start on).
        if status == "+" and length:
            rescued.append((offset, offset + length))
        log.debug("%s: range: %#x %#x '%s'", path, offset, length, status)
    return rescued


def merge(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent blocks joined.

    nbdkit 1.32 fails a read that spans two adjacent rescued blocks (it looks for one block
    holding the whole read); joining them serves every byte that was rescued.
    """
    merged: list[tuple[int, int]] = []
    for start, end in sorted(blocks):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class DdrescueFilter(Filter):
    """NAME
        ddrescue - pynbd ddrescue filter: serve a rescued image, failing its bad blocks

    SYNOPSIS
        pynbd serve --filter=ddrescue PLUGIN [PLUGIN-ARGS...] ddrescue-mapfile=FILE.map

        pynbd serve --filter=ddrescue file file=disk.img ddrescue-mapfile=disk.map

    DESCRIPTION
        ddrescue overlays the bad blocks recorded in a GNU ddrescue(1) mapfile on the image
        ddrescue recovered: a read that is not wholly inside the rescued blocks (status '+')
        fails with EIO, as reading the failing disk did, instead of returning the zeroes the
        image holds there. Use it to find which files or file system structures a rescue
        lost, or to run a file system check on the image with the damage visible.

        The export is read-only, and cache requests are not offered.

        This is nbdkit-ddrescue-filter(1) for pynbd, with nbdkit 1.32's parameters. Unlike
        nbdkit 1.32, a read spanning two rescued blocks listed separately succeeds, and a
        rescued block of size 0 rescues nothing.

    PARAMETERS
        ddrescue-mapfile=FILE
            The mapfile ddrescue wrote while rescuing the image.

    FILE FORMAT
        A GNU ddrescue mapfile: lines starting with # are comments; the first other line is
        the status line (current position and state), skipped; then one line per block:

            0x00000000  0x00100000  +
            0x00100000  0x00001000  -

        position and size (decimal, 0x hex or 0 octal) and the block's status: '+' rescued,
        anything else ('-' bad sector, '?' not tried, '*' not trimmed, '/' not scraped) not.

    EXAMPLES
        Serve a rescued disk image with its bad sectors failing as they did:

            pynbd serve --filter=ddrescue file file=disk.img ddrescue-mapfile=disk.map
    """

    name = "ddrescue"
    version = "1.32.5"
    nonblocking = True
    config_help = "ddrescue-mapfile=...     Specify ddrescue mapfile to use"

    def __init__(self) -> None:
        self._blocks: list[tuple[int, int]] = []
        self.rescued: list[tuple[int, int]] = []
        self._starts: list[int] = []

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "ddrescue-mapfile":
            self._blocks += parse_mapfile(value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        self.rescued = merge(self._blocks)
        self._starts = [r[0] for r in self.rescued]

    def can_write(self, next: Any, h: Any) -> bool:
        # Without this the layer below would be asked, and writes would go through.
        return False

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        return CacheMode.NONE

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset + count <= self.rescued[i][1]:
            return next.pread(count, offset, flags)
        log.debug("ddrescue: pread: range: %#x %#x failing with EIO", offset, count)
        raise CommandError(errno.EIO, "ddrescue: reading a block that was not rescued")
