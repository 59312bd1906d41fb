"""The ddrescue filter in one process: the mapfile's syntax (sscanf's), reads at the edges
of rescued blocks, nothing but reads reaching the plugin."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pynbd.errors import CommandError
from pynbd.filters.ddrescue import DdrescueFilter, _scan_line, merge, parse_mapfile
from tests.e2e.shape_chain import Disk, manual_of, open_chain


@pytest.mark.parametrize("line,want", [
    ("0x00000000  0x00001000  +", (0, 4096, "+")),
    ("0\t10\t-", (0, 10, "-")),
    ("010 0X10 ?", (8, 16, "?")),
    ("  1 2 /  rest", (1, 2, "/")),
    ("12+", None),
    ("1 2", None),
    ("1 2 ", None),
    ("x 2 +", None),
    ("-5 2 +", (-5, 2, "+")),
    ("99999999999999999999 1 +", ((1 << 63) - 1, 1, "+")),
])
def test_scan_line(line: str, want: tuple[int, int, str] | None) -> None:
    assert _scan_line(line) == want


def test_merge() -> None:
    assert merge([(10, 20), (0, 5), (20, 30), (5, 6), (40, 50)]) == [(0, 6), (10, 30),
                                                                       (40, 50)]


def test_reads(tmp_path: Path) -> None:
    mapfile = tmp_path / "map"
    mapfile.write_text("# comment\n0x2000 + 1\n0 0x1000 +\n0x1000 0x200 -\n"
                       "0x1200 0xe00 +\n0x2000 0x2000 ?\n")
    assert parse_mapfile(str(mapfile)) == [(0, 0x1000), (0x1200, 0x2000)]
    disk = Disk(0x4000)
    _, ctx = open_chain(disk, (DdrescueFilter, [f"ddrescue-mapfile={mapfile}"]))
    assert not ctx.can_write()
    assert ctx.can_cache() == 0
    ctx.pread(0x1000, 0)
    ctx.pread(1, 0x1FFF)
    for count, offset in ((1, 0x1000), (2, 0xFFF), (0x200, 0x1F00), (1, 0x3FFF)):
        with pytest.raises(CommandError) as e:
            ctx.pread(count, offset)
        assert e.value.errno == errno.EIO
    assert disk.named("pread") == [("pread", 0x1000, 0, 0), ("pread", 1, 0x1FFF, 0)]
    with pytest.raises(CommandError) as e:
        ctx.pwrite(b"x", 0)
    assert e.value.errno == errno.EROFS
    assert disk.named("pwrite") == []


def test_manual() -> None:
    assert "ddrescue-mapfile=FILE" in manual_of("ddrescue")
