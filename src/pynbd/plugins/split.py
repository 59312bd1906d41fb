"""The split plugin: several files concatenated into one disk. Its manual page is
:class:`SplitPlugin`'s docstring."""

from __future__ import annotations

import bisect
import errno
import os
import stat
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Extent, Flag, Plugin, ThreadModel

__all__ = ["SplitPlugin"]

_HOLE = EXTENT_HOLE | EXTENT_ZERO


class _Files:
    """One connection's open files: fds, and where each starts on the disk."""

    def __init__(self, paths: list[str], readonly: bool) -> None:
        self.fds: list[int] = []
        self.starts: list[int] = []
        self.sizes: list[int] = []
        pos = 0
        try:
            for path in paths:
                try:
                    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
                except OSError as e:
                    raise CommandError(e.errno or errno.EIO,
                                       f"open: {path}: {e.strerror}") from None
                self.fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CommandError(errno.EINVAL, f"{path}: not a regular file")
                self.starts.append(pos)
                self.sizes.append(st.st_size)
                pos += st.st_size
        except BaseException:
            self.close()
            raise
        self.size = pos

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def spans(self, count: int, offset: int) -> list[tuple[int, int, int, int]]:
        """The pieces of [offset, offset+count): (file index, offset in file, length,
        offset in the request)."""
        out = []
        done = 0
        i = bisect.bisect_right(self.starts, offset) - 1
        while done < count:
            while self.sizes[i] == 0 or offset + done >= self.starts[i] + self.sizes[i]:
                i += 1
            at = offset + done - self.starts[i]
            n = min(count - done, self.sizes[i] - at)
            out.append((i, at, n, done))
            done += n
        return out


class SplitPlugin(Plugin):
    """NAME
        split - pynbd plugin to concatenate split files into one disk

    SYNOPSIS
        pynbd serve split [file=]FILENAME [[file=]FILENAME ...]

    DESCRIPTION
        split is a plugin for pynbd which serves one or more files, logically concatenated
        in the order given, as one disk. Reads and writes may span files; writes go to the
        files (unless the server is read-only). Block status reports the files' holes and
        data (found with SEEK_DATA/SEEK_HOLE), and cache requests ask the kernel to read
        ahead (posix_fadvise WILLNEED). Trim is not supported, zeroing writes zeroes, and
        there is no flush. The files are opened for each connection and must not change
        size while served. To add a partition table see the partitioning plugin; to serve
        one file the file plugin is faster.

        Differences from nbdkit 1.32: only regular files are served; a directory or device
        is refused at start (nbdkit 1.32 serves a directory as a disk of its
        inode size whose reads fail).

        This is nbdkit-split-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [file=]FILENAME
            A file to serve; give it once per file, in order. "file=" may be omitted. With
            no files the disk is empty.

    EXAMPLES
        A disk split into three parts:

            pynbd serve split disk.img.0 disk.img.1 disk.img.2
    """

    name = "split"
    version = "1.0"
    magic_config_key = "file"
    thread_model = ThreadModel.PARALLEL
    config_help = "[file=]<FILENAME> (required) File(s) to serve."

    def __init__(self) -> None:
        self._paths: list[str] = []

    def config(self, key: str, value: str) -> None:
        if key != "file":
            raise ConfigError(f"unknown parameter '{key}'")
        try:
            path = os.path.realpath(value, strict=True)
        except OSError as e:
            raise ConfigError(f"realpath: {value}: {e.strerror}") from None
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{value}: not a regular file")
        self._paths.append(path)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Files:
        return _Files(self._paths, readonly)

    def close(self, h: _Files) -> None:
        h.close()

    def get_size(self, h: _Files) -> int:
        return h.size

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread_into(self, h: _Files, buf: memoryview, offset: int, flags: int) -> None:
        for i, at, n, pos in h.spans(len(buf), offset):
            got = os.preadv(h.fds[i], [buf[pos:pos + n]], at)
            if got < n:
                raise CommandError(errno.EIO, "pread: unexpected end of file")

    def pwrite(self, h: _Files, buf: memoryview, offset: int, flags: int) -> None:
        for i, at, n, pos in h.spans(len(buf), offset):
            view = buf[pos:pos + n]
            while len(view):
                w = os.pwrite(h.fds[i], view, at)
                view, at = view[w:], at + w

    def cache(self, h: _Files, count: int, offset: int, flags: int) -> None:
        for i, at, n, _ in h.spans(count, offset):
            os.posix_fadvise(h.fds[i], at, n, os.POSIX_FADV_WILLNEED)

    def extents(self, h: _Files, count: int, offset: int, flags: int) -> list[Extent]:
        out: list[Extent] = []
        for i, at, n, pos in h.spans(count, offset):
            for lo, length, typ in _file_extents(h.fds[i], at, n):
                lo += offset + pos - at
                if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == lo:
                    out[-1] = (out[-1][0], out[-1][1] + length, typ)
                else:
                    out.append((lo, length, typ))
            if flags & Flag.REQ_ONE and out:
                return out[:1]
        return out


def _file_extents(fd: int, offset: int, count: int) -> list[Extent]:
    """Data and holes of [offset, offset+count) of a file, by SEEK_DATA and SEEK_HOLE."""
    out: list[Extent] = []
    end = offset + count
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return [*out, (pos, end - pos, 0)]
            data = end  # no data after pos: a hole to the end
        if data > pos:
            n = min(data, end) - pos
            out.append((pos, n, _HOLE))
            pos += n
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        n = min(hole, end) - pos
        out.append((pos, n, 0))
        pos += n
    return out
