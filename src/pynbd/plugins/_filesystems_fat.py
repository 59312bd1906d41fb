"""A virtual FAT32 disk made from a directory, for the floppy plugin.

Nothing is copied: the disk is a list of regions (:class:`Regions`), the boot sectors, FATs
and directory tables held in memory and the files' data read from the files themselves when a
client reads it. The layout is nbdkit's floppy plugin's, so the same directory gives the same
bytes under both servers, with three corrections that make ``fsck.fat -n`` clean where
nbdkit 1.32's image is not:

- an empty file has no first cluster (nbdkit gives it the next file's first cluster);
- ".." in a directory of the root names cluster 0, as FAT requires for the root (nbdkit
  names cluster 2), with the root directory's times (nbdkit writes 1970's, garbled);
- a name with no valid short-name character before its extension (".hidden") gets the short
  base name "_" (nbdkit leaves it blank, which is invalid).

Layout (sectors of 512 bytes, clusters of 16 KiB):

    0           MBR, one partition (type 0x0c, FAT32 LBA) from sector 2048
    2048        boot sector      2049  FSInfo      2054  backup boot sector
    2080        FAT              then the second FAT, each a whole number of clusters
    then        the data area from cluster 2: every directory table, then every file
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from dataclasses import dataclass, field

from pynbd.errors import ConfigError
from pynbd.plugins._filesystems_common import FILE, SECTOR_SIZE, ZERO, Regions, mbr_entry

__all__ = ["CLUSTER_SIZE", "DEFAULT_LABEL", "FIRST_DATA_OFFSET", "VirtualFloppy"]

SECTORS_PER_CLUSTER = 32
CLUSTER_SIZE = SECTOR_SIZE * SECTORS_PER_CLUSTER
PARTITION_START = 2048  # sector
RESERVED_SECTORS = 32
#: Where the first FAT starts (the partition's sector 32).
FIRST_DATA_OFFSET = (PARTITION_START + RESERVED_SECTORS) * SECTOR_SIZE
DEFAULT_LABEL = "NBDKITFLOPY"
OEM_NAME = b"MSWIN4.1"
#: FAT32 cluster numbers have 28 bits.
MAX_CLUSTERS = 0x10000000
MAX_FILE_SIZE = 0xFFFFFFFF
#: 0x3f LFN entries of 13 UTF-16 units.
MAX_LFN_UNITS = 819
END_OF_CHAIN = 0x0FFFFFFF

ATTR_VOLUME_LABEL = 0x08
ATTR_SUBDIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LFN = 0x0F

#: Characters kept in short names ("~" is left out: it marks a renamed duplicate).
_SHORT_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                      b"!#$%&'()-@^_`{}")
_DIR_ENTRY = struct.Struct("<11sBBBHHHHHHHI")
_LFN_ENTRY = struct.Struct("<B10sBBB12sH4s")


@dataclass
class _File:
    name: str
    path: str
    st: os.stat_result
    first_cluster: int = 0
    nr_clusters: int = 0


@dataclass
class _Dir:
    name: str
    st: os.stat_result | None
    parent: int
    subdirs: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    table: bytearray = field(default_factory=bytearray)
    #: (offset in table, "dir" or "file", index): short entries whose cluster is set later.
    links: list[tuple[int, str, int]] = field(default_factory=list)
    first_cluster: int = 0
    nr_clusters: int = 0


def _clusters(nbytes: int) -> int:
    return -(-nbytes // CLUSTER_SIZE)


def _pad(text: bytes, n: int) -> bytes:
    return text[:n].ljust(n, b" ")


# ------------------------------------------------------------------ names and times
def short_names(names: list[str]) -> list[bytes]:
    """The 11-byte short names (8.3, upper case) of one directory's entries: the leading
    run of valid characters of the name and of its last extension; duplicates are renamed
    by writing "~N" (N the entry's index) over the end of the base name."""
    out = []
    for name in names:
        raw = os.fsencode(name)
        n = 0
        while n < len(raw) and raw[n] in _SHORT_OK:
            n += 1
        base = bytearray(_pad(raw[:min(n, 8)], 8))
        if base[0] == 0x20:
            base[0] = ord("_")  # a blank first character is invalid
        dot = raw.rfind(b".")
        ext = b""
        if dot >= 0:
            tail = raw[dot + 1:]
            m = 0
            while m < len(tail) and tail[m] in _SHORT_OK:
                m += 1
            ext = tail[:min(m, 3)]
        out.append(bytearray(bytes(base) + _pad(ext, 3)).upper())
    for i in range(1, len(out)):
        for j in range(i):
            if out[i] == out[j]:
                suffix = b"~%d" % i
                k = 8 - len(suffix)
                while k > 0 and out[i][k] == 0x20:
                    k -= 1
                out[i][k:k + len(suffix)] = suffix
    return [bytes(s) for s in out]


def _checksum(short: bytes) -> int:
    c = 0
    for b in short:
        c = (((c & 1) << 7) + (c >> 1) + b) & 0xFF
    return c


def _fat_time(t: time.struct_time) -> int:
    return t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2


def _fat_date(t: time.struct_time) -> int:
    # Years before 1980 wrap, as they do in nbdkit's 16-bit field.
    return ((t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday) & 0xFFFF


def _times(st: os.stat_result | None) -> tuple[int, int, int, int, int, int]:
    """(ctime_10ms, ctime, cdate, adate, mtime, mdate) in local time."""
    if st is None:
        return (0, 0, 0, 0, 0, 0)
    c = time.localtime(st.st_ctime_ns // 10**9)
    m = time.localtime(st.st_mtime_ns // 10**9)
    a = time.localtime(st.st_atime_ns // 10**9)
    return (100 * (c.tm_sec % 2), _fat_time(c), _fat_date(c), _fat_date(a), _fat_time(m),
            _fat_date(m))


def _entry(short: bytes, attributes: int, st: os.stat_result | None, size: int = 0) -> bytes:
    c10, ct, cd, ad, mt, md = _times(st)
    return _DIR_ENTRY.pack(short, attributes, 0, c10, ct, cd, ad, 0, mt, md, 0, size)


def _lfn_entries(name: str, short: bytes) -> bytes:
    """The long-name entries of ``name``, last part first; the name ends with a NUL (in an
    entry of its own when it fills the others) and is padded with NULs."""
    try:
        units = os.fsencode(name).decode("utf-8").encode("utf-16-le")
    except UnicodeDecodeError:
        raise ConfigError(f"floppy: iconv: {name}: "
                          f"{os.strerror(errno.EILSEQ)}") from None
    if len(units) > 2 * MAX_LFN_UNITS:
        raise ConfigError(f"floppy: {name}: filename is too long")
    checksum = _checksum(short)
    count = 1 + len(units) // 26
    out = bytearray()
    for seq in range(count, 0, -1):
        part = units[(seq - 1) * 26:seq * 26].ljust(26, b"\0")
        out += _LFN_ENTRY.pack(seq | (0x40 if seq == count else 0), part[:10], ATTR_LFN, 0,
                               checksum, part[10:22], 0, part[22:26])
    return bytes(out)


# ------------------------------------------------------------------ the disk
class VirtualFloppy:
    """The virtual disk for ``directory``: :attr:`regions` (FILE regions' payload is the
    host path of the file) and its :attr:`size`."""

    def __init__(self, directory: str, label: str, size: int = 0) -> None:
        self.label = os.fsencode(label)
        self.dirs: list[_Dir] = []
        self.files: list[_File] = []
        try:
            root_st = os.stat(directory)
        except OSError as e:
            raise ConfigError(f"floppy: stat: {directory}: {e.strerror}") from None
        self._visit(directory, "", root_st, 0)
        for d in self.dirs:
            self._make_table(d)
        used = self._assign_clusters()
        self.data_used_clusters = used
        self.data_clusters, self.fat_clusters = self._sizes(used, size)
        if self.data_clusters >= MAX_CLUSTERS:
            raise ConfigError("floppy: disk image is too large for the FAT32 disk format")
        self.fat_entries = self.data_clusters + 2
        fat_sectors = self.fat_clusters * SECTORS_PER_CLUSTER
        self.data_start = PARTITION_START + RESERVED_SECTORS + 2 * fat_sectors
        self.data_last = self.data_start + self.data_clusters * SECTORS_PER_CLUSTER - 1
        if self.data_last >= 0xFFFFFFFF:
            raise ConfigError("floppy: disk image is too large for the MBR disk format")
        for d in self.dirs:
            self._link(d)
        self.regions = self._layout()
        if size:
            assert self.regions.size == size

    @property
    def size(self) -> int:
        return self.regions.size

    # Reading the directory -------------------------------------------------------------
    def _visit(self, path: str, name: str, st: os.stat_result | None, parent: int) -> int:
        """Add the directory at ``path`` and, depth first in readdir order, everything below
        it (regular files and directories; anything else is left out)."""
        di = len(self.dirs)
        self.dirs.append(_Dir(name, st, parent))
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            raise ConfigError(f"floppy: opendir: {path}: {e.strerror}") from None
        for entry in entries:
            try:
                est = os.lstat(entry.path)
            except OSError as e:
                raise ConfigError(f"floppy: stat: {entry.path}: {e.strerror}") from None
            if stat.S_ISDIR(est.st_mode):
                sdi = self._visit(entry.path, entry.name, est, di)
                self.dirs[di].subdirs.append(sdi)
            elif stat.S_ISREG(est.st_mode):
                if est.st_size >= MAX_FILE_SIZE:
                    raise ConfigError(f"floppy: {entry.path}: file is larger than maximum "
                                      "supported by VFAT")
                self.dirs[di].files.append(len(self.files))
                self.files.append(_File(entry.name, entry.path, est))
        return di

    def _make_table(self, d: _Dir) -> None:
        """The directory's entries; the short entries' clusters are filled in by _link."""
        t = d.table
        if d is self.dirs[0]:
            t += _DIR_ENTRY.pack(_pad(self.label, 11), ATTR_VOLUME_LABEL, *(0,) * 10)
        else:
            d.links.append((len(t), "self", 0))
            t += _entry(b".".ljust(11), ATTR_SUBDIRECTORY, d.st)
            d.links.append((len(t), "parent", 0))
            t += _entry(b"..".ljust(11), ATTR_SUBDIRECTORY, self.dirs[d.parent].st)
        names = ([self.dirs[i].name for i in d.subdirs]
                 + [self.files[i].name for i in d.files])
        shorts = short_names(names)
        for k, i in enumerate(d.subdirs):
            t += _lfn_entries(names[k], shorts[k])
            d.links.append((len(t), "dir", i))
            t += _entry(shorts[k], ATTR_SUBDIRECTORY, self.dirs[i].st)
        for k, i in enumerate(d.files, start=len(d.subdirs)):
            f = self.files[i]
            t += _lfn_entries(names[k], shorts[k])
            d.links.append((len(t), "file", i))
            t += _entry(shorts[k], ATTR_ARCHIVE, f.st, f.st.st_size)

    # Sizes -----------------------------------------------------------------------------
    def _assign_clusters(self) -> int:
        """Clusters from 2: every directory table, then every file. Returns how many."""
        cluster = 2
        for d in self.dirs:
            d.nr_clusters = _clusters(len(d.table))
            d.first_cluster = cluster
            cluster += d.nr_clusters
        for f in self.files:
            f.nr_clusters = _clusters(f.st.st_size)
            f.first_cluster = cluster if f.nr_clusters else 0
            cluster += f.nr_clusters
            if cluster > MAX_CLUSTERS:
                raise ConfigError("floppy: disk image is too large for the FAT32 disk format")
        return cluster - 2

    @staticmethod
    def _sizes(used: int, size: int) -> tuple[int, int]:
        """(data clusters, clusters of each FAT): just what is used, or what ``size`` leaves
        after the reserved sectors and the two FATs (each FAT sized for the clusters the
        whole area would have; it may then have a cluster more than the data area needs,
        which keeps the disk exactly ``size``: nbdkit 1.32 aborts on such sizes)."""
        if size == 0:
            return used, _clusters((used + 2) * 4)
        data = size - FIRST_DATA_OFFSET
        fat = _clusters((max(data, 0) // CLUSTER_SIZE + 2) * 4)
        data -= 2 * fat * CLUSTER_SIZE
        if data < used * CLUSTER_SIZE:
            raise ConfigError('floppy: filesystem is larger than "size" bytes')
        if size % CLUSTER_SIZE:
            raise ConfigError(f"floppy: size={size} is not a multiple of {CLUSTER_SIZE} bytes "
                              "(the cluster size)")
        return data // CLUSTER_SIZE, fat

    # Building --------------------------------------------------------------------------
    def _link(self, d: _Dir) -> None:
        for offset, kind, index in d.links:
            if kind == "self":
                cluster = d.first_cluster
            elif kind == "parent":
                cluster = self.dirs[d.parent].first_cluster if d.parent else 0
            elif kind == "dir":
                cluster = self.dirs[index].first_cluster
            else:
                cluster = self.files[index].first_cluster
            struct.pack_into("<H", d.table, offset + 20, cluster >> 16)
            struct.pack_into("<H", d.table, offset + 26, cluster & 0xFFFF)

    def _boot_sector(self) -> bytes:
        b = bytearray(SECTOR_SIZE)
        b[3:11] = OEM_NAME
        struct.pack_into("<HBHBHHBHHHII", b, 11, SECTOR_SIZE, SECTORS_PER_CLUSTER,
                         RESERVED_SECTORS, 2, 0, 0, 0xF8, 0, 0, 0, 0,
                         self.data_last - PARTITION_START + 1)
        struct.pack_into("<IHHIHH", b, 36, self.fat_clusters * SECTORS_PER_CLUSTER, 0, 0, 2,
                         1, 6)
        struct.pack_into("<BBBI11s8s", b, 64, 0, 0, 0x29, 0x01020304, _pad(self.label, 11),
                         b"FAT32   ")
        b[510:512] = b"\x55\xaa"
        return bytes(b)

    def _fsinfo(self) -> bytes:
        b = bytearray(SECTOR_SIZE)
        b[0:4] = b"RRaA"
        b[484:488] = b"rrAa"
        struct.pack_into("<II", b, 488, self.data_clusters - self.data_used_clusters,
                         2 + self.data_used_clusters)
        b[508:512] = b"\0\0\x55\xaa"
        return bytes(b)

    def _mbr(self) -> bytes:
        b = bytearray(SECTOR_SIZE)
        b[3:11] = OEM_NAME
        b[0x1BE:0x1CE] = mbr_entry(PARTITION_START, self.data_last - PARTITION_START + 1,
                                   0x0C)
        b[510:512] = b"\x55\xaa"
        return bytes(b)

    def _fat_used(self) -> bytes:
        """The FAT's entries up to the last cluster used (the rest are 0: free)."""
        fat = [0x0FFFFFF8, END_OF_CHAIN] + [0] * self.data_used_clusters
        for first, n in ([(d.first_cluster, d.nr_clusters) for d in self.dirs]
                         + [(f.first_cluster, f.nr_clusters) for f in self.files]):
            for c in range(first, first + n - 1):
                fat[c] = c + 1
            if n:
                fat[first + n - 1] = END_OF_CHAIN
        return struct.pack(f"<{len(fat)}I", *fat)

    def _layout(self) -> Regions:
        r = Regions()
        r.add_data(self._mbr())
        r.pad_to(PARTITION_START * SECTOR_SIZE)
        boot = self._boot_sector()
        r.add_data(boot)
        r.add_data(self._fsinfo())
        r.add(4 * SECTOR_SIZE, ZERO)
        r.add_data(boot)
        r.add(25 * SECTOR_SIZE, ZERO)
        fat = self._fat_used()
        for _ in range(2):
            r.add_data(fat)
            r.add(self.fat_clusters * CLUSTER_SIZE - len(fat), ZERO)  # free (0) entries
        assert r.size == self.data_start * SECTOR_SIZE
        for d in self.dirs:
            r.add_data(d.table)
            r.pad_to(CLUSTER_SIZE)
        for f in self.files:
            if f.st.st_size:
                r.add(f.st.st_size, FILE, f.path)
                r.pad_to(CLUSTER_SIZE)
        r.add((self.data_clusters - self.data_used_clusters) * CLUSTER_SIZE, ZERO)
        return r
