"""partitioning side by side with nbdkit's: MBR (with logical partitions) and GPT disks of the
same files are byte for byte the same, but for GPT's random partition GUIDs (masked, with the
CRCs that cover them); writes and bad parameters get nbdkit's answers."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same, serve_both

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


@pytest.fixture
def parts(tmp_path: Path) -> list[str]:
    out = []
    for name, size in (("p1", 1000), ("p2", 4096), ("p3", 70000)):
        p = tmp_path / name
        p.write_bytes(bytes((i * 7 + size) & 0xFF for i in range(size)))
        out.append(str(p))
    return out


def _fetch(uri: str) -> bytes:
    return subprocess.run([require("nbdcopy"), uri, "-"], capture_output=True, check=True,
                          timeout=60).stdout


def _mask_gpt(d: bytes) -> bytes:
    """Zero GPT's random partition GUIDs and the CRCs covering them."""
    b = bytearray(d)
    for hdr in (512, len(b) - 512):
        assert b[hdr:hdr + 8] == b"EFI PART"
        b[hdr + 16:hdr + 20] = bytes(4)
        b[hdr + 88:hdr + 92] = bytes(4)
        lba, n = struct.unpack_from("<QI", b, hdr + 72)
        for i in range(n):
            e = lba * 512 + i * 128
            b[e + 16:e + 32] = bytes(16)
    return bytes(b)


LAYOUTS = [
    lambda p: [p[0]],
    lambda p: p,
    lambda p: [*p, *p, "partition-type=mbr"],
    lambda p: ["alignment=512", p[0], "mbr-id=0x82", p[1], "mbr-id=default", p[2]],
    lambda p: [p[0], p[1], "partition-type=gpt"],
    lambda p: [*p, *p],
    lambda p: ["partition-type=gpt", "type-guid=C12A7328-F81F-11D2-BA4B-00A0C93EC93B", p[0],
               "alignment=4096", "type-guid=default", p[2]],
]


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_partitioning_as_nbdkit(pynbd_server, nbdkit_server, parts: list[str],
                                layout: int) -> None:
    args = ["partitioning", *LAYOUTS[layout](parts)]
    assert_same(pynbd_server, nbdkit_server, args, ops=[("size",)])
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    mine, theirs = _fetch(p.uri), _fetch(n.uri)
    if theirs[0x1C2] == 0xEE:  # a protective MBR: GPT
        mine, theirs = _mask_gpt(mine), _mask_gpt(theirs)
    assert mine == theirs


def test_partitioning_writes_as_nbdkit(pynbd_server, nbdkit_server, parts: list[str],
                                       tmp_path: Path) -> None:
    mbr = _fetch(pynbd_server("partitioning", *parts).uri)[:512]
    ops = [("pwrite", b"X" * 100, MIB + 10), ("pread", 200, MIB), ("pwrite", mbr[:64], 0),
           ("pwrite", b"\1" * 16, 0x1BE), ("pwrite", bytes(24), MIB + 1000),
           ("pwrite", b"\1" * 24, MIB + 1000), ("pwrite", b"y" * 8, 2 * MIB - 4),
           ("flush",), ("pread", 512, 0)]
    copies = []
    for name in ("mine", "theirs"):
        d = tmp_path / name
        d.mkdir()
        copies.append([])
        for p in parts:
            q = d / Path(p).name
            q.write_bytes(Path(p).read_bytes())
            copies[-1].append(str(q))
    p, n = pynbd_server("partitioning", *copies[0]), nbdkit_server("partitioning", *copies[1])
    from side_by_side import assert_views_equal, probe
    assert_views_equal(probe(p.uri, ops), probe(n.uri, ops), "partitioning writes")
    for a, b in zip(copies[0], copies[1], strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(copies[0][0]).read_bytes()[10:110] == b"X" * 100


@pytest.mark.parametrize("args, message", [
    ([], "at least one file= parameter must be supplied"),
    (["partition-type=foo", "P1"], "unknown partition-type: foo"),
    (["alignment=100", "P1"], ("partition alignment 100 should be >= sector size 512 and "
                              "<= maximum alignment 1048576")),
    (["alignment=4M", "P1"], "partition alignment 4194304 should be"),
    (["alignment=x", "P1"], "could not parse size string (x)"),
    (["mbr-id=x", "P1"], "mbr-id: empty string where we expected a number"),
    (["mbr-id=256", "P1"], 'mbr-id: could not parse number: "256"'),
    (["mbr-id=-1", "P1"], "mbr-id: negative numbers are not allowed"),
    (["type-guid=x", "P1"], "could not validate GUID: x"),
    (["/nonexistent"], "/nonexistent: No such file or directory"),
    (["EMPTY"], "zero length partitions are not allowed"),
    (["DIR"], "Is a directory"),
    (["foo=1", "P1"], "unknown parameter 'foo'"),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, parts: list[str], tmp_path: Path,
                                  args: list[str], message: str) -> None:
    (tmp_path / "empty").write_bytes(b"")
    subst = {"P1": parts[0], "EMPTY": str(tmp_path / "empty"), "DIR": str(tmp_path)}
    args = [subst.get(a, a) for a in args]
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "partitioning", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "partitioning",
                             *args], capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert b"Traceback" not in mine.stderr
