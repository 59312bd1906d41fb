"""split side by side with nbdkit's: files concatenated give the same size, flags, bytes,
extents and writes; bad parameters get nbdkit's messages."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, probe

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def _files(d: Path) -> list[Path]:
    a, b, c = d / "a", d / "b", d / "c"
    a.write_bytes(b"abc")
    with open(b, "wb") as f:
        f.truncate(MIB)
        f.seek(300000)
        f.write(b"x")
    c.write_bytes(b"")
    return [a, b, c]


def _copy_of(d: Path, name: str) -> list[Path]:
    out = []
    for p in _files(d):
        q = d / f"{name}-{p.name}"
        q.write_bytes(p.read_bytes())
        if p.name == "b":  # keep it sparse
            q.unlink()
            with open(q, "wb") as f:
                f.truncate(MIB)
                f.seek(300000)
                f.write(b"x")
        out.append(q)
    return out


READS = [("size",), ("pread", 4096, 0), ("pread", 10, 299995), ("pread", 100, MIB - 50),
         ("extents", MIB + 3, 0), ("extents", 8192, 299000)]
# No cache requests side by side: nbdkit 1.32's split plugin never answers them (it hangs).


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 2, 0, 1]])
@pytest.mark.parametrize("options", [[], ["-r"]])
def test_split_reads_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path,
                               order: list[int], options: list[str]) -> None:
    files = _files(tmp_path)
    args = [*options, "split", *(str(files[i]) for i in order)]
    assert_same(pynbd_server, nbdkit_server, args, ops=READS)


def test_split_writes_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    # Into the first file only: nbdkit 1.32 writes into the later files at the disk's
    # offset instead of the file's (see test_split_writes_into_later_files).
    ops = [("pwrite", b"W" * 2, 0), ("pwrite", b"S" * 8, MIB - 2), ("zero", 1, 2),
           ("pread", 16, 0), ("pread", 16, MIB - 8),
           ("trim", 4096, 0), ("flush",)]
    got = []
    for name, fixture in (("p", pynbd_server), ("n", nbdkit_server)):
        files = _copy_of(tmp_path, name)
        srv = fixture("split", *map(str, files))
        got.append(probe(srv.uri, ops))
        srv.stop()
        got.append([f.read_bytes() for f in files])
    assert got[0] == got[2]
    for mine, theirs in zip(got[1], got[3], strict=True):
        diff = [i for i in range(len(mine)) if mine[i:i + 1] != theirs[i:i + 1]]
        assert mine == theirs, (diff[:5], len(mine), len(theirs))
    assert got[1][0] == b"WW\0"


def test_split_writes_into_later_files(pynbd_server, tmp_path: Path) -> None:
    """Writes land at the file's offset, also across files (nbdkit 1.32 writes the part
    after the first file at the disk's offset: a bug)."""
    files = _copy_of(tmp_path, "p")
    srv = pynbd_server("split", *map(str, files))
    ops = [("pwrite", b"W" * 10, 0), ("zero", 5, 1), ("pwrite", b"T" * 6, 100),
           ("pread", 12, 0), ("pread", 6, 100)]
    got = probe(srv.uri, ops)["results"]
    assert got[3:] == [["data", b"W\0\0\0\0\0WWWW\0\0"], ["data", b"T" * 6]]
    srv.stop()
    assert files[0].read_bytes() == b"W\0\0"
    b = files[1].read_bytes()
    assert b[:8] == b"\0\0\0WWWW\0" and b[97:103] == b"T" * 6


def test_split_cache(pynbd_server, tmp_path: Path) -> None:
    srv = pynbd_server("split", *map(str, _files(tmp_path)))
    assert probe(srv.uri, [("cache", MIB + 3, 0)])["results"] == [["ok"]]


def test_split_no_files(pynbd_server, nbdkit_server) -> None:
    assert_same(pynbd_server, nbdkit_server, ["split"], ops=[("size",)])


def test_split_whole_disk(pynbd_server, tmp_path: Path) -> None:
    """nbdcopy of the whole disk (nbdkit 1.32's split crashes on nbdcopy's block status)."""
    files = _files(tmp_path)
    srv = pynbd_server("split", *map(str, files))
    cp = subprocess.run([require("nbdcopy"), srv.uri, "-"], capture_output=True, check=True,
                        timeout=60)
    assert cp.stdout == b"".join(f.read_bytes() for f in files)


def test_split_directory_is_refused(sockdir: Path, tmp_path: Path) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "split", tmp_path, check=False)
    assert mine.returncode == 1
    assert mine.stderr.decode().endswith(f"{tmp_path}: not a regular file\n")


@pytest.mark.parametrize("args, message", [
    (["split", "/nonexistent/x"], "realpath: /nonexistent/x: No such file or directory"),
    (["split", "foo=1"], "unknown parameter 'foo'"),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, args: list[str], message: str) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert b"Traceback" not in mine.stderr
