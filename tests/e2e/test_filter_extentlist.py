"""The extentlist filter in one process: the file format, lookups, the plugin never asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pynbd.errors import ConfigError
from pynbd.filters.extentlist import ExtentlistFilter, parse_extentlist
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO
from tests.e2e.shape_chain import Disk, manual_of, open_chain

HOLE = EXTENT_HOLE | EXTENT_ZERO
END = 1 << 64


def test_parse(tmp_path: Path) -> None:
    p = tmp_path / "list"
    p.write_text("100 10 3abc\n0 5 -1\n5 5 holezero\n10\t10 zero\n200 0 hole\n"
                 "30 1 HOLE\n40 2 +2\n")
    assert parse_extentlist(str(p)) == [
        (0, 5, 0xFFFFFFFF), (5, 5, HOLE), (10, 10, EXTENT_ZERO), (20, 10, HOLE), (30, 1, 0),
        (31, 9, HOLE), (40, 2, 2), (42, 58, HOLE), (100, 10, 3), (110, END - 110, HOLE)]


@pytest.mark.parametrize("text,message", [
    ("0 10\n5 10\n", "extents in the extent list are overlapping"),
    ("  7\n", "LIST: cannot parse   7"),
    ("0 1\n\n", "LIST: cannot parse "),
    ("1.5 1\n", "could not parse size: unknown suffix '.5'"),
])
def test_parse_errors(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "list"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_extentlist(str(p))
    assert str(e.value) == message.replace("LIST", str(p))


def test_lookups_never_ask_the_plugin(tmp_path: Path) -> None:
    p = tmp_path / "list"
    p.write_text("0 1M\n2M 1M zero\n")
    disk = Disk(4 << 20, extents=[(0, 4 << 20, 0)])
    _, ctx = open_chain(disk, (ExtentlistFilter, [f"extentlist={p}"]))
    assert ctx.can_extents()
    assert ctx.extents(4096, (1 << 20) - 100) == [((1 << 20) - 100, 100, 0),
                                                  (1 << 20, 3996, HOLE)]
    assert ctx.extents(4 << 20, 0) == [(0, 1 << 20, 0), (1 << 20, 1 << 20, HOLE),
                                       (2 << 20, 1 << 20, EXTENT_ZERO),
                                       (3 << 20, 1 << 20, HOLE)]
    assert disk.named("extents") == []


def test_manual() -> None:
    text = manual_of("extentlist")
    assert "extentlist=FILENAME" in text and "FILE FORMAT" in text
