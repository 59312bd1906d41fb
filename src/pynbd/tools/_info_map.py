"""``pynbd info --map`` (nbdinfo's map.c): the export's extents for one metadata context,
each run of one type on a line (or as JSON), or with --totals each type's share."""

from __future__ import annotations

from typing import Any

from pynbd import libnbd as nbd
from pynbd.tools._info_output import (
    BG_BLACK,
    BG_LIGHT_GREY,
    FG_BOLD_BLACK,
    FG_BRIGHT_WHITE,
    FG_GREEN,
    FG_RED,
    Output,
    fail,
    fmt_g,
    json_string,
    nbd_fail,
    try_,
)

__all__ = ["ShowMap", "extent_description"]


class ShowMap(Output):
    """The --map mode."""

    h: nbd.NBD | None
    map: str | None
    totals: bool
    json_output: bool

    def do_map(self) -> None:
        h = self.h
        assert h is not None and self.map is not None
        mapname = self.map
        if not try_(lambda: h.can_meta_context(mapname), True):
            fail(f'--map: server does not support metadata context "{mapname}"')
        align = try_(lambda: h.get_block_size(nbd.SIZE_MINIMUM), 0) or 512
        max_len = (1 << 32) - align  # UINT32_MAX - align + 1: whole aligned blocks
        try:
            size = h.get_size()
        except nbd.Error as e:
            nbd_fail(e)

        entries: list[int] = []

        def extent(metacontext: str, offset: int, ents: list[int], err: Any) -> int:
            if metacontext == mapname:
                entries.extend(ents)
            return 0

        offset = 0
        while offset < size:
            prev = len(entries)
            try:
                h.block_status(min(size - offset, max_len), offset, extent, 0)
            except nbd.Error as e:
                nbd_fail(e)
            if prev == len(entries):
                fail("--map: server did not return any extents")
            offset += sum(entries[prev::2])

        pairs = list(zip(entries[0::2], entries[1::2], strict=True))
        if not self.totals:
            self.print_extents(pairs)
        else:
            self.print_totals(pairs, size)

    def print_extents(self, pairs: list[tuple[int, int]]) -> None:
        # Adjacent extents of the same type are printed as one.
        merged: list[list[int]] = []
        for length, typ in pairs:
            if merged and merged[-1][1] == typ:
                merged[-1][0] += length
            else:
                merged.append([length, typ])
        if self.json_output:
            self.w("[\n")
        offset = 0
        for i, (length, typ) in enumerate(merged):
            descr, fg, bg = extent_description(self.map or "", typ)
            if not self.json_output:
                self._map_line(f"{offset:10d}  {length:10d}  {typ:3d}", "  ", descr, fg, bg)
            else:
                if i:
                    self.w(",\n")
                self.w(f'{{ "offset": {offset}, "length": {length}, "type": {typ}')
                if descr is not None:
                    self.w(f', "description": {json_string(descr)}')
                self.w("}")
            offset += length
        if self.json_output:
            self.w("\n]\n")

    def _map_line(self, text: str, sep: str, descr: str | None, fg: str | None,
                  bg: str | None) -> None:
        """One line of the text map or totals, in the type's colours."""
        if fg:
            self.ansi_colour(fg)
        if bg:
            self.ansi_colour(bg)
        self.w(text)
        if descr is not None:
            self.w(f"{sep}{descr}")
        if fg or bg:
            self.ansi_restore()
        self.w("\n")

    def print_totals(self, pairs: list[tuple[int, int]], size: int) -> None:
        if size == 0:
            if self.json_output:
                self.w("[]\n")
            return
        if self.json_output:
            self.w("[\n")
        totals: dict[int, int] = {}
        for length, typ in pairs:
            totals[typ] = totals.get(typ, 0) + length
        comma = False
        for typ in sorted(totals):
            c = totals[typ]
            if c == 0:
                continue
            percent = 100.0 * c / size
            descr, fg, bg = extent_description(self.map or "", typ)
            if not self.json_output:
                self._map_line(f"{c:10d} {percent:5.1f}% {typ:3d}", " ", descr, fg, bg)
            else:
                if comma:
                    self.w(",\n")
                self.w(f'{{ "size": {c}, "percent": {fmt_g(percent)}, "type": {typ}')
                if descr is not None:
                    self.w(f', "description": {json_string(descr)}')
                self.w(" }")
                comma = True
        if self.json_output:
            self.w("\n]\n")


def extent_description(metacontext: str, typ: int) -> tuple[str | None, str | None, str | None]:
    """nbdinfo's (description, foreground, background) of extent type `typ`."""
    if metacontext == "base:allocation":
        if typ == 0:
            return "data", FG_BOLD_BLACK, None
        if typ in (1, 2, 3):
            return ("hole", "zero", "hole,zero")[typ - 1], None, None
    elif metacontext.startswith("qemu:dirty-bitmap:"):
        if typ == 0:
            return "clean", FG_GREEN, None
        if typ == 1:
            return "dirty", FG_RED, None
    elif metacontext == "qemu:allocation-depth":
        if typ == 0:
            return "absent", None, None
        if typ == 1:
            return "local", FG_BRIGHT_WHITE, BG_BLACK
        return f"backing depth {typ}", None, BG_LIGHT_GREY
    return None, None, None
