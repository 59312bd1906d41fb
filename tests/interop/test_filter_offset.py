"""The offset filter side by side with nbdkit's: the same command lines give a client the
same size, flags, bytes, extents and errors, and write the same bytes into the image."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
    pynbd_main_exit,
)

KiB = 1024
MiB = 1024 * KiB


def image(tmp_path: Path, size: int = 64 * KiB) -> Path:
    """A file whose every byte differs from its neighbours' (offset mistakes show)."""
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 251) & 0xFF for i in range(size)))
    return p


def test_range_reads(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=offset", "pattern", "1M", "offset=1000", "range=64K"], [
        ("pread", 16, 0), ("pread", 4096, 60 * KiB), ("pread", 8, 64 * KiB - 8),
        ("pread", 16, 64 * KiB - 8), ("cache", 4096, 0), ("extents", 64 * KiB, 0),
        ("pwrite", b"x", 0), ("size",)])
    assert view["size"] == 64 * KiB
    # pattern's bytes are their own big-endian offsets: byte 0 is the plugin's byte 1000
    assert view["results"][0] == ["data", (1000).to_bytes(8, "big") + (1008).to_bytes(8, "big")]


def test_writes_land_at_the_offset(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = image(tmp_path)
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=offset", "file", disk, "offset=4K", "range=16K"], [
        ("pwrite", b"hello", 0), ("pwrite", bytes(range(256)) * 16, 5000),
        ("zero", 1000, 10000), ("zero", 512, 12 * KiB, 1 | 16), ("trim", 4096, 8192),
        ("flush",), ("pread", 16 * KiB, 0), ("pwrite", b"beyond", 16 * KiB - 3)],
        copies=[disk])


def test_offset_without_range_and_to_the_end(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=offset", "pattern", "1M", *args], [("pread", 8, 0)])
        for args in (["offset=1M"], ["offset=512K"], ["offset=0", "range=1M"], ["range=0"],
                     ["offset=1M", "range=0"])])
    assert [v["size"] for v in views] == [0, 512 * KiB, MiB, 0, 0]
    assert views[1]["results"] == [["data", (512 * KiB).to_bytes(8, "big")]]


def test_extents_move_with_the_offset(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 1M\n1536K 4k\n2M 512K hole\n3M 1M zero\n")
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=offset", "--filter=extentlist", "null", "8M", "offset=1M", "range=3M",
        f"extentlist={extents}"], [
        ("extents", 3 * MiB, 0), ("extents", 4096, 512 * KiB - 100),
        ("extents", 100, 512 * KiB + 4096), ("extents", MiB, 2 * MiB, 8),
        ("extents", 1, 3 * MiB - 1)])


def test_range_outside_the_plugin(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=offset", "memory", "1M", "offset=2M"], [("pread", 1, 0)])
    assert view.get("connect_error")
    sizes = assert_same_open([
        ["--filter=offset", "memory", "1M", *args]
        for args in (["offset=2M"], ["offset=1M", "range=1"], ["range=2M"],
                     ["offset=1", "range=1M"], ["offset=1M"], ["offset=1M", "range=0"])])
    assert sizes == [None, None, None, None, 0, 0]


def test_composes_with_truncate(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """offset then truncate (nbdkit's example): a window that reaches past the plugin,
    its tail reading as zeroes."""
    disk = image(tmp_path, 10000)
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=truncate", "--filter=offset", "file", disk, "offset=1000",
        "truncate=12K"], [
        ("size",), ("pread", 100, 8950), ("pread", 12 * KiB - 9000, 9000),
        ("pwrite", bytes(3000), 8000), ("pwrite", b"\1" * 3000, 8000),
        ("extents", 12 * KiB, 0), ("pread", 1000, 8500)], copies=[disk])
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=offset", "--filter=truncate", "file", disk, "offset=1000",
        "truncate=12K"], [("size",), ("pread", 2000, 10 * KiB), ("pread", 100, 0)])


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=offset", "null", "1M", "offset=x"],
        ["--filter=offset", "null", "1M", "offset="],
        ["--filter=offset", "null", "1M", "offset=-1"],
        ["--filter=offset", "null", "1M", "offset=1.5M"],
        ["--filter=offset", "null", "1M", "offset=1MB"],
        ["--filter=offset", "null", "1M", "offset=99999999999999999999"],
        ["--filter=offset", "null", "1M", "offset=9E"],
        ["--filter=offset", "null", "1M", "range=10Q"],
    ])
    # and as its own process: exit status 1, one line, no traceback
    rc, err = pynbd_main_exit(["--filter=offset", "null", "1M", "offset=x"])
    assert (rc, err) == (1, "pynbd serve: error: could not parse size string (x)\n")
