"""The cache filter in one process (what reaches the plugin, and when) and as a server
(its temporary file, parallel clients, its parameters)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from pynbd.errors import CommandError, ConfigError
from pynbd.filters.cache import CacheFilter
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Flag, FuaMode
from tests.e2e.caching_helpers import (
    Disk,
    open_chain,
    served_while_one_waits,
    temp_files_of,
    write_script,
)
from tests.helpers import PYNBD, run_libnbd

KiB = 1024
MiB = 1 << 20
BLK = 64 * KiB
HOLE = EXTENT_HOLE | EXTENT_ZERO


@pytest.fixture(autouse=True)
def _tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def cache(disk: Disk, *params: str) -> tuple[CacheFilter, object]:
    chain, ctx = open_chain(disk, (CacheFilter, list(params)))
    return chain.filters[0], ctx  # type: ignore[return-value]


def test_writeback_reaches_the_plugin_on_flush() -> None:
    disk = Disk()
    _, ctx = cache(disk)
    ctx.pwrite(b"\1" * BLK, BLK)
    assert disk.named("pwrite") == []
    assert bytes(ctx.pread(BLK, BLK)) == b"\1" * BLK  # from the cache
    assert disk.named("pread") == []
    ctx.flush()
    assert disk.named("pwrite", "flush") == [("pwrite", BLK, BLK, 0), ("flush", 0, 0, 0)]
    assert disk.data[BLK:2 * BLK] == b"\1" * BLK
    disk.forget()
    ctx.flush()  # nothing dirty any more: only the plugin's flush
    assert disk.named("pwrite", "flush") == [("flush", 0, 0, 0)]


def test_writethrough_writes_at_once() -> None:
    disk = Disk()
    _, ctx = cache(disk, "cache=writethrough")
    ctx.pwrite(b"\2" * 100, 10)  # a partial block: the rest comes from the plugin
    assert disk.named("pread", "pwrite") == [("pread", BLK, 0, 0), ("pwrite", BLK, 0, 0)]
    assert disk.data[:120] == bytes(10) + b"\2" * 100 + bytes(10)


def test_unsafe_never_flushes() -> None:
    disk = Disk(flush=False, fua=FuaMode.NONE)
    _, ctx = cache(disk, "cache=unsafe")
    assert ctx.can_flush() and ctx.can_fua() == FuaMode.NATIVE
    ctx.pwrite(b"\3" * BLK, 0, Flag.FUA)
    ctx.flush()
    assert disk.named("pwrite", "flush") == []
    assert bytes(ctx.pread(4, 0)) == b"\3" * 4


def test_fua_writes_through_in_writeback_mode() -> None:
    disk = Disk()
    _, ctx = cache(disk)
    ctx.pwrite(b"\4" * BLK, 0)
    ctx.pwrite(b"\5" * BLK, BLK, Flag.FUA)
    assert disk.named("pwrite") == [("pwrite", BLK, BLK, Flag.FUA)]
    disk2 = Disk(fua=FuaMode.EMULATE)
    _, ctx2 = cache(disk2)
    ctx2.pwrite(b"\5" * 10, 0, Flag.FUA)  # emulated FUA below: a flush of everything
    assert disk2.named("pwrite", "flush") == [("pwrite", BLK, 0, 0), ("flush", 0, 0, 0)]


def test_capabilities() -> None:
    disk = Disk(cache=CacheMode.NONE, flush=False, fua=FuaMode.NONE)
    _, ctx = cache(disk, "cache=writethrough")
    assert ctx.can_cache() == CacheMode.NATIVE
    assert ctx.can_fast_zero()
    assert not ctx.can_flush() and ctx.can_fua() == FuaMode.NONE
    assert ctx.can_multi_conn()  # the plugin's, in writethrough mode


def test_cache_on_read() -> None:
    disk = Disk()
    _, off = cache(disk)
    off.pread(100, 0)
    off.pread(100, 0)
    assert len(disk.named("pread")) == 2
    disk2 = Disk()
    _, on = cache(disk2, "cache-on-read=true")
    on.pread(100, 0)
    on.pread(BLK, 0)
    assert disk2.named("pread") == [("pread", BLK, 0, 0)]


def test_cache_on_read_path(tmp_path: Path) -> None:
    flag = tmp_path / "cor"
    disk = Disk()
    _, ctx = cache(disk, f"cache-on-read={flag}")
    ctx.pread(1, 0)
    ctx.pread(1, 0)
    flag.touch()
    ctx.pread(1, 0)  # kept now
    ctx.pread(1, 0)
    flag.unlink()
    ctx.pread(1, BLK)  # not kept
    ctx.pread(1, BLK)
    assert [c[2] for c in disk.named("pread")] == [0, 0, 0, BLK, BLK]


def test_unaligned_reads_and_writes() -> None:
    data = bytes(range(256)) * 1024  # 256K
    disk = Disk(data=data)
    _, ctx = cache(disk, "cache-min-block-size=4K")
    ctx.pwrite(b"\xee" * 5000, 3000)
    want = bytearray(data)
    want[3000:8000] = b"\xee" * 5000
    assert bytes(ctx.pread(20000, 1000)) == want[1000:21000]
    # partial blocks were read whole from the plugin; the block in the middle never
    assert disk.named("pread")[:2] == [("pread", 4096, 0, 0), ("pread", 4096, 4096, 0)]
    ctx.flush()
    assert disk.data == want


def test_zero() -> None:
    disk = Disk(data=b"\xff" * MiB)
    _, ctx = cache(disk, "cache=writethrough")
    with pytest.raises(CommandError) as e:
        ctx.zero(BLK, 0, Flag.FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP
    ctx.zero(3 * BLK + 10, 10, Flag.MAY_TRIM)
    assert bytes(ctx.pread(3 * BLK + 30, 0)) == b"\xff" * 10 + bytes(3 * BLK + 10) + \
        b"\xff" * 10
    # written to the plugin with pwrite, never zero, MAY_TRIM dropped
    assert disk.named("zero") == [] and disk.data[10:3 * BLK + 20] == bytes(3 * BLK + 10)
    assert all(c[3] == 0 for c in disk.named("pwrite"))


def test_prefetch_is_one_plugin_read_per_run() -> None:
    disk = Disk()
    _, ctx = cache(disk)
    ctx.cache(10 * BLK, 100)  # rounded out to 11 blocks
    assert disk.named("pread") == [("pread", 11 * BLK, 0, 0)]
    ctx.pread(MiB - 100, 100)  # all but the tail from the cache
    assert disk.named("pread")[1:] == [("pread", MiB - 11 * BLK, 11 * BLK, 0)]
    assert disk.named("cache") == []  # the plugin's cache is not used


def test_other_connections_share_the_cache() -> None:
    disk = Disk()
    chain, one = open_chain(disk, (CacheFilter, []))
    two = chain.open(False, "", False)
    one.pwrite(b"\7" * 10, 0)
    assert bytes(two.pread(10, 0)) == b"\7" * 10
    assert disk.named("pwrite") == []


def test_extents_call_dirty_blocks_data() -> None:
    """nbdkit 1.32 passes the plugin's extents: a block written to the cache only is
    reported as a hole reading as zeroes, while reads return what was written."""
    disk = Disk()
    _, ctx = cache(disk)
    ctx.pwrite(b"\1", BLK + 5)
    assert ctx.extents(3 * BLK, 0) == [(0, BLK, HOLE), (BLK, BLK, 0), (2 * BLK, BLK, HOLE)]
    ctx.flush()  # now the plugin has the data and says so itself
    assert ctx.extents(3 * BLK, 0) == [(0, BLK, HOLE), (BLK, 4 * KiB, 0),
                                       (BLK + 4 * KiB, 2 * BLK - 4 * KiB, HOLE)]


def test_trim_drops_blocks_from_the_cache() -> None:
    disk = Disk(data=b"\xaa" * MiB)
    _, ctx = cache(disk, "cache-on-read=true")
    ctx.pread(4 * BLK, 0)
    ctx.trim(BLK + 200, BLK - 100)  # covers block 1, and parts of blocks 0 and 2
    assert disk.named("trim") == [("trim", BLK + 200, BLK - 100, 0)]
    disk.forget()
    # blocks 0 and 2, partly trimmed, are still cached; block 1 is read again
    assert bytes(ctx.pread(4 * BLK, 0)) == b"\xaa" * BLK + bytes(BLK) + b"\xaa" * 2 * BLK
    assert disk.named("pread") == [("pread", BLK, BLK, 0)]


def test_reclaim_keeps_the_cache_small_and_loses_no_write(_tmpdir: Path) -> None:
    """cache-max-size: reading 8M with cache-on-read keeps about 1M cached. Dirty blocks are
    written to the plugin before their space is given back (nbdkit 1.32 loses them)."""
    disk = Disk(size=8 * MiB)
    flt, ctx = cache(disk, "cache-max-size=1M", "cache-on-read=true")
    for off in range(0, 8 * MiB, BLK):
        ctx.pread(BLK, off)
    assert flt.store.allocated() <= MiB
    assert sum(1 for s in flt.store.states if s) <= MiB // BLK
    for off in range(0, 8 * MiB, BLK):
        ctx.pwrite(bytes([off // BLK % 250 + 1]) * BLK, off)
    assert flt.store.allocated() <= MiB
    assert len(disk.named("pwrite")) >= 8 * MiB // BLK - MiB // BLK  # written back
    for off in range(0, 8 * MiB, BLK):
        assert bytes(ctx.pread(BLK, off)) == bytes([off // BLK % 250 + 1]) * BLK, off
    ctx.flush()
    assert all(disk.data[off] == off // BLK % 250 + 1 for off in range(0, 8 * MiB, BLK))


def test_flush_reports_a_failed_write_back() -> None:
    disk = Disk()
    _, ctx = cache(disk)
    ctx.pwrite(b"\1" * BLK, 0)
    ctx.pwrite(b"\2" * BLK, 4 * BLK)
    disk.fail_writes = True
    with pytest.raises(CommandError) as e:
        ctx.flush()
    assert e.value.errno == errno.EIO
    # every dirty block was tried, and the plugin flushed anyway
    assert [c[0] for c in disk.calls] == ["pwrite", "pwrite", "flush"]
    disk.fail_writes = False
    ctx.flush()  # still dirty: written now
    assert disk.data[0] == 1 and disk.data[4 * BLK] == 2


def test_reads_of_the_plugin_run_in_parallel() -> None:
    """A read waiting for the plugin holds nothing: reads of other blocks (cached or not)
    and writes go on meanwhile."""
    import threading

    disk = Disk()
    _, ctx = cache(disk)
    ctx.pwrite(b"\1" * BLK, 2 * BLK)
    disk.hold(0)
    t = threading.Thread(target=ctx.pread, args=(BLK, 0))
    t.start()
    try:
        disk.holding(0)
        assert bytes(ctx.pread(4, 2 * BLK)) == b"\1" * 4
        assert bytes(ctx.pread(4, 4 * BLK)) == bytes(4)
        ctx.pwrite(b"\2" * BLK, 6 * BLK)
    finally:
        disk.release(0)
        t.join(10)
    assert not t.is_alive()


def test_parameters() -> None:
    flt = CacheFilter()
    for key, value, message in [
            ("cache", "foo", "invalid cache parameter, should be writeback|writethrough|unsafe"),
            ("cache-on-read", "maybe", "could not decipher boolean (maybe)"),
            ("cache-min-block-size", "1000",
             "cache-min-block-size is not a power of 2, or is too small or too large"),
            ("cache-min-block-size", "x", "could not parse size string (x)"),
            ("cache-max-size", "1000", "cache-max-size is too small"),
            ("cache-high-threshold", "0", "cache-high-threshold must be greater than zero"),
            ("cache-low-threshold", "-1",
             "cache-low-threshold: negative numbers are not allowed"),
            ("cache-low-threshold", "12abc",
             'cache-low-threshold: could not parse number: "12abc": trailing garbage')]:
        with pytest.raises(ConfigError) as e:
            flt.config(lambda k, v: None, key, value)
        assert str(e.value) == message
    flt.config(lambda k, v: None, "cache-high-threshold", "0x10")  # C's rules: hex
    assert flt.hi_thresh == 16
    flt.config(lambda k, v: None, "cache-max-size", "1M")
    flt.config(lambda k, v: None, "cache-low-threshold", "020")  # and octal
    with pytest.raises(ConfigError, match="^cache-low-threshold must be less than "):
        flt.config_complete()


def test_block_size_follows_the_file_system(_tmpdir: Path) -> None:
    flt, _ = cache(Disk(), "cache-min-block-size=4K")
    assert flt.store.blksize == max(4096, os.statvfs(_tmpdir).f_bsize)
    flt2, _ = cache(Disk(), "cache-min-block-size=1M")
    assert flt2.store.blksize == MiB


# ---- as a server ---------------------------------------------------------------------------


def test_temporary_file_is_unlinked_and_nothing_is_left(pynbd_server, tmp_path: Path) -> None:
    tmpdir = tmp_path / "cachedir"
    tmpdir.mkdir()
    srv = pynbd_server("--filter=cache", "memory", "1M", env={"TMPDIR": str(tmpdir)})
    run_libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
               "h.pwrite(b'x' * 65536, 0)\nh.shutdown()", srv.uri)
    held = set(temp_files_of(srv.pid, tmpdir))  # (the mapping holds a second descriptor)
    assert len(held) == 1
    target, allocated = held.pop()
    assert target.endswith(" (deleted)") and allocated >= 65536  # the write is in it
    assert list(tmpdir.iterdir()) == []
    srv.stop()
    assert list(tmpdir.iterdir()) == []


def test_no_temporary_directory(tmp_path: Path) -> None:
    cp = subprocess.run([*PYNBD, "serve", "-U", str(tmp_path / "s"), "--filter=cache",
                         "memory", "1M", "--run", "true"], check=False, capture_output=True, text=True,
                        env={**os.environ, "TMPDIR": str(tmp_path / "nonexistent")},
                        timeout=60)
    assert cp.returncode == 1
    assert cp.stderr == (f"pynbd serve: error: mkostemp: {tmp_path}/nonexistent: "
                         "No such file or directory\n")


def test_bad_parameter_is_one_line(tmp_path: Path) -> None:
    cp = subprocess.run([*PYNBD, "serve", "-U", str(tmp_path / "s"), "--filter=cache",
                         "memory", "1M", "cache-max-size=1G", "cache-high-threshold=50",
                         "cache-low-threshold=50"], check=False, capture_output=True, text=True, timeout=60)
    assert (cp.returncode, cp.stderr) == (
        1, "pynbd serve: error: cache-low-threshold must be less than cache-high-threshold\n")


def test_another_connection_is_served_while_one_waits(pynbd_server, tmp_path: Path) -> None:
    """A client whose read waits for a slow plugin leaves the server answering others."""
    script = write_script(tmp_path)
    hold = tmp_path / "hold"
    hold.touch()
    srv = pynbd_server("--filter=cache", "python", script, f"hold={hold}")
    seconds, waiting, answered = served_while_one_waits(srv.uri, hold)
    assert seconds < 10 and waiting and answered


def test_manual() -> None:
    cp = subprocess.run([*PYNBD, "serve", "--filter=cache", "null", "--help"],
                        check=False, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0
    for word in ("cache=writeback", "cache-min-block-size=SIZE", "cache-max-size=SIZE",
                 "cache-on-read=/PATH", "TMPDIR", "EXAMPLES"):
        assert word in cp.stdout
