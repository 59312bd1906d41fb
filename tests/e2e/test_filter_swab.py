"""The swab filter in one process: swapping, alignment, whole-word extents."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pynbd.errors import CommandError
from pynbd.filters.swab import SwabFilter, swap
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO
from tests.e2e.shape_chain import Disk, manual_of, open_chain


@given(st.sampled_from([1, 2, 4, 8]), st.binary(max_size=64))
def test_swap(width: int, data: bytes) -> None:
    data = data[:len(data) // width * width]
    out = bytes(swap(data, width))
    assert out == b"".join(data[i:i + width][::-1] for i in range(0, len(data), width))
    assert bytes(swap(out, width)) == data


def test_reads_writes_and_alignment() -> None:
    disk = Disk(bytes(range(64)) + b"xyz", extents=[(0, 67, 0)])
    _, ctx = open_chain(disk, (SwabFilter, ["swab-bits=32"]))
    assert ctx.get_size() == 64
    assert bytes(ctx.pread(8, 8)) == bytes([11, 10, 9, 8, 15, 14, 13, 12])
    ctx.pwrite(b"abcd", 4)
    assert disk.data[4:8] == b"dcba"
    for call in (lambda: ctx.pread(4, 2), lambda: ctx.pwrite(b"ab", 0),
                 lambda: ctx.zero(4, 1), lambda: ctx.trim(3, 0), lambda: ctx.cache(4, 6),
                 lambda: ctx.extents(2, 0)):
        with pytest.raises(CommandError) as e:
            call()
        assert e.value.errno == errno.EINVAL
        assert e.value.message == "swab: requests to this filter must be aligned"
    assert ctx.block_size() == (4, 512, 0xFFFFFFFF)


def test_extents_in_whole_words() -> None:
    hole = EXTENT_HOLE | EXTENT_ZERO
    disk = Disk(64, extents=[(0, 3, 0), (3, 13, hole), (16, 48, EXTENT_ZERO)])
    _, ctx = open_chain(disk, (SwabFilter, ["swab-bits=64"]))
    # the first word mixes data and hole: data, and the answer stops there (the client
    # asks again from 8), as nbdkit_extents_aligned does
    assert ctx.extents(64, 0) == [(0, 8, 0)]
    assert ctx.extents(56, 8) == [(8, 8, hole), (16, 48, EXTENT_ZERO)]


def test_manual() -> None:
    assert "swab-bits=64" in manual_of("swab")
