"""The checkwrite filter side by side with nbdkit's: the same flags, the same answers to
matching and mismatching writes, zeroes and trims; copying tools pass through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server, run_peer
from side_by_side import assert_same

FAST_ZERO = 16


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """4 MiB: data at 0 and at 2 MiB, holes elsewhere (extents tell them apart)."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.write(os.urandom(65536))
        f.seek(2 << 20)
        f.write(b"\x01" * 65536)
    return path


def ops(data: bytes) -> list[tuple[object, ...]]:
    return [
        ("pwrite", data[:4096], 0),               # the same data: ok
        ("pwrite", data[:512], 512),              # not the same place: EIO
        ("pwrite", bytes(4096), 1 << 20, 1),      # zeroes over a hole, with FUA: ok
        ("zero", 65536, 1 << 20),                 # zero over a hole: ok
        ("zero", 65536, 1 << 20, FAST_ZERO),      # known zero from extents: ok
        ("zero", 4096, 2 << 20, FAST_ZERO),       # fast zero over data: ENOTSUP
        ("zero", 4096, 2 << 20),                  # zero over data: EIO
        ("trim", 65536, 3 << 20),                 # trim of a hole: ok
        ("trim", 8192, (2 << 20) + 61440),        # trim reaching data: EIO
        ("flush",),
        ("pread", 4096, 0),
        ("extents", 1 << 20, 2 << 20),
    ]


def test_same_as_nbdkit(pynbd_server: Callable[..., Server],
                        nbdkit_server: Callable[..., Server], image: Path) -> None:
    data = image.read_bytes()
    got = assert_same(pynbd_server, nbdkit_server,
                      ["--filter=checkwrite", "file", image], ops(data))
    assert [r[0] if r[0] != "error" else r[1] for r in got["results"]] == [
        "ok", 5, "ok", "ok", "ok", 95, 5, "ok", 5, "ok", "data", "extents"]
    flags = got["flags"]
    assert not flags["is_read_only"] and flags["can_fua"] and flags["can_multi_conn"]
    assert flags["can_trim"] and flags["can_zero"] and flags["can_fast_zero"]
    assert image.read_bytes() == data  # never written


def test_read_only_plugin_and_server(pynbd_server: Callable[..., Server],
                                     nbdkit_server: Callable[..., Server],
                                     image: Path) -> None:
    data = image.read_bytes()
    assert_same(pynbd_server, nbdkit_server, ["--filter=checkwrite", "pattern", "1M"],
                [("pwrite", (8).to_bytes(8, "big"), 8), ("pwrite", bytes(8), 8),
                 ("zero", 8, 0), ("zero", 16, 0)])
    assert_same(pynbd_server, nbdkit_server, ["-r", "--filter=checkwrite", "file", image],
                ops(data)[:3])


@pytest.mark.parametrize("tool", ["nbdcopy", "qemu-img"])
def test_a_copy_onto_itself_passes(tool: str, pynbd_server: Callable[..., Server],
                                   image: Path) -> None:
    srv = pynbd_server("--filter=checkwrite", "file", image)
    if tool == "nbdcopy":
        run_peer("nbdcopy", srv.uri, srv.uri)
    else:
        run_peer("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", srv.uri, srv.uri)


def test_a_wrong_copy_fails(pynbd_server: Callable[..., Server], image: Path,
                            tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(image.read_bytes()[:-1] + b"\xff")
    srv = pynbd_server("--filter=checkwrite", "file", image)
    cp = run_peer("nbdcopy", other, srv.uri, check=False)
    assert cp.returncode != 0
    assert "data written does not match expected" in srv.stderr
