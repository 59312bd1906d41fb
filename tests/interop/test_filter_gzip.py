"""The gzip filter side by side with nbdkit's: size, flags and bytes, the export
description, files that do not decompress, and the temporary file in TMPDIR."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import pytest

from tests.interop.shape_compare import Factory, assert_same_many, assert_same_open, infos


@pytest.fixture(scope="module")
def raw() -> bytes:
    rng = random.Random(7)
    return b"".join(i.to_bytes(8, "big") + rng.randbytes(24) + bytes(4064)
                    for i in range(300)) + b"end"


@pytest.fixture(scope="module")
def gz(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gz") / "disk.img.gz"
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


def test_reads_and_flags(pynbd_server: Factory, nbdkit_server: Factory, gz: Path,
                         raw: bytes, tmp_path: Path) -> None:
    two = tmp_path / "two.gz"  # two members, then junk: only the first member counts
    two.write_bytes(gz.read_bytes() * 2 + b"junk")
    ops = [("size",), ("pread", 4096, 0), ("pread", 10000, 1210000), ("pread", 3, len(raw) - 3),
           ("cache", 8192, 0), ("extents", 8192, 0), ("flush",), ("pwrite", b"x", 0)]
    one, _ = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=gzip", "file", gz], ops), (["--filter=gzip", "file", two], ops)])
    assert one["size"] == len(raw) and one["flags"]["is_read_only"] is True
    assert one["results"][1:4] == [["data", raw[:4096]], ["data", raw[1210000:1220000]],
                                   ["data", b"end"]]


def test_nbdinfo_and_description(pynbd_server: Factory, nbdkit_server: Factory, gz: Path,
                                 tmp_path: Path) -> None:
    script = tmp_path / "desc.py"
    script.write_text(
        "API_VERSION = 2\n"
        f"data = open({os.fspath(gz)!r}, 'rb').read()\n"
        "def open(readonly):\n    return 1\n"
        "def get_size(h):\n    return len(data)\n"
        "def pread(h, buf, offset, flags):\n    buf[:] = data[offset:offset + len(buf)]\n"
        "def export_description(h):\n    return 'zipped'\n")
    cases = [["--filter=gzip", "python", script], ["--filter=gzip", "file", gz]]
    seen = infos(pynbd_server, nbdkit_server, cases)
    for mine, theirs in seen:
        for key in ("export-size", "description", "is_read_only", "can_multi_conn",
                    "can_cache", "can_zero", "can_trim", "can_flush", "contexts"):
            assert mine.get(key) == theirs.get(key), key
    assert seen[0][0]["description"] == "expansion of gzip-compressed image: zipped"


def test_broken_files(gz: Path, tmp_path: Path) -> None:
    good = gz.read_bytes()
    broken = {"empty": b"", "truncated": good[:len(good) // 2],
              "crc": good[:-8] + bytes([good[-8] ^ 1]) + good[-7:],
              "notgzip": b"plain text" * 50,
              "corrupt": good[:30] + bytes(b ^ 0x33 for b in good[30:80]) + good[80:]}
    cases = []
    for name, data in broken.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        cases.append(["--filter=gzip", "file", path])
    assert assert_same_open(cases) == [None] * len(cases)


def test_temporary_file_in_tmpdir(pynbd_server: Factory, gz: Path, raw: bytes,
                                  tmp_path: Path) -> None:
    """The uncompressed copy is made in TMPDIR and unlinked at once: the directory stays
    empty while the server holds the file open, and nothing is left after it stops."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    srv = pynbd_server("--filter=gzip", "file", gz, env={"TMPDIR": os.fspath(tmpdir)})
    from tests.side_by_side import probe

    assert probe(srv.uri, [("pread", 3, len(raw) - 3)])["results"] == [["data", b"end"]]
    fds = Path(f"/proc/{srv.proc.pid}/fd")
    held = [os.readlink(p) for p in fds.iterdir() if os.readlink(p).startswith(str(tmpdir))]
    assert len(held) == 1 and held[0].endswith(" (deleted)"), held
    assert list(tmpdir.iterdir()) == []
    srv.stop()
    assert list(tmpdir.iterdir()) == []
