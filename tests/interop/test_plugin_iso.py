"""iso side by side with nbdkit's: the same directories and params give an image of the same
size and flags that xorriso lists and extracts to the same files (the bytes differ only by
the times the ISO programs record). Also genisoimage, params passed through the shell, and the
programs' failures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, serve_both

from tests.interop.filesystems_helpers import (
    fetch,
    make_tree,
    need,
    tree,
    xorriso_extract,
    xorriso_listing,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    need("xorriso")
    return make_tree(tmp_path / "src")


def pvd_volume_id(image: bytes) -> str:
    """The primary volume descriptor's volume identifier (sector 16, bytes 40-71)."""
    pvd = image[16 * 2048:17 * 2048]
    assert pvd[1:6] == b"CD001"
    return pvd[40:72].decode().rstrip()


@pytest.mark.parametrize("params", [[], ["params=-JrT"], ["params=-r -V 'My Disk'"]])
def test_same_image_as_nbdkit(pynbd_server, nbdkit_server, src: Path, tmp_path: Path,
                              params: list[str]) -> None:
    args = ["iso", src, *params]
    assert_same(pynbd_server, nbdkit_server, args,
                ops=[("size",), ("pread", 2048, 0), ("cache", 4096, 0)])
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    mine = tmp_path / "pynbd.iso"
    theirs = tmp_path / "nbdkit.iso"
    a, b = fetch(p.uri, mine), fetch(n.uri, theirs)
    assert len(a) == len(b)
    assert pvd_volume_id(a) == pvd_volume_id(b)
    assert xorriso_listing(mine) == xorriso_listing(theirs)
    if params:  # Rock Ridge: the names, links and contents are the directory's
        assert tree(xorriso_extract(mine, tmp_path / "out")) == tree(src)
    if params and "My Disk" in params[0]:
        assert pvd_volume_id(a) == "My Disk"  # the quotes went through the shell


def test_several_directories_are_merged(pynbd_server, nbdkit_server, src: Path,
                                        tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "more").mkdir(parents=True)
    (other / "more" / "x.txt").write_text("x\n")
    (other / "top.txt").write_text("top\n")
    args = ["iso", src, f"dir={other}", "params=-r"]
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    mine = tmp_path / "p.iso"
    fetch(p.uri, mine)
    fetch(n.uri, tmp_path / "n.iso")
    assert xorriso_listing(mine) == xorriso_listing(tmp_path / "n.iso")
    assert tree(xorriso_extract(mine, tmp_path / "out")) == {**tree(src), **tree(other)}


def test_genisoimage(pynbd_server, src: Path, tmp_path: Path) -> None:
    """prog=genisoimage (nbdkit 1.32 as Debian builds it passes it xorriso's -as mkisofs and
    fails)."""
    need("genisoimage")
    srv = pynbd_server("iso", src, "prog=genisoimage", "params=-r -V GENISO")
    image = tmp_path / "g.iso"
    data = fetch(srv.uri, image)
    assert pvd_volume_id(data) == "GENISO"
    assert tree(xorriso_extract(image, tmp_path / "out")) == tree(src)


def test_image_is_made_in_tmpdir_and_not_left(pynbd_server, src: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    srv = pynbd_server("iso", src, env={"TMPDIR": str(tmpdir)})
    assert fetch(srv.uri, tmp_path / "i.iso")[32769:32774] == b"CD001"
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    ([], ("you must supply the dir=<DIRECTORY> parameter after the plugin name on the "
         "command line")),
    (["SRC/nonexistent"], "realpath: SRC/nonexistent: No such file or directory"),
    (["SRC", "size=1M"], "unknown parameter 'size'"),
    (["SRC", "prog=false"], "false: command failed with exit code 1"),
    (["SRC", "params=--no-such-option"], "xorriso: command failed with exit code"),
])
def test_bad_parameters_as_nbdkit(src: Path, sockdir: Path, args: list[str],
                                  message: str) -> None:
    args = [a.replace("SRC", str(src)) for a in args]
    message = message.replace("SRC", str(src))
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "iso", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "iso", *args],
                            capture_output=True, check=False, timeout=60)
    err = mine.stderr.decode()
    assert mine.returncode == theirs.returncode == 1
    assert message in err and message in theirs.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pynbd serve: error: iso: "), err
