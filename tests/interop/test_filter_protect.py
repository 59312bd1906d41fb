"""The protect filter side by side with nbdkit's: writes, zeroes and trims that would
change a protected byte fail with EPERM and write nothing; others go through."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_shape,
    bad_params,
    views,
)
from tests.side_by_side import assert_views_equal

EPERM = 1


def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\xee" * 512 + bytes(1536) + bytes(range(256)) * 8)  # 4K
    return p


OPS = [
    ("pwrite", b"x", 0), ("pwrite", b"\xee" * 100, 100), ("pwrite", b"\xee\xef", 510),
    ("pwrite", b"y" * 10, 600), ("zero", 100, 700), ("zero", 100, 400),
    ("trim", 512, 1024), ("trim", 10, 0), ("pwrite", bytes(range(256)), 2048),
    ("pwrite", bytes(256), 2048), ("zero", 256, 3000), ("pwrite", b"z", 4095),
    ("pwrite", b"q" * 600, 1900), ("pread", 4096, 0),
]


def test_ranges(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = image(tmp_path)
    views_ = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=protect", "file", disk, *ranges], OPS, [disk])
        for ranges in (["protect=0-511"], ["protect=~1024-2047"],
                       ["protect=0-0x1ff", "protect=2048-", "protect=0600-0777"],
                       ["protect=-511"], ["protect=~-"], ["protect=~0-"],
                       ["protect=4095-4095"])])
    assert [r[0] for r in views_[0]["results"][:4]] == ["error", "ok", "error", "ok"]
    assert all(r[0] != "error" for r in views_[4]["results"])  # ~- protects nothing


def test_whole_disk_and_readonly(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = image(tmp_path)
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=protect", "file", disk, "protect=0-"], OPS, copies=[disk])
    assert view["results"][0] == ["error", EPERM]
    assert view["results"][-1] == ["data", disk.read_bytes()]
    assert_same_shape(pynbd_server, nbdkit_server, [
        "-r", "--filter=protect", "file", disk, "protect=0-511"], OPS[:2])


def test_range_inside_another(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """protect=0-1023 protect=10-20: nbdkit 1.32 merges the two into 0-20 (it takes the
    second range's end), so bytes 21-1023 become writable. pynbd keeps 0-1023 protected.
    Everything else is the same."""
    disk = image(tmp_path)
    ops = [("pwrite", b"a", 5), ("pwrite", b"b", 15), ("pwrite", b"c", 500),
           ("pwrite", b"d", 1500), ("pread", 2048, 0)]
    args = ["--filter=protect", "file", disk, "protect=0-1023", "protect=10-20"]
    mine, theirs, files = views(pynbd_server, nbdkit_server, args, ops, copies=[disk])
    assert mine["results"][:4] == [["error", EPERM], ["error", EPERM], ["error", EPERM],
                                   ["ok"]]
    assert theirs["results"][:4] == [["error", EPERM], ["error", EPERM], ["ok"], ["ok"]]
    assert files[0][500] == 0xEE and files[1][500] == ord("c")
    # with the ranges not nested both agree
    assert_views_equal(*views(pynbd_server, nbdkit_server, [
        "--filter=protect", "file", disk, "protect=0-20", "protect=10-1023"], ops,
        copies=[disk])[:2], "overlapping ranges")


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=protect", "null", "protect=5"],
        ["--filter=protect", "null", "protect=~5"],
        ["--filter=protect", "null", "protect="],
        ["--filter=protect", "null", "protect=5-3"],
        ["--filter=protect", "null", "protect=~5-3"],
        ["--filter=protect", "null", "protect=x-5"],
        ["--filter=protect", "null", "protect=1-5-9"],
        ["--filter=protect", "null", "protect=1k-2k"],
        ["--filter=protect", "null", "protect=--5"],
        ["--filter=protect", "null", "protect=0-99999999999999999999"],
    ])
