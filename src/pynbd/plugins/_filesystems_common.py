"""Helpers shared by the filesystem plugins (linuxdisk, floppy, iso, tmpdisk, ondemand).

- :class:`Regions`: a virtual disk laid out as consecutive regions (bytes held in memory,
  zeroes, or a range of a file), read with one :meth:`Regions.read_into`.
- :func:`gpt_disk`: a GPT-partitioned disk holding one Linux partition (linuxdisk).
- :func:`run_tool`: run an external program with nbdkit's failure messages.
- :func:`large_tmpdir`, :func:`realpath`: where nbdkit puts big temporary files; its realpath
  message.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pynbd.errors import CommandError, ConfigError
from pynbd.plugins._common import zeroes

__all__ = [
    "DATA",
    "FILE",
    "LINUX_FILESYSTEM_GUID",
    "SECTOR_SIZE",
    "ZERO",
    "Region",
    "Regions",
    "chs_too_large",
    "exit_message",
    "gpt_disk",
    "large_tmpdir",
    "log",
    "mbr_entry",
    "read_fully",
    "realpath",
    "run_tool",
]

log = logging.getLogger("pynbd.server")

SECTOR_SIZE = 512
#: Where nbdkit keeps large temporary files when $TMPDIR is not set.
LARGE_TMPDIR = "/var/tmp"
#: GPT partition type "Linux filesystem data".
LINUX_FILESYSTEM_GUID = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")

DATA, ZERO, FILE = "data", "zero", "file"


class Region(NamedTuple):
    """``[start, end)`` of the virtual disk: ``kind`` DATA (``payload`` is the bytes), ZERO,
    or FILE (``payload`` names the file; the region is the file from its offset 0)."""

    start: int
    end: int
    kind: str
    payload: Any


class Regions:
    """A virtual disk as consecutive regions, looked up by bisection."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._starts: list[int] = []

    @property
    def size(self) -> int:
        return self.regions[-1].end if self.regions else 0

    def add(self, length: int, kind: str, payload: Any = None) -> Region:
        """Append a region of ``length`` bytes (nothing for a length of 0)."""
        start = self.size
        region = Region(start, start + length, kind, payload)
        if length > 0:
            self.regions.append(region)
            self._starts.append(start)
        return region

    def add_data(self, data: bytes | bytearray | memoryview) -> Region:
        return self.add(len(data), DATA, bytes(data))

    def pad_to(self, alignment: int) -> None:
        """Append zeroes up to the next multiple of ``alignment``."""
        rest = -self.size % alignment
        if rest:
            self.add(rest, ZERO)

    def read_into(self, buf: memoryview, offset: int,
                  read_file: Callable[[Any, memoryview, int], None]) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset``; ``read_file(payload, view,
        file_offset)`` fills the parts that come from files."""
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        count = len(buf)
        while pos < count:
            r = self.regions[i]
            here = offset + pos
            n = min(count - pos, r.end - here)
            view = buf[pos:pos + n]
            if r.kind == DATA:
                view[:] = r.payload[here - r.start:here - r.start + n]
            elif r.kind == ZERO:
                view[:] = zeroes(n)
            else:
                read_file(r.payload, view, here - r.start)
            pos += n
            i += 1


def read_fully(fd: int, view: memoryview, offset: int, what: str) -> None:
    """pread until ``view`` is full; EIO with nbdkit's message at an unexpected end of file."""
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    done = 0
    count = len(view)
    while done < count:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CommandError(errno.EIO, f"{what}: pread: unexpected end of file")
        done += n


# ------------------------------------------------------------------ partition tables
def chs_too_large() -> bytes:
    """A CHS address meaning "past what CHS can say" (cylinder 1023, head 254, sector 63)."""
    return bytes((254, 0xC0 | 63, 0xFF))


def mbr_entry(start_sector: int, nr_sectors: int, part_type: int,
              bootable: bool = False) -> bytes:
    """One 16-byte MBR partition table entry addressed by LBA."""
    return (bytes((0x80 if bootable else 0,)) + chs_too_large() + bytes((part_type,))
            + chs_too_large() + struct.pack("<II", start_sector, nr_sectors))


_GPT_HEADER = struct.Struct("<8s4sIIIQQQQ16sQIII4x")  # 92 bytes and 4 of padding (nbdkit's)
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
GPT_PT_SECTORS = GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR_SIZE  # 32


def _gpt_header(nr_lbas: int, pt: bytes, primary: bool) -> bytes:
    current, backup = (1, nr_lbas - 1) if primary else (nr_lbas - 1, 1)
    entries_lba = 2 if primary else nr_lbas - 1 - GPT_PT_SECTORS
    fields = [b"EFI PART", b"\0\0\1\0", _GPT_HEADER.size, 0, 0, current, backup,
              2 + GPT_PT_SECTORS, nr_lbas - 2 - GPT_PT_SECTORS, bytes(16), entries_lba,
              GPT_ENTRIES, GPT_ENTRY_SIZE, zlib.crc32(pt)]
    fields[3] = zlib.crc32(_GPT_HEADER.pack(*fields))
    return _GPT_HEADER.pack(*fields).ljust(SECTOR_SIZE, b"\0")


def gpt_disk(partition_size: int, partition_guid: uuid.UUID,
             add_partition: Callable[[Regions, int], None]) -> Regions:
    """The layout of nbdkit's linuxdisk: protective MBR, GPT header and table, the one
    partition at 1 MiB (``add_partition(regions, size)`` appends it), the backup table and
    header. The partition is typed "Linux filesystem data" and marked legacy-BIOS-bootable;
    the disk GUID is left zero (as nbdkit does)."""
    if partition_size % SECTOR_SIZE:
        raise ValueError("partition size must be a whole number of sectors")
    start = 2048 * SECTOR_SIZE
    total = start + partition_size + (GPT_PT_SECTORS + 1) * SECTOR_SIZE
    nr_lbas = total // SECTOR_SIZE
    entry = _GPT_ENTRY.pack(LINUX_FILESYSTEM_GUID.bytes_le, partition_guid.bytes_le,
                            start // SECTOR_SIZE, (start + partition_size) // SECTOR_SIZE - 1,
                            4, bytes(72))
    pt = entry.ljust(GPT_ENTRIES * GPT_ENTRY_SIZE, b"\0")
    # The protective MBR covers the whole disk after sector 0, as far as MBR can say.
    last = min(total - 1, 0xFFFFFFFF * SECTOR_SIZE)
    mbr = bytearray(SECTOR_SIZE)
    mbr[0x1BE:0x1CE] = mbr_entry(1, -(-(last - SECTOR_SIZE + 1) // SECTOR_SIZE), 0xEE)
    mbr[0x1FE:0x200] = b"\x55\xaa"
    regions = Regions()
    regions.add_data(mbr)
    regions.add_data(_gpt_header(nr_lbas, pt, True))
    regions.add_data(pt)
    regions.pad_to(start)
    add_partition(regions, partition_size)
    regions.add_data(pt)
    regions.add_data(_gpt_header(nr_lbas, pt, False))
    assert regions.size == total
    return regions


# ------------------------------------------------------------------ processes and paths
def exit_message(returncode: int, who: str, style: str = "tool") -> str:
    """nbdkit's words for a command that failed: ``style`` "tool" (``WHO: command failed
    with exit code N``) or "command" (tmpdisk's and ondemand's ``command exited with code
    N``)."""
    if returncode < 0:
        sig = -returncode
        if style == "tool":
            return f"{who}: command was killed by signal {sig}"
        return f"command killed by signal {sig}"
    if style == "tool":
        return f"{who}: command failed with exit code {returncode}"
    return f"command exited with code {returncode}"


def run_tool(argv: Sequence[str], who: str, *, shell: bool = False,
             stdout: int | None = subprocess.DEVNULL, style: str = "tool") -> None:
    """Run a program (or with ``shell`` a /bin/sh script) with stdin from /dev/null.

    Its error output is logged (debug), not printed: if it cannot start or fails, the
    :class:`CommandError` (EIO) has nbdkit's message and the program's last line of errors,
    so that the failure is one line in the log.
    """
    cmd = ["/bin/sh", "-c", argv[0]] if shell else list(argv)
    try:
        cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.PIPE, check=False)
    except OSError as e:
        if style == "tool":
            raise CommandError(errno.EIO, f"{who}: command failed: {e.strerror}") from None
        raise CommandError(errno.EIO, f"failed to execute command: {e.strerror}") from None
    lines = [line.strip() for line in cp.stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        log.debug("%s: %s", who, line)
    if cp.returncode != 0:
        msg = exit_message(cp.returncode, who, style)
        raise CommandError(errno.EIO, f"{msg}: {lines[-1]}" if lines else msg)


def large_tmpdir() -> str:
    """$TMPDIR, else /var/tmp (nbdkit's LARGE_TMPDIR)."""
    return os.environ.get("TMPDIR") or LARGE_TMPDIR


def realpath(value: str, who: str) -> str:
    """nbdkit_realpath: the absolute, resolved path of an existing file."""
    if not value:
        raise ConfigError(f"{who}: realpath: cannot resolve an empty path")
    try:
        return os.path.realpath(value, strict=True)
    except OSError as e:
        raise ConfigError(f"{who}: realpath: {value}: {e.strerror}") from None
