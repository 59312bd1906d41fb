"""The floppy plugin: a directory served as a virtual FAT32 disk. Its manual page is
:class:`FloppyPlugin`'s docstring."""

from __future__ import annotations

import errno
import os
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_size
from pynbd.plugin import CacheMode, Plugin, ThreadModel
from pynbd.plugins._filesystems_common import Regions, log, realpath
from pynbd.plugins._filesystems_fat import DEFAULT_LABEL, VirtualFloppy

__all__ = ["FloppyPlugin"]


class FloppyPlugin(Plugin):
    """NAME
        floppy - pynbd plugin making a virtual FAT32 disk from a directory

    SYNOPSIS
        pynbd serve floppy [dir=]DIRECTORY [label=LABEL] [size=SIZE]

    DESCRIPTION
        floppy serves the files of DIRECTORY (and its subdirectories) as a read-only disk
        with one MBR partition holding a FAT32 filesystem, with long file names.

        The filesystem is virtual: when the server starts it reads the directory tree and
        builds the boot sectors, the FATs and the directory tables in memory; the files'
        data are read from the files themselves whenever a client reads them. Nothing is
        copied, so the disk is ready at once however large the files are, but the files
        must be left alone while the server runs (a file that moved or shrank makes reads
        of it fail with the error of open(2), or EIO).

        Only regular files and directories are included (symbolic links, devices, sockets
        and FIFOs are left out). Each name gets a long (VFAT) name and an 8.3 short name
        made from it; clashing short names are renamed with "~N". Times are the files'
        change, modification and access times in local time. FAT32 is used even for small
        disks, with 16 KiB clusters (the space wasted is virtual).

        The bytes are nbdkit's: the same directory gives the same disk under both servers,
        except where nbdkit 1.32's image fails "fsck.fat -n" and pynbd's does not: an empty
        file has no first cluster, ".." in a directory of the root names cluster 0 (and
        carries the root's times), and a name with no valid short-name character before its
        extension (".hidden") gets the short base name "_".

        Every client sees the same disk: multi-conn is advertised. The cow filter on top
        lets clients write (their writes are thrown away). This is nbdkit-floppy-plugin(1)
        for pynbd, with the same parameters and messages.

    PARAMETERS
        [dir=]DIRECTORY
            The directory whose files are put on the disk (required, once). "dir=" may be
            omitted.

        label=LABEL
            The volume label, up to 11 ASCII characters (longer labels are cut). The
            default is "NBDKITFLOPY".

        size=SIZE
            The size of the whole disk, a multiple of 16 KiB. The space the files do not
            use is free space in the filesystem. Without it, the disk is just large enough
            for the files and directories, with no free space.

    LIMITS
        A file of 4 GiB or more, a disk of 2 TiB or more (MBR), or more than 2^28 clusters
        cannot be made: the server does not start, and says why.

    EXAMPLES
        Serve a directory as a FAT disk:

            pynbd serve floppy /path/to/directory label=DATA

        Serve it with 100 MiB of free space, writable (writes are discarded):

            pynbd serve --filter=cow floppy /path/to/directory size=128M
    """

    name = "floppy"
    version = "1.0"
    magic_config_key = "dir"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "dir=<DIRECTORY>     (required) The directory to serve.\n"
        "label=<LABEL>                  The volume label."
    )

    def __init__(self) -> None:
        self._dir: str | None = None
        self._label = DEFAULT_LABEL
        self._size = 0
        self._regions = Regions()

    def config(self, key: str, value: str) -> None:
        if key == "dir":
            if self._dir is not None:
                raise ConfigError("floppy: dir=<DIRECTORY> must only be set once")
            self._dir = realpath(value, "floppy")
        elif key == "label":
            self._label = value
        elif key == "size":
            try:
                self._size = parse_size(value)
            except ConfigError as e:
                raise ConfigError(f"floppy: {e}") from None
        else:
            raise ConfigError(f"floppy: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self._dir is None:
            raise ConfigError("floppy: you must supply the dir=<DIRECTORY> parameter "
                              "after the plugin name on the command line")

    def get_ready(self) -> None:
        assert self._dir is not None
        floppy = VirtualFloppy(self._dir, self._label, self._size)
        log.debug("floppy: %d directories and %d files, %d data clusters, disk size %d",
                  len(floppy.dirs), len(floppy.files), floppy.data_clusters, floppy.size)
        self._regions = floppy.regions

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return None

    def get_size(self, h: Any) -> int:
        return self._regions.size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.EMULATE

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        self._regions.read_into(buf, offset, _read_file)


def _read_file(path: str, view: memoryview, offset: int) -> None:
    """Read part of a file of the directory (opened for this read only, as nbdkit does)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log.error("floppy: open: %s: %s", path, e.strerror)
        raise CommandError(e.errno or errno.EIO, f"open: {path}: {e.strerror}") from None
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                log.error("floppy: pread: %s: unexpected end of file", path)
                raise CommandError(errno.EIO, f"pread: {path}: unexpected end of file")
            done += n
    except OSError as e:
        log.error("floppy: pread: %s: %s", path, e.strerror)
        raise CommandError(e.errno or errno.EIO, f"pread: {path}: {e.strerror}") from None
    finally:
        os.close(fd)
