"""The cow filter in one process (the plugin is never written; the overlay's blocks; what
reaches the plugin) and as a server (its temporary file, a client served while another
waits, parameters)."""

from __future__ import annotations

import errno
import subprocess
import threading
from pathlib import Path

import pytest

from pynbd.errors import CommandError, ConfigError
from pynbd.filters.cow import CowFilter
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


def cow(disk: Disk, *params: str, readonly: bool = False) -> tuple[CowFilter, object]:
    chain, ctx = open_chain(disk, (CowFilter, list(params)), readonly=readonly)
    return chain.filters[0], ctx  # type: ignore[return-value]


def test_the_plugin_is_opened_read_only_and_never_written() -> None:
    data = bytes(range(256)) * 4096  # 1M
    disk = Disk(data=data)
    _, ctx = cow(disk)
    assert ctx.can_write() and ctx.can_trim() and ctx.can_zero() and ctx.can_flush()
    assert ctx.can_fua() == FuaMode.NATIVE and ctx.can_multi_conn() and ctx.can_extents()
    assert ctx.layer.below_context(ctx.handle).readonly  # type: ignore[attr-defined]
    ctx.pwrite(b"\xee" * 5000, 3000, Flag.FUA)
    ctx.zero(BLK, 2 * BLK)
    ctx.trim(BLK, 4 * BLK)
    ctx.flush()
    assert disk.named("pwrite", "zero", "trim", "flush") == []
    assert disk.data == data
    want = bytearray(data)
    want[3000:8000] = b"\xee" * 5000
    want[2 * BLK:3 * BLK] = bytes(BLK)
    want[4 * BLK:5 * BLK] = bytes(BLK)
    assert bytes(ctx.pread(MiB, 0)) == want


def test_reads_come_from_the_overlay_where_written() -> None:
    disk = Disk(data=b"\x11" * MiB)
    _, ctx = cow(disk)
    ctx.pwrite(b"\x22" * 10, BLK + 5)  # block 1 copied up: read from the plugin once
    disk.forget()
    assert bytes(ctx.pread(3 * BLK, 0)) == b"\x11" * (BLK + 5) + b"\x22" * 10 + \
        b"\x11" * (2 * BLK - 15)
    # blocks 0 and 2 from the plugin (one read each), block 1 from the overlay
    assert disk.named("pread") == [("pread", BLK, 0, 0), ("pread", BLK, 2 * BLK, 0)]


def test_cow_on_read() -> None:
    disk = Disk()
    _, ctx = cow(disk, "cow-on-read=true")
    ctx.pread(3 * BLK, 0)
    ctx.pread(3 * BLK, 0)
    assert disk.named("pread") == [("pread", 3 * BLK, 0, 0)]


def test_cow_on_read_path(tmp_path: Path) -> None:
    flag = tmp_path / "cor"
    disk = Disk()
    _, ctx = cow(disk, f"cow-on-read={flag}")
    ctx.pread(1, 0)
    flag.touch()
    ctx.pread(1, 0)  # copied now
    ctx.pread(1, 0)
    flag.unlink()
    ctx.pread(1, BLK)
    ctx.pread(1, BLK)
    assert [c[2] for c in disk.named("pread")] == [0, 0, BLK, BLK]


def test_cow_on_read_keeps_a_write_made_meanwhile() -> None:
    """A read copying a block up must not store the plugin's older data over a write made
    to another part of the block while it read (nbdkit 1.32 can)."""
    disk = Disk(data=b"\x01" * MiB)
    _, ctx = cow(disk, "cow-on-read=true")
    disk.hold(0)
    t = threading.Thread(target=ctx.pread, args=(512, 0))
    t.start()
    try:
        disk.holding(0)
        ctx.pwrite(b"\x02" * 512, 4096)  # the same block, another part of it
    finally:
        disk.release(0)
        t.join(10)
    assert bytes(ctx.pread(512, 4096)) == b"\x02" * 512
    assert bytes(ctx.pread(512, 0)) == b"\x01" * 512


def test_cache_modes() -> None:
    for mode, params, want in [
            (CacheMode.NONE, [], []),
            (CacheMode.EMULATE, [], [("pread", 2 * BLK, 0, 0)]),
            (CacheMode.NATIVE, [], [("cache", 2 * BLK, 0, 0)]),
            (CacheMode.NATIVE, ["cow-on-cache=true"], [("pread", 2 * BLK, 0, 0)])]:
        disk = Disk(cache=mode)
        _, ctx = cow(disk, *params)
        assert ctx.can_cache() == CacheMode.NATIVE
        ctx.cache(BLK + 1, 100)  # rounded out to 2 blocks
        assert disk.named("pread", "cache") == want, (mode, params)
        disk.forget()
        ctx.pread(BLK, 0)
        assert len(disk.named("pread")) == (0 if params else 1)


def test_zero_and_trim() -> None:
    disk = Disk(data=b"\xff" * MiB)
    _, ctx = cow(disk, "cow-block-size=4K")
    with pytest.raises(CommandError) as e:
        ctx.zero(BLK, 0, Flag.FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP
    ctx.zero(10000, 100)  # [100, 10100)
    ctx.trim(19900, 10100)  # [10100, 30000)
    assert bytes(ctx.pread(30200, 0)) == b"\xff" * 100 + bytes(29900) + b"\xff" * 200
    # whole trimmed blocks are holes; zeroed and partly trimmed blocks are data
    assert ctx.extents(32 * KiB, 0) == [(0, 12 * KiB, 0), (12 * KiB, 16 * KiB, HOLE),
                                        (28 * KiB, 4 * KiB, 0)]


def test_extents() -> None:
    disk = Disk()
    disk.data[8 * BLK] = 1  # the plugin has data in block 8
    _, ctx = cow(disk)
    ctx.pwrite(b"\1", 2 * BLK)
    disk.forget()
    assert ctx.extents(MiB, 0) == [(0, 2 * BLK, HOLE), (2 * BLK, BLK, 0),
                                   (3 * BLK, 5 * BLK, HOLE), (8 * BLK, 4 * KiB, 0),
                                   (8 * BLK + 4 * KiB, 8 * BLK - 4 * KiB, HOLE)]
    # the plugin was asked once per run of blocks not in the overlay
    assert disk.named("extents") == []  # (not recorded: the call is the context's)
    assert ctx.extents(MiB, 0, Flag.REQ_ONE)[0] == (0, 2 * BLK, HOLE)


def test_block_size() -> None:
    _, ctx = cow(Disk(), "cow-block-size=256K")
    assert ctx.block_size() == (1, 256 * KiB, 0xFFFFFFFF)


def test_readonly_server() -> None:
    _, ctx = cow(Disk(), readonly=True)
    assert not ctx.can_write()
    with pytest.raises(CommandError) as e:
        ctx.pwrite(b"x", 0)
    assert e.value.errno == errno.EROFS


def test_reads_of_the_plugin_run_in_parallel() -> None:
    disk = Disk()
    _, ctx = cow(disk, "cow-on-read=true")
    disk.hold(0)
    t = threading.Thread(target=ctx.pread, args=(BLK, 0))
    t.start()
    try:
        disk.holding(0)
        ctx.pwrite(b"\3" * 100, 5 * BLK + 7)  # a read-modify-write of another block
        assert bytes(ctx.pread(100, 5 * BLK + 7)) == b"\3" * 100
    finally:
        disk.release(0)
        t.join(10)
    assert not t.is_alive()


def test_parameters() -> None:
    flt = CowFilter()
    for key, value, message in [
            ("cow-block-size", "1000",
             "cow-block-size is out of range (4096..2G) or not a power of 2"),
            ("cow-block-size", "4G",
             "cow-block-size is out of range (4096..2G) or not a power of 2"),
            ("cow-block-size", "x", "could not parse size string (x)"),
            ("cow-block-size", "-4096", "size cannot be negative (-4096)"),
            ("cow-block-size", "4kb", "could not parse size: unknown suffix 'kb'"),
            ("cow-on-cache", "maybe", "could not decipher boolean (maybe)"),
            ("cow-on-read", "", "could not decipher boolean ()"),
            ("cow-on-read", "relative/path", "could not decipher boolean (relative/path)")]:
        with pytest.raises(ConfigError) as e:
            flt.config(lambda k, v: None, key, value)
        assert str(e.value) == message
    flt.config(lambda k, v: None, "cow-block-size", "2G")
    flt.config(lambda k, v: None, "cow-on-read", "/some/path")
    flt.config(lambda k, v: None, "cow-on-cache", "ON")
    assert (flt.blksize, flt.cow_on_read, flt.cow_on_cache) == (1 << 31, "/some/path", True)


# ---- as a server ---------------------------------------------------------------------------


def test_temporary_file_is_unlinked_and_nothing_is_left(pynbd_server, tmp_path: Path) -> None:
    tmpdir = tmp_path / "cowdir"
    tmpdir.mkdir()
    srv = pynbd_server("--filter=cow", "memory", "1M", env={"TMPDIR": str(tmpdir)})
    run_libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
               "h.pwrite(b'x' * 65536, 0)\nh.shutdown()", srv.uri)
    held = set(temp_files_of(srv.pid, tmpdir))
    assert len(held) == 1
    target, allocated = held.pop()
    assert target.endswith(" (deleted)") and allocated >= 65536
    assert list(tmpdir.iterdir()) == []
    srv.kill()  # even without a clean exit
    assert list(tmpdir.iterdir()) == []


def test_another_connection_is_served_while_one_waits(pynbd_server, tmp_path: Path) -> None:
    script = write_script(tmp_path)
    hold = tmp_path / "hold"
    hold.touch()
    srv = pynbd_server("--filter=cow", "python", script, f"hold={hold}")
    seconds, waiting, answered = served_while_one_waits(srv.uri, hold)
    assert seconds < 10 and waiting and answered


def test_manual() -> None:
    cp = subprocess.run([*PYNBD, "serve", "--filter=cow", "null", "--help"],
                        check=False, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0
    for word in ("cow-block-size=N", "cow-on-cache=true", "cow-on-read=/PATH", "TMPDIR",
                 "qemu-img rebase"):
        assert word in cp.stdout
