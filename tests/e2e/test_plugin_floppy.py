"""The floppy plugin: a directory as a virtual FAT32 disk. fsck.fat must find nothing wrong
and list the directory's files; mtools must copy the files back out, the same bytes (through
`pynbd fuse`, on a disk large enough for mtools to take it for FAT32); a file that goes away
while the server runs is an error for the reads of it only."""

from __future__ import annotations

import errno
import inspect
import os
import struct
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import fuse_mount  # noqa: F401 (fixture)
from helpers import run_libnbd, run_pynbd

from pynbd.plugins._filesystems_fat import CLUSTER_SIZE, short_names
from pynbd.plugins.floppy import FloppyPlugin
from tests.interop.filesystems_helpers import fat_listing, fetch, make_tree, need, tree

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "src")
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_text("dot\n")
    (root / "sub" / ".config").write_text("dot\n")
    return root


def fat_of(image: bytes, dest: Path) -> Path:
    """The MBR's one partition (a FAT32 filesystem) written to ``dest``."""
    assert image[510:512] == b"\x55\xaa" and image[0x1C2] == 0x0C
    start, count = struct.unpack_from("<II", image, 0x1C6)
    assert start == 2048 and (start + count) * 512 == len(image)
    dest.write_bytes(image[start * 512:])
    return dest


def expected_listing(root: Path) -> list[str]:
    return sorted("/" + p for p, what in tree(root, links=False).items())


def test_short_names() -> None:
    names = ["hello.txt", "Hello.TXT", "longfilename1.txt", "longfilename2.txt", ".hidden",
             "..x", "A long file name.text", "h\u00e9llo.txt", "archive.tar.gz", "noext",
             "ABCDEFGHIJK"]
    assert short_names(names) == [
        b"HELLO   TXT", b"HELL~1  TXT", b"LONGFILETXT", b"LONGFI~3TXT", b"_       HID",
        b"_       X  ", b"A       TEX", b"H       TXT", b"ARCHIVE GZ ", b"NOEXT      ",
        b"ABCDEFGH   "]


def test_fsck_clean_and_same_files(pynbd_server, src: Path, tmp_path: Path) -> None:
    need("fsck.fat")
    srv = pynbd_server("floppy", src)
    image = fetch(srv.uri, tmp_path / "disk.img")
    rc, names = fat_listing(fat_of(image, tmp_path / "fat.img"))
    assert rc == 0
    assert names == expected_listing(src)  # the symbolic link is left out
    # just large enough: every cluster is in use, and the size is a whole number of them
    assert len(image) % CLUSTER_SIZE == 0
    fat = image[MIB:]
    assert struct.unpack_from("<II", fat, 512 + 488)[0] == 0  # FSInfo: no free cluster
    assert fat[0x47:0x52] == b"NBDKITFLOPY" and fat[3:11] == b"MSWIN4.1"


def test_contents_through_fuse_with_mtools(pynbd_server, fuse_mount, src: Path,  # noqa: F811
                                           tmp_path: Path) -> None:
    """mtools takes a FAT with fewer than 65525 clusters for FAT12/16: serve 1.1 GiB (virtual
    space, nothing is allocated) and let mtools read the partition through FUSE."""
    need("mcopy")
    srv = pynbd_server("--filter=partition", "floppy", src, "label=My Files",
                       f"size={1152 * MIB}", "partition=1")
    m = fuse_mount(srv.uri)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    out = tmp_path / "out"
    out.mkdir()
    cp = subprocess.run([need("mcopy"), "-s", "-n", "-i", str(m.file), "::/*", str(out)],
                        capture_output=True, text=True, env=env, check=False)
    assert cp.returncode == 0, cp.stderr
    assert tree(out) == tree(src, links=False)
    label = subprocess.run([need("mlabel"), "-s", "-i", str(m.file), "::"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert "My Files" in label
    assert m.unmount() == 0


@pytest.mark.parametrize("size", [4 * MIB, 65 * MIB])
def test_size_gives_free_space(pynbd_server, src: Path, tmp_path: Path, size: int) -> None:
    """65 MiB: the FAT for all the space is a cluster larger than the data area left needs
    (nbdkit 1.32 aborts there); it is kept a cluster larger, so the size is exact."""
    need("fsck.fat")
    srv = pynbd_server("floppy", src, f"size={size}", "label=a-very-long-label")
    image = fetch(srv.uri, tmp_path / "disk.img")
    assert len(image) == size
    fat = fat_of(image, tmp_path / "fat.img")
    rc, names = fat_listing(fat)
    assert rc == 0 and names == expected_listing(src)
    data = fat.read_bytes()
    free, _next = struct.unpack_from("<II", data, 512 + 488)
    assert free > 0 and data[0x47:0x52] == b"a-very-long"


def test_a_file_gone_is_an_error_for_its_reads_only(pynbd_server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"A" * 40000)
    (src / "b.bin").write_bytes(b"B" * 40000)
    srv = pynbd_server("floppy", src)
    image = fetch(srv.uri, tmp_path / "disk.img")
    a_at, b_at = image.index(b"A" * 40000), image.index(b"B" * 40000)
    (src / "a.bin").unlink()
    (src / "b.bin").write_bytes(b"b" * 100)  # shrunk
    out = run_libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "for off in map(int, sys.argv[2:]):\n"
        "    try:\n"
        "        print(bytes(h.pread(100, off)[:1]))\n"
        "    except nbd.Error as e:\n"
        "        print(e.errno)\n", srv.uri, str(a_at), str(b_at), str(b_at + 1000),
        "0").stdout.split()
    # ENOENT has no NBD error code: the client gets EINVAL (as from nbdkit)
    assert out == ["EINVAL", "b'b'", errno.errorcode[errno.EIO], "b'\\x00'"]
    assert "a.bin: No such file or directory" in srv.stderr
    assert "b.bin: unexpected end of file" in srv.stderr


@pytest.mark.parametrize("args, message", [
    ([], ("floppy: you must supply the dir=<DIRECTORY> parameter after the plugin name on "
         "the command line")),
    (["dir=SRC", "dir=SRC"], "floppy: dir=<DIRECTORY> must only be set once"),
    (["SRC/nonexistent"], "floppy: realpath: SRC/nonexistent: No such file or directory"),
    (["SRC", "size=abc"], "floppy: could not parse size string (abc)"),
    (["SRC", "size=64K"], 'floppy: filesystem is larger than "size" bytes'),
    (["SRC", "size=10000000"], "floppy: size=10000000 is not a multiple of 16384 bytes"),
    (["SRC", "fat=16"], "floppy: unknown parameter 'fat'"),
    (["HUGE"], "floppy: HUGE/big: file is larger than maximum supported by VFAT"),
])
def test_bad_parameters(src: Path, sockdir: Path, tmp_path: Path, args: list[str],
                        message: str) -> None:
    huge = tmp_path / "huge"
    huge.mkdir()
    with open(huge / "big", "wb") as f:
        f.truncate(1 << 32)  # sparse: 4 GiB that take no space
    args = [a.replace("SRC", str(src)).replace("HUGE", str(huge)) for a in args]
    message = message.replace("HUGE", str(huge))
    r = run_pynbd("serve", "-f", "-U", sockdir / "s", "floppy", *args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pynbd serve: error: " + message.replace("SRC", str(src))), err


def test_manual() -> None:
    lines = inspect.cleandoc(FloppyPlugin.__doc__ or "").splitlines()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in lines, section
