"""The partition filter in one process: the table is read when a client connects, the
partition's requests are moved, the description, GPT values that overflow 64 bits."""

from __future__ import annotations

import struct

import pytest

from pynbd.errors import CommandError, ConfigError
from pynbd.filters.partition import PartitionFilter
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def mbr_disk(size: int = 64 * 1024) -> bytearray:
    disk = bytearray(size)
    for i, (ptype, start, n) in enumerate([(0x83, 8, 8), (0x0C, 16, 32)]):
        struct.pack_into("<4xB3xII", disk, 0x1BE + 16 * i, ptype, start, n)
    disk[0x1FE:0x200] = b"\x55\xaa"
    return disk


def test_requests_are_moved() -> None:
    disk = Disk(mbr_disk(), description="a disk")
    chain, ctx = open_chain(disk, (PartitionFilter, ["partition=2"]))
    assert ctx.get_size() == 32 * 512
    assert ctx.export_description() == "partition 2 of MBR disk: a disk"
    assert disk.named("pread") == [("pread", 1024, 0, 0)]  # LBA 0 and 1, once, at open
    ctx.pwrite(b"xyz", 5)
    ctx.zero(512, 512)
    assert disk.named("pwrite", "zero") == [("pwrite", 3, 16 * 512 + 5, 0),
                                            ("zero", 512, 17 * 512, 0)]
    assert disk.data[16 * 512 + 5:16 * 512 + 8] == b"xyz"
    ctx.close()
    chain.cleanup()


def test_table_read_per_connection() -> None:
    """Each connection reads the table when it opens: a change shows in the next one."""
    disk = Disk(mbr_disk())
    chain, first = open_chain(disk, (PartitionFilter, ["partition=1"]))
    struct.pack_into("<II", disk.data, 0x1BE + 8, 8, 16)  # partition 1 grows to 16 sectors
    assert first.get_size() == 8 * 512
    second = chain.open(False, "", False)
    assert second.get_size() == 16 * 512
    first.close()
    second.close()


def test_gpt_values_are_64_bit() -> None:
    """A first LBA whose byte offset passes 2^63 is negative as nbdkit's int64_t holds it:
    outside the disk, never a huge positive offset."""
    disk = bytearray(64 * 1024)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    struct.pack_into("<II", disk, 512 + 80, 4, 128)
    struct.pack_into("<16s16sQQ", disk, 1024, b"T" * 16, b"U" * 16, 1 << 54, (1 << 54) + 1)
    with pytest.raises(CommandError, match="partition is outside the disk"):
        open_chain(Disk(disk), (PartitionFilter, ["partition=1"]))


def test_parameters() -> None:
    with pytest.raises(ConfigError, match="you must supply the partition parameter"):
        open_chain(Disk(), (PartitionFilter, []))
    with pytest.raises(ConfigError, match="invalid partition number"):
        open_chain(Disk(), (PartitionFilter, ["partition=000"]))
    _chain, ctx = open_chain(Disk(mbr_disk()), (PartitionFilter, ["partition=0x2"]))
    assert ctx.get_size() == 32 * 512


def test_manual() -> None:
    assert "partition=PART" in manual_of("partition")
