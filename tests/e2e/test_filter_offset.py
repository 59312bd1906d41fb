"""The offset filter in one process: requests reach the plugin moved by the offset, with
their flags; extents come back moved; the size checks; nbdkit's size parser."""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import parse_size, strtol
from pynbd.filters.offset import OffsetFilter
from pynbd.plugin import EXTENT_HOLE, Flag
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def test_requests_are_moved() -> None:
    disk = Disk(bytes(range(256)) * 16, extents=[(0, 1000, 0), (1000, 3096, EXTENT_HOLE)])
    chain, ctx = open_chain(disk, (OffsetFilter, ["offset=512", "range=1024"]))
    assert ctx.get_size() == 1024
    assert bytes(ctx.pread(4, 0)) == bytes([0, 1, 2, 3])  # 512 % 256 == 0
    ctx.pwrite(b"ab", 10, Flag.FUA)
    ctx.zero(5, 20, Flag.MAY_TRIM)
    ctx.trim(6, 30)
    ctx.cache(7, 40)
    assert ctx.extents(1024, 0) == [(0, 488, 0), (488, 536, EXTENT_HOLE)]
    assert disk.calls[-5:] == [
        ("pwrite", 2, 522, Flag.FUA), ("zero", 5, 532, Flag.MAY_TRIM), ("trim", 6, 542, 0),
        ("cache", 7, 552, 0), ("extents", 1024, 512, 0)]
    assert disk.data[522:524] == b"ab"
    ctx.close()
    chain.cleanup()


def test_size_errors() -> None:
    for params, message in (
            (["offset=5000"], ("offset (5000) is larger than the real size (4096) of the "
                              "underlying file or device")),
            (["offset=4000", "range=97"], ("offset+range (4000+97) is larger than the real "
                                          "size (4096) of the underlying file or device"))):
        _chain, ctx = open_chain(Disk(4096), (OffsetFilter, params))
        with pytest.raises(CommandError) as e:
            ctx.get_size()
        assert (e.value.errno, e.value.message) == (errno.EIO, message)
        ctx.close()


def test_runs_on_the_event_loop() -> None:
    """A filter that only computes: with a plugin that never blocks, the chain stays on
    the event loop (no thread hop per request)."""
    from pynbd.plugins.memory import MemoryPlugin
    chain, ctx = open_chain(MemoryPlugin(), (OffsetFilter, ["offset=1", "size=1M"]))
    assert chain.on_loop
    assert ctx.get_size() == (1 << 20) - 1
    ctx.close()


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), (" 7", 7), ("+8", 8), ("1k", 1024), ("1K", 1024), ("2s", 1024),
    ("3b", 3), ("1M", 1 << 20), ("1G", 1 << 30), ("1T", 1 << 40), ("1P", 1 << 50),
    ("7E", 7 << 60), ("0x10", None), ("1.5M", None), ("1MB", None), ("", None), ("-1", None),
    ("9223372036854775807", (1 << 63) - 1), ("9223372036854775808", None), ("8E", None)])
def test_parse_size(text: str, value: int | None) -> None:
    if value is None:
        with pytest.raises(ConfigError):
            parse_size(text)
    else:
        assert parse_size(text) == value


def test_strtol() -> None:
    assert strtol("0x1fz") == (31, 4)
    assert strtol("017") == (15, 3)
    assert strtol("08") == (0, 1)  # octal stops at 8
    assert strtol("0x") == (0, 1)
    assert strtol("  -12abc") == (-12, 5)
    assert strtol("abc") == (0, 0)


def test_manual() -> None:
    text = manual_of("offset")
    assert "offset=OFFSET" in text and "range=LENGTH" in text
