"""The extentlist filter side by side with nbdkit's: the file format (sizes, types as
numbers or words, any order, gaps, zero lengths), what clients see, and the errors."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import Factory, assert_same_shape, bad_params, clip_extents
from tests.side_by_side import probe

KiB = 1024
MiB = 1024 * KiB

LIST = """\
8M 1M 7
0  1M
2M\t1M hole
4M 4k zero
5M 1 hole,zero
  6M 0
3M 512 1
3146240 1
"""


def test_extents(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text(LIST)
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "-r", "--filter=extentlist", "memory", "10M", f"extentlist={path}"], [
        ("extents", 10 * MiB, 0), ("extents", 65536, 0), ("extents", 4096, MiB - 1),
        ("extents", 100, 5 * MiB), ("extents", 3 * MiB, 7 * MiB), ("extents", 1, 3 * MiB),
        ("extents", 4096, 3 * MiB + 500), ("extents", MiB, 0, 8), ("pread", 16, 0)])
    assert view["results"][1] == ["extents", [65536, 0]]
    assert view["results"][5] == ["extents", [1, 1]]


def test_empty_list_and_no_extents_below(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """An empty list is one hole; the plugin's own extents (null has none) do not matter."""
    empty = tmp_path / "empty"
    empty.write_text("")
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=extentlist", "null", "1M", f"extentlist={empty}"], [
        ("extents", MiB, 0), ("extents", 1, MiB - 1)])
    assert view["results"][0] == ["extents", [MiB, 3]]


def test_bad_files(tmp_path: Path) -> None:
    """Errors in the file are found when the server starts (nbdkit reads it in get_ready)."""
    cases = {
        "overlap": "0 1M\n512K 1M\n",
        "overlap-same-start": "0 1\n0 2\n",
        "one-field": "0\n",
        "blank-line": "0 1M\n\n",
        "spaces-only": "0 1M\n   \n",
        "bad-offset": "x 1M\n",
        "bad-length": "0 1Q\n",
        "negative": "0 -1\n",
    }
    argvs = []
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        argvs.append(["--filter=extentlist", "null", "1M", f"extentlist={p}"])
    argvs.append(["--filter=extentlist", "null", "1M", f"extentlist={tmp_path}/missing"])
    bad_params(argvs)


def test_file_read_once_at_start(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """The list is read when the server starts: changing the file later changes nothing."""
    path = tmp_path / "list"
    path.write_text("0 1M\n")
    servers = [f("--filter=extentlist", "null", "2M", f"extentlist={path}")
               for f in (pynbd_server, nbdkit_server)]
    path.write_text("0 2M hole\n")
    for srv in servers:
        view = probe(srv.uri, [("extents", 2 * MiB, 0)])
        assert clip_extents(view, [("extents", 2 * MiB, 0)])["results"] == [
            ["extents", [MiB, 0, MiB, 3]]]


def test_bad_parameters(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text("0 1\n")
    bad_params([
        ["--filter=extentlist", "null", "1M"],
        ["--filter=extentlist", "null", "1M", f"extentlist={path}", f"extentlist={path}"],
    ])
