"""The cache filter: keep blocks of the plugin in a temporary file. Its manual page is
:class:`CacheFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._caching_reclaim import Reclaimer
from pynbd.filters._caching_store import CHUNK, BlockStore, as_bytes, block_runs, temp_file
from pynbd.filters._params import parse_bool, parse_size, parse_unsigned
from pynbd.plugin import CacheMode, Extent, Filter, Flag, FuaMode, ThreadModel

__all__ = ["CacheFilter"]

log = logging.getLogger("pynbd.filters")

# Block states in the store.
_NOT_CACHED, _CLEAN, _DIRTY = 0, 1, 3
_CACHED = bytes((_CLEAN, _DIRTY))
_UNCACHED = bytes((_NOT_CACHED,))
_DIRTY_B = bytes((_DIRTY,))

_MODES = ("writeback", "writethrough", "unsafe")
#: The largest read of the plugin a cache (prefetch) request makes at once, and the most
#: a flush writes back at once.
MAX_RUN = 8 << 20


class CacheFilter(Filter):
    """NAME
        cache - pynbd caching filter

    SYNOPSIS
        pynbd serve --filter=cache PLUGIN [PLUGIN-ARGS...]
                    [cache=writeback|writethrough|unsafe]
                    [cache-min-block-size=SIZE]
                    [cache-max-size=SIZE]
                    [cache-high-threshold=N] [cache-low-threshold=N]
                    [cache-on-read=true|false|/PATH]

    DESCRIPTION
        cache keeps blocks of the disk in a temporary file so that a slow or costly plugin
        is asked less often: writes (and, on request, reads) are kept, and later reads of
        those blocks are answered from the file. All clients share one cache.

        Clients often cache better themselves, close to where the data is used; this filter
        is for clients that do not, or (cache=unsafe) to make a client's flush requests
        free, at the risk its name says.

        Only the disk's contents are cached. For extents, put the cacheextents filter
        between this filter and the plugin; to speed up sequential reads put the readahead
        (or scan) filter in front of this one.

        The temporary file is made in $TMPDIR (/var/tmp when TMPDIR is not set) and
        unlinked at once: it takes disk space while the server runs and none after.

        Where this filter differs from nbdkit 1.32's: a block written to the cache and not
        yet to the plugin is written to the plugin before cache-max-size reclaims its space
        (nbdkit drops it and the write is lost); extents report such blocks as data (nbdkit
        passes the plugin's answer, which may call them zero); a trim drops the blocks it
        covers from the cache before it reaches the plugin (so later reads and extents agree
        with the plugin); reads of blocks not in the cache run in parallel (nbdkit reads one
        request at a time), and runs of blocks go to the plugin as one request.

    PARAMETERS
        cache=writeback
            Writes go to the cache only; they reach the plugin when the client flushes (or
            writes with FUA). The default, and safe with clients that flush when they must
            (modern Linux and any well-written NBD client).

        cache=writethrough
            Writes go to the cache and to the plugin. Less effective, but needed when the
            client does not flush correctly.

        cache=unsafe
            Flush requests are ignored and succeed: the plugin is written only when a dirty
            block is reclaimed (see cache-max-size). Data is lost when the server stops:
            for tests, or for data that can be made again cheaply.

        cache-min-block-size=SIZE
            The smallest block the cache uses: a power of 2, at least 4096. The block size
            is this or the block size of the file system holding the temporary file,
            whichever is larger. The default is 64K.

        cache-max-size=SIZE
        cache-high-threshold=N
        cache-low-threshold=N
            Limit the space the cache takes to about SIZE (at least 1M). Once it takes more
            than N% of SIZE (the high threshold, default 95), blocks are given back, least
            recently used first, until it takes less than the low threshold (default 80%).
            0 < low < high. This punches holes in the temporary file (fallocate), which the
            file system must support. Without it the cache may grow to the size of the disk.

        cache-on-read=false
            Do not keep what is read (the default): only writes and cache (prefetch)
            requests fill the cache.

        cache-on-read=true
            Keep every block read from the plugin, so later reads of it are fast. If the
            plugin's data can change behind the server's back, reads then return stale data.

        cache-on-read=/PATH
            Cache on read while the file /PATH (an absolute path) exists: lets a user turn
            it on and off while the server runs.

        -D cache.verbose=1
            Log every block operation (with -v).

    EXAMPLES
        A slow remote disk, read-only, with reads cached and the readahead filter in front:

            pynbd serve -r --filter=readahead --filter=cache nbd uri=nbd://remote \\
                cache-on-read=true

        A cache of at most 1G in a directory with room for it:

            TMPDIR=/var/tmp/big pynbd serve --filter=cache file disk.img cache-max-size=1G
    """

    name = "cache"
    version = "1.0"
    config_help = (
        "cache=MODE                Set cache MODE, one of writeback (default),\n"
        "                          writethrough, or unsafe.\n"
        "cache-on-read=BOOL|/PATH  Set to true to cache on reads (default false).\n"
        "cache-min-block-size=SIZE Set the minimum block size (default 64K).\n"
        "cache-max-size=SIZE       Set maximum space used by cache.\n"
        "cache-high-threshold=PCT  Percentage of max size where reclaim begins.\n"
        "cache-low-threshold=PCT   Percentage of max size where reclaim ends.")

    #: ``-D cache.verbose=1``: a debug line for every block operation.
    debug_verbose = 0

    def __init__(self) -> None:
        self.mode = "writeback"
        self.min_block_size = 65536
        self.max_size = -1
        self.hi_thresh = 95
        self.lo_thresh = 80
        #: True, False, or the path whose existence turns cache-on-read on.
        self.cache_on_read: bool | str = False
        self._store: BlockStore | None = None
        self._reclaimer: Reclaimer | None = None
        #: Held for every change of block states and for cache file I/O; plugin I/O
        #: happens without it except inside a read-modify-write, a write-through, a flush.
        self._lock = threading.Lock()

    # ---- configuration -------------------------------------------------------------------
    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "cache":
            if value not in _MODES:
                raise ConfigError("invalid cache parameter, should be "
                                  "writeback|writethrough|unsafe")
            self.mode = value
        elif key == "cache-min-block-size":
            r = parse_size(value)
            if r < 4096 or r & (r - 1) or r > 0xFFFFFFFF:
                raise ConfigError("cache-min-block-size is not a power of 2, "
                                  "or is too small or too large")
            self.min_block_size = r
        elif key == "cache-max-size":
            r = parse_size(value)
            if r < 1024 * 1024:  # nbdkit's floor, "just to keep out of trouble"
                raise ConfigError("cache-max-size is too small")
            self.max_size = r
        elif key in ("cache-high-threshold", "cache-low-threshold"):
            n = parse_unsigned(key, value)
            if n == 0:
                raise ConfigError(f"{key} must be greater than zero")
            if key == "cache-high-threshold":
                self.hi_thresh = n
            else:
                self.lo_thresh = n
        elif key == "cache-on-read":
            self.cache_on_read = value if value.startswith("/") else parse_bool(value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.max_size != -1 and self.lo_thresh >= self.hi_thresh:
            raise ConfigError("cache-low-threshold must be less than cache-high-threshold")

    def get_ready(self, thread_model: ThreadModel) -> None:
        fd = temp_file("cache", "cache")
        try:
            blksize = max(self.min_block_size, os.fstatvfs(fd).f_bsize)
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"fstatvfs: {e.strerror}") from None
        log.debug("cache: block size: %d", blksize)
        store = BlockStore(fd, blksize)
        self._store = store
        self._reclaimer = Reclaimer(store, self.max_size, self.hi_thresh, self.lo_thresh,
                                    self._write_back, _DIRTY)

    def unload(self) -> None:
        if self._store is not None:
            self._store.close()

    def _on_read(self) -> bool:
        cor = self.cache_on_read
        return cor if isinstance(cor, bool) else os.access(cor, os.F_OK)

    @property
    def store(self) -> BlockStore:
        if self._store is None:
            raise CommandError(errno.EIO, "cache: the cache was not set up")
        return self._store

    @property
    def reclaimer(self) -> Reclaimer:
        assert self._reclaimer is not None
        return self._reclaimer

    def _debug(self, fmt: str, *args: Any) -> None:
        if self.debug_verbose:
            log.debug("cache: " + fmt, *args)

    # ---- per connection ------------------------------------------------------------------
    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        self.get_size(next, h)  # sizes the cache before any data call

    def get_size(self, next: Any, h: Any) -> int:
        size = int(next.get_size())
        log.debug("cache: underlying file size: %d", size)
        with self._lock:
            self.store.set_size(size)
            self.reclaimer.set_size()
        return size

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        return CacheMode.NATIVE  # this filter is the cache

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        return True  # advertised, and always refused: zeroing here is never faster

    def can_flush(self, next: Any, h: Any) -> bool:
        return True if self.mode == "unsafe" else bool(next.can_flush())

    def can_fua(self, next: Any, h: Any) -> FuaMode:
        return FuaMode.NATIVE if self.mode == "unsafe" else FuaMode(next.can_fua())

    def can_multi_conn(self, next: Any, h: Any) -> bool:
        # One cache serves every connection, and a flush writes back every connection's
        # blocks; in writethrough mode the plugin's own consistency decides.
        return bool(next.can_multi_conn()) if self.mode == "writethrough" else True

    # ---- reads ---------------------------------------------------------------------------
    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        st = self.store
        bs = st.blksize
        end = offset + count
        b, last = offset // bs, (end - 1) // bs + 1
        if self.max_size == -1 and not self.debug_verbose:
            with self._lock:  # the usual hit: all cached, a view of the file, no copy
                if _NOT_CACHED not in st.states[b:last]:
                    view = st.view(offset, count)
                    if view is not None:
                        return view
        out: bytearray | None = None
        pos = offset
        while pos < end:
            with self._lock:
                self.reclaimer.reclaim(next)
                cached = st.states[b] != _NOT_CACHED
                n = st.run(b, last, _CACHED if cached else _UNCACHED)
                hi = min(end, (b + n) * bs)
                self._debug("blk_read_multiple block %d (offset %d) is %s", b, b * bs,
                            "cached" if cached else "not cached")
                if cached:
                    self.reclaimer.touch(b, n)
                    piece = self._cached(pos, hi)
                else:
                    epoch = self.reclaimer.epoch
            if not cached:  # from the plugin, without the lock: reads run in parallel
                data = st.read_below(next, b, n)
                if self._on_read():
                    self._store_clean(b, n, data, epoch)
                piece = data[pos - b * bs:hi - b * bs]
            if out is None and pos == offset and hi == end:
                return piece  # one run: no copy
            if out is None:
                out = bytearray(count)
            out[pos - offset:hi - offset] = piece
            pos = hi
            b += n
        return out

    def _cached(self, pos: int, hi: int) -> Any:
        """Bytes ``pos``..``hi`` of the cache file (lock held): a view of its mapping, or a
        copy when a size limit is set (reclaim could punch the blocks under a view)."""
        st = self.store
        if self.max_size == -1:
            view = st.view(pos, hi - pos)
            if view is not None:
                return view
        buf = bytearray(hi - pos)
        st.pread_into(memoryview(buf), pos)
        return buf

    def _store_clean(self, blk: int, n: int, data: memoryview, epoch: int) -> None:
        """Keep blocks just read from the plugin, those still not cached (a write may have
        cached newer data meanwhile) and only if no block left the cache meanwhile."""
        st, bs = self.store, self.store.blksize
        with self._lock:
            if epoch != self.reclaimer.epoch:
                return
            b, end = blk, blk + n
            while b < end:
                if st.states[b] != _NOT_CACHED:
                    b += st.run(b, end, _CACHED)
                    continue
                k = st.run(b, end, _UNCACHED)
                self._debug("cache-on-read block %d (offset %d)", b, b * bs)
                st.write(b, data[(b - blk) * bs:(b - blk + k) * bs])
                st.set_states(b, k, _CLEAN)
                self.reclaimer.touch(b, k)
                b += k

    def _read_block(self, next: Any, blk: int) -> bytearray:
        """One whole block, from the cache or the plugin (the lock is held)."""
        st = self.store
        self.reclaimer.reclaim(next)
        self._debug("blk_read block %d (offset %d) is %s", blk, blk * st.blksize,
                    "cached" if st.states[blk] != _NOT_CACHED else "not cached")
        if st.states[blk] != _NOT_CACHED:
            self.reclaimer.touch(blk)
            return st.read(blk, 1)
        block = bytearray(st.read_below(next, blk, 1))
        if self._on_read():
            st.write(blk, block)
            st.states[blk] = _CLEAN
            self.reclaimer.touch(blk)
        return block

    # ---- writes --------------------------------------------------------------------------
    def _fua_by_flush(self, next: Any, flags: int) -> bool:
        return bool(flags & Flag.FUA) and (
            self.mode == "unsafe" or next.can_fua() == FuaMode.EMULATE)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        need_flush = self._fua_by_flush(next, flags)
        if need_flush:
            flags &= ~Flag.FUA
        data = as_bytes(buf)
        self._write(next, data, len(data), offset, flags)
        if need_flush:
            self.flush(next, h, 0)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO:
            # Zeroes are written block by block, never faster than writing data.
            raise CommandError(errno.ENOTSUP, "cache: fast zero is not supported")
        flags &= ~Flag.MAY_TRIM
        need_flush = self._fua_by_flush(next, flags)
        if need_flush:
            flags &= ~Flag.FUA
        self._write(next, None, count, offset, flags)
        if need_flush:
            self.flush(next, h, 0)

    def _write(self, next: Any, data: memoryview | None, count: int, offset: int,
               flags: int) -> None:
        """Write ``data`` (None: zeroes): partial blocks read, modified and written under
        the lock; whole blocks written as one run."""
        bs = self.store.blksize
        for rel, b, boff, k, partial in block_runs(offset, count, bs):
            piece = None if data is None else data[rel:rel + k]
            with self._lock:
                if partial:
                    block = self._read_block(next, b)
                    block[boff:boff + k] = piece if piece is not None else bytes(k)
                    self._write_blocks(next, b, 1, block, flags)
                else:
                    self._write_blocks(next, b, k // bs, piece, flags)

    def _write_blocks(self, next: Any, blk: int, n: int, data: Any, flags: int) -> None:
        """Write ``n`` whole blocks (``data`` None: zeroes) as the mode says (lock held)."""
        st = self.store
        self.reclaimer.reclaim(next, n)
        through = self.mode == "writethrough" or (
            self.mode == "writeback" and bool(flags & Flag.FUA))
        self._debug("%s block %d (offset %d)", "writethrough" if through else "writeback",
                    blk, blk * st.blksize)
        if through:
            # The plugin first: if it fails, the cache still agrees with it.
            if data is None:
                self._zero_below(next, blk, n, flags)
            else:
                st.write_below(next, blk, data, flags)
        try:
            if data is None:
                st.punch(blk, n)
            else:
                st.write(blk, data)
        except OSError:
            st.set_states(blk, n, _NOT_CACHED)  # whatever the file holds now, forget it
            self.reclaimer.dropped()
            raise
        st.set_states(blk, n, _CLEAN if through else _DIRTY)
        self.reclaimer.touch(blk, n)

    def _zero_below(self, next: Any, blk: int, n: int, flags: int) -> None:
        """Zeroes written to the plugin with pwrite, as nbdkit's filter writes them."""
        bs = self.store.blksize
        step = max(1, CHUNK // bs)
        zeros = bytes(min(n, step) * bs)
        for b in range(blk, blk + n, step):
            k = min(step, blk + n - b)
            self.store.write_below(next, b, memoryview(zeros)[:k * bs], flags)

    def _write_back(self, next: Any, blk: int, n: int = 1) -> None:
        """Write dirty blocks to the plugin and mark them clean (lock held)."""
        st = self.store
        self._debug("writethrough block %d (offset %d)", blk, blk * st.blksize)
        st.write_below(next, blk, st.read(blk, n), 0)
        st.set_states(blk, n, _CLEAN)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        if self.mode == "unsafe":
            return
        # Write back every dirty block (in writethrough mode there should be none), then
        # flush the plugin. A failure does not stop the others; the first one is reported.
        st = self.store
        failed: list[int] = []
        b = 0
        while True:
            with self._lock:
                b = st.states.find(_DIRTY_B, b)
                if b == -1:
                    break
                n = st.run(b, min(st.nblocks, b + max(1, MAX_RUN // st.blksize)), _DIRTY_B)
                try:
                    self._write_back(next, b, n)
                except (OSError, CommandError) as e:
                    log.error("cache: flush of block %d failed", b)
                    failed.append(e.errno or errno.EIO)
            b += n
        try:
            next.flush(0)
        except (OSError, CommandError) as e:
            failed.append(e.errno or errno.EIO)
        if failed:
            raise CommandError(failed[0], "cache: flush failed")

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        # Whole blocks the trim covers leave the cache, so that what is read afterwards (and
        # what extents say) is the plugin's. nbdkit 1.32 keeps them: reads of a trimmed
        # range can then return the old data while extents say it reads as zeroes.
        st = self.store
        first = -(-offset // st.blksize)
        last = (offset + count) // st.blksize if offset + count < st.size else st.nblocks
        if first < last:
            with self._lock:
                st.punch(first, last - first)
                st.set_states(first, last - first, _NOT_CACHED)
                self.reclaimer.dropped()
        next.trim(count, offset, flags)

    # ---- cache and extents ---------------------------------------------------------------
    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        """Prefetch: blocks not cached are read from the plugin and kept (whatever
        cache-on-read says); cached blocks are hinted to the kernel."""
        st = self.store
        b, last = offset // st.blksize, -(-(offset + count) // st.blksize)
        while b < last:
            with self._lock:
                self.reclaimer.reclaim(next)
                cached = st.states[b] != _NOT_CACHED
                n = st.run(b, min(last, b + max(1, MAX_RUN // st.blksize)),
                           _CACHED if cached else _UNCACHED)
                self._debug("blk_cache block %d (offset %d) is %s", b, b * st.blksize,
                            "cached" if cached else "not cached")
                if cached:
                    st.will_need(b, n)
                    self.reclaimer.touch(b, n)
                else:
                    epoch = self.reclaimer.epoch
            if not cached:
                self._store_clean(b, n, st.read_below(next, b, n), epoch)
            b += n

    def extents(self, next: Any, h: Any, count: int, offset: int,
                flags: int) -> list[Extent]:
        exts: list[Extent] = next.extents(count, offset, flags)
        st = self.store
        end = min(st.nblocks, -(-(offset + count) // st.blksize))
        dirty: list[tuple[int, int]] = []
        with self._lock:
            b = st.states.find(_DIRTY_B, offset // st.blksize, end)
            while b != -1:
                n = st.run(b, end, _DIRTY_B)
                dirty.append((b * st.blksize, (b + n) * st.blksize))
                b = st.states.find(_DIRTY_B, b + n, end)
        return _as_data(exts, dirty) if dirty else exts


def _as_data(exts: list[Extent], ranges: list[tuple[int, int]]) -> list[Extent]:
    """``exts`` with the byte ranges in ``ranges`` (sorted) reported as data: the plugin
    has not seen what the cache holds there."""
    out: list[Extent] = []
    for off, length, typ in exts:
        pos, e_end = off, off + length
        for lo, hi in ranges:
            if hi <= pos or lo >= e_end:
                continue
            if lo > pos:
                out.append((pos, lo - pos, typ))
            top = min(hi, e_end)
            out.append((max(lo, pos), top - max(lo, pos), 0))
            pos = top
        if pos < e_end:
            out.append((pos, e_end - pos, typ))
    return out
