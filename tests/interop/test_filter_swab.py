"""The swab filter side by side with nbdkit's: swapped reads and writes for each word
size, alignment errors, the rounded size, extents in whole words, block sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
    infos,
)
from tests.side_by_side import probe

KiB = 1024


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_swapped_reads_and_writes(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path,
                                  bits: int) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 16 + b"tail!")
    w = bits // 8
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=swab", "file", disk, f"swab-bits={bits}"], [
        ("size",), ("pread", 16, 0), ("pread", 64, 8), ("pwrite", b"0123456789abcdef", 32),
        ("pread", 16, 32), ("pread", w, 1), ("pread", 8, 0), ("zero", 8, 64),
        ("trim", 8, 72), ("cache", 16, 0), ("pwrite", b"x" * 3, 4), ("flush",)],
        copies=[disk], strict=False)
    want = bytes(range(16))
    want = b"".join(want[i:i + w][::-1] for i in range(0, 16, w))
    assert view["results"][1] == ["data", want]
    assert view["results"][0] == ["size", 4096 + (5 // w) * w]
    assert view["results"][4] == ["data", b"0123456789abcdef"]  # swapped twice
    assert view["results"][5] == ["error", 22]


def test_swab_bits_8(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """swab-bits=8 swaps nothing. nbdkit 1.32 writes uninitialised memory instead of the
    client's data there (its pwrite copies nothing into the buffer it writes): reads and
    sizes are compared, and pynbd's writes are checked on their own."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) + b"odd")
    args = ["--filter=swab", "file", disk, "swab-bits=8"]
    view = assert_same_shape(pynbd_server, nbdkit_server, args, [
        ("size",), ("pread", 259, 0), ("pread", 3, 1), ("zero", 3, 5), ("pread", 8, 0)],
        copies=[disk], strict=False)
    assert view["results"][1] == ["data", disk.read_bytes()]
    srv = pynbd_server(*args)
    view = probe(srv.uri, [("pwrite", b"written", 1), ("pread", 9, 0)])
    assert view["results"][1] == ["data", b"\0written\x08"]


def test_pattern_little_endian(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """The manual's use: swab-bits=64 makes pattern's offsets little-endian."""
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=swab", "pattern", "1M", "swab-bits=64"], [("pread", 16, 4096)])
    assert view["results"][0] == ["data", (4096).to_bytes(8, "little") +
                                  (4104).to_bytes(8, "little")]


def test_extents_in_whole_words(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 3\n3 5 hole,zero\n8 13 zero\n21 11\n32 4064 hole,zero\n")
    assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=swab", "--filter=extentlist", "null", "4K", f"swab-bits={bits}",
          f"extentlist={extents}"],
         [("extents", 4096, 0), ("extents", 8, 0), ("extents", 8, 8), ("extents", 16, 16),
          ("extents", 64, 32), ("extents", 3, 1)])
        for bits in (16, 64)])


def test_block_size_and_blocksize(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """The word is the minimum block size; blocksize after swab gives byte access."""
    cases = [(["swab-bits=32"], (4, 512)), (["swab-bits=8"], (1, 512))]
    got = infos(pynbd_server, nbdkit_server,
                [["--filter=swab", "memory", "1M", *a] for a, _ in cases])
    for (_, want), pair in zip(cases, got, strict=True):
        for info in pair:
            assert (info["block_size_minimum"], info["block_size_preferred"]) == want
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(64)))
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=blocksize", "--filter=swab", "file", disk], [
        ("pread", 3, 1), ("pwrite", b"Z", 5), ("pread", 8, 0)], copies=[disk])
    assert view["results"][0] == ["data", bytes([0, 3, 2])]
    assert view["results"][2] == ["data", bytes([1, 0, 3, 2, 5]) + b"Z" + bytes([7, 6])]


def test_sizes() -> None:
    assert assert_same_open([["--filter=swab", "memory", "1001", f"swab-bits={b}"]
                             for b in (8, 16, 32, 64)]) == [1001, 1000, 1000, 1000]


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=swab", "null", "swab-bits=12"],
        ["--filter=swab", "null", "swab-bits=0"],
        ["--filter=swab", "null", "swab-bits=-16"],
        ["--filter=swab", "null", "swab-bits="],
        ["--filter=swab", "null", "swab-bits=16bits"],
        ["--filter=swab", "null", "swab-bits=99999999999"],
        ["--filter=swab", "null", "swab-bits=0x20x"],
    ])
