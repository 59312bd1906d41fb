"""The truncate filter in one process: the plugin's size is taken once per connection,
the tail is never passed to the plugin, fast zero."""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import CommandError
from pynbd.filters.truncate import TruncateFilter
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Flag
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def test_size_per_connection() -> None:
    disk = Disk(1000)
    chain, first = open_chain(disk, (TruncateFilter, ["round-up=512"]))
    disk.data += bytes(100)  # the plugin grows while the first client is connected
    second = chain.open(False, "", False)
    assert (first.get_size(), second.get_size()) == (1024, 1536)
    # the first connection's tail starts at the size it saw: [1000, 1024) is zeroes
    assert bytes(first.pread(24, 1000)) == bytes(24)
    first.close()
    second.close()


def test_tail_never_reaches_the_plugin() -> None:
    disk = Disk(bytes(range(100)) * 10)
    _, ctx = open_chain(disk, (TruncateFilter, ["truncate=2000"]))
    assert bytes(ctx.pread(20, 990)) == bytes(range(90, 100)) + bytes(10)
    ctx.pwrite(b"ab" + bytes(10), 998)
    ctx.zero(500, 900, Flag.MAY_TRIM)
    ctx.trim(100, 1500)
    ctx.cache(200, 950)
    assert disk.named("pread", "pwrite", "zero", "trim", "cache") == [
        ("pread", 10, 990, 0), ("pwrite", 2, 998, 0), ("zero", 100, 900, Flag.MAY_TRIM),
        ("cache", 50, 950, 0)]
    with pytest.raises(CommandError) as e:
        ctx.pwrite(b"\1", 1999)
    assert e.value.errno == errno.ENOSPC
    assert ctx.extents(1000, 1000) == [(1000, 1000, EXTENT_HOLE | EXTENT_ZERO)]


def test_fast_zero() -> None:
    _, ctx = open_chain(Disk(1000, fast_zero=False), (TruncateFilter, ["truncate=2000"]))
    assert ctx.can_fast_zero()
    ctx.zero(1000, 1000, Flag.FAST_ZERO)  # all past the end: nothing to do, fast
    with pytest.raises(CommandError) as e:
        ctx.zero(10, 990, Flag.FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP


def test_manual() -> None:
    text = manual_of("truncate")
    assert "round-up=N" in text and "round-down=N" in text and "truncate=SIZE" in text
