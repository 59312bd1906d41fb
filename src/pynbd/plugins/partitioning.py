"""The partitioning plugin: files as the partitions of a virtual disk. Its manual page is
:class:`PartitioningPlugin`'s docstring."""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import _number_tail, _strtol, parse_size
from pynbd.plugin import CacheMode, Plugin, ThreadModel
from pynbd.plugins._partition_layout import SECTOR, PartFile, Region, build_layout, parse_guid

__all__ = ["PartitioningPlugin"]

log = logging.getLogger("pynbd.plugins.partitioning")

_MAX_ALIGNMENT = 2048 * SECTOR
_DEFAULT_MBR_ID = 0x83
_DEFAULT_TYPE_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
#: Largest total for an MBR: what 32-bit sector numbers reach, less room for alignment.
_MAX_MBR_SIZE = 0xFFFFFFFF * SECTOR - 5 * _MAX_ALIGNMENT


class PartitioningPlugin(Plugin):
    """NAME
        partitioning - pynbd plugin to create a partitioned virtual disk from files

    SYNOPSIS
        pynbd serve partitioning [file=]FILE [[file=]FILE ...] [partition-type=mbr|gpt]
                                 [alignment=N] [mbr-id=0xN|default] [type-guid=GUID|default]

    DESCRIPTION
        partitioning is a plugin for pynbd which makes a partitioned virtual disk from one
        or more files, each holding one partition: the files are laid out one after another
        and a virtual partition table is put in front (and for GPT a backup table at the
        end). Clients see one partitioned disk. To concatenate files without a partition
        table use the split plugin; to pick one partition out of a disk, the partition
        filter.

        Without partition-type=, the table is GPT when there are more than 4 files or the
        files are too large for an MBR (about 2 TB), else MBR. With an MBR and more than 4
        files, the first three are primary partitions, the fourth is an extended partition
        and the files from the fourth on are logical partitions 5 and up (each after its
        own EBR sector). GPT adds a protective MBR; the first partition is marked bootable
        (legacy BIOS bootable attribute for GPT, the active flag for MBR). A GPT entry
        names its partition after the file name when it is short ASCII.

        Partitions are padded with zeroes to whole 512-byte sectors, and padding is added
        before each to align it (alignment=). Clients may read everything and write the
        partitions (the writes go to the files); a write that would change the partition
        tables or the padding fails with EIO. Flush flushes the files.

        The bytes are those nbdkit's partitioning plugin serves for the same command line,
        except the GPT partitions' unique GUIDs, which are random (as nbdkit's).

        This is nbdkit-partitioning-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [file=]FILE
            A file holding a partition (required, once per partition, in order; not empty).
            "file=" may be omitted.

        partition-type=mbr|gpt
            The partition table type (default: chosen as described above).

        alignment=N
            Align the following partitions to N bytes (a size from 512 to 1M; default 1M).

        mbr-id=0xN|default
            The MBR partition type byte of the following partitions (default 0x83, Linux).

        type-guid=GUID|default
            The GPT partition type GUID of the following partitions (default
            0FC63DAF-8483-4772-8E79-3D69D8477DE4, Linux filesystem data).

    EXAMPLES
        A disk with one partition holding a filesystem image:

            pynbd serve partitioning ext4fs.img

        Boot, swap and root partitions:

            pynbd serve partitioning boot.img mbr-id=0x82 swap.img mbr-id=default root.img
    """

    name = "partitioning"
    version = "1.0"
    magic_config_key = "file"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "file=<FILENAME>  (required) File(s) containing partitions\n"
        "partition-type=mbr|gpt     Partition type")

    def __init__(self) -> None:
        self._files: list[PartFile] = []
        self._alignment = _MAX_ALIGNMENT
        self._mbr_id = _DEFAULT_MBR_ID
        self._type_guid = parse_guid(_DEFAULT_TYPE_GUID) or b""
        self._parttype: str | None = None
        self._regions: list[Region] = []
        self._starts: list[int] = []

    def config(self, key: str, value: str) -> None:
        if key == "file":
            self._add_file(value)
        elif key == "partition-type":
            if value.lower() not in ("mbr", "gpt"):
                raise ConfigError(f"unknown partition-type: {value}")
            self._parttype = value.lower()
        elif key == "alignment":
            n = parse_size(value)
            if not SECTOR <= n <= _MAX_ALIGNMENT or n & (n - 1):
                raise ConfigError(f"partition alignment {n} should be >= sector size "
                                  f"{SECTOR} and <= maximum alignment {_MAX_ALIGNMENT}")
            self._alignment = n
        elif key == "mbr-id":
            self._mbr_id = _DEFAULT_MBR_ID if value == "default" else _uint8("mbr-id", value)
        elif key == "type-guid":
            guid = parse_guid(_DEFAULT_TYPE_GUID if value == "default" else value)
            if guid is None:
                raise ConfigError(f"could not validate GUID: {value}")
            self._type_guid = guid
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def _add_file(self, name: str) -> None:
        try:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"{name}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
            raise ConfigError(f"{name}: {os.strerror(code)}")
        self._files.append(PartFile(name, fd, st.st_size, self._alignment, self._mbr_id,
                                    self._type_guid))

    def config_complete(self) -> None:
        files = self._files
        if not files:
            raise ConfigError("at least one file= parameter must be supplied")
        for f in files:
            if f.size == 0:
                raise ConfigError(f"{f.name}: zero length partitions are not allowed")
        total = sum(f.size for f in files)
        if self._parttype is None:
            self._parttype = "gpt" if len(files) > 4 or total > _MAX_MBR_SIZE else "mbr"
        if self._parttype == "mbr" and total > _MAX_MBR_SIZE:
            raise ConfigError(
                "MBR partition table type supports a maximum virtual disk size of about "
                f"2 TB, but you requested {len(files)} partition(s) and a total size of "
                f"{total} bytes (> {_MAX_MBR_SIZE}).  Try using: partition-type=gpt")
        self._regions = build_layout(files, self._parttype == "gpt")
        self._starts = [r.start for r in self._regions]

    def cleanup(self) -> None:
        for f in self._files:
            os.close(f.fd)
        self._files = []

    def get_size(self, h: Any) -> int:
        return self._regions[-1].end

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.EMULATE  # a cache request reads (into the page cache)

    def _spans(self, count: int, offset: int) -> list[tuple[Region, int, int, int]]:
        """(region, offset in region, length, offset in the request) over the request."""
        out = []
        pos = 0
        i = bisect.bisect_right(self._starts, offset) - 1
        while pos < count:
            r = self._regions[i]
            at = offset + pos - r.start
            n = min(count - pos, r.length - at)
            out.append((r, at, n, pos))
            pos += n
            i += 1
        return out

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        for r, at, n, pos in self._spans(len(buf), offset):
            if r.kind == "file":
                fd = self._files[r.index].fd
                if os.preadv(fd, [buf[pos:pos + n]], at) < n:
                    raise CommandError(errno.EIO, "pread: unexpected end of file")
            elif r.kind == "data":
                assert r.data is not None
                buf[pos:pos + n] = r.data[at:at + n]
            else:
                buf[pos:pos + n] = bytes(n)

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        for r, at, n, pos in self._spans(len(buf), offset):
            part = buf[pos:pos + n]
            if r.kind == "file":
                fd = self._files[r.index].fd
                while len(part):
                    w = os.pwrite(fd, part, at)
                    part, at = part[w:], at + w
            elif r.kind == "data":
                assert r.data is not None
                if r.data[at:at + n] != part:
                    _fail("attempt to change partition table of virtual disk")
            elif part.tobytes().count(0) != n:
                _fail("write to padding area")

    def flush(self, h: Any, flags: int) -> None:
        for f in self._files:
            os.fdatasync(f.fd)


def _uint8(what: str, text: str) -> int:
    """``nbdkit_parse_uint8_t``."""
    if text.lstrip().startswith("-"):
        raise ConfigError(f"{what}: negative numbers are not allowed")
    value, end = _strtol(text)
    return _number_tail(what, text, value, end, 0, value > 255)


def _fail(message: str) -> None:
    log.error("%s", message)
    raise CommandError(errno.EIO, message)
