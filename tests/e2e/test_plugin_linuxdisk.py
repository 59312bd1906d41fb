"""The linuxdisk plugin: a directory as an ext2/3/4 disk. The disk's GPT is checked field by
field, the filesystem with e2fsck and by copying every file back out with debugfs; and the
seed's demo: the disk mounted through `pynbd fuse` and a loop device, its files the
directory's."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from fuse_helpers import fuse_mount  # noqa: F401 (fixture)
from helpers import missing, run_libnbd, run_pynbd

from pynbd.plugins.linuxdisk import LinuxdiskPlugin, estimate_size
from tests.interop.filesystems_helpers import (
    debugfs_extract,
    debugfs_inode,
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


def partition_file(image: bytes, dest: Path) -> tuple[Path, int, bytes]:
    """The GPT's one partition written to ``dest``: (path, offset, unique GUID)."""
    first, length, type_guid, unique = gpt_partition(image)
    assert type_guid == LINUX_DATA
    dest.write_bytes(image[first:first + length])
    return dest, first, unique


def dumpe2fs(path: Path) -> dict[str, str]:
    cp = subprocess.run([need("dumpe2fs"), "-h", str(path)], capture_output=True, text=True,
                        check=True)
    out = {}
    for line in cp.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def test_directory_becomes_a_checked_ext2_disk(pynbd_server, src: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    srv = pynbd_server("linuxdisk", src, "label=ROOTFS", env={"TMPDIR": str(tmpdir)})
    image = fetch(srv.uri, tmp_path / "disk.img")
    # the size is nbdkit's: 1 MiB + the estimate + the backup GPT (33 sectors)
    estimate = estimate_size(str(src), "ext2")
    assert len(image) == MIB + estimate + 33 * 512
    fs, first, unique = partition_file(image, tmp_path / "fs.img")
    assert first == MIB and unique != bytes(16)
    e2fsck(fs)
    info = dumpe2fs(fs)
    assert info["Filesystem volume name"] == "ROOTFS"
    assert "has_journal" not in info["Filesystem features"]
    out = debugfs_extract(fs, tmp_path / "out")
    assert tree(out) == tree(src)
    # hard links stay one file
    ino, links = debugfs_inode(fs, "/hello.txt")
    assert debugfs_inode(fs, "/sub/hardlink.txt") == (ino, links) and links == 2
    # the image was made in TMPDIR and is not left there
    assert list(tmpdir.iterdir()) == []
    srv.stop()
    assert list(tmpdir.iterdir()) == []


def test_read_only_and_shared(pynbd_server, src: Path) -> None:
    srv = pynbd_server("linuxdisk", src)
    out = run_libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "print(h.is_read_only(), h.can_multi_conn(), h.can_cache())\n"
        "try:\n"
        "    h.pwrite(b'x' * 512, 0)\n"
        "except nbd.Error as e:\n"
        "    print('write refused', e.errno)\n", srv.uri).stdout
    assert out.splitlines() == ["True True True", "write refused EPERM"]


@pytest.mark.parametrize("fstype, journal", [("ext3", True), ("ext4", True)])
def test_types(pynbd_server, src: Path, tmp_path: Path, fstype: str, journal: bool) -> None:
    srv = pynbd_server("linuxdisk", src, f"type={fstype}")
    image = fetch(srv.uri, tmp_path / "disk.img")
    # ext3/4 get 32 MiB more for the journal
    assert len(image) == MIB + estimate_size(str(src), "ext2") + 32 * MIB + 33 * 512
    fs, _, _ = partition_file(image, tmp_path / "fs.img")
    e2fsck(fs)
    assert ("has_journal" in dumpe2fs(fs)["Filesystem features"]) == journal
    assert tree(debugfs_extract(fs, tmp_path / "out")) == tree(src)


def test_sizes(pynbd_server, src: Path, tmp_path: Path) -> None:
    # size=SIZE: exactly that (rounded up to a sector)
    srv = pynbd_server("linuxdisk", src, "size=4000001")
    assert fetch(srv.uri, tmp_path / "a.img").__len__() == MIB + 4000256 + 33 * 512
    # size=+SIZE: at least SIZE free
    srv = pynbd_server("linuxdisk", src, "size=+8M")
    image = fetch(srv.uri, tmp_path / "b.img")
    fs, _, _ = partition_file(image, tmp_path / "fs.img")
    info = dumpe2fs(fs)
    free = int(info["Free blocks"]) * int(info["Block size"])
    assert free >= 8 * MIB
    assert len(image) == MIB + estimate_size(str(src), "ext2") + 8 * MIB + 33 * 512


def test_partition_filter_serves_the_filesystem(pynbd_server, src: Path,
                                               tmp_path: Path) -> None:
    srv = pynbd_server("--filter=partition", "linuxdisk", src, "partition=1")
    fs = tmp_path / "fs.img"
    fetch(srv.uri, fs)
    e2fsck(fs)
    assert tree(debugfs_extract(fs, tmp_path / "out")) == tree(src)


@pytest.mark.parametrize("args, message", [
    ([], ("linuxdisk: you must supply the dir=<DIRECTORY> parameter after the plugin name "
         "on the command line")),
    (["dir=SRC", "dir=SRC"], "linuxdisk: dir=<DIRECTORY> must only be set once"),
    (["SRC", "type=xfs"], ("linuxdisk: type=<TYPE> must be an filesystem type supported by "
                          "e2fsprogs")),
    (["SRC", "size=abc"], "linuxdisk: could not parse size string (abc)"),
    (["SRC", "size=+1Q"], "linuxdisk: could not parse size: unknown suffix 'Q'"),
    (["SRC", "colour=red"], "linuxdisk: unknown parameter 'colour'"),
    (["SRC/nonexistent"], "linuxdisk: SRC/nonexistent: No such file or directory"),
    (["SRC/hello.txt"], "linuxdisk: SRC/hello.txt: Not a directory"),
    (["SRC", "size=100K"], "linuxdisk: mke2fs: command failed with exit code 1: "),
])
def test_bad_parameters(src: Path, sockdir: Path, args: list[str], message: str) -> None:
    args = [a.replace("SRC", str(src)) for a in args]
    r = run_pynbd("serve", "-f", "-U", sockdir / "s", "linuxdisk", *args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pynbd serve: error: " + message.replace("SRC", str(src))), err


def test_manual() -> None:
    lines = inspect.cleandoc(LinuxdiskPlugin.__doc__ or "").splitlines()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in lines, section
    r = run_pynbd("serve", "linuxdisk", "--help")
    assert b"mke2fs -q -F -t TYPE" in r.stdout


# ------------------------------------------------------------------ the demo
def _loop_devices_work() -> str | None:
    if os.geteuid() != 0:
        return "losetup and mount need root"
    for tool in ("losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    r = subprocess.run(["losetup", "-f"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"losetup -f failed: {r.stderr.strip()}"
    with open("/proc/filesystems") as f:
        if "ext2" not in f.read().split():
            return "this kernel cannot mount ext2"
    return None


def test_demo_mounted_through_fuse_and_a_loop_device(pynbd_server, fuse_mount,  # noqa: F811
                                                     src: Path, tmp_path: Path) -> None:
    """pynbd serve linuxdisk DIR -> pynbd fuse -> losetup (the partition, read-only) ->
    mount: the files are DIR's."""
    why = _loop_devices_work()
    if why is not None:
        missing(f"loop devices unusable here: {why}")
    srv = pynbd_server("linuxdisk", src, "type=ext4", "label=DEMO")
    m = fuse_mount(srv.uri)
    first, length, _, _ = gpt_partition(m.file.read_bytes())  # the disk, through FUSE
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = subprocess.run(["losetup", "-r", "-f", "--show", "-o", str(first),
                           "--sizelimit", str(length), str(m.file)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True, capture_output=True)
        try:
            got = tree(mnt)
            got.pop("lost+found", None)
            assert got == tree(src)
            cp = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,LABEL", str(mnt)],
                                capture_output=True, text=True, check=False)
            if cp.returncode == 0:
                assert cp.stdout.split()[0] == "ext4"
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert m.unmount() == 0
