"""linuxdisk side by side with nbdkit's: the same command line gives a disk of the same size
and flags, the same protective MBR and GPT layout, and a filesystem that checks clean and
holds the same files. (mke2fs puts random UUIDs and the time in the filesystem, and each
server a random partition GUID, so the bytes cannot all be the same.)"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, serve_both

from tests.interop.filesystems_helpers import (
    debugfs_extract,
    e2fsck,
    fetch,
    gpt_partition,
    make_tree,
    need,
    tree,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
LINUX_DATA = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le


@pytest.fixture
def src(tmp_path: Path) -> Path:
    need("mke2fs")
    return make_tree(tmp_path / "src")


@pytest.mark.parametrize("params", [
    [], ["label=ROOTFS"], ["type=ext4"], ["type=ext3", "size=+2M"], ["size=6M"],
    ["size=3000001"],
])
def test_same_disk_as_nbdkit(pynbd_server, nbdkit_server, src: Path, tmp_path: Path,
                             params: list[str]) -> None:
    args = ["linuxdisk", src, *params]
    assert_same(pynbd_server, nbdkit_server, args,
                ops=[("size",), ("pread", 512, 0), ("cache", 4096, 0)])
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    mine = fetch(p.uri, tmp_path / "pynbd.img")
    theirs = fetch(n.uri, tmp_path / "nbdkit.img")
    assert len(mine) == len(theirs)
    # the GPT headers agree but for the checksums (the GUIDs differ)
    for lba in (1, len(mine) // 512 - 1):
        a, b = mine[lba * 512:lba * 512 + 512], theirs[lba * 512:lba * 512 + 512]
        assert a[:16] + a[20:88] + a[92:] == b[:16] + b[20:88] + b[92:]
    first, length, type_guid, _ = gpt_partition(mine)
    # nbdkit 1.32 writes the text "0FC63DAF-8483-47" as the type GUID; pynbd the GUID
    assert type_guid == LINUX_DATA
    assert theirs[1024:1040] == b"0FC63DAF-8483-47"
    assert theirs[1024 + 32:1024 + 56] == mine[1024 + 32:1024 + 56]  # first/last LBA, flags
    trees = []
    for name, image in (("pynbd", mine), ("nbdkit", theirs)):
        fs = tmp_path / f"{name}.fs"
        fs.write_bytes(image[first:first + length])
        e2fsck(fs)
        trees.append(tree(debugfs_extract(fs, tmp_path / f"{name}.out")))
    assert trees[0] == trees[1] == tree(src)


def test_same_size_estimate_for_a_bigger_tree(pynbd_server, nbdkit_server, src: Path) -> None:
    """du's count (hard links once, symbolic links not followed), +20%, both ways."""
    (src / "sub" / "big2.bin").write_bytes(b"\x01" * (3 * MIB + 123))
    (src / "sparse").write_bytes(b"")
    with open(src / "sparse", "r+b") as f:
        f.truncate(64 * MIB)  # allocates nothing: counts for nothing
    for name in ("x", "y"):
        (src / "sub" / f"hl-{name}").hardlink_to(src / "sub" / "big2.bin")
    assert_same(pynbd_server, nbdkit_server, ["linuxdisk", src], ops=[("size",)])


@pytest.mark.parametrize("args, message", [
    ([], ("you must supply the dir=<DIRECTORY> parameter after the plugin name on the "
         "command line")),
    (["dir=SRC", "dir=SRC"], "dir=<DIRECTORY> must only be set once"),
    (["SRC", "type=btrfs"], "type=<TYPE> must be an filesystem type supported by e2fsprogs"),
    (["SRC", "size=12Q"], "could not parse size: unknown suffix 'Q'"),
    (["SRC", "size=-5"], "size cannot be negative (-5)"),
    (["SRC", "flavour=x"], "unknown parameter 'flavour'"),
    (["SRC", "size=200K"], "mke2fs: command failed with exit code 1"),
])
def test_bad_parameters_as_nbdkit(src: Path, sockdir: Path, args: list[str],
                                  message: str) -> None:
    import subprocess

    args = [a.replace("SRC", str(src)) for a in args]
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "linuxdisk", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "linuxdisk", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert mine.stderr.decode().count("\n") == 1


def test_partition_offsets(pynbd_server, src: Path, tmp_path: Path) -> None:
    """The partition starts at 1 MiB, the protective MBR covers sectors 1 to the end."""
    image = fetch(pynbd_server("linuxdisk", src).uri, tmp_path / "d.img")
    start, count = struct.unpack_from("<II", image, 0x1C6)
    assert (start, count) == (1, len(image) // 512 - 1)
    assert gpt_partition(image)[0] == MIB
