"""The extentlist filter: extents from a file instead of the plugin. Its manual page is
:class:`ExtentlistFilter`'s docstring."""

from __future__ import annotations

import bisect
import logging
import re
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._shape_common import parse_size
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Extent, Filter, ThreadModel

__all__ = ["ExtentlistFilter", "parse_extentlist"]

log = logging.getLogger("pynbd.server")

_HOLE = EXTENT_HOLE | EXTENT_ZERO
_END = 1 << 64  # the list covers the whole 64-bit offset space
_FIELDS = re.compile(r"[^ \t]+")


def _type(word: str) -> int:
    """The type field: a number (sscanf "%u": leading digits, a minus wraps) or words
    containing "hole" and/or "zero"."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)", word)
    if m:
        n = int(m.group(2))
        return (-n if m.group(1) == "-" else n) & 0xFFFFFFFF
    return (EXTENT_HOLE if "hole" in word else 0) | (EXTENT_ZERO if "zero" in word else 0)


def parse_extentlist(path: str) -> list[Extent]:
    """The file's extents, sorted, with the gaps (and everything after the last) as holes:
    a list covering [0, 2^64) without overlaps. Errors are nbdkit's messages."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").split("\n")
    except OSError as e:
        raise ConfigError(f"open: {path}: {e.strerror}") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    found: list[Extent] = []
    for line in lines:
        fields = _FIELDS.findall(line)
        if len(fields) < 2:
            # nbdkit prints what strtok left of the line: up to the end of the first field.
            first = _FIELDS.search(line)
            raise ConfigError(f"{path}: cannot parse {line[:first.end()] if first else line}")
        offset, length = parse_size(fields[0]), parse_size(fields[1])
        if length:
            found.append((offset, length, _type(fields[2]) if len(fields) > 2 else 0))
    found.sort(key=lambda e: e[0])
    out: list[Extent] = []
    end = 0
    for offset, length, typ in found:
        if offset < end:
            raise ConfigError("extents in the extent list are overlapping")
        if offset > end:
            out.append((end, offset - end, _HOLE))
        out.append((offset, length, typ))
        end = offset + length
    if end < _END:
        out.append((end, _END - end, _HOLE))
    for i, (offset, length, typ) in enumerate(out):
        log.debug("extentlist: extent[%d] = %d-%d (length %d) type %d",
                  i, offset, offset + length - 1, length, typ)
    return out


class ExtentlistFilter(Filter):
    """NAME
        extentlist - pynbd extentlist filter: take extents from a file

    SYNOPSIS
        pynbd serve -r --filter=extentlist PLUGIN extentlist=FILENAME [PLUGIN-ARGS...]

    DESCRIPTION
        extentlist answers clients' extent queries (which parts of the disk are allocated,
        which are holes or read as zeroes) from a list in a file instead of asking the
        plugin. It helps with plugins that cannot tell, when the information can be had
        another way: over ssh or http there is no way to ask whether a remote file is sparse,
        but xfs_bmap(8) or filefrag(8) on the remote machine can tell.

        The list is read once, when the server starts, and never changes: writes do not
        update it. A client writing into a listed hole may not read back what it wrote, as
        it believes that part of the disk is a hole. So serve read-only (-r) with this
        filter, as a rule.

        This is nbdkit-extentlist-filter(1) for pynbd, with nbdkit 1.32's parameters and
        file format.

    FILE FORMAT
        One extent per line:

            offset length type

        offset and length are sizes as on the command line (512, 1M, 2s...); fields are
        separated by spaces or tabs. type is optional: a number (0 for data, the default; 1
        hole; 2 zero; 3 both), or a word containing "hole" and/or "zero", such as hole,zero.
        Lines may come in any order and need not cover the disk, but must not overlap. What
        they leave out is a hole that reads as zeroes (hole,zero). Extents of length 0 are
        ignored.

        This list says that of a 10M disk only the first megabyte is allocated:

            0  1M
            1M 9M  hole,zero

        and so does this one, the rest being a hole anyway:

            0  1M

    PARAMETERS
        extentlist=FILENAME
            The file holding the list. Required, once.

    EXAMPLES
        Sparseness of an image served over ssh, from a list made on the remote machine:

            pynbd serve -r --filter=extentlist ssh host=server path=/disk.img \\
                extentlist=disk.extents
    """

    name = "extentlist"
    version = "1.32.5"
    nonblocking = True

    def __init__(self) -> None:
        self.path: str | None = None
        self.extents_list: list[Extent] = []
        self._starts: list[int] = []

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "extentlist":
            if self.path is not None:
                raise ConfigError("extentlist cannot appear twice")
            self.path = value
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.path is None:
            raise ConfigError("you must supply the extentlist parameter on the command line")

    def get_ready(self, thread_model: ThreadModel) -> None:
        assert self.path is not None
        self.extents_list = parse_extentlist(self.path)
        self._starts = [e[0] for e in self.extents_list]

    def can_extents(self, next: Any, h: Any) -> bool:
        return True

    def extents(self, next: Any, h: Any, count: int, offset: int,
                flags: int) -> list[Extent]:
        # The list covers every offset: from the extent holding offset to the one
        # holding the last byte asked for.
        first = bisect.bisect_right(self._starts, offset) - 1
        last = bisect.bisect_left(self._starts, offset + count)
        return self.extents_list[first:last]
