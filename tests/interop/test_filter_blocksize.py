"""The blocksize filter side by side with nbdkit's: unaligned requests become whole blocks
(read-modify-write for writes and zeroes), large ones are split, the size is rounded down,
extents come in whole blocks, and the widest block size is advertised."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
    infos,
)

KiB = 1024
MiB = 1024 * KiB
FUA, FAST_ZERO, REQ_ONE = 1, 16, 8


def image(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 13 + i // 256) & 0xFF for i in range(size)))
    return p


UNALIGNED = [
    ("pread", 100, 1000), ("pread", 3000, 7), ("pread", 1, 4095), ("pread", 8192, 4096),
    ("pwrite", b"A" * 10, 1020), ("pwrite", b"B" * 5000, 3), ("pwrite", b"C" * 512, 512),
    ("pwrite", b"D" * 100, 4000, FUA), ("zero", 700, 300), ("zero", 3000, 9000, FUA),
    ("zero", 100, 20000, FAST_ZERO), ("zero", 4096, 8192, FAST_ZERO), ("trim", 1500, 700),
    ("trim", 4096, 16384, FUA), ("cache", 10, 1000), ("flush",), ("pread", 24 * KiB, 0),
]


def test_unaligned_requests(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = image(tmp_path, 24 * KiB + 300)
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=blocksize", "file", disk, *args], UNALIGNED, [disk])
        for args in (["minblock=512"], ["minblock=4K", "maxdata=8K"],
                     ["minblock=512", "maxdata=1K", "maxlen=2K"])])
    assert [v["size"] for v in views] == [24 * KiB] * 3  # 24K+300 rounded down


def test_fast_zero(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """A fast zero that would take more than one call to the plugin (unaligned, or longer
    than maxlen) fails at once with ENOTSUP."""
    ops = [("zero", 100, 20000, FAST_ZERO), ("zero", 4096, 8192, FAST_ZERO),
           ("zero", 1024, 512, FAST_ZERO)]
    plain, short = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=blocksize", "memory", "32K", "minblock=512", *args], ops)
        for args in ([], ["maxlen=2K"])])
    assert plain["results"] == [["error", 95], ["ok"], ["ok"]]
    assert short["results"] == [["error", 95], ["error", 95], ["ok"]]


def test_requests_reach_the_plugin_aligned_and_bounded(pynbd_server: Factory, nbdkit_server: Factory,
                                                        tmp_path: Path) -> None:
    """blocksize over blocksize-policy: the policy (error) refuses anything not 512-byte
    aligned or larger than 1K, so every request succeeding shows blocksize split and
    aligned it. Under nbdkit the same stack is the reference."""
    disk = image(tmp_path, 16 * KiB)
    policy = ["blocksize-error-policy=error", "blocksize-minimum=512",
              "blocksize-preferred=512", "blocksize-maximum=1K"]
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=blocksize", "--filter=blocksize-policy", "file", disk, *policy], [
        ("pread", 5000, 3), ("pwrite", b"x" * 5000, 3), ("zero", 3000, 6001),
        ("trim", 3000, 9001), ("cache", 5000, 1), ("extents", 5000, 7),
        ("pread", 16 * KiB, 0)], copies=[disk])
    assert not [r for r in view["results"] if r[0] == "error"]


def test_size_and_truncate(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = image(tmp_path, 10000)
    sizes = assert_same_open([
        ["--filter=blocksize", "file", disk, "minblock=4K"],
        ["--filter=blocksize", "--filter=truncate", "file", disk, "minblock=4K",
         "round-up=4K"],
        ["--filter=blocksize", "file", disk, "minblock=64K"]])
    assert sizes == [8192, 12288, 0]
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=blocksize", "--filter=truncate", "file", disk, "minblock=4k",
        "round-up=4k"], [
        ("pread", 300, 9900), ("pwrite", b"tail", 9996), ("pwrite", b"\1", 10001),
        ("pwrite", bytes(100), 10001), ("pread", 12288, 0)], copies=[disk])


def test_extents_in_whole_blocks(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 100\n100 100 hole\n200 3896 zero\n4096 4096 hole,zero\n"
                       "8192 1 3\n8193 4095\n12288 4000 hole,zero\n16288 4096\n")
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=blocksize", "--filter=extentlist", "null", "64K", "minblock=4K",
        f"extentlist={extents}"], [
        ("extents", 64 * KiB, 0), ("extents", 4096, 0, REQ_ONE), ("extents", 100, 4100),
        ("extents", 10, 8190), ("extents", 8192, 12288), ("extents", 100, 16000),
        ("extents", 4096, 20480)])


def test_advertised_block_size(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """Minimum 1, preferred at least 4096 and minblock; maximum 2^32-1 (pynbd's server
    advertises at most its own 32M limit, which it never lifts)."""
    cases = [(["minblock=512"], (1, 4096)), (["minblock=64K"], (1, 65536)),
             (["maxdata=1M"], (1, 4096))]
    got = infos(pynbd_server, nbdkit_server,
                [["--filter=blocksize", "memory", "1M", *a] for a, _ in cases])
    for (_, want), (mine, theirs) in zip(cases, got, strict=True):
        for info in (mine, theirs):
            assert (info["block_size_minimum"], info["block_size_preferred"]) == want
        assert theirs["block_size_maximum"] == 0xFFFFFFFF
        assert mine["block_size_maximum"] == 32 * MiB


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=blocksize", "null", "minblock=0"],
        ["--filter=blocksize", "null", "minblock=x"],
        ["--filter=blocksize", "null", "minblock=3"],
        ["--filter=blocksize", "null", "minblock=128k"],
        ["--filter=blocksize", "null", "maxdata=4G"],
        ["--filter=blocksize", "null", "maxlen=0"],
        ["--filter=blocksize", "null", "minblock=512", "maxdata=1000"],
        ["--filter=blocksize", "null", "minblock=512", "maxlen=1000"],
    ])
