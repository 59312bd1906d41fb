"""The block store under the cache and cow filters.

A temporary file in ``$TMPDIR`` (``/var/tmp`` by default), unlinked as soon as it is made so
nothing is left behind whatever happens to the server, holds whole blocks of the disk; one
state byte per block says what the file holds for that block (each filter gives the states
their meaning; 0 is always "nothing here"). The file is sparse: it takes space only for the
blocks written to it, and blocks are given back with ``fallocate(PUNCH_HOLE)``.

Reads can be served without a copy: the file is also mapped, and :meth:`BlockStore.view`
hands out read-only views of the mapping. A view stays valid while the server sends it: the
file never shrinks (blocks past a smaller disk are punched instead), and the bytes of a block
change only when a client writes, zeroes or trims them (a request overlapping the read, whose
outcome the protocol leaves open) or when the cache filter reclaims the block (that filter
copies instead of viewing while a size limit is set).

The store itself does no locking: the filters decide which operations must be atomic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from pynbd.errors import CommandError, ConfigError

__all__ = ["BlockStore", "as_bytes", "block_runs", "temp_file", "zeros"]

log = logging.getLogger("pynbd.filters")

#: Where the temporary file goes when TMPDIR is not set (nbdkit's LARGE_TMPDIR).
DEFAULT_TMPDIR = "/var/tmp"
#: The most the store writes (or a caller reads from the plugin) in one call when a range
#: has to be split anyway: zeroes written where holes cannot be punched.
CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
_NONZERO = re.compile(rb"[^\x00]")

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
#: madvise(MADV_POPULATE_READ) (Linux >= 5.14): map pages just written into this process,
#: so that the reads that follow do not fault them in one by one.
_MADV_POPULATE_READ = 22


def _load_fallocate() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def zeros(n: int) -> memoryview:
    """``n`` zero bytes (a view of a shared buffer when it is large enough)."""
    return memoryview(_ZEROS)[:n] if n <= CHUNK else memoryview(bytes(n))


def as_bytes(data: Any) -> memoryview:
    """A flat byte view of any buffer a layer returned."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def block_runs(offset: int, count: int, bs: int) -> Iterator[tuple[int, int, int, int, bool]]:
    """How a request of ``count`` bytes at ``offset`` falls on blocks of ``bs`` bytes, in
    order: (offset in the request, first block, offset in that block, length, partial).
    A partial piece lies inside one block; a whole one covers ``length // bs`` blocks."""
    pos, end = offset, offset + count
    while pos < end:
        b, boff = divmod(pos, bs)
        if boff or end - pos < bs:
            k = min(bs - boff, end - pos)
            yield pos - offset, b, boff, k, True
        else:
            k = (end - pos) // bs * bs
            yield pos - offset, b, 0, k, False
        pos += k


def temp_file(who: str, what: str) -> int:
    """A new temporary file in ``$TMPDIR``, already unlinked; its descriptor is
    close-on-exec. A failure is nbdkit's configuration error ``mkostemp: DIR: REASON``."""
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir is None:
        tmpdir = DEFAULT_TMPDIR
    log.debug("%s: temporary directory for %s: %s", who, what, tmpdir)
    try:
        fd, path = tempfile.mkstemp(dir=tmpdir + "/")
    except OSError as e:
        raise ConfigError(f"mkostemp: {tmpdir}: {e.strerror or e}") from None
    try:
        os.unlink(path)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"unlink: {path}: {e.strerror or e}") from None
    return fd


class BlockStore:
    """Blocks of ``blksize`` bytes in a temporary file, with a state byte per block."""

    def __init__(self, fd: int, blksize: int) -> None:
        self.fd = fd
        self.blksize = blksize
        #: The disk's size in bytes (the last block may be partly past it).
        self.size = 0
        #: One state byte per block of the disk; 0 means the file holds nothing for it.
        self.states = bytearray()
        self._punch = _fallocate is not None
        #: The file's length: it grows with the disk and never shrinks.
        self._file_len = 0
        self._mmap: mmap.mmap | None = None
        self._map: memoryview | None = None
        self._populate = True

    @property
    def nblocks(self) -> int:
        return len(self.states)

    def set_size(self, size: int) -> None:
        """Fit the states and the file to a disk of ``size`` bytes (it may have changed)."""
        n = -(-size // self.blksize)
        old = len(self.states)
        if n > old:
            self.states.extend(bytes(n - old))
        elif n < old:
            del self.states[n:]
            self.punch(n, old - n)  # the file keeps its length: views of it may be out
        if n * self.blksize > self._file_len:
            os.ftruncate(self.fd, n * self.blksize)
            self._file_len = n * self.blksize
            try:
                m = mmap.mmap(self.fd, self._file_len, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ)
            except (OSError, ValueError, OverflowError) as e:
                log.debug("mmap of the temporary file: %s (reads will copy)", e)
                self._mmap = self._map = None
            else:
                self._mmap, self._map = m, memoryview(m)
        self.size = size

    def view(self, offset: int, length: int) -> memoryview | None:
        """A read-only view of ``length`` bytes of the file at ``offset`` (no copy), or
        None if the file could not be mapped."""
        m = self._map
        return m[offset:offset + length] if m is not None else None

    def close(self) -> None:
        self._mmap = self._map = None  # the mapping goes when the last view of it does
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- states ------------------------------------------------------------------------
    def run(self, blk: int, end: int, states: bytes) -> int:
        """How many blocks from ``blk`` (before ``end``) have a state in ``states``."""
        seg = self.states[blk:end]
        return len(seg) - len(seg.lstrip(states))

    def next_used(self, blk: int) -> int:
        """The first block at or after ``blk`` whose state is not 0, or -1."""
        m = _NONZERO.search(self.states, blk)
        return m.start() if m else -1

    def set_states(self, blk: int, n: int, state: int) -> None:
        self.states[blk:blk + n] = bytes((state,)) * n

    # ---- the file ----------------------------------------------------------------------
    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from the file at byte ``offset`` (all of it: the file is sized)."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                buf[done:] = bytes(len(buf) - done)  # past the end of the file: a hole
                return
            done += n

    def read(self, blk: int, n: int) -> bytearray:
        buf = bytearray(n * self.blksize)
        self.pread_into(memoryview(buf), blk * self.blksize)
        return buf

    def write(self, blk: int, data: Any) -> None:
        """Write whole blocks from ``blk`` (``data`` is a multiple of the block size)."""
        mv = as_bytes(data)
        offset = blk * self.blksize
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)
        m = self._mmap
        if m is not None and self._populate and offset + len(mv) <= len(m):
            try:
                m.madvise(_MADV_POPULATE_READ, offset, len(mv))
            except OSError:
                self._populate = False  # an older kernel: reads fault the pages in

    def punch(self, blk: int, n: int) -> None:
        """Make blocks read as zeroes and give their space back (or write zeroes where the
        file system cannot punch holes)."""
        offset, length = blk * self.blksize, n * self.blksize
        if self._punch and _fallocate is not None:
            r = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if r == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, f"fallocate: FALLOC_FL_PUNCH_HOLE: {os.strerror(err)}")
            self._punch = False
        end = offset + length
        while offset < end:
            k = min(CHUNK, end - offset)
            os.pwrite(self.fd, memoryview(_ZEROS)[:k], offset)
            offset += k

    def will_need(self, blk: int, n: int) -> None:
        os.posix_fadvise(self.fd, blk * self.blksize, n * self.blksize,
                         os.POSIX_FADV_WILLNEED)

    def allocated(self) -> int:
        """The space the file takes on disk, in bytes."""
        return os.fstat(self.fd).st_blocks * 512

    # ---- the layer below -----------------------------------------------------------------
    def read_below(self, next: Any, blk: int, n: int) -> memoryview:
        """Blocks ``blk``.. ``blk+n-1`` read from the layer below, the part past the end of
        the disk as zeroes (the last block may be partial)."""
        offset = blk * self.blksize
        want = n * self.blksize
        length = min(want, self.size - offset)
        if length <= 0:
            return memoryview(bytes(want))
        data = as_bytes(next.pread(length, offset, 0))
        if len(data) < length:
            raise CommandError(errno.EIO, "the layer below returned a short read")
        if length == want:
            return data[:want]
        buf = bytearray(want)
        buf[:length] = data[:length]
        return memoryview(buf)

    def write_below(self, next: Any, blk: int, data: Any, flags: int) -> None:
        """Write whole blocks to the layer below, clipped at the end of the disk."""
        offset = blk * self.blksize
        mv = as_bytes(data)
        length = min(len(mv), self.size - offset)
        if length > 0:
            next.pwrite(mv[:length], offset, flags)
