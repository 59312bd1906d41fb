"""The tar filter: serve one file inside an uncompressed tar file. Its manual page is
:class:`TarFilter`'s docstring."""

from __future__ import annotations

import errno
import io
import logging
import tarfile
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_size
from pynbd.filters._shape_common import shift_extents
from pynbd.plugin import Extent, Filter

__all__ = ["TarFilter"]

log = logging.getLogger("pynbd.server")

_NOT_FOUND = "tar subcommand failed, check that the file really exists in the tarball"


class _PluginFile(io.RawIOBase):
    """The plugin below as a read-only, seekable file of ``size`` bytes (for tarfile)."""

    def __init__(self, next: Any, size: int) -> None:
        self.next, self.size, self.pos = next, size, 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        if n:
            memoryview(buf)[:n] = self.next.pread(n, self.pos, 0)
            self.pos += n
            self.bytes_read += n
        return n


def find_entry(next: Any, entry: str, limit: int) -> tuple[int, int]:
    """(offset, size) of the data of member ``entry``, reading member headers only (and
    no more than ``limit`` bytes of the tar file, if not 0)."""
    size = next.get_size()
    if limit:
        size = min(size, limit)
    f = _PluginFile(next, size)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.name == entry:
                    if member.issparse():
                        raise CommandError(errno.EIO,
                                           f"tar: {entry} is a sparse file: cannot serve it")
                    log.debug("tar: %s found at offset %d, size %d", entry,
                              member.offset_data, member.size)
                    return member.offset_data, member.size
    except tarfile.TarError as e:
        log.debug("tar: %s", e)
    raise CommandError(errno.EIO, _NOT_FOUND)


class TarFilter(Filter):
    """NAME
        tar - pynbd tar filter: read and write a file inside a tar file without unpacking it

    SYNOPSIS
        pynbd serve --filter=tar PLUGIN [PLUGIN-ARGS...] tar-entry=PATH_INSIDE_TAR
                    [tar-limit=SIZE]

    DESCRIPTION
        tar serves one file (an "entry") of the uncompressed tar file that the plugin below
        serves: the client sees that file as the disk. Without -r writes change the file's
        bytes inside the tar file in place; the tar file is never resized, so the disk
        cannot grow. Use -r to be sure the tar file is not modified.

        Where the entry is, is found once, by the first client that connects, by reading
        the tar file's member headers from the start (the data of other members is skipped,
        not read), with Python's tarfile module: ustar, GNU (long names) and pax formats
        all work. A connection fails if the entry is not there. Sparse members cannot be
        served.

        The filter does not decompress: put the gzip or xz filter below it for a
        compressed tar file (then it is read-only).

        An OVA file ("Open Virtual Appliance") is an uncompressed tar file: the filter
        serves a disk inside one directly. Writing to it does not update the checksums in
        the OVA's manifest, so other tools may then refuse the OVA.

        This is nbdkit-tar-filter(1) for pynbd, with nbdkit 1.32's parameters and messages,
        and tar-limit from later nbdkit versions.

    PARAMETERS
        tar-entry=PATH_INSIDE_TAR
            The entry to serve (required), exactly as the tar file names it: see
            "tar tf FILE.tar".

        tar-limit=SIZE
            Read at most SIZE bytes of the tar file looking for the entry (default 0: no
            limit). Guards against tar files (or plugins) that never end.

        tar=PROGRAM
            Accepted for nbdkit compatibility (nbdkit 1.32 runs GNU tar to find the entry)
            and ignored: pynbd reads the tar headers itself.

    EXAMPLES
        Serve a disk image inside a tar file:

            pynbd serve --filter=tar file file.tar tar-entry=some/disk.img

        Serve the disk of an OVA, read-only:

            pynbd serve -r --filter=tar file rhel.ova tar-entry=rhel-disk1.vmdk

        Serve a disk image from a compressed tar file on a web server:

            pynbd serve --filter=tar --filter=xz curl https://example.com/file.tar.xz \\
                tar-entry=disk.img
    """

    name = "tar"
    version = "1.32.5"
    config_help = (
        "tar-entry=<FILENAME> (required) The path inside the tar file to serve.\n"
        "tar-limit=<SIZE>     (optional) Bytes of the tar file searched (default: 0, all).")

    def __init__(self) -> None:
        self.entry: str | None = None
        self.limit = 0
        self._lock = threading.Lock()
        self._found: tuple[int, int] | None = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "tar-entry":
            if self.entry is not None:
                raise ConfigError("only one tar-entry parameter can be given")
            self.entry = value
        elif key == "tar-limit":
            self.limit = parse_size(value)
        elif key == "tar":
            pass  # nbdkit's GNU tar program: not needed here
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.entry is None:
            raise ConfigError("you must supply the tar-entry=<FILENAME> parameter")

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        assert self.entry is not None
        with self._lock:
            if self._found is None:
                self._found = find_entry(next, self.entry, self.limit)

    def _where(self) -> tuple[int, int]:
        if self._found is None:
            raise CommandError(errno.EIO, _NOT_FOUND)
        return self._found

    def get_size(self, next: Any, h: Any) -> int:
        next.get_size()  # asked as nbdkit asks it (the layer below caches its size)
        return self._where()[1]

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return next.pread(count, offset + self._where()[0], flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + self._where()[0], flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + self._where()[0], flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + self._where()[0], flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + self._where()[0], flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        start = self._where()[0]
        return shift_extents(next.extents(count, offset + start, flags), start)
