"""The file plugin: serve a file, a block device, or a directory of files. Its manual page is
:class:`FilePlugin`'s docstring."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
)

__all__ = ["FilePlugin"]

# Linux constants (linux/falloc.h, linux/fs.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKSSZGET = 0x1268  # _IO(0x12, 104)
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKROTATIONAL = 0x127E  # _IO(0x12, 126)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)

_ENOTSUP = (errno.ENOTSUP, errno.EOPNOTSUPP)
_FADVISE = {
    "normal": getattr(os, "POSIX_FADV_NORMAL", None),
    "random": getattr(os, "POSIX_FADV_RANDOM", None),
    "sequential": getattr(os, "POSIX_FADV_SEQUENTIAL", None),
}
_HOLE = EXTENT_HOLE | EXTENT_ZERO


def _load_libc() -> tuple[Any, Any]:
    """libc's fallocate(2) and sync_file_range(2) through ctypes (None where missing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None, None
    fns = []
    for names in (("fallocate64", "fallocate"), ("sync_file_range",)):
        fn = None
        for name in names:
            fn = getattr(libc, name, None)
            if fn is not None:
                break
        if fn is not None:
            fn.restype = ctypes.c_int
            if names[0] == "fallocate64":
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fns.append(fn)
    return fns[0], fns[1]


_fallocate, _sync_file_range = _load_libc()
# sync_file_range flags
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (ENOTSUP where it, or the mode, is unavailable)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err == errno.ENODEV:  # old kernels on block devices; newer say EOPNOTSUPP
            err = errno.EOPNOTSUPP
        raise OSError(err, f"fallocate: {os.strerror(err)}")


#: preadv flag to read only what is in the page cache (Linux >= 4.14); 0 if missing.
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

class _Handle:
    """One open file: the per-connection handle."""

    __slots__ = (
        "can_fallocate",
        "can_punch_hole",
        "can_write",
        "can_zero_range",
        "can_zeroout",
        "fd",
        "is_block",
        "lseek_lock",
        "name",
        "rotational",
        "sector_size",
    )

    def __init__(self, fd: int, name: str, can_write: bool, st: os.stat_result) -> None:
        self.fd = fd
        self.name = name
        self.can_write = can_write
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.sector_size = 4096  # a safe guess until the device says otherwise
        self.rotational = False
        self.can_punch_hole = _fallocate is not None
        self.can_zero_range = _fallocate is not None
        self.can_fallocate = _fallocate is not None
        self.can_zeroout = self.is_block
        # lseek moves the shared file offset: serialize the callbacks that use it.
        self.lseek_lock = threading.Lock()
        if self.is_block:
            try:
                self.sector_size = struct.unpack(
                    "i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            except OSError:
                pass
            self.rotational = _rotational(fd, st)


def _rotational(fd: int, st: os.stat_result) -> bool:
    """Whether a block device spins: the BLKROTATIONAL ioctl, else sysfs."""
    try:
        return struct.unpack("H", fcntl.ioctl(fd, BLKROTATIONAL, b"\0" * 2))[0] != 0
    except OSError:
        pass
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    for path in (f"{base}/queue/rotational", f"{base}/../queue/rotational"):
        try:
            with open(path) as f:
                return f.read().strip() == "1"
        except OSError:
            continue
    return False


class _WriteWindow:
    """cache=none for writes, as nbdkit: start writing each range back at once, and evict
    the oldest of the last few ranges from the page cache once it is on disk."""

    SIZE = 8

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.windows: list[tuple[int, int, int]] = []

    def evict(self, fd: int, offset: int, length: int) -> None:
        if _sync_file_range is None:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            return
        with self.lock:
            if _sync_file_range(fd, offset, length, _SFR_WRITE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"sync_file_range: cache=none: {os.strerror(err)}")
            self.windows.append((fd, offset, length))
            if len(self.windows) > self.SIZE:
                ofd, ooff, olen = self.windows.pop(0)
                if _sync_file_range(ofd, ooff, olen,
                                    _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER) == 0:
                    try:
                        os.posix_fadvise(ofd, ooff, olen, os.POSIX_FADV_DONTNEED)
                    except OSError:
                        pass

    def forget(self, fd: int) -> None:
        with self.lock:
            self.windows = [w for w in self.windows if w[0] != fd]


class FilePlugin(Plugin):
    """NAME
        file - pynbd file plugin

    SYNOPSIS
        pynbd serve file [file=]FILENAME [cache=default|none]
                         [fadvise=normal|random|sequential]

        pynbd serve file dir=DIRECTORY [cache=...] [fadvise=...]

    DESCRIPTION
        file is a plugin for pynbd which serves a file or a block device (file=), or every
        file in a directory as its own export (dir=).

        With file=, the file (or device) is the one export; clients may use any export
        name. Its size is the file's size (a device's size for block devices), read on
        every connection, so a file may grow between connections. If the file cannot be
        opened for writing (a read-only file or file system), it is served read-only.

        With dir=, each regular file (or block device) in DIRECTORY, following symbolic
        links, is an export named after the file: the list of exports (nbdinfo --list)
        shows them sorted by name, and a client picks one by export name. Names containing
        "/", the names "." and "..", and the empty export name are refused. The directory
        is read at each request, so files may come and go while the server runs.

        Reads and writes go straight to the file (pread/pwrite). Flush is fdatasync(2),
        and FUA writes are followed by one. Trim punches holes (fallocate(2)
        FALLOC_FL_PUNCH_HOLE; BLKDISCARD on block devices). Write-zeroes uses
        FALLOC_FL_ZERO_RANGE or hole punching (when the client allows trimming), or
        BLKZEROOUT on block devices; failing those the server writes zeroes. Block status
        (extents) comes from lseek(2) SEEK_DATA/SEEK_HOLE, so holes in sparse files are
        reported. Cache requests become posix_fadvise(2) POSIX_FADV_WILLNEED. Multi-conn
        is advertised: every connection sees the same file.

        Relative paths are made absolute (and symbolic links resolved) when the server
        starts, so they keep working after the server changes directory.

        This is nbdkit-file-plugin(1) for pynbd; the command lines are the same (the fd=
        and dirfd= forms are not implemented).

    PARAMETERS
        [file=]FILENAME
            Serve this file or block device. "file=" may be omitted (it is the magic
            parameter). Exactly one of file= and dir= must be given.

        dir=DIRECTORY
        directory=DIRECTORY
            Serve each file in DIRECTORY as an export of the same name.

        cache=default
        cache=none
            With "none", try not to fill the host's page cache: pages read are dropped
            after each read, and pages written are written back at once and dropped
            shortly after. The default leaves the page cache alone.

        fadvise=normal
        fadvise=random
        fadvise=sequential
            The access pattern hint given to the kernel (posix_fadvise(2)) for the whole
            file when it is opened. The default is "normal".

    EXAMPLES
        Serve a disk image:

            pynbd serve file disk.img

        Serve it read-only to qemu-img on a Unix socket:

            pynbd serve -r -U - file disk.img --run 'qemu-img convert "$uri" out.qcow2'

        Serve every image in a directory, one export each:

            pynbd serve file dir=/var/lib/images
            nbdinfo --list nbd://localhost

        A block device, dropping pages from the page cache as it streams:

            pynbd serve file /dev/sdb cache=none fadvise=sequential
    """

    name = "file"
    version = "1.0"
    magic_config_key = "file"
    thread_model = ThreadModel.PARALLEL
    nonblocking = False
    config_help = (
        "[file=]<FILENAME>     The filename to serve.\n"
        "dir=<DIRNAME>         A directory containing files to serve.\n"
        "cache=<MODE>          Set use of caching (default, none).\n"
        "fadvise=<LEVEL>       Set fadvise hint (normal, random, sequential)."
    )

    def __init__(self) -> None:
        self._filename: str | None = None
        self._directory: str | None = None
        self._fadvise: int | None = _FADVISE["normal"]
        self._cache_none = False
        self._window = _WriteWindow()

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key in ("file", "dir", "directory"):
            if self._filename is not None or self._directory is not None:
                raise ConfigError(
                    "file: file|dir parameter can only appear once on the command line")
            if not value:
                raise ConfigError(f"file: {key}= must not be empty")
            try:
                path = os.path.realpath(value, strict=True)
            except OSError as e:
                raise ConfigError(f"file: realpath: {value}: {e.strerror}") from None
            if key == "file":
                self._filename = path
            else:
                self._directory = path
        elif key == "fadvise":
            if value not in _FADVISE:
                raise ConfigError(
                    f"file: unknown fadvise mode: {value} "
                    f"(expecting normal, random or sequential)")
            self._fadvise = _FADVISE[value]
        elif key == "cache":
            if value not in ("default", "none"):
                raise ConfigError(
                    f"file: unknown cache mode: {value} (expecting default or none)")
            self._cache_none = value == "none"
        elif key in ("rdelay", "wdelay"):
            raise ConfigError("file: add --filter=delay on the command line")
        elif key in ("fd", "dirfd"):
            raise ConfigError(f"file: {key}= is not supported by pynbd; use file= or dir=")
        else:
            raise ConfigError(f"file: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self._filename is not None:
            try:
                st = os.stat(self._filename)
            except OSError as e:
                raise ConfigError(f"file: {self._filename}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"file: use dir= to serve files within {self._filename}")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(
                    f"file: file is not regular or block device: {self._filename}")
        elif self._directory is not None:
            if not os.path.isdir(self._directory):
                raise ConfigError(f"file: expecting a directory: {self._directory}")
        else:
            raise ConfigError(
                "file: you must supply [file=]<FILENAME> or dir=<DIRNAME> parameter "
                "after the plugin name on the command line")

    def dump_plugin(self) -> list[str]:
        lines = ["file_blksszget=yes", "file_blkzeroout=yes", "file_blkdiscard=yes",
                 "file_extents=yes"]
        if _fallocate is not None:
            lines += ["file_falloc_fl_punch_hole=yes", "file_falloc_fl_zero_range=yes"]
        return lines

    # Connection ------------------------------------------------------------------------
    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        if self._directory is None:
            return None  # just the default export
        names = []
        for entry in os.scandir(self._directory):
            try:
                st = os.stat(entry.path)  # follow symlinks, like nbdkit
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                continue
            try:
                entry.name.encode("utf-8")  # export names travel as UTF-8
            except UnicodeEncodeError:
                continue
            names.append(entry.name)
        return [(n, "") for n in sorted(names)]

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        # In dir= mode there is no default export: the empty name is refused.
        return None if self._directory is not None else ""

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        dir_fd = None
        if self._directory is not None:
            name = export_name
            if name == "":
                raise CommandError(
                    errno.ENOENT, "file: open: cannot use empty file name or export name")
            if "/" in name or "\0" in name or name in (".", ".."):
                raise CommandError(errno.EINVAL, f"file: export name not allowed: {name!r}")
            dir_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            assert self._filename is not None
            name = self._filename
        try:
            fd, can_write = self._open_file(name, readonly, dir_fd)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise CommandError(
                    errno.ENOENT, f"file: file is not regular or block device: {name}")
            os.set_blocking(fd, True)
            if self._fadvise is not None:
                try:
                    os.posix_fadvise(fd, 0, 0, self._fadvise)
                except OSError:
                    pass  # a hint
            return _Handle(fd, name, can_write, st)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_file(name: str, readonly: bool, dir_fd: int | None) -> tuple[int, bool]:
        # O_NONBLOCK so that a FIFO in the way cannot hang the open; open() checks the file
        # type and clears the flag (it means nothing for regular files and devices).
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        if not readonly:
            try:
                return os.open(name, flags | os.O_RDWR, dir_fd=dir_fd), True
            except OSError as e:
                # A read-only file or file system: serve it read-only, as nbdkit does.
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                    raise
        return os.open(name, flags | os.O_RDONLY, dir_fd=dir_fd), False

    def close(self, h: _Handle) -> None:
        if self._cache_none:
            self._window.forget(h.fd)
        os.close(h.fd)

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: _Handle) -> int:
        if h.is_block:
            with h.lseek_lock:
                return os.lseek(h.fd, 0, os.SEEK_END)
        return os.fstat(h.fd).st_size

    def can_write(self, h: _Handle) -> bool:
        return h.can_write

    def is_rotational(self, h: _Handle) -> bool:
        return h.rotational

    def can_multi_conn(self, h: _Handle) -> bool:
        return True

    def can_trim(self, h: _Handle) -> bool:
        return h.is_block or _fallocate is not None

    def can_fua(self, h: _Handle) -> FuaMode:
        return FuaMode.NATIVE

    def can_cache(self, h: _Handle) -> CacheMode:
        return CacheMode.NATIVE

    def can_extents(self, h: _Handle) -> bool:
        # Whether SEEK_HOLE works on this file system at all.
        try:
            with h.lseek_lock:
                os.lseek(h.fd, 0, os.SEEK_HOLE)
        except OSError:
            return False
        return True

    # Data ------------------------------------------------------------------------------
    def pread_nowait(self, h: _Handle, count: int, offset: int, flags: int) -> bytearray:
        """Read from the page cache on the event loop (RWF_NOWAIT); BlockingIOError if the
        data is not all cached, so the server reads in a worker thread instead."""
        if self._cache_none or _RWF_NOWAIT == 0:
            raise BlockingIOError
        buf = bytearray(count)
        if os.preadv(h.fd, [buf], offset, _RWF_NOWAIT) != count:
            raise BlockingIOError
        return buf

    def pread_into(self, h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
        fd = h.fd
        view = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        count = len(view)
        done = 0
        while done < count:
            n = os.preadv(fd, [view[done:]] if done else [view], offset + done)
            if n == 0:
                raise CommandError(errno.EIO, f"file: pread: {h.name}: unexpected end of file")
            done += n
        if self._cache_none:
            os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)

    def pwrite(self, h: _Handle, buf: Any, offset: int, flags: int) -> None:
        fd = h.fd
        view = memoryview(buf).cast("B")
        count = len(view)
        done = 0
        while done < count:
            done += os.pwrite(fd, view[done:] if done else view, offset + done)
        if flags & Flag.FUA:
            os.fdatasync(fd)
        if self._cache_none:
            self._window.evict(fd, offset, count)

    def flush(self, h: _Handle, flags: int) -> None:
        os.fdatasync(h.fd)

    def trim(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        try:
            if h.is_block:
                fcntl.ioctl(h.fd, BLKDISCARD, struct.pack("QQ", offset, count))
            elif h.can_punch_hole:
                fallocate(h.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
        except OSError as e:
            # Trim is advisory: only EIO and EPERM are worth reporting.
            if e.errno in (errno.EIO, errno.EPERM):
                raise
            if e.errno in _ENOTSUP and not h.is_block:
                h.can_punch_hole = False
        if flags & Flag.FUA:
            os.fdatasync(h.fd)

    def zero(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        """Zero with the cheapest method that works (nbdkit's order); ENOTSUP if none does,
        so the server writes zeroes -- or, for a FAST_ZERO request, fails fast."""
        fd = h.fd
        if h.can_punch_hole and flags & Flag.MAY_TRIM:
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
                return self._zeroed(h, flags)
            except OSError as e:
                if e.errno not in _ENOTSUP:
                    raise
                h.can_punch_hole = False
        if h.can_zero_range:
            try:
                fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, count)
                return self._zeroed(h, flags)
            except OSError as e:
                if e.errno not in _ENOTSUP:
                    raise
                h.can_zero_range = False
        if h.can_punch_hole and h.can_fallocate:
            # Punch a hole, then allocate it again: zeroes without trimming.
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
            except OSError as e:
                if e.errno not in _ENOTSUP:
                    raise
                h.can_punch_hole = False
            else:
                try:
                    fallocate(fd, 0, offset, count)
                    return self._zeroed(h, flags)
                except OSError as e:
                    if e.errno not in _ENOTSUP:
                        raise
                    h.can_fallocate = False
        if (h.can_zeroout and not flags & Flag.FAST_ZERO
                and (offset | count) % h.sector_size == 0):
            # BLKZEROOUT may write zeroes itself (slow): never for a fast zero.
            try:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, count))
                return self._zeroed(h, flags)
            except OSError as e:
                if e.errno != errno.ENOTTY:
                    raise
                h.can_zeroout = False
        raise CommandError(errno.ENOTSUP, "file: no fast way to zero; write zeroes instead")

    @staticmethod
    def _zeroed(h: _Handle, flags: int) -> None:
        if flags & Flag.FUA:
            os.fdatasync(h.fd)

    def extents(self, h: _Handle, count: int, offset: int, flags: int) -> list[Extent]:
        fd = h.fd
        req_one = flags & Flag.REQ_ONE
        end = offset + count
        out: list[Extent] = []
        with h.lseek_lock:
            while offset < end:
                try:
                    pos = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    pos = end  # offset is in the final hole of the file
                if pos > offset:
                    out.append((offset, pos - offset, _HOLE))
                    if req_one:
                        break
                offset = pos
                if offset >= end:
                    break
                pos = os.lseek(fd, offset, os.SEEK_HOLE)
                if pos > offset:
                    out.append((offset, pos - offset, 0))
                    if req_one:
                        break
                offset = pos
        return out

    def cache(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        os.posix_fadvise(h.fd, offset, count, os.POSIX_FADV_WILLNEED)
