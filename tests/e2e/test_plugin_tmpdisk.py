"""The tmpdisk plugin: each client gets a fresh filesystem of its own, made in TMPDIR and
gone from there at once; command= with shell variables; a failing command refuses the client
and leaves nothing behind."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from helpers import run_libnbd, run_pynbd

from pynbd.plugins._filesystems_mkfs import mkfs_argv
from pynbd.plugins.tmpdisk import TmpdiskPlugin
from tests.interop.filesystems_helpers import e2fsck, fat_listing, fetch, need

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20

#: Two clients at once: each writes its own mark, each reads back only its own; what TMPDIR
#: holds while they are connected.
TWO_CLIENTS = r'''
import json, os, sys, nbd
uri, tmpdir = sys.argv[1], sys.argv[2]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
a.pwrite(b"client A" * 64, 8 * 1048576)
b.pwrite(b"client B" * 64, 8 * 1048576)
out = {"a": bytes(a.pread(8, 8 * 1048576)).decode(), "b": bytes(b.pread(8, 8 * 1048576)).decode(),
       "size": a.get_size(), "tmpdir": os.listdir(tmpdir),
       "flags": [a.can_flush(), a.can_fua(), a.can_trim(), a.can_multi_conn(), a.is_read_only()]}
a.flush(); a.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA); a.trim(65536, 10 * 1048576)
a.shutdown(); b.shutdown()
c = nbd.NBD(); c.connect_uri(uri)
out["c"] = bytes(c.pread(8, 8 * 1048576)).hex()
c.shutdown()
print(json.dumps(out))
'''


@pytest.fixture
def tmpdir(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    return d


def test_each_client_has_its_own_fresh_disk(pynbd_server, tmpdir: Path) -> None:
    need("mke2fs")
    srv = pynbd_server("tmpdisk", "64M", env={"TMPDIR": str(tmpdir)})
    out = json.loads(run_libnbd(TWO_CLIENTS, srv.uri, tmpdir).stdout)
    assert (out["a"], out["b"]) == ("client A", "client B")
    assert out["c"] == "00" * 8  # a third client: a new disk, without A's or B's writes
    assert out["size"] == 64 * MIB
    assert out["flags"] == [True, True, True, False, False]
    assert out["tmpdir"] == []  # the disk files are deleted as soon as they are open
    assert list(tmpdir.iterdir()) == []


def test_fresh_filesystem_checks_clean(pynbd_server, tmpdir: Path, tmp_path: Path) -> None:
    need("mke2fs")
    srv = pynbd_server("tmpdisk", "size=32M", "label=SCRATCH", env={"TMPDIR": str(tmpdir)})
    disk = tmp_path / "disk.img"
    fetch(srv.uri, disk)
    assert "SCRATCH" in e2fsck(disk)
    assert list(tmpdir.iterdir()) == []


def test_vfat_with_a_label(pynbd_server, tmpdir: Path, tmp_path: Path) -> None:
    need("mkfs.fat")
    srv = pynbd_server("tmpdisk", "32M", "type=vfat", "label=SCRATCH",
                       env={"TMPDIR": str(tmpdir)})
    disk = tmp_path / "disk.img"
    data = fetch(srv.uri, disk)
    assert fat_listing(disk) == (0, [])
    assert b"SCRATCH    FAT" in data[:512]  # the label given with mkfs.fat -n


def test_command_with_variables(pynbd_server, tmpdir: Path) -> None:
    srv = pynbd_server(
        "tmpdisk", "1M", "greeting=hello, world",
        'command=truncate -s $size "$disk"\n'
        'printf %s "$greeting" | dd of="$disk" conv=notrunc 2>/dev/null',
        env={"TMPDIR": str(tmpdir)})
    out = run_libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                     "print(h.get_size(), bytes(h.pread(12, 0)))", srv.uri).stdout
    assert out.strip() == "1048576 b'hello, world'"


def test_command_decides_the_size(pynbd_server, tmpdir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"base image" * 1000)
    srv = pynbd_server("tmpdisk", "size=0", f"base={base}",
                       'command=cp --sparse=always "$base" "$disk"',
                       env={"TMPDIR": str(tmpdir)})
    assert fetch(srv.uri, tmp_path / "copy.img") == base.read_bytes()


def test_failing_command_refuses_the_client(pynbd_server, tmpdir: Path) -> None:
    srv = pynbd_server("tmpdisk", "1M",
                       'command=truncate -s $size "$disk"; echo "no luck" >&2; exit 3',
                       env={"TMPDIR": str(tmpdir)})
    out = run_libnbd("import nbd, sys\nh = nbd.NBD()\n"
                     "try:\n    h.connect_uri(sys.argv[1])\n"
                     "except nbd.Error as e:\n    print('refused')\n", srv.uri).stdout
    assert out.strip() == "refused"
    assert "tmpdisk: command exited with code 3: no luck" in srv.stderr
    assert list(tmpdir.iterdir()) == []  # the private directory and the disk are gone


def test_read_only(pynbd_server, tmpdir: Path) -> None:
    srv = pynbd_server("-r", "tmpdisk", "1M", 'command=truncate -s $size "$disk"',
                       env={"TMPDIR": str(tmpdir)})
    out = run_libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                     "print(h.is_read_only(), bytes(h.pread(4, 0)))", srv.uri).stdout
    assert out.strip() == "True b'\\x00\\x00\\x00\\x00'"


def test_mkfs_options() -> None:
    assert mkfs_argv("ext4", "", "D") == ["mkfs", "-t", "ext4", "-F", "D"]
    assert mkfs_argv("vfat", "L", "D") == ["mkfs", "-t", "vfat", "-I", "-n", "L", "D"]
    assert mkfs_argv("msdos", "", "D") == ["mkfs", "-t", "msdos", "-I", "D"]
    assert mkfs_argv("ntfs", "L", "D") == ["mkfs", "-t", "ntfs", "-Q", "-F", "-n", "L", "D"]
    assert mkfs_argv("xfs", "L", "D") == ["mkfs", "-t", "xfs", "-f", "-L", "L", "D"]
    assert mkfs_argv("btrfs", "L", "D") == ["mkfs", "-t", "btrfs", "-L", "L", "D"]


@pytest.mark.parametrize("args, message", [
    ([], "tmpdisk: size parameter is required"),
    (["type=ext4"], "tmpdisk: size parameter is required"),
    (["1M", "disk=/tmp/x"], "tmpdisk: 'disk' parameter cannot be set on the command line"),
    (["size=lots"], "tmpdisk: could not parse size string (lots)"),
])
def test_bad_parameters(sockdir: Path, args: list[str], message: str) -> None:
    r = run_pynbd("serve", "-f", "-U", sockdir / "s", "tmpdisk", *args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err == f"pynbd serve: error: {message}\n"


def test_manual() -> None:
    lines = inspect.cleandoc(TmpdiskPlugin.__doc__ or "").splitlines()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in lines, section
