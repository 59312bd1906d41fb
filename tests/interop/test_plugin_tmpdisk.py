"""tmpdisk side by side with nbdkit's: a blank disk made by command= behaves the same under
both (size, flags, writes, trims, flushes, FUA); mkfs's disks have the same size and both
check clean; bad parameters and failing commands get the same answers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, serve_both

from tests.interop.filesystems_helpers import e2fsck, fetch, need

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
FUA, NO_HOLE, FAST_ZERO = 1, 2, 16
BLANK = 'command=truncate -s $size "$disk"'

OPS = [
    ("size",), ("pread", 4096, 0), ("pwrite", b"\x5a" * 8192, 4096), ("pread", 16384, 0),
    ("pwrite", b"fua" * 100, MIB, FUA), ("flush",), ("trim", 65536, 2 * MIB),
    ("trim", 4096, 3 * MIB, FUA), ("zero", 65536, 4096), ("zero", 4096, 0, FAST_ZERO),
    ("zero", 4096, 0, NO_HOLE), ("pread", 16384, 0), ("cache", 4096, 0),
    ("extents", 4 * MIB, 0),
]


@pytest.mark.parametrize("options", [[], ["-r"]])
def test_blank_disk_as_nbdkit(pynbd_server, nbdkit_server, options: list[str]) -> None:
    ops = OPS if not options else [op for op in OPS if op[0] in ("size", "pread")]
    assert_same(pynbd_server, nbdkit_server, [*options, "tmpdisk", "4M", BLANK], ops=ops)


def test_mkfs_disks_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    need("mke2fs")
    args = ["tmpdisk", "size=24M", "label=SCRATCH"]
    assert_same(pynbd_server, nbdkit_server, args, ops=[("size",)])
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    for name, srv in (("pynbd", p), ("nbdkit", n)):
        disk = tmp_path / f"{name}.img"
        fetch(srv.uri, disk)
        assert "SCRATCH" in e2fsck(disk)


def test_failing_command_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    args = ["tmpdisk", "1M", "command=exit 7"]
    got = assert_same(pynbd_server, nbdkit_server, args)
    assert "connect_error" in got


@pytest.mark.parametrize("args, message", [
    ([], "size parameter is required"),
    (["1M", "disk=x"], "'disk' parameter cannot be set on the command line"),
    (["size=1Z"], "could not parse size: unknown suffix 'Z'"),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, args: list[str], message: str) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "tmpdisk", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "tmpdisk", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
