"""floppy side by side with nbdkit's: the same directory gives the same bytes, read through
libnbd, except where nbdkit 1.32's image fails fsck.fat (the ".." entries of the root's
subdirectories, empty files, names like ".hidden"), and there pynbd's checks clean and lists
the same files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import require, run_peer, run_pynbd
from side_by_side import assert_same, assert_views_equal, probe, serve_both

from tests.interop.filesystems_helpers import fat_listing, fetch, make_tree, need

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
DOTDOT = b"..         "


def flat_tree(root: Path) -> Path:
    """Files only (no subdirectory, so no ".." entry): long, clashing, non-ASCII and
    13-character names, several clusters."""
    root.mkdir()
    for name, data in [("hello.txt", b"hello\n"), ("Hello.TXT", b"HELLO\n"),
                       ("A long file name with spaces.text", b"long\n"),
                       ("longfilename1.txt", b"1\n"), ("longfilename2.txt", b"2\n"),
                       ("h\u00e9llo w\u00f6rld.txt", b"unicode\n"), ("abcdefghij.kl", b"13\n"),
                       ("big.bin", bytes(range(256)) * 300)]:
        (root / name).write_bytes(data)
    os.symlink("hello.txt", root / "link")  # left out by both
    return root


@pytest.mark.parametrize("params", [[], ["label=DATA"], ["size=2M"], ["label=x", "size=8M"]])
def test_same_bytes_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path,
                              params: list[str]) -> None:
    src = flat_tree(tmp_path / "src")
    # Both servers read the directory when they start (before the reads change any atime).
    p, n = serve_both(pynbd_server, nbdkit_server, ["floppy", src, *params])
    size = int(run_peer("nbdinfo", "--size", p.uri).stdout)
    ops = [("size",)] + [("pread", min(MIB, size - off), off) for off in range(0, size, MIB)]
    assert_views_equal(probe(p.uri, ops), probe(n.uri, ops), f"floppy {params}")


def test_same_bytes_but_the_dotdot_entries(pynbd_server, nbdkit_server,
                                           tmp_path: Path) -> None:
    need("fsck.fat")
    src = make_tree(tmp_path / "src")
    p, n = serve_both(pynbd_server, nbdkit_server, ["floppy", src])
    mine = fetch(p.uri, tmp_path / "pynbd.img")
    theirs = fetch(n.uri, tmp_path / "nbdkit.img")
    assert len(mine) == len(theirs)
    differ = {i // 32 * 32 for i in range(len(mine)) if mine[i] != theirs[i]}
    # "sub" and "emptydir" are the root's subdirectories: their ".." entries differ
    assert len(differ) == 2
    for entry in differ:
        assert mine[entry:entry + 11] == theirs[entry:entry + 11] == DOTDOT
        assert mine[entry + 26:entry + 28] == b"\0\0"  # cluster 0: the root
        assert theirs[entry + 26:entry + 28] == b"\2\0"  # nbdkit names cluster 2
    listings = []
    for name, image in (("pynbd", mine), ("nbdkit", theirs)):
        fat = tmp_path / f"{name}.fat"
        fat.write_bytes(image[MIB:])
        listings.append(fat_listing(fat))
    assert listings[0][0] == 0  # fsck.fat -n: nothing to fix
    assert listings[1][0] == 1  # nbdkit's: "Invalid '..' entry in the second slot"
    assert listings[0][1] == listings[1][1] and "/sub/deeper/d" in listings[0][1]


def test_empty_and_dot_files(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    need("fsck.fat")
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty").write_bytes(b"")
    (src / "after-empty.txt").write_text("data\n")
    (src / ".hidden").write_text("dot\n")
    p, n = serve_both(pynbd_server, nbdkit_server, ["floppy", src])
    results = []
    for name, srv in (("pynbd", p), ("nbdkit", n)):
        fat = tmp_path / f"{name}.fat"
        fat.write_bytes(fetch(srv.uri, tmp_path / f"{name}.img")[MIB:])
        results.append(fat_listing(fat))
    assert results[0] == (0, ["/.hidden", "/after-empty.txt", "/empty"])
    assert results[1][0] == 1 and results[1][1] == results[0][1]


@pytest.mark.parametrize("args, message", [
    ([], ("you must supply the dir=<DIRECTORY> parameter after the plugin name on the "
         "command line")),
    (["dir=SRC", "dir=SRC"], "dir=<DIRECTORY> must only be set once"),
    (["SRC/nonexistent"], "realpath: SRC/nonexistent: No such file or directory"),
    (["SRC", "size=abc"], "could not parse size string (abc)"),
    (["SRC", "size=1100000"], 'filesystem is larger than "size" bytes'),
    (["SRC", "fat=16"], "unknown parameter 'fat'"),
])
def test_bad_parameters_as_nbdkit(tmp_path: Path, sockdir: Path, args: list[str],
                                  message: str) -> None:
    src = flat_tree(tmp_path / "src")
    args = [a.replace("SRC", str(src)) for a in args]
    message = message.replace("SRC", str(src))
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "floppy", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "floppy", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert mine.stderr.decode().count("\n") == 1


def test_flags_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    src = flat_tree(tmp_path / "src")
    assert_same(pynbd_server, nbdkit_server, ["floppy", src],
                ops=[("size",), ("cache", 65536, 0), ("pread", 4096, MIB)])
