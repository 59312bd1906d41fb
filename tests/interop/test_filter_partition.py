"""The partition filter side by side with nbdkit's, on MBR (primary and logical) and GPT
disks made by nbdkit's partitioning plugin, and on broken tables made here."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import require, run_peer
from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
    nbdinfo,
)

KiB = 1024


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mbr.img (3 primary partitions, an extended one holding 3 logical ones) and gpt.img
    (3 partitions), written by nbdkit's partitioning plugin; partition N holds N KiB of
    byte 0x40+N."""
    d = tmp_path_factory.mktemp("partition")
    parts = []
    for n in range(1, 7):
        p = d / f"p{n}.bin"
        p.write_bytes(bytes([0x40 + n]) * (n * KiB))
        parts.append(str(p))
    out = {}
    for kind, files in (("mbr", parts), ("gpt", parts[:3])):
        img = d / f"{kind}.img"
        run_peer("nbdkit", "-U", "-", "partitioning", *files, f"partition-type={kind}",
                 "alignment=4096", "--run", f"nbdcopy $uri {img}")
        out[kind] = img
    return out


def ops_for(size: int) -> list[tuple]:
    return [("pread", size, 0), ("pwrite", b"written", 100), ("zero", 512, 512),
            ("trim", 512, 0), ("cache", 1024, 0), ("pread", 1024, 0), ("extents", size, 0),
            ("pread", 2, size - 1), ("flush",)]


@pytest.mark.parametrize("kind,numbers", [("mbr", (1, 2, 3, 5, 6, 7)), ("gpt", (1, 2, 3))])
def test_each_partition(pynbd_server: Factory, nbdkit_server: Factory,
                        disks: dict[str, Path], kind: str, numbers: tuple[int, ...]) -> None:
    sizes = [(n if n < 5 else n - 1) * KiB for n in numbers]
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=partition", "file", disks[kind], f"partition={n}"], ops_for(size),
         [disks[kind]]) for n, size in zip(numbers, sizes, strict=True)])
    for n, size, view in zip(numbers, sizes, views, strict=True):
        assert view["size"] == size
        fill = 0x40 + (n if n < 5 else n - 1)
        assert view["results"][0] == ["data", bytes([fill]) * size]


def test_missing_partitions(pynbd_server: Factory, nbdkit_server: Factory,
                            disks: dict[str, Path]) -> None:
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=partition", "file", disks["mbr"], "partition=4"], [("pread", 1, 0)])
    assert view.get("connect_error")
    assert_same_open([
        ["--filter=partition", "file", disks[kind], f"partition={n}"]
        for kind, n in (("mbr", 4), ("mbr", 8), ("mbr", 100), ("gpt", 4), ("gpt", 128),
                        ("gpt", 129), ("gpt", 0xFFFFFFFF), ("mbr", 7), ("gpt", 3))])


def test_description(pynbd_server: Factory, nbdkit_server: Factory, disks: dict[str, Path],
                     tmp_path: Path) -> None:
    """"partition N of MBR disk: ..." from the layer below's description (here a plugin
    file under pynbd, exportname's exportdesc under nbdkit), none without one."""
    require("nbdinfo")
    plugin = tmp_path / "described.py"
    plugin.write_text(
        "from pynbd.plugins.file import FilePlugin\n"
        "class Described(FilePlugin):\n"
        "    name = 'described'\n"
        "    def export_description(self, h):\n"
        "        return 'the disk'\n")
    for kind, n in (("mbr", 6), ("gpt", 2)):
        mine = pynbd_server("--filter=partition", plugin, disks[kind], f"partition={n}")
        theirs = nbdkit_server("--filter=partition", "--filter=exportname", "file",
                               disks[kind], f"partition={n}", "exportdesc=fixed:the disk")
        want = f"partition {n} of {kind.upper()} disk: the disk"
        assert nbdinfo(mine.uri).get("description") == want
        assert nbdinfo(theirs.uri).get("description") == want
    plain = [f("--filter=partition", "file", disks["gpt"], "partition=1")
             for f in (pynbd_server, nbdkit_server)]
    assert [nbdinfo(s.uri).get("description") for s in plain] == [None, None]


# Broken tables --------------------------------------------------------------------------

def mbr(entries: list[tuple[int, int, int]], size: int,
        ebrs: Sequence[tuple[int, list[tuple[int, int, int]]]] = ()) -> bytes:
    """A disk of ``size`` bytes with an MBR of (type, start sector, sectors) entries and
    EBRs at (byte offset, [entries])."""
    disk = bytearray(size)
    for i, (ptype, start, n) in enumerate(entries):
        struct.pack_into("<4xB3xII", disk, 0x1BE + 16 * i, ptype, start, n)
    disk[0x1FE:0x200] = b"\x55\xaa"
    for at, ents in ebrs:
        for i, (ptype, start, n) in enumerate(ents):
            struct.pack_into("<4xB3xII", disk, at + 0x1BE + 16 * i, ptype, start, n)
        disk[at + 0x1FE:at + 0x200] = b"\x55\xaa"
    return bytes(disk)


def gpt(nentries: int, esize: int, entries: list[tuple[int, int]], size: int) -> bytes:
    disk = bytearray(size)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    struct.pack_into("<II", disk, 512 + 80, nentries, esize)
    for i, (first, last) in enumerate(entries):
        struct.pack_into("<16s16sQQ", disk, 1024 + i * esize, b"T" * 16, b"U" * 16,
                         first, last)
    return bytes(disk)


BROKEN = {
    "tiny": (bytes(1000), 1),
    "no-signature": (bytes(64 * KiB), 1),
    "empty-entry": (mbr([(0x83, 8, 8), (0, 16, 8)], 64 * KiB), 2),
    "zero-sectors": (mbr([(0x83, 8, 0)], 64 * KiB), 1),
    "extended-as-primary": (mbr([(0x05, 8, 64)], 64 * KiB), 1),
    "outside": (mbr([(0x83, 100, 100)], 64 * KiB), 1),
    "no-extended": (mbr([(0x83, 8, 8)], 64 * KiB), 5),
    "ebr-outside": (mbr([(0x0F, 200, 8)], 64 * KiB), 5),
    "ebr-backwards": (mbr([(0x0F, 8, 100)], 64 * KiB,
                          [(8 * 512, [(0x83, 2, 2), (0x05, 0, 4)])]), 6),
    "logical-outside": (mbr([(0x85, 8, 10)], 64 * KiB,
                            [(8 * 512, [(0x83, 2, 20)])]), 5),
    "logical-before-ebr": (mbr([(0x05, 8, 10)], 64 * KiB, [(8 * 512, [(0x83, 0, 2)])]), 5),
    "chain-ends": (mbr([(0x05, 8, 20)], 64 * KiB, [(8 * 512, [(0x83, 2, 2)])]), 6),
    "logical-ok": (mbr([(0x05, 8, 40)], 64 * KiB,
                       [(8 * 512, [(0x83, 2, 4), (0x05, 10, 20)]),
                        (18 * 512, [(0x83, 1, 3)])]), 6),
    "gpt-out-of-range": (gpt(4, 128, [(40, 50)], 64 * KiB), 5),
    "gpt-small-entries": (gpt(4, 64, [(40, 50)], 64 * KiB), 1),
    "gpt-table-too-large": (gpt(1000, 128, [(40, 50)], 64 * KiB), 1),
    "gpt-ok": (gpt(4, 256, [(40, 50), (60, 69)], 64 * KiB), 2),
    "gpt-outside": (gpt(4, 128, [(40, 500)], 64 * KiB), 1),
    "gpt-last-before-first": (gpt(4, 128, [(40, 30)], 64 * KiB), 1),
    "gpt-small-disk-is-mbr": (gpt(4, 128, [(4, 5)], 34 * KiB - 512), 1),
}


def test_broken_tables(tmp_path: Path) -> None:
    cases = []
    for name, (content, n) in BROKEN.items():
        img = tmp_path / f"{name}.img"
        img.write_bytes(content)
        cases.append(["--filter=partition", "file", img, f"partition={n}"])
    sizes = dict(zip(BROKEN, assert_same_open(cases), strict=True))
    assert sizes["logical-ok"] == 3 * 512
    assert sizes["gpt-ok"] == 10 * 512
    assert sizes["gpt-small-disk-is-mbr"] is None


def test_bad_parameters() -> None:
    bad_params([
        ["--filter=partition", "null", "1M"],
        ["--filter=partition", "null", "1M", "partition=0"],
        ["--filter=partition", "null", "1M", "partition=-1"],
        ["--filter=partition", "null", "1M", "partition="],
        ["--filter=partition", "null", "1M", "partition=abc"],
        ["--filter=partition", "null", "1M", "partition=2x"],
        ["--filter=partition", "null", "1M", "partition=4294967296"],
    ])
