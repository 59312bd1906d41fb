"""The partition filter: serve one partition of a partitioned disk. Its manual page is
:class:`PartitionFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import struct
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import parse_unsigned, shift_extents
from pynbd.plugin import Extent, Filter

__all__ = ["PartitionFilter"]

log = logging.getLogger("pynbd.server")

SECTOR = 512
#: MBR partition types of extended partitions (Linux's is_extended_partition).
_EXTENDED = (0x05, 0x0F, 0x85)
_MBR_ENTRY = struct.Struct("<4xB3xII")  # type byte, start sector, number of sectors
_GPT_COUNTS = struct.Struct("<II")  # at 80 in the header: number and size of entries
_GPT_ENTRY = struct.Struct("<16s16sQQ")  # type GUID, partition GUID, first LBA, last LBA
_U64 = (1 << 64) - 1


def _error(message: str) -> CommandError:
    return CommandError(errno.EIO, message)


def _s64(n: int) -> int:
    """A 64-bit result as C's int64_t holds it."""
    n &= _U64
    return n - (1 << 64) if n >> 63 else n


def _mbr_entry(sector: bytes, i: int) -> tuple[int, int, int]:
    """Entry ``i`` (0-3) of an MBR or EBR: (type byte, start sector, number of sectors)."""
    return _MBR_ENTRY.unpack_from(sector, 0x1BE + 16 * i)


def find_mbr(next: Any, size: int, mbr: bytes, partnum: int) -> tuple[int, int]:
    """(offset, length) of partition ``partnum`` in an MBR table: 1-4 primary, 5... the
    logical partitions, in the order of the extended partition's chain of EBRs."""
    if partnum <= 4:
        ptype, start, nsect = _mbr_entry(mbr, partnum - 1)
        if nsect > 0 and ptype != 0 and ptype not in _EXTENDED:
            return start * SECTOR, nsect * SECTOR
        raise _error(f"MBR partition {partnum} not found")
    for i in range(4):
        ptype, ep_start, ep_nsect = _mbr_entry(mbr, i)
        if ep_nsect > 0 and ptype in _EXTENDED:
            break
    else:
        raise _error("MBR logical partition selected, "
                     "but there is no extended partition in the partition table")
    ebr = ep_start * SECTOR
    # Only links to a later EBR are followed, so the walk ends.
    for i in range(5, partnum + 1):
        if ebr % SECTOR or ebr < SECTOR or ebr >= size - SECTOR:
            raise _error("invalid EBR chain: "
                         "next EBR boot sector is located outside disk boundary")
        log.debug("partition: reading EBR at %d", ebr)
        sector = bytes(next.pread(SECTOR, ebr, 0))
        if i == partnum:
            _, start, nsect = _mbr_entry(sector, 0)  # relative to this EBR
            offset, length = ebr + start * SECTOR, nsect * SECTOR
            if offset <= ebr or offset + length > (ep_start + ep_nsect) * SECTOR:
                raise _error(
                    f"logical partition start or size out of range (offset={offset}, "
                    f"range={length}, ep:startsect={ep_start}, ep:nrsects={ep_nsect})")
            return offset, length
        _, start, nsect = _mbr_entry(sector, 1)  # the next EBR, relative to the extended
        if start == 0 and nsect == 0:
            break
        next_ebr = (ep_start + start) * SECTOR
        if next_ebr <= ebr:
            raise _error(f"invalid EBR chain: next EBR {next_ebr} <= current EBR {ebr}")
        ebr = next_ebr
    raise _error(f"MBR partition {partnum} not found")


def find_gpt(next: Any, size: int, header: bytes, partnum: int) -> tuple[int, int]:
    """(offset, length) of partition ``partnum`` of a GPT disk (entries from LBA 2)."""
    nentries, esize = _GPT_COUNTS.unpack_from(header, 80)
    if partnum > nentries:
        raise _error("GPT partition number out of range")
    if esize < 128:
        raise _error("GPT partition entry size is < 128 bytes")
    # A table that cannot fit twice (primary and backup) means a bogus header.
    if size < 3 * SECTOR + 2 * nentries * esize:
        raise _error("GPT partition table is too large for this disk")
    entry = bytes(next.pread(128, 2 * SECTOR + (partnum - 1) * esize, 0))
    type_guid, _, first, last = _GPT_ENTRY.unpack_from(entry)
    if type_guid == bytes(16):
        raise _error(f"GPT partition {partnum} not found")
    return _s64(first * SECTOR), _s64((1 + last - first) * SECTOR)


class _Part:
    """Per connection: where the partition is, found when the client connects."""

    __slots__ = ("kind", "length", "offset")

    def __init__(self) -> None:
        self.kind = ""
        self.offset = -1
        self.length = -1


class PartitionFilter(Filter):
    """NAME
        partition - pynbd partition filter: serve one partition of a disk

    SYNOPSIS
        pynbd serve --filter=partition PLUGIN partition=PART [PLUGIN-ARGS...]

    DESCRIPTION
        partition serves a single partition of the partitioned disk image the plugin serves:
        the client sees the partition as a whole disk. It reads MBR (DOS) partition tables,
        where partitions 1-4 are the primary ones and 5 and up the logical partitions in the
        extended partition, and GPT partition tables. It works like qemu-nbd -P.

        The partition table is read when a client connects. A disk without a table, or
        without the partition asked for, or with a partition reaching past its end, is
        refused with a message saying what is wrong. The export's description, when the
        plugin has one, becomes "partition PART of MBR disk: DESCRIPTION" (or GPT disk).

        Sectors are taken to be 512 bytes. The opposite of this filter is a plugin that
        builds a partition table around files (nbdkit's partitioning plugin).

        This is nbdkit-partition-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        partition=PART
            The partition to serve, counting from 1 (decimal, 0x hex or 0 octal). Required.

    EXAMPLES
        Serve the first partition of a virtual machine's disk image:

            pynbd serve --filter=partition file disk.img partition=1

        The first logical partition of an MBR disk:

            pynbd serve --filter=partition file disk.img partition=5
    """

    name = "partition"
    version = "1.32.5"
    nonblocking = True
    config_help = "partition=<PART>    (required) The partition number (counting from 1)."

    def __init__(self) -> None:
        self.partnum = 0

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "partition":
            n = parse_unsigned("partition", value)
            if n == 0:
                raise ConfigError("invalid partition number")
            self.partnum = n
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.partnum == 0:
            raise ConfigError("you must supply the partition parameter on the command line")

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> _Part:
        next_open(readonly, export_name)
        return _Part()

    def prepare(self, next: Any, h: _Part, readonly: bool) -> None:
        size = next.get_size()
        if size < 2 * SECTOR:
            raise _error("disk is too small to be a partitioned disk")
        log.debug("disk size=%d", size)
        lba01 = bytes(next.pread(2 * SECTOR, 0, 0))
        if size >= 2 * 34 * SECTOR and lba01[SECTOR:SECTOR + 8] == b"EFI PART":
            h.kind = "GPT"
            h.offset, h.length = find_gpt(next, size, lba01[SECTOR:], self.partnum)
        elif lba01[0x1FE:0x200] == b"\x55\xaa":
            h.kind = "MBR"
            h.offset, h.length = find_mbr(next, size, lba01, self.partnum)
        else:
            raise _error("disk does not contain MBR or GPT partition table signature")
        if h.offset < 0 or h.length < 0 or h.offset + h.length > size:
            raise _error("partition is outside the disk")
        log.debug("partition offset=%d range=%d", h.offset, h.length)

    def get_size(self, next: Any, h: _Part) -> int:
        return h.length

    def export_description(self, next: Any, h: _Part) -> str | None:
        base = next.export_description()
        if not base:
            return None
        return f"partition {self.partnum} of {h.kind} disk: {base}"

    def pread(self, next: Any, h: _Part, count: int, offset: int, flags: int) -> Any:
        return next.pread(count, offset + h.offset, flags)

    def pwrite(self, next: Any, h: _Part, buf: Any, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + h.offset, flags)

    def trim(self, next: Any, h: _Part, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + h.offset, flags)

    def zero(self, next: Any, h: _Part, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + h.offset, flags)

    def extents(self, next: Any, h: _Part, count: int, offset: int,
                flags: int) -> list[Extent]:
        return shift_extents(next.extents(count, offset + h.offset, flags), h.offset)

    def cache(self, next: Any, h: _Part, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + h.offset, flags)
