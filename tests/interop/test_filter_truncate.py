"""The truncate filter side by side with nbdkit's: sizes, the zero tail, writes across the
end of the plugin, fast zero, extents of the tail, and its parameters."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
)
from tests.side_by_side import probe

KiB = 1024


def test_sizes() -> None:
    sizes = assert_same_open([
        ["--filter=truncate", "memory", "1000", *args]
        for args in (["truncate=1500"], ["truncate=10"], ["truncate=0"], ["round-up=512"],
                     ["round-down=512"], ["round-down=8"], ["round-up=8"], ["round-down=2K"],
                     ["truncate=1500", "round-up=1K"], ["truncate=1500", "round-down=1K"],
                     ["round-up=4K", "round-down=1K"], ["truncate=9223372036854775807",
                                                       "round-up=2"])])
    assert sizes == [1500, 10, 0, 1024, 512, 1000, 1000, 0, 2048, 1024, 4096, None]


def test_tail_reads_writes_and_extents(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(250)) * 4)  # 1000 bytes
    assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=truncate", "file", disk, "truncate=1500", "round-up=512"], [
        ("size",), ("pread", 100, 950), ("pread", 500, 1000), ("pread", 1536, 0),
        ("pwrite", bytes(100), 1100), ("pwrite", b"\1" * 100, 950),
        ("pwrite", b"\2" * 100, 1100), ("pwrite", b"\3" * 10, 990),
        ("zero", 100, 950), ("zero", 500, 1000), ("trim", 100, 980), ("trim", 100, 1200),
        ("cache", 200, 900), ("cache", 100, 1200), ("extents", 1536, 0),
        ("extents", 100, 1000), ("extents", 500, 999, 8), ("extents", 1, 1499),
        ("pread", 1536, 0), ("flush",)], copies=[disk])


def test_tail_past_truncate_and_round_up(pynbd_server: Factory) -> None:
    """truncate=1500 round-up=512: the size is 1536, and [1500, 1536) is part of the hole.
    nbdkit 1.32 ends the hole at 1500 (the truncate= size, not the rounded one), and a
    query inside [1500, 1536) finds no extent: its server dies on an assertion
    (extents_to_block_descriptors: nr_extents >= 1). pynbd answers hole,zero."""
    srv = pynbd_server("--filter=truncate", "memory", "1000", "truncate=1500",
                       "round-up=512")
    view = probe(srv.uri, [("extents", 1, 1535), ("extents", 36, 1500),
                           ("extents", 536, 1000), ("pread", 36, 1500)])
    assert view["size"] == 1536
    assert view["results"] == [["extents", [1, 3]], ["extents", [36, 3]],
                               ["extents", [536, 3]], ["data", bytes(36)]]


def test_fast_zero(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """A fast zero past the end always succeeds; inside it needs the plugin's."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xff" * 2048)
    fast = 16
    memory, file = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=truncate", "memory", "2048", "truncate=4K"],
         [("zero", 1024, 2048, fast), ("zero", 1024, 1024, fast), ("pread", 16, 1024)]),
        (["--filter=truncate", "file", disk, "truncate=4K"],
         [("zero", 1024, 2048, fast), ("zero", 1024, 1024, fast), ("pread", 16, 1024)],
         [disk]),
    ])
    assert memory["results"] == [["ok"], ["ok"], ["data", bytes(16)]]
    # the file plugin cannot zero fast: ENOTSUP inside, nothing written
    assert file["results"] == [["ok"], ["error", 95], ["data", b"\xff" * 16]]


def test_shrink(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=truncate", "pattern", "1M", "truncate=1000"], [
        ("size",), ("pread", 1000, 0), ("pread", 8, 992), ("extents", 1000, 0)])
    assert view["results"][2] == ["data", (992).to_bytes(8, "big")]


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=truncate", "null", "truncate=x"],
        ["--filter=truncate", "null", "truncate=-1"],
        ["--filter=truncate", "null", "round-up=0"],
        ["--filter=truncate", "null", "round-up=3"],
        ["--filter=truncate", "null", "round-up=8G"],
        ["--filter=truncate", "null", "round-down=4294967296"],
        ["--filter=truncate", "null", "round-down=1k5"],
        ["--filter=truncate", "null", "round-down="],
    ])
