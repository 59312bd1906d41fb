"""The partitioning plugin's virtual disk: its regions and partition tables (private).

The disk is a list of contiguous regions: the primary partition table (MBR: one sector; GPT:
protective MBR, header and entry array), then for each file (after an EBR sector for MBR
logical partitions) zero padding up to the file's alignment, the file, and zero padding to
a whole sector; for GPT finally the backup entry array and header. Sectors are 512 bytes.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

__all__ = ["SECTOR", "PartFile", "Region", "build_layout", "parse_guid"]

SECTOR = 512
_ENTRY = 128  # GPT partition entry size
_MIN_ENTRIES = 128
_HEADER = struct.Struct("<8s4sIIIQQQQ16sQIII4x")  # 96 bytes, as nbdkit writes it
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


def parse_guid(text: str) -> bytes | None:
    """A GUID (with or without braces) in GPT's mixed-endian form; None if malformed."""
    if len(text) == 38 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1]
    if len(text) != 36 or any(text[i] != "-" for i in (8, 13, 18, 23)):
        return None
    hexdigits = text.replace("-", "")
    if len(hexdigits) != 32 or any(c not in "0123456789abcdefABCDEF" for c in hexdigits):
        return None
    return uuid.UUID(hexdigits).bytes_le


@dataclass
class PartFile:
    """One file= and the settings that applied to it."""

    name: str
    fd: int
    size: int
    alignment: int
    mbr_id: int
    type_guid: bytes
    guid: bytes = field(default_factory=lambda: uuid.uuid4().bytes_le)


@dataclass
class Region:
    """[start, start+length): kind "data" (``data``), "zero" or "file" (``index``)."""

    start: int
    length: int
    kind: str
    index: int = -1
    data: bytearray | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


def _chs_max() -> bytes:
    return bytes((254, 0xFF, 0xFF))  # cylinder 1023, head 254, sector 63: "too large"


def _mbr_entry(start: int, length: int, bootable: bool, mbr_id: int) -> bytes:
    return (bytes((0x80 if bootable else 0,)) + _chs_max() + bytes((mbr_id,)) + _chs_max()
            + struct.pack("<II", start // SECTOR, -(-length // SECTOR)))


class _Builder:
    def __init__(self, files: list[PartFile], gpt: bool) -> None:
        self.files = files
        self.gpt = gpt
        self.regions: list[Region] = []
        self.entries = -(-len(files) // _MIN_ENTRIES) * _MIN_ENTRIES
        self.pta_sectors = self.entries * _ENTRY // SECTOR

    @property
    def size(self) -> int:
        return self.regions[-1].end if self.regions else 0

    def add(self, length: int, kind: str, index: int = -1,
            data: bytearray | None = None) -> Region:
        r = Region(self.size, length, kind, index, data)
        self.regions.append(r)
        return r

    def lay_out(self) -> None:
        n = len(self.files)
        head = (2 + self.pta_sectors) * SECTOR if self.gpt else SECTOR
        self.primary = self.add(head, "data", data=bytearray(head))
        self.ebrs: list[Region] = []
        self.parts: list[Region] = []
        for i, f in enumerate(self.files):
            if not self.gpt and n > 4 and i >= 3:
                self.ebrs.append(self.add(SECTOR, "data", data=bytearray(SECTOR)))
            if self.size % f.alignment:
                self.add(f.alignment - self.size % f.alignment, "zero")
            self.parts.append(self.add(f.size, "file", index=i))
            if f.size % SECTOR:
                self.add(SECTOR - f.size % SECTOR, "zero")
        if self.gpt:
            tail = (self.pta_sectors + 1) * SECTOR
            self.secondary = self.add(tail, "data", data=bytearray(tail))

    def mbr(self) -> None:
        out = self.primary.data
        assert out is not None
        out[0x1FE:0x200] = b"\x55\xaa"
        n = len(self.files)
        for i in range(min(n, 3 if n > 4 else 4)):
            p = self.parts[i]
            out[0x1BE + 16 * i:0x1CE + 16 * i] = _mbr_entry(p.start, p.length, i == 0,
                                                            self.files[i].mbr_id)
        if n <= 4:
            return
        ext0 = self.ebrs[0]
        out[0x1EE:0x1FE] = _mbr_entry(ext0.start, self.size - ext0.start, False, 0x0F)
        for k, ebr in enumerate(self.ebrs):
            i = k + 3
            d = ebr.data
            assert d is not None
            d[0x1FE:0x200] = b"\x55\xaa"
            p = self.parts[i]
            d[0x1BE:0x1CE] = _mbr_entry(p.start - ebr.start, p.length, False,
                                        self.files[i].mbr_id)
            if i < n - 1:
                nxt, nxt_part = self.ebrs[k + 1], self.parts[i + 1]
                d[0x1CE:0x1DE] = _mbr_entry(nxt.start - ext0.start,
                                            nxt_part.end - nxt.start, False, 0x0F)

    def gpt_tables(self) -> None:
        pta = bytearray(self.entries * _ENTRY)
        for i, (f, p) in enumerate(zip(self.files, self.parts, strict=True)):
            name = b""
            if len(f.name) < 36 and f.name.isascii():
                name = f.name.encode("utf-16-le")
            pta[i * _ENTRY:(i + 1) * _ENTRY] = _GPT_ENTRY.pack(
                f.type_guid, f.guid, p.start // SECTOR, (p.end - 1) // SECTOR,
                4 if i == 0 else 0, name)
        lbas = self.size // SECTOR
        out = self.primary.data
        assert out is not None and self.secondary.data is not None
        end = min(self.size - 1, 0xFFFFFFFF * SECTOR)
        out[0x1BE:0x1CE] = _mbr_entry(SECTOR, end - SECTOR + 1, False, 0xEE)
        out[0x1FE:0x200] = b"\x55\xaa"
        out[2 * SECTOR:2 * SECTOR + len(pta)] = pta
        self.secondary.data[:len(pta)] = pta
        pcrc = zlib.crc32(pta)
        for primary in (True, False):
            cur, backup = (1, lbas - 1) if primary else (lbas - 1, 1)
            entries_lba = 2 if primary else lbas - self.pta_sectors - 1
            fields = [b"EFI PART", b"\0\0\1\0", _HEADER.size, 0, 0, cur, backup,
                      2 + self.pta_sectors, lbas - self.pta_sectors - 2, bytes(16),
                      entries_lba, self.entries, _ENTRY, pcrc]
            fields[3] = zlib.crc32(_HEADER.pack(*fields))
            header = _HEADER.pack(*fields)
            if primary:
                out[SECTOR:SECTOR + len(header)] = header
            else:
                at = self.pta_sectors * SECTOR
                self.secondary.data[at:at + len(header)] = header


def build_layout(files: list[PartFile], gpt: bool) -> list[Region]:
    """The regions of the virtual disk for ``files`` with an MBR or a GPT."""
    b = _Builder(files, gpt)
    b.lay_out()
    if gpt:
        b.gpt_tables()
    else:
        b.mbr()
    return b.regions
