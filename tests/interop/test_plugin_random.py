"""random and sparse-random side by side with nbdkit's: the same bytes and extents for the same
seed, the same answers to writes, trims and zeroes, and nbdkit's messages for bad parameters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, serve_both

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
FUA = 1


def _copy(uri: str) -> bytes:
    return subprocess.run([require("nbdcopy"), uri, "-"], capture_output=True, check=True,
                          timeout=60).stdout


def test_random_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    ops = [("size",), ("pread", 4096, 0), ("pread", 1000, 12345), ("pread", 65536, 3 * MIB),
           ("trim", 4096, 0), ("zero", 1, 7), ("flush",), ("cache", 4096, 0),
           ("extents", MIB, 0), ("pwrite", b"\0" * 16, 0)]
    got = assert_same(pynbd_server, nbdkit_server, ["random", "4M", "seed=12345"], ops=ops)
    assert got["results"][1][1] != bytes(4096)


def test_random_whole_disk_and_matching_writes(pynbd_server, nbdkit_server) -> None:
    p, n = serve_both(pynbd_server, nbdkit_server, ["random", "size=3M", "seed=0x7fffffff"])
    data = _copy(p.uri)
    assert data == _copy(n.uri)
    ops = [("pwrite", data[5000:20000], 5000), ("pwrite", data[:4096], 0, FUA)]
    assert_same(pynbd_server, nbdkit_server, ["random", "size=3M", "seed=0x7fffffff"], ops=ops)


def test_random_copies_onto_itself(pynbd_server) -> None:
    srv = pynbd_server("random", "size=2M", "seed=1")
    subprocess.run([require("nbdcopy"), srv.uri, srv.uri], check=True, timeout=60)


SPARSE = [
    ["sparse-random", "64M", "seed=7", "runlength=65536", "percent=30"],
    ["sparse-random", "4M", "seed=7", "runlength=65536", "percent=30", "random-content=true"],
    ["sparse-random", "size=1000000", "seed=9", "percent=50", "runlength=8192"],
    ["sparse-random", "1G", "seed=4294967295"],
    ["sparse-random", "8M", "seed=3", "percent=100"],
    ["sparse-random", "8M", "seed=3", "percent=0"],
]


@pytest.mark.parametrize("args", SPARSE, ids=lambda a: " ".join(a[1:]))
def test_sparse_random_as_nbdkit(pynbd_server, nbdkit_server, args: list[str]) -> None:
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    ops = [("size",), ("extents", 64 * MIB, 0), ("extents", 64 * MIB, 5000, 8),
           ("pread", 65536, 0), ("pread", 8192, 4 * MIB)]
    from side_by_side import assert_views_equal, probe
    assert_views_equal(probe(p.uri, ops), probe(n.uri, ops), " ".join(args))
    if "1G" not in args:
        assert _copy(p.uri) == _copy(n.uri)


def test_sparse_random_writes_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    args = ["sparse-random", "16M", "seed=11", "percent=50", "runlength=32768"]
    p, _ = serve_both(pynbd_server, nbdkit_server, args)
    data = _copy(p.uri)
    hole = next(i for i in range(0, len(data), 4096) if data[i:i + 4096] == bytes(4096))
    full = next(i for i in range(0, len(data), 4096) if data[i:i + 4096] != bytes(4096))
    ops = [("pwrite", data[full:full + 4096], full), ("pwrite", b"x" * 4096, full),
           ("pwrite", bytes(4096), hole), ("pwrite", bytes(4096), full),
           ("trim", 4096, hole), ("zero", 4096, hole, FUA), ("trim", 4096, full),
           ("zero", 8192, full), ("flush",)]
    assert_same(pynbd_server, nbdkit_server, args, ops=ops)
    subprocess.run([require("nbdcopy"), p.uri, p.uri], check=True, timeout=60)


def test_sparse_random_unaligned_reads_are_consistent(pynbd_server) -> None:
    """nbdkit 1.32 computes the head of an unaligned read from the unaligned offset; pynbd
    serves each block's bytes wherever a read starts."""
    args = ["sparse-random", "4M", "seed=3", "percent=100", "random-content=true"]
    srv = pynbd_server(*args)
    data = _copy(srv.uri)
    from side_by_side import probe
    got = probe(srv.uri, [("pread", 5000, 100), ("pread", 10, 4095)])["results"]
    assert got[0][1] == data[100:5100] and got[1][1] == data[4095:4105]


@pytest.mark.parametrize("args, message", [
    (["random", "seed=-1"], "seed: negative numbers are not allowed"),
    (["random", "seed=4294967296"], 'seed: could not parse number: "4294967296"'),
    (["random", "seed=x"], "seed: empty string where we expected a number"),
    (["random", "size=x"], "could not parse size string (x)"),
    (["random", "foo=1"], "unknown parameter 'foo'"),
    (["sparse-random", "percent=x"], "cannot parse percent parameter: x"),
    (["sparse-random", "percent=101"], "cannot parse percent parameter: 101"),
    (["sparse-random", "runlength=0"], "runlength parameter must be > 0"),
    (["sparse-random", "runlength=x"], "runlength: empty string where we expected a number"),
    (["sparse-random", "random-content=maybe"], "could not decipher boolean (maybe)"),
    (["sparse-random", "seed=4294967296"], 'seed: could not parse number: "4294967296"'),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, args: list[str], message: str) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert b"Traceback" not in mine.stderr
