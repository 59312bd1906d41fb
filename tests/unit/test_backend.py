"""The backend chain: filter stacking order, capability defaults and the core's emulation."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from pynbd.errors import CommandError
from pynbd.plugin import CacheMode, Filter, Flag, FuaMode, Plugin, ThreadModel
from pynbd.server.backend import Chain


class Recorder(Plugin):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.data = bytearray(64 * 1024)

    def config(self, key, value):
        self.calls.append(("config", key, value))

    def open(self, readonly, export_name, is_tls):
        self.calls.append(("open", readonly, export_name))
        return "H"

    def close(self, h):
        self.calls.append(("close", h))

    def get_size(self, h):
        return len(self.data)

    def pread(self, h, count, offset, flags):
        self.calls.append(("pread", count, offset))
        return bytes(self.data[offset:offset + count])

    def pwrite(self, h, buf, offset, flags):
        self.calls.append(("pwrite", len(buf), offset, flags))
        self.data[offset:offset + len(buf)] = buf

    def flush(self, h, flags):
        self.calls.append(("flush",))


def make_filter(tag: str, log: list):
    class F(Filter):
        name = tag

        def config(self, next_config, key, value):
            if key == tag:
                log.append((tag, "config", value))
            else:
                next_config(key, value)

        def open(self, next_open, readonly, export_name, is_tls):
            log.append((tag, "open"))
            next_open(readonly, export_name)
            return tag

        def close(self, h):
            log.append((tag, "close"))

        def pread(self, next, h, count, offset, flags):
            log.append((tag, "pread"))
            return next.pread(count, offset, flags)

    return F()


def test_three_filters_stack_in_command_line_order():
    log: list = []
    plugin = Recorder()
    chain = Chain(plugin, [make_filter("a", log), make_filter("b", log), make_filter("c", log)])
    # parameters go to the outermost filter first; each consumes its own key
    chain.config("b", "1")
    chain.config("size", "2")
    assert log == [("b", "config", "1")]
    assert plugin.calls == [("config", "size", "2")]
    log.clear()
    ctx = chain.open(False, "", False)
    assert log == [("a", "open"), ("b", "open"), ("c", "open")]
    assert plugin.calls[-1] == ("open", False, "")
    log.clear()
    assert bytes(ctx.pread(4, 0)) == b"\0" * 4
    assert log == [("a", "pread"), ("b", "pread"), ("c", "pread")]
    assert plugin.calls[-1] == ("pread", 4, 0)
    log.clear()
    ctx.close()
    assert log == [("a", "close"), ("b", "close"), ("c", "close")]
    assert plugin.calls[-1] == ("close", "H")


def test_filter_passes_through_what_it_does_not_override():
    log: list = []
    plugin = Recorder()
    ctx = Chain(plugin, [make_filter("a", log)]).open(False, "x", False)
    ctx.pwrite(b"abc", 10)
    assert plugin.data[10:13] == b"abc"
    assert ctx.get_size() == 64 * 1024
    assert ctx.can_write() and ctx.can_flush() and not ctx.can_trim()


def test_capability_defaults_follow_overridden_methods():
    ctx = Chain(Recorder()).open(False, "", False)
    assert ctx.can_write() is True
    assert ctx.can_flush() is True
    assert ctx.can_trim() is False
    assert ctx.can_zero() is False          # zero not overridden: emulated
    assert ctx.can_fast_zero() is True      # fast zeroes then fail fast
    assert ctx.can_extents() is False
    assert ctx.can_fua() == FuaMode.EMULATE  # flush exists
    assert ctx.can_cache() == CacheMode.NONE
    assert ctx.can_multi_conn() is False


def test_readonly_context_refuses_writes():
    ctx = Chain(Recorder()).open(True, "", False)
    assert ctx.can_write() is False
    with pytest.raises(CommandError) as ei:
        ctx.pwrite(b"x", 0)
    assert ei.value.errno == errno.EROFS


def test_a_context_reopened_read_only_refuses_writes_it_took_before():
    """The write path remembers that a layer is writable (no checks per write): a reopen
    read-only (the retry filter's) forgets it."""
    plugin = Recorder()
    ctx = Chain(plugin).open(False, "", False)
    ctx.pwrite(b"x", 0)
    ctx.pwrite(b"y", 1)  # the shorter way
    assert plugin.calls[-2:] == [("pwrite", 1, 0, 0), ("pwrite", 1, 1, 0)]
    ctx.reopen(readonly=True)
    with pytest.raises(CommandError) as ei:
        ctx.pwrite(b"z", 2)
    assert ei.value.errno == errno.EROFS
    assert plugin.data[:3] == b"xy\0"


def test_zero_is_emulated_with_writes_and_fast_zero_fails():
    plugin = Recorder()
    plugin.data[:] = b"\xff" * len(plugin.data)
    ctx = Chain(plugin).open(False, "", False)
    ctx.zero(5000, 100, 0)
    assert plugin.data[100:5100] == bytes(5000)
    assert plugin.data[99] == 0xFF and plugin.data[5100] == 0xFF
    with pytest.raises(CommandError) as ei:
        ctx.zero(10, 0, Flag.FAST_ZERO)
    assert ei.value.errno == errno.ENOTSUP
    assert plugin.data[0] == 0xFF  # a failed fast zero changes nothing


def test_zero_falls_back_when_plugin_says_enotsup():
    class P(Recorder):
        def zero(self, h, count, offset, flags):
            raise OSError(errno.EOPNOTSUPP, "no")

    plugin = P()
    plugin.data[:] = b"\x01" * len(plugin.data)
    ctx = Chain(plugin).open(False, "", False)
    assert ctx.can_zero() is True
    ctx.zero(8, 0, Flag.MAY_TRIM)
    assert plugin.data[:8] == bytes(8)
    with pytest.raises(OSError):
        ctx.zero(8, 8, Flag.FAST_ZERO)
    assert plugin.data[8:16] == b"\x01" * 8


def test_fua_is_emulated_by_flush():
    plugin = Recorder()
    ctx = Chain(plugin).open(False, "", False)
    ctx.pwrite(b"ab", 0, Flag.FUA)
    assert plugin.calls[-2:] == [("pwrite", 2, 0, 0), ("flush",)]


def test_cache_emulated_by_reading():
    class P(Recorder):
        def can_cache(self, h):
            return CacheMode.EMULATE

    plugin = P()
    ctx = Chain(plugin).open(False, "", False)
    ctx.cache(3 * 1024 * 1024 // 64, 0)
    assert ("pread", 3 * 1024 * 1024 // 64, 0) in plugin.calls


def test_extents_default_and_normalisation():
    ctx = Chain(Recorder()).open(False, "", False)
    assert ctx.extents(100, 50) == [(50, 100, 0)]

    class P(Recorder):
        def extents(self, h, count, offset, flags):
            # starts before offset, neighbours of one type, runs past the end
            return [(0, 4096, 3), (4096, 4096, 3), (8192, 4096, 0), (12288, 65536, 0)]

    ctx = Chain(P()).open(False, "", False)
    assert ctx.extents(10000, 1000) == [(1000, 7192, 3), (8192, 2808, 0)]

    class Bad(Recorder):
        def extents(self, h, count, offset, flags):
            return [(0, 10, 0), (20, 10, 0)]

    with pytest.raises(CommandError):
        Chain(Bad()).open(False, "", False).extents(30, 0)


def test_each_capability_is_asked_once_per_connection():
    class P(Recorder):
        n = 0

        def can_multi_conn(self, h):
            P.n += 1
            return True

    ctx = Chain(P()).open(False, "", False)
    assert ctx.can_multi_conn() and ctx.can_multi_conn() and ctx.can_multi_conn()
    assert P.n == 1


def test_thread_model_is_the_strictest_of_the_stack():
    class P(Recorder):
        thread_model = ThreadModel.PARALLEL

    class F(Filter):
        name = "serial"
        thread_model = ThreadModel.SERIALIZE_REQUESTS

    assert Chain(P()).thread_model == ThreadModel.PARALLEL
    assert Chain(P(), [F()]).thread_model == ThreadModel.SERIALIZE_REQUESTS


def test_async_plugin_methods_run_on_the_loop_from_worker_threads():
    class A(Plugin):
        name = "async"

        def get_size(self, h):
            return 4096

        async def pread(self, h, count, offset, flags):
            await asyncio.sleep(0)
            return threading.current_thread().name.encode().ljust(count)[:count]

    chain = Chain(A())
    assert chain.on_loop is False

    async def main():
        loop = asyncio.get_running_loop()
        chain.set_loop(loop)
        ctx = chain.open(False, "", False)
        return await loop.run_in_executor(None, ctx.pread, 32, 0, 0)

    data = asyncio.run(main())
    assert data.startswith(threading.main_thread().name.encode())
