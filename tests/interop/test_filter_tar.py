"""The tar filter side by side with nbdkit's: entries of ustar, GNU and pax tar files (reads,
writes into the tar file, zeroes, trims, extents), entries not found, bad parameters, and
composition with gzip and xz below it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import require
from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
)
from tests.side_by_side import probe

LONG = "d" * 60 + "/" + "n" * 70 + ".img"  # 135 characters: a GNU long name


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tree")
    (d / "sub").mkdir()
    (d / "disk.img").write_bytes(bytes(range(256)) * 400 + b"tail")  # 102404 bytes
    (d / "sub" / "b.bin").write_bytes(b"\xab" * 70000)
    (d / LONG.split("/")[0]).mkdir()
    (d / LONG).write_bytes(b"long" * 1250)
    return d


def _tar(tree: Path, out: Path, *opts: str) -> Path:
    subprocess.run([require("tar"), *opts, "-C", tree, "-cf", out, "disk.img", "sub", LONG],
                   check=True)
    return out


@pytest.fixture(scope="module")
def tars(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tars")
    return {"gnu": _tar(tree, d / "gnu.tar"),
            "pax": _tar(tree, d / "pax.tar", "--format=pax")}


def test_reads_writes_extents(pynbd_server: Factory, nbdkit_server: Factory,
                              tars: dict[str, Path], tree: Path) -> None:
    ops = [("size",), ("pread", 4096, 0), ("pread", 100, 102304), ("extents", 102404, 0),
           ("pwrite", b"\x01" * 1000, 500), ("pwrite", b"\x02" * 4, 102400),
           ("zero", 600, 2000), ("trim", 512, 8192), ("cache", 4096, 0), ("flush",),
           ("pread", 3000, 0), ("pread", 8, 102396)]
    cases = [(["--filter=tar", "file", tars[k], "tar-entry=" + e], ops, [tars[k]])
             for k in ("gnu", "pax") for e in ("disk.img", "sub/b.bin")]
    cases.append((["-r", "--filter=tar", "file", tars["pax"], "tar-entry=disk.img"],
                  [("pwrite", b"x", 0), ("pread", 16, 0)], [tars["pax"]]))
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    raw = (tree / "disk.img").read_bytes()
    assert views[0]["size"] == len(raw)
    assert views[0]["results"][1] == ["data", raw[:4096]]
    assert views[0]["results"][-1] == ["data", raw[-8:-4] + b"\x02" * 4]


def test_long_name(pynbd_server: Factory, nbdkit_server: Factory,
                   tars: dict[str, Path], tree: Path) -> None:
    """A GNU long name (a ././@LongLink member before the real header): pynbd serves the
    file. nbdkit 1.32 takes GNU tar's block number of the LongLink header for the file's
    header and serves the long name and the real header as the first bytes instead."""
    want = (tree / LONG).read_bytes()
    pax = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=tar", "file", tars["pax"], "tar-entry=" + LONG], [("pread", 5000, 0)])
    assert pax["results"] == [["data", want]]
    srv = pynbd_server("--filter=tar", "file", tars["gnu"], "tar-entry=" + LONG)
    assert probe(srv.uri, [("pread", 5000, 0)])["results"] == [["data", want]]


def test_entries_not_found(tars: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file" * 100)
    sizes = assert_same_open([
        ["--filter=tar", "file", tars["gnu"], "tar-entry=nope"],
        ["--filter=tar", "file", tars["gnu"], "tar-entry=./disk.img"],
        ["--filter=tar", "file", tars["pax"], "tar-entry=sub"],
        ["--filter=tar", "file", junk, "tar-entry=disk.img"],
        ["--filter=tar", "file", tars["pax"], "tar-entry=disk.img", "tar=tar"],
    ])
    assert sizes == [None, None, 0, None, 102404]


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=tar", "null"],
        ["--filter=tar", "null", "tar-entry=a", "tar-entry=b"],
    ])


def test_compressed_below(pynbd_server: Factory, nbdkit_server: Factory,
                          tars: dict[str, Path], tree: Path, tmp_path: Path) -> None:
    data = tars["pax"].read_bytes()
    gz, xz = tmp_path / "t.tar.gz", tmp_path / "t.tar.xz"
    gz.write_bytes(subprocess.run([require("gzip"), "-c"], input=data, capture_output=True,
                                  check=True).stdout)
    xz.write_bytes(subprocess.run([require("xz"), "-c", "--block-size=16384"], input=data,
                                  capture_output=True, check=True).stdout)
    ops = [("size",), ("pread", 70000, 0), ("pwrite", b"x", 0)]
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=tar", "--filter=gzip", "file", gz, "tar-entry=sub/b.bin"], ops),
        (["--filter=tar", "--filter=xz", "file", xz, "tar-entry=sub/b.bin"], ops),
    ])
    for view in views:
        assert view["results"][:2] == [["size", 70000], ["data", b"\xab" * 70000]]
