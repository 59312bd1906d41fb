"""The blocksize filter in one process: whatever the client asks, the plugin sees only
aligned requests within the limits, the bytes are right, read-modify-write cycles are
serialised, and FUA emulated once per request. Also the helpers it is built on."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import CommandError
from pynbd.filters._shape_common import RWLock, extents_aligned, is_zero
from pynbd.filters.blocksize import BlocksizeFilter
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Flag, FuaMode
from tests.e2e.shape_chain import Disk, manual_of, open_chain

SIZE = 16384
request = st.tuples(st.sampled_from(["pread", "pwrite", "zero", "trim", "cache"]),
                    st.integers(0, SIZE - 1), st.integers(1, 5000))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 512, 4096]), st.sampled_from([0, 1, 2]),
       st.lists(request, min_size=1, max_size=8))
def test_plugin_sees_aligned_bounded_requests(minblock: int, limits: int,
                                              requests: list) -> None:
    maxdata = [0, 2 * minblock, 4 * minblock][limits]
    maxlen = [0, 4 * minblock, 2 * minblock][limits]
    params = [f"minblock={minblock}"]
    params += [f"maxdata={maxdata}"] if maxdata else []
    params += [f"maxlen={maxlen}"] if maxlen else []
    disk = Disk(bytes(range(251)) * 66)  # 16566 bytes: the size is rounded down
    model = bytearray(disk.data)
    _, ctx = open_chain(disk, (BlocksizeFilter, params))
    size = ctx.get_size()
    assert size == len(disk.data) // minblock * minblock
    for n, (kind, offset, count) in enumerate(requests):
        offset %= size
        count = min(count, size - offset)
        if kind == "pread":
            assert bytes(ctx.pread(count, offset)) == model[offset:offset + count]
        elif kind == "pwrite":
            data = bytes([n + 1]) * count
            ctx.pwrite(data, offset)
            model[offset:offset + count] = data
        elif kind == "zero":
            ctx.zero(count, offset)
            model[offset:offset + count] = bytes(count)
        else:
            getattr(ctx, kind)(count, offset)
    assert disk.data[:size] == model[:size]
    data_max = maxdata or 64 * 1024 * 1024
    for kind, count, offset, _ in disk.calls:
        assert offset % minblock == 0 and count % minblock == 0, (kind, count, offset)
        assert count <= (data_max if kind in ("pread", "pwrite", "cache") else
                         maxlen or 1 << 32), (kind, count)


def test_trim_ignores_unaligned_ends_and_fua_flushes_once() -> None:
    disk = Disk(SIZE, fua=FuaMode.EMULATE)
    _, ctx = open_chain(disk, (BlocksizeFilter, ["minblock=512", "maxlen=1024"]))
    ctx.trim(3000, 100, Flag.FUA)
    assert disk.named("trim", "flush") == [("trim", 1024, 512, 0), ("trim", 1024, 1536, 0),
                                           ("trim", 512, 2560, 0), ("flush", 0, 0, 0)]
    disk.calls.clear()
    ctx.pwrite(b"x" * 3000, 100, Flag.FUA)
    assert [c[0] for c in disk.calls].count("flush") == 1 and disk.calls[-1][0] == "flush"


def test_fast_zero_in_one_call_or_not_at_all() -> None:
    disk = Disk(SIZE)
    _, ctx = open_chain(disk, (BlocksizeFilter, ["minblock=512", "maxlen=2K"]))
    for count, offset in ((100, 512), (512, 100), (4096, 0)):
        with pytest.raises(CommandError) as e:
            ctx.zero(count, offset, Flag.FAST_ZERO)
        assert e.value.errno == errno.ENOTSUP
    assert not disk.calls[1:]
    ctx.zero(2048, 0, Flag.FAST_ZERO)
    assert disk.named("zero") == [("zero", 2048, 0, Flag.FAST_ZERO)]


def test_plugin_limits_are_respected() -> None:
    """The plugin's own minimum and maximum (block_size) tighten the defaults."""
    disk = Disk(SIZE, block_size=(1024, 2048, 2048))
    _, ctx = open_chain(disk, (BlocksizeFilter, []))
    assert ctx.block_size() == (1, 4096, 0xFFFFFFFF)
    ctx.pread(5000, 100)
    assert disk.named("pread") == [("pread", 1024, 0, 0), ("pread", 2048, 1024, 0),
                                   ("pread", 1024, 3072, 0), ("pread", 1024, 4096, 0)]


def test_limits_below_the_plugin_minimum() -> None:
    """maxdata and maxlen smaller than the plugin's minimum block: one block at a time
    (nbdkit 1.32 rounds them down to 0 and dies on an assertion, a request of length 0)."""
    disk = Disk(SIZE, block_size=(4096, 4096, 65536))
    _, ctx = open_chain(disk, (BlocksizeFilter, ["maxdata=1K", "maxlen=2K"]))
    ctx.pread(8192, 0)
    ctx.zero(8192, 0)
    ctx.trim(8192, 0)
    assert [c[:3] for c in disk.calls] == [
        ("pread", 4096, 0), ("pread", 4096, 4096), ("zero", 4096, 0), ("zero", 4096, 4096),
        ("trim", 4096, 0), ("trim", 4096, 4096)]


class SlowDisk(Disk):
    """Reads take a moment after taking their copy: time for another thread's write to
    slip in between a read-modify-write's read and write, if it may."""

    def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        data = super().pread(h, count, offset, flags)
        time.sleep(0.002)
        return data


def test_read_modify_write_cycles_do_not_lose_writes() -> None:
    """16 threads each write one byte of the same 512-byte block (each a read-modify-write
    of the whole block) while others write aligned blocks next to it: every byte lands."""
    disk = SlowDisk(4096)
    _, ctx = open_chain(disk, (BlocksizeFilter, ["minblock=512"]))

    def writer(i: int) -> None:
        ctx.pwrite(bytes([i + 1]), i * 7)
        ctx.pwrite(bytes([i]) * 512, 1024)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [disk.data[i * 7] for i in range(16)] == list(range(1, 17))


def test_rwlock_excludes() -> None:
    lock = RWLock()
    inside: list[str] = []
    with lock.shared(), lock.shared():  # readers share
        pass
    with lock.shared():
        t = threading.Thread(target=lambda: (lock.exclusive().__enter__(),
                                             inside.append("writer")))
        t.start()
        t.join(0.05)
        assert inside == []  # the writer waits for the reader
    t.join(5)
    assert inside == ["writer"]


class Ext:
    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.asked: list = []

    def extents(self, count: int, offset: int, flags: int) -> list:
        self.asked.append((count, offset, flags))
        return self.answers.pop(0)


def test_extents_aligned() -> None:
    hole = EXTENT_HOLE | EXTENT_ZERO
    # aligned already
    assert extents_aligned(Ext([[(0, 512, 0), (512, 512, hole)]]), 1024, 0, 0, 512) == [
        (0, 512, 0), (512, 512, hole)]
    # an unaligned extent after the first block is cut back to the block boundary
    assert extents_aligned(Ext([[(0, 512, hole), (512, 700, 0), (1212, 324, hole)]]),
                           1536, 0, 0, 512) == [(0, 512, hole), (512, 512, 0)]
    # a short first extent merges with the next ones into one block of their common type
    assert extents_aligned(Ext([[(0, 100, hole), (100, 200, EXTENT_ZERO), (300, 900, hole)]]),
                           1024, 0, 0, 512) == [(0, 512, EXTENT_ZERO)]
    # and asks for more when the answer ends inside the block (REQ_ONE dropped)
    ext = Ext([[(0, 100, hole)], [(100, 412, hole), (512, 512, 0)]])
    assert extents_aligned(ext, 1024, 0, Flag.REQ_ONE, 512) == [(0, 512, hole)]
    assert ext.asked == [(1024, 0, Flag.REQ_ONE), (412, 100, 0)]


def test_is_zero() -> None:
    assert is_zero(b"") and is_zero(bytes(200000))
    assert not is_zero(bytes(70000) + b"\1")
    assert not is_zero(b"\1" + bytes(70000))
    assert is_zero(memoryview(bytearray(65536 * 2 + 5)))


def test_manual() -> None:
    text = manual_of("blocksize")
    assert "minblock=SIZE" in text and "maxdata=SIZE" in text and "maxlen=SIZE" in text
