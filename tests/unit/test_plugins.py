"""Unit tests of the built-in plugins, called directly (config -> config_complete -> open ->
methods), and of the plugin/filter registries. The file plugin is in test_plugins_file.py."""

from __future__ import annotations

import errno
import inspect
import itertools
import os
import random
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from helpers import peer_env, require

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Filter,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
)
from pynbd.plugins import BUILTIN_PLUGINS, find_plugin
from pynbd.plugins.full import FullPlugin
from pynbd.plugins.memory import _PAGE, MemoryPlugin
from pynbd.plugins.null import NullPlugin
from pynbd.plugins.pattern import PatternPlugin, pattern_bytes
from pynbd.plugins.zero import ZeroPlugin

HOLE = EXTENT_HOLE | EXTENT_ZERO
GIANT = (1 << 63) - 1


def make(cls: type[Plugin], *args: str, readonly: bool = False, **params: str) -> tuple[Any, Any]:
    """Configure and open a plugin the way the server does; bare args use the magic key."""
    p = cls()
    for a in args:
        assert cls.magic_config_key
        p.config(cls.magic_config_key, a)
    for k, v in params.items():
        p.config(k, v)
    p.config_complete()
    p.get_ready()
    h = p.open(readonly, "", False)
    return p, h


def read(p: Any, h: Any, count: int, offset: int) -> bytes:
    return bytes(p.pread(h, count, offset, 0))


def check_extents(exts: list[tuple[int, int, int]], offset: int, size: int) -> None:
    """Ascending, contiguous, non-empty, starting at or before offset, within the disk."""
    assert exts
    assert exts[0][0] <= offset < exts[0][0] + exts[0][1]
    for (o1, n1, _), (o2, _, _) in itertools.pairwise(exts):
        assert o1 + n1 == o2
    for o, n, t in exts:
        assert n > 0 and t in (0, HOLE, EXTENT_ZERO, EXTENT_HOLE)
    assert exts[-1][0] + exts[-1][1] <= size


# ---------------------------------------------------------------------------------------
# Registry and manual pages

ALL = [MemoryPlugin, NullPlugin, ZeroPlugin, FullPlugin, PatternPlugin]


def test_find_plugin_builtins() -> None:
    from pynbd.plugins.file import FilePlugin
    for name, cls in [("memory", MemoryPlugin), ("file", FilePlugin), ("null", NullPlugin),
                      ("zero", ZeroPlugin), ("full", FullPlugin), ("pattern", PatternPlugin)]:
        assert find_plugin(name) is cls
        assert cls.name == name
    assert {"memory", "file", "null", "zero", "full", "pattern"} <= set(BUILTIN_PLUGINS)
    for name in BUILTIN_PLUGINS:  # every module of pynbd.plugins is a plugin of its name
        assert find_plugin(name).name == name


@pytest.mark.parametrize("name", ["nosuch", "", "../memory", "memory.py", "Memory"])
def test_find_plugin_unknown(name: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin"):
        find_plugin(name)


class _FakeEP:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = f"fake:{name}"
        self._value = value

    def load(self) -> Any:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, eps: dict[str, list[_FakeEP]]) -> None:
    import importlib.metadata

    def entry_points(*, group: str, name: str) -> list[_FakeEP]:
        return [ep for ep in eps.get(group, []) if ep.name == name]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_find_plugin_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    class Third(Plugin):
        name = "third"

    _fake_entry_points(monkeypatch, {"pynbd.plugins": [
        _FakeEP("third", Third), _FakeEP("broken", ImportError("no module named foo")),
        _FakeEP("notaplugin", object)]})
    assert find_plugin("third") is Third
    assert find_plugin("memory") is MemoryPlugin  # built-ins come first
    with pytest.raises(ConfigError, match=r"plugin 'broken': cannot load .*no module named foo"):
        find_plugin("broken")
    with pytest.raises(ConfigError, match=r"not a subclass"):
        find_plugin("notaplugin")
    with pytest.raises(ConfigError, match=r"unknown plugin 'fourth'"):
        find_plugin("fourth")


def test_find_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynbd.filters import find_filter

    class MyFilter(Filter):
        name = "myfilter"

    with pytest.raises(ConfigError, match=r"^unknown filter 'nosuch'$"):
        find_filter("nosuch")
    _fake_entry_points(monkeypatch, {"pynbd.filters": [_FakeEP("myfilter", MyFilter)],
                                     "pynbd.plugins": [_FakeEP("memfilter", MemoryPlugin)]})
    assert find_filter("myfilter") is MyFilter
    with pytest.raises(ConfigError, match=r"unknown filter 'memfilter'"):
        find_filter("memfilter")  # a plugin's group is not searched for filters


def test_builtins_need_no_entry_points() -> None:
    """Built-ins are found from their modules; an entry point of the same name would never be
    used (built-ins come first), so pyproject declares none."""
    import importlib.metadata
    for group in ("pynbd.plugins", "pynbd.filters"):
        eps = {ep.name for ep in importlib.metadata.entry_points(group=group)}
        assert not eps & set(BUILTIN_PLUGINS), eps


def _all_plugins() -> list[type[Plugin]]:
    from pynbd.plugins.file import FilePlugin
    return [*ALL, FilePlugin]


@pytest.mark.parametrize("cls", _all_plugins(), ids=lambda c: c.name)
def test_manual_page(cls: type[Plugin]) -> None:
    doc = inspect.getdoc(cls)
    assert doc
    positions = [doc.find(f"\n{s}\n") if s != "NAME" else doc.find("NAME\n")
                 for s in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES")]
    assert -1 not in positions and positions == sorted(positions), positions
    assert f"pynbd serve {cls.name}" in doc
    assert doc.splitlines()[1].strip().startswith(f"{cls.name} - ")


def test_declarations() -> None:
    """magic keys as nbdkit 1.32 has them; thread model; which plugins stay on the loop."""
    from pynbd.plugins.file import FilePlugin
    expect = {MemoryPlugin: "size", NullPlugin: "size", FullPlugin: "size",
              PatternPlugin: "size", ZeroPlugin: None, FilePlugin: "file"}
    for cls, key in expect.items():
        assert cls.magic_config_key == key
        assert cls.thread_model == ThreadModel.PARALLEL
        assert cls.nonblocking is (cls is not FilePlugin)


# ---------------------------------------------------------------------------------------
# memory

def test_memory_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"you must specify size=<SIZE>"):
        make(MemoryPlugin)
    with pytest.raises(ConfigError, match=r"could not parse size"):
        make(MemoryPlugin, "lots")
    with pytest.raises(ConfigError, match=r"too large"):
        make(MemoryPlugin, "8E")  # 2^63 > 2^63-1
    with pytest.raises(ConfigError, match=r'unknown allocator "foo"'):
        make(MemoryPlugin, "1M", allocator="foo")
    with pytest.raises(ConfigError, match=r"does not take extra parameters"):
        make(MemoryPlugin, "1M", allocator="sparse,foo")
    with pytest.raises(ConfigError, match=r"unknown parameter 'sise'"):
        make(MemoryPlugin, sise="1M")
    p, h = make(MemoryPlugin, size="1M", allocator="sparse")
    assert p.get_size(h) == 1 << 20
    p, h = make(MemoryPlugin, "2s")
    assert p.get_size(h) == 1024


def test_memory_capabilities() -> None:
    p, h = make(MemoryPlugin, "1M")
    assert p.can_write(h) and p.can_flush(h) and p.can_trim(h) and p.can_zero(h)
    assert p.can_fast_zero(h) and p.can_extents(h) and p.can_multi_conn(h)
    assert p.can_fua(h) == FuaMode.NATIVE
    assert p.can_cache(h) == CacheMode.NATIVE
    assert not p.is_rotational(h)
    p.flush(h, 0)
    p.cache(h, 4096, 0, 0)


def test_memory_read_write() -> None:
    p, h = make(MemoryPlugin, "1M")
    assert read(p, h, 4096, 0) == bytes(4096)
    p.pwrite(h, memoryview(b"hello"), 100, 0)
    assert read(p, h, 10, 98) == b"\0\0hello\0\0\0"
    # across pages, unaligned
    data = bytes(random.Random(1).randbytes(3 * _PAGE + 123))
    p.pwrite(h, memoryview(data), _PAGE - 7, Flag.FUA)
    assert read(p, h, len(data), _PAGE - 7) == data
    assert read(p, h, 20, _PAGE - 17) == bytes(10) + data[:10]
    # the last byte of the disk
    p.pwrite(h, b"Z", (1 << 20) - 1, 0)
    assert read(p, h, 2, (1 << 20) - 2) == b"\0Z"


def test_memory_pread_holes_are_shared_zeroes_data_is_a_stable_copy() -> None:
    p, h = make(MemoryPlugin, "1M")
    z = p.pread(h, 4096, 8192, 0)
    assert isinstance(z, memoryview) and z.readonly and bytes(z) == bytes(4096)
    p.pwrite(h, b"x" * 4096, 8192, 0)
    r = p.pread(h, 4096, 8192, 0)
    assert bytes(r) == b"x" * 4096
    # A reply may wait in the send queue while later requests run: what it carries must not
    # change when the page is rewritten, freed, or reused for another offset.
    p.pwrite(h, b"y", 8192, 0)
    p.trim(h, _PAGE, 0, 0)
    p.pwrite(h, b"z" * _PAGE, 5 * _PAGE, 0)  # may reuse the freed page's memory
    assert bytes(r) == b"x" * 4096
    # A read spanning pages written by one large aligned write (a run).
    big = random.Random(2).randbytes(256 * 1024)
    p.pwrite(h, memoryview(big), 256 * 1024, 0)
    assert bytes(p.pread(h, 256 * 1024, 256 * 1024, 0)) == big
    assert bytes(p.pread(h, 100000, 256 * 1024 + 5, 0)) == big[5:100005]
    # Spanning absent pages: shared zeroes, no copy.
    z = p.pread(h, 200000, 600000, 0)
    assert isinstance(z, memoryview) and bytes(z) == bytes(200000)


def test_memory_new_pages_cost_only_what_is_written() -> None:
    """Page memory comes from anonymous maps: a 4 KiB write into a new 32 KiB page
    touches one frame, and trimmed pages are given back and read as zeroes when reused."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    p, h = make(MemoryPlugin, "1G")
    before = rss()
    n = 2000
    for i in range(n):
        p.pwrite(h, b"\xff" * 4096, i * _PAGE, 0)
    grown = rss() - before
    assert grown < n * _PAGE // 2, grown  # zero-filled pages would cost n * 32 KiB
    p.trim(h, n * _PAGE, 0, 0)
    assert not p._pages
    # reused memory reads as zeroes around new data
    p.pwrite(h, b"\x01", 7 * _PAGE + 100, 0)
    assert bytes(p.pread(h, _PAGE, 7 * _PAGE, 0)) == bytes(100) + b"\x01" + bytes(_PAGE - 101)


def test_memory_run_broken_by_trim() -> None:
    p, h = make(MemoryPlugin, "1M")
    big = bytes(random.Random(3).randbytes(8 * _PAGE))
    p.pwrite(h, big, 0, 0)
    assert p._runs[0].intact
    big = bytes(random.Random(4).randbytes(8 * _PAGE))
    p.pwrite(h, big, 0, 0)  # rewritten in place, one copy into the run
    assert read(p, h, len(big), 0) == big
    p.pwrite(h, b"ab", _PAGE - 1, 0)  # and a small write across two of its pages
    big = big[:_PAGE - 1] + b"ab" + big[_PAGE + 1:]
    assert read(p, h, len(big), 0) == big
    p.trim(h, _PAGE, 3 * _PAGE, 0)  # frees a page in the middle of the run
    assert not p._runs[0].intact
    expect = big[:3 * _PAGE] + bytes(_PAGE) + big[4 * _PAGE:]
    assert read(p, h, len(big), 0) == expect
    p.pwrite(h, b"q" * 10, 3 * _PAGE + 1, 0)  # reallocated on its own
    expect = big[:3 * _PAGE] + b"\0" + b"q" * 10 + bytes(_PAGE - 11) + big[4 * _PAGE:]
    assert read(p, h, len(big), 0) == expect


def test_memory_trim_zero_free_pages() -> None:
    p, h = make(MemoryPlugin, "1M")
    p.pwrite(h, b"\1" * (1 << 20), 0, 0)
    assert len(p._pages) == (1 << 20) // _PAGE
    # partial zero keeps the page; zeroing the rest of it frees it
    p.zero(h, 100, 10, 0)
    assert read(p, h, 120, 0) == b"\1" * 10 + bytes(100) + b"\1" * 10
    assert 0 in p._pages
    p.zero(h, 10, 0, Flag.MAY_TRIM)
    p.trim(h, _PAGE - 110, 110, 0)
    assert 0 not in p._pages
    assert read(p, h, _PAGE, 0) == bytes(_PAGE)
    # a range covering whole pages frees them, unaligned ends are zeroed in place
    p.trim(h, 5 * _PAGE, _PAGE + 1, 0)
    assert sorted(p._pages)[:2] == [1, 6]
    assert read(p, h, 2, _PAGE) == b"\1\0"
    assert read(p, h, 2, 6 * _PAGE) == b"\0\1"
    p.zero(h, 1 << 20, 0, Flag.FAST_ZERO | Flag.FUA)
    assert not p._pages
    assert read(p, h, 1 << 20, 0) == bytes(1 << 20)


def test_memory_extents() -> None:
    p, h = make(MemoryPlugin, "1M")
    size = 1 << 20
    assert p.extents(h, size, 0, 0) == [(0, size, HOLE)]
    p.pwrite(h, b"x", 2 * _PAGE + 5, 0)
    p.pwrite(h, b"x" * 2 * _PAGE, 4 * _PAGE, 0)
    p.pwrite(h, b"x", 6 * _PAGE, 0)  # coalesces with the previous data
    p.pwrite(h, b"x", size - 1, 0)
    P = _PAGE
    assert p.extents(h, size, 0, 0) == [
        (0, 2 * P, HOLE), (2 * P, P, 0), (3 * P, P, HOLE), (4 * P, 3 * P, 0),
        (7 * P, size - 8 * P, HOLE), (size - P, P, 0)]
    # starts at the page containing offset
    assert p.extents(h, 10, 2 * P + 100, 0) == [(2 * P, P, 0)]
    assert p.extents(h, P, 3 * P + 1, 0) == [(3 * P, P, HOLE), (4 * P, P, 0)]
    assert p.extents(h, size, 0, Flag.REQ_ONE) == [(0, 2 * P, HOLE)]
    assert p.extents(h, size, 4 * P, Flag.REQ_ONE) == [(4 * P, 3 * P, 0)]


def test_memory_partial_last_page() -> None:
    size = 3 * _PAGE + 1000
    p, h = make(MemoryPlugin, str(size))
    assert p.extents(h, size, 0, 0) == [(0, size, HOLE)]
    p.pwrite(h, b"end", size - 3, 0)
    assert read(p, h, 3, size - 3) == b"end"
    assert p.extents(h, 10, size - 10, 0) == [(3 * _PAGE, 1000, 0)]
    p.zero(h, 1000, 3 * _PAGE, 0)
    assert p.extents(h, size, 0, 0) == [(0, size, HOLE)]


def test_memory_giant_disk() -> None:
    t0 = time.monotonic()
    p, h = make(MemoryPlugin, str(GIANT))
    assert p.get_size(h) == GIANT
    assert read(p, h, 1, GIANT - 1) == b"\0"
    assert p.extents(h, GIANT, 0, 0) == [(0, GIANT, HOLE)]
    p.pwrite(h, b"last", GIANT - 4, 0)
    p.pwrite(h, b"first", 0, 0)
    p.pwrite(h, b"middle", 1 << 62, 0)
    assert read(p, h, 4, GIANT - 4) == b"last"
    assert read(p, h, 1, GIANT - 1) == b"t"
    last_page = (GIANT >> 15) << 15
    exts = p.extents(h, GIANT, 0, 0)
    assert exts == [(0, _PAGE, 0), (_PAGE, (1 << 62) - _PAGE, HOLE), (1 << 62, _PAGE, 0),
                    ((1 << 62) + _PAGE, last_page - (1 << 62) - _PAGE, HOLE),
                    (last_page, GIANT - last_page, 0)]
    check_extents(exts, 0, GIANT)
    # a 32-bit request, as NBD sends them, from an odd offset
    exts = p.extents(h, 0xFFFFFFFF, (1 << 62) - 12345, 0)
    assert exts[0][2] == HOLE and exts[1] == (1 << 62, _PAGE, 0)
    check_extents(exts, (1 << 62) - 12345, GIANT)
    # trimming the whole giant disk is quick too
    p.trim(h, GIANT, 0, 0)
    assert not p._pages and read(p, h, 4, GIANT - 4) == bytes(4)
    assert time.monotonic() - t0 < 2


def test_memory_extents_many_pages_bounded() -> None:
    """With many pages allocated, one call does bounded work and may answer short."""
    p, h = make(MemoryPlugin, str(GIANT))
    for i in range(0, 70000 * 2, 2):  # 70000 separate pages: more than the window
        p._pages[i] = memoryview(bytearray(b"x" * 16))
    exts = p.extents(h, 0xFFFFFFFF, 0, 0)
    check_extents(exts, 0, GIANT)
    assert exts[:3] == [(0, _PAGE, 0), (_PAGE, _PAGE, HOLE), (2 * _PAGE, _PAGE, 0)]
    exts = p.extents(h, 1 << 62, 0, 0)  # a 64-bit request, bounded all the same
    check_extents(exts, 0, GIANT)
    assert len(exts) <= 1 << 16


def test_memory_random_against_model() -> None:
    """Random writes, trims, zeroes and reads agree with a plain bytearray; extents agree
    with the contents (a hole reads as zeroes)."""
    rng = random.Random(1234)
    size = 40 * _PAGE + 777
    p, h = make(MemoryPlugin, str(size))
    model = bytearray(size)
    for _ in range(600):
        op = rng.random()
        off = rng.randrange(size)
        n = rng.choice([1, 7, 512, 4096, _PAGE, 3 * _PAGE, 9 * _PAGE + 3, rng.randrange(1, size)])
        n = max(1, min(n, size - off))
        if rng.random() < 0.3:
            off -= off % _PAGE
            n = max(1, min(n - n % _PAGE or n, size - off))
        if op < 0.45:
            data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
            p.pwrite(h, memoryview(data), off, 0)
            model[off:off + n] = data
        elif op < 0.6:
            p.trim(h, n, off, 0)
            model[off:off + n] = bytes(n)
        elif op < 0.75:
            p.zero(h, n, off, rng.choice([0, Flag.MAY_TRIM, Flag.FAST_ZERO]))
            model[off:off + n] = bytes(n)
        elif op < 0.95:
            assert read(p, h, n, off) == model[off:off + n]
        else:
            exts = p.extents(h, n, off, 0)
            check_extents(exts, off, size)
            for o, ln, t in exts:
                if t & EXTENT_ZERO:
                    assert model[o:o + ln] == bytes(ln)
    assert read(p, h, size, 0) == model
    exts = p.extents(h, size, 0, 0)
    check_extents(exts, 0, size)
    assert exts[-1][0] + exts[-1][1] == size
    for o, ln, t in exts:
        if t:
            assert model[o:o + ln] == bytes(ln)
    # every page is a whole page
    for page in p._pages.values():
        assert len(page) == _PAGE


def test_memory_threads_write_while_zeroing() -> None:
    """Lock-free writers against zeroes freeing pages that became all zero, on the same
    pages: no completed write may be lost (the seqlock makes racing writers redo theirs).

    Each thread owns one 512-byte block in each of a few shared pages and loops: write it,
    check it, zero it (which frees the page when every other block is zero too)."""
    p, h = make(MemoryPlugin, "1M")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        stop = time.monotonic() + 0.6
        errors: list[BaseException] = []

        def worker(slot: int) -> None:
            try:
                i = 0
                while time.monotonic() < stop and not errors:
                    i += 1
                    for pg in range(1):
                        off = pg * _PAGE + slot * 512
                        data = struct.pack(">QQ", i, off) * 32
                        p.pwrite(h, memoryview(data), off, 0)
                        got = read(p, h, 512, off)
                        assert got == data, (slot, pg, i)
                        p.zero(h, 512, off, 0)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, repr(errors[0])
        assert not p._pages
    finally:
        sys.setswitchinterval(old)


# ---------------------------------------------------------------------------------------
# null, zero, full

def test_null() -> None:
    p, h = make(NullPlugin)
    assert p.get_size(h) == 0
    p, h = make(NullPlugin, "1G")
    assert p.get_size(h) == 1 << 30
    z = p.pread(h, 1 << 20, 12345, 0)
    assert isinstance(z, memoryview) and z.readonly and bytes(z) == bytes(1 << 20)
    assert p.pread(h, 4096, 0, 0).obj is z.obj  # one shared buffer
    p.pwrite(h, b"data", 0, Flag.FUA)
    assert read(p, h, 4, 0) == bytes(4)
    p.trim(h, 100, 0, 0)
    p.zero(h, 100, 0, Flag.FAST_ZERO)
    p.flush(h, 0)
    p.cache(h, 100, 0, 0)
    assert p.extents(h, 1 << 30, 0, 0) == [(0, 1 << 30, HOLE)]
    assert p.can_multi_conn(h) and p.can_fast_zero(h) and p.can_write(h)
    assert p.can_fua(h) == FuaMode.NATIVE and p.can_cache(h) == CacheMode.NATIVE
    with pytest.raises(ConfigError, match=r"unknown parameter 'foo'"):
        make(NullPlugin, foo="1")
    p, h = make(NullPlugin, str(GIANT))
    assert read(p, h, 1, GIANT - 1) == b"\0"


def test_zero() -> None:
    p, h = make(ZeroPlugin)
    assert p.get_size(h) == 0
    assert not p.can_write(h) and not p.can_trim(h) and not p.can_flush(h)
    assert p.can_multi_conn(h)
    with pytest.raises(ConfigError, match=r"does not need command line configuration"):
        make(ZeroPlugin, size="1M")


def test_full() -> None:
    with pytest.raises(ConfigError, match=r"size parameter is required"):
        make(FullPlugin)
    p, h = make(FullPlugin, "1M")
    assert p.get_size(h) == 1 << 20
    assert read(p, h, 4096, 4096) == bytes(4096)
    assert p.can_write(h) and p.can_trim(h) and p.can_zero(h) and p.can_fast_zero(h)
    assert not p.can_flush(h)
    for fn in (lambda: p.pwrite(h, b"x", 0, 0), lambda: p.trim(h, 512, 0, 0),
               lambda: p.zero(h, 512, 0, 0), lambda: p.zero(h, 512, 0, Flag.MAY_TRIM)):
        with pytest.raises(CommandError) as ei:
            fn()
        assert ei.value.errno == errno.ENOSPC
    with pytest.raises(CommandError) as ei:
        p.zero(h, 512, 0, Flag.FAST_ZERO)
    assert ei.value.errno == errno.ENOTSUP  # as nbdkit: fast zero fails fast
    assert p.extents(h, 1 << 20, 0, 0) == [(0, 1 << 20, HOLE)]


# ---------------------------------------------------------------------------------------
# pattern

def reference_pattern(count: int, offset: int) -> bytes:
    """Independent of the plugin: struct-pack each word, slice."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + count, 8))
    return words[offset - first:offset - first + count]


@pytest.mark.parametrize("offset,count", [
    (0, 8), (0, 1), (3, 1), (5, 11), (0, 4096), (4093, 4096), (0, 256 * 1024),
    (65536 - 3, 17), (65536 * 5 - 1, 200000), ((1 << 24) - 100, 300), ((1 << 32) - 9, 8192),
    ((1 << 40) + 7, 65536), ((1 << 56) - 300000, 600000), (GIANT - 1, 1), (GIANT - 262144, 262144),
    (12345, 2 * 1024 * 1024 + 3)])
def test_pattern_bytes(offset: int, count: int) -> None:
    assert bytes(pattern_bytes(count, offset)) == reference_pattern(count, offset)


def test_pattern_random_reads() -> None:
    rng = random.Random(99)
    for _ in range(200):
        offset = rng.choice([rng.randrange(1 << 20), rng.randrange(1 << 40),
                             rng.randrange(GIANT - (1 << 20))])
        count = rng.randrange(1, 70000)
        assert bytes(pattern_bytes(count, offset)) == reference_pattern(count, offset)


def test_pattern_plugin() -> None:
    p, h = make(PatternPlugin)
    assert p.get_size(h) == 0
    p, h = make(PatternPlugin, str(GIANT))
    assert not p.can_write(h) and not p.can_trim(h) and not p.can_zero(h)
    assert p.can_multi_conn(h) and p.can_cache(h) == CacheMode.NATIVE
    assert read(p, h, 16, 0) == bytes(8) + b"\0\0\0\0\0\0\0\x08"
    assert read(p, h, 8, 1 << 40) == (1 << 40).to_bytes(8, "big")
    # the last (partial) word holds 2^63-8 = 0x7ffffffffffffff8, cut after 7 bytes
    assert read(p, h, 7, GIANT - 7) == b"\x7f\xff\xff\xff\xff\xff\xff"
    assert p.extents(h, 1 << 20, 4096, 0) == [(4096, 1 << 20, 0)]
    with pytest.raises(ConfigError, match=r"unknown parameter 'seed'"):
        make(PatternPlugin, "1M", seed="1")


def test_pattern_reads_are_vectorised() -> None:
    """256 KiB reads must be fast (this is a benchmark plugin): built from slices of a
    template, not word by word in Python. Counted, not timed: a read anywhere on a giant
    disk makes a handful of Python-level calls, whatever its size."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    for offset in (0, (1 << 30) + 3, (1 << 62) + 12345):
        calls = 0
        sys.setprofile(count)
        try:
            data = pattern_bytes(256 * 1024, offset)
        finally:
            sys.setprofile(None)
        assert len(data) == 256 * 1024
        assert calls < 200, f"{calls} calls for one 256 KiB read at {offset}"


def _need_nbdkit() -> str:
    """nbdkit's path, once nbdkit and nbdcopy are known to be here (skip, or fail in CI)."""
    require("nbdcopy")
    return require("nbdkit")


@pytest.mark.interop
@pytest.mark.parametrize("offset", [0, (1 << 62) + 3])
def test_pattern_matches_nbdkit(tmp_path: Any, offset: int) -> None:
    """Byte for byte what `nbdkit pattern` serves (via nbdcopy), at the start of a 1M disk
    and 1 MiB at an odd offset of the giant disk (through nbdkit's offset filter)."""
    nbdkit = _need_nbdkit()
    out = tmp_path / "out.bin"
    size = 1 << 20
    if offset == 0:
        cmd = [nbdkit, "-U", "-", "pattern", str(size)]
    else:
        cmd = [nbdkit, "-U", "-", "--filter=offset", "pattern", str(GIANT),
               f"offset={offset}", f"range={size}"]
    cmd += ["--run", f'nbdcopy "$uri" {out}']
    subprocess.run(cmd, check=True, timeout=30, capture_output=True, env=peer_env())
    assert out.read_bytes() == bytes(pattern_bytes(size, offset))
