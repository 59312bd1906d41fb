"""The xz filter side by side with nbdkit's: sizes, flags, bytes (within and across blocks,
several streams, stream padding), read-only errors, the export description, broken files,
bad parameters, and composition with tar and offset."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.helpers import require, run_peer
from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    bad_params,
    infos,
)
from tests.side_by_side import probe

KiB = 1024
BLOCK = 64 * KiB


def _disk(size: int, seed: int) -> bytes:
    """Compressible but not trivial data: every 4 KiB page numbered and partly random."""
    rng = random.Random(seed)
    out = bytearray(size)
    for off in range(0, size, 4096):
        out[off:off + 8] = off.to_bytes(8, "big")
        out[off + 8:off + 72] = rng.randbytes(64)
    return bytes(out)


def _xz(data: bytes, *opts: str) -> bytes:
    xz = require("xz")
    return subprocess.run([xz, "-c", "-T1", *opts], input=data, capture_output=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xz")
    raw = _disk(1 << 20, 1) + bytes(100_000) + _disk(1000, 2)  # not a multiple of anything
    one = _xz(raw, f"--block-size={BLOCK}")
    files = {
        "raw": raw,
        "blocks": one,
        "single": _xz(raw),  # one block
        "streams": one + b"\0" * 8 + _xz(raw[:300_000], "--block-size=100000"),
        # padding after the last stream too: see test_whole_disk_by_nbdcopy
        "padded": one + b"\0" * 8 + _xz(raw[:300_000], "--block-size=100000") + b"\0" * 4,
    }
    out = {}
    for name, data in files.items():
        out[name] = d / f"{name}.xz"
        out[name].write_bytes(data)
    return out


def _ops(size: int) -> list[tuple[object, ...]]:
    edges = [0, BLOCK - 100, BLOCK, 3 * BLOCK - 1, size - 4096, size - 1]
    ops: list[tuple[object, ...]] = [("size",)]
    ops += [("pread", min(4096, size - o), o) for o in edges]
    ops += [("pread", 3 * BLOCK + 17, BLOCK // 2), ("pread", 8, size - 8),
            ("cache", 2 * BLOCK, 0), ("extents", 65536, 0), ("flush",),
            ("pwrite", b"x" * 512, 0), ("zero", 512, 0), ("trim", 512, 0)]
    return ops


def test_reads_and_flags(pynbd_server: Factory, nbdkit_server: Factory,
                         images: dict[str, Path]) -> None:
    raw = images["raw"].read_bytes()
    across = [("pread", 16, len(raw) - 8)]  # the end of one stream, the next one's start
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=xz", "file", images["blocks"]], _ops(len(raw))),
        (["--filter=xz", "file", images["single"]], _ops(len(raw))),
        (["--filter=xz", "file", images["streams"]], _ops(len(raw) + 300_000) + across)])
    blocks, _, streams = views
    assert blocks["size"] == len(raw) and streams["size"] == len(raw) + 300_000
    assert blocks["flags"]["is_read_only"] is True
    assert blocks["results"][1] == ["data", raw[:4096]]
    assert blocks["results"][7] == ["data", raw[BLOCK // 2:BLOCK // 2 + 3 * BLOCK + 17]]
    # libnbd refuses these itself on a read-only export: EPERM for a write, EINVAL else
    assert blocks["results"][-3:] == [["error", 1], ["error", 22], ["error", 22]]
    assert streams["results"][-1] == ["data", raw[-8:] + raw[:8]]


def test_whole_disk_by_nbdcopy(pynbd_server: Factory, images: dict[str, Path],
                               tmp_path: Path) -> None:
    """Two streams with padding between them and after the last. nbdkit 1.32 gets the
    second stream's block offsets wrong here (it gives the first stream the padding seen
    so far from the end, trailing padding included, where liblzma wants the padding right
    after it) and fails reads there with "invalid block header"."""
    out = tmp_path / "out.img"
    srv = pynbd_server("--filter=xz", "file", images["padded"])
    run_peer("nbdcopy", srv.uri, out)
    raw = images["raw"].read_bytes()
    assert out.read_bytes() == raw + raw[:300_000]


def test_nbdinfo_and_description(pynbd_server: Factory, nbdkit_server: Factory,
                                 images: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "desc.py"
    script.write_text(
        "API_VERSION = 2\n"
        f"data = open({os.fspath(images['blocks'])!r}, 'rb').read()\n"
        "def open(readonly):\n    return 1\n"
        "def get_size(h):\n    return len(data)\n"
        "def pread(h, buf, offset, flags):\n    buf[:] = data[offset:offset + len(buf)]\n"
        "def export_description(h):\n    return 'a small disk'\n")
    cases = [["--filter=xz", "python", script], ["--filter=xz", "file", images["blocks"]]]
    for mine, theirs in infos(pynbd_server, nbdkit_server, cases):
        for key in ("export-size", "description", "is_read_only", "can_multi_conn",
                    "can_cache", "can_zero", "can_trim", "can_fua", "can_flush", "contexts"):
            assert mine.get(key) == theirs.get(key), key
    assert infos(pynbd_server, nbdkit_server, cases[:1])[0][0]["description"] == \
        "expansion of xz-compressed image: a small disk"


def test_broken_files(images: dict[str, Path], tmp_path: Path) -> None:
    good = images["blocks"].read_bytes()
    broken = {
        "empty": b"", "short": good[:3], "magic6": good[:6], "magic8": good[:8],
        "notxz": b"hello world!" * 100, "truncated": good[:len(good) // 2 & ~3],
        "footercrc": good[:-12] + bytes([good[-12] ^ 1]) + good[-11:],
        "garbage": good + b"ABCD", "index": good[:-20] + b"\xff" * 4 + good[-16:],
        "header": good[:6] + b"\x00\x07" + good[8:],
    }
    cases = []
    for name, data in broken.items():
        path = tmp_path / f"{name}.xz"
        path.write_bytes(data)
        cases.append(["--filter=xz", "file", path])
    assert assert_same_open(cases) == [None] * len(cases)


def test_corrupt_block_fails_the_read(pynbd_server: Factory, images: dict[str, Path],
                                      tmp_path: Path) -> None:
    """A block whose data is damaged fails reads in it with EIO (nbdkit 1.32 aborts on an
    assertion here: its filter fails the read without setting an errno); other blocks
    still read."""
    good = bytearray(images["blocks"].read_bytes())
    good[200:260] = bytes(b ^ 0x55 for b in good[200:260])  # inside the first block
    path = tmp_path / "corrupt.xz"
    path.write_bytes(good)
    srv = pynbd_server("--filter=xz", "file", path)
    view = probe(srv.uri, [("pread", 512, 0), ("pread", 512, BLOCK), ("pread", 512, 10)])
    raw = images["raw"].read_bytes()
    assert view["results"] == [["error", 5], ["data", raw[BLOCK:BLOCK + 512]], ["error", 5]]


def test_block_too_large(images: dict[str, Path]) -> None:
    """xz-max-block below the file's largest block: the connection fails with nbdkit's
    (first) line; the rest of pynbd's message is nbdkit's too."""
    from tests.interop.shape_compare import _nbdkit_open, _pynbd_open

    args = ["--filter=xz", "file", os.fspath(images["blocks"]), "xz-max-block=65535"]
    size, msg = _pynbd_open(args)
    assert size is None and msg is not None
    assert (None, msg.splitlines()[0]) == _nbdkit_open(require("nbdkit"), args)
    assert msg.splitlines()[-2:] == ["maxblock = 65535 (bytes)",
                                     f"largest block in xz file = {BLOCK} (bytes)"]
    assert assert_same_open([args[:-1] + ["xz-max-block=64K"]]) == [len(
        images["raw"].read_bytes())]


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=xz", "null", "xz-max-depth=0"],
        ["--filter=xz", "null", "xz-max-depth=-1"],
        ["--filter=xz", "null", "xz-max-depth=x"],
        ["--filter=xz", "null", "xz-max-depth=4294967296"],
        ["--filter=xz", "null", "xz-max-block=1Q"],
        ["--filter=xz", "null", "xz-max-block="],
    ])


def test_composition(pynbd_server: Factory, nbdkit_server: Factory, images: dict[str, Path],
                     tmp_path: Path) -> None:
    raw = images["raw"].read_bytes()
    entry = tmp_path / "t" / "disk.img"
    entry.parent.mkdir()
    entry.write_bytes(raw[:200_000])
    tar = tmp_path / "disk.tar"
    subprocess.run([require("tar"), "-C", entry.parent, "-cf", tar, "disk.img"], check=True)
    tar_xz = tmp_path / "disk.tar.xz"
    tar_xz.write_bytes(_xz(tar.read_bytes(), "--block-size=32768"))
    tar_view, offset_view = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=tar", "--filter=xz", "file", tar_xz, "tar-entry=disk.img"],
         [("size",), ("pread", 100_000, 50_000)]),
        (["--filter=offset", "--filter=xz", "file", images["blocks"], "offset=65000",
          "range=70000"], [("size",), ("pread", 70_000, 0)]),
    ])
    assert tar_view["results"][1] == ["data", raw[50_000:150_000]]
    assert offset_view["results"][1] == ["data", raw[65_000:135_000]]
