"""The cow filter: a writable copy-on-write overlay over a plugin that is never written.
Its manual page is :class:`CowFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._caching_store import BlockStore, as_bytes, block_runs, temp_file, zeros
from pynbd.filters._params import parse_bool, parse_size
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Filter,
    Flag,
    FuaMode,
    ThreadModel,
)

__all__ = ["CowFilter"]

log = logging.getLogger("pynbd.filters")

# Block states in the overlay.
_NOT_ALLOCATED, _ALLOCATED, _TRIMMED = 0, 1, 3
_ALLOCATED_B = bytes((_ALLOCATED,))
_STATE_NAMES = {_NOT_ALLOCATED: "not allocated", _ALLOCATED: "allocated", _TRIMMED: "trimmed"}
_UINT32_MAX = 0xFFFFFFFF
#: The largest read of the plugin a cache (prefetch) request makes at once.
MAX_RUN = 8 << 20


class CowFilter(Filter):
    """NAME
        cow - pynbd copy-on-write (COW) filter

    SYNOPSIS
        pynbd serve --filter=cow PLUGIN [PLUGIN-ARGS...]
                    [cow-block-size=N]
                    [cow-on-cache=false|true]
                    [cow-on-read=false|true|/PATH]

    DESCRIPTION
        cow makes a temporary writable copy of the disk: writes (and trims and zeroes) go
        to an overlay, a temporary file, and reads come from the overlay where it was
        written, from the plugin elsewhere. It also makes read-only plugins writable.

        The plugin is opened read-only and never written. What clients write is thrown
        away when the server exits: to keep it, copy the whole disk out (pynbd copy,
        nbdcopy) or make a diff with qemu-img as shown under EXAMPLES.

        Every client sees the same overlay (unlike nbd-server -c, where each connection
        has its own). The plugin must not change size, and must serve the same data to
        every client.

        The overlay is made in $TMPDIR (/var/tmp when TMPDIR is not set) and unlinked at
        once: it takes disk space while the server runs and none after.

        Where this filter differs from nbdkit 1.32's: zero requests are advertised (nbdkit
        1.32 implements them but asks the read-only plugin whether to advertise them, so
        it never does); a block that cow-on-read copies while a client writes to another
        part of it keeps that write (nbdkit can store the older plugin data over it); reads
        of blocks not in the overlay run in parallel with everything else, and a cache
        request reads each run of blocks from the plugin at once.

    PARAMETERS
        cow-block-size=N
            The block size of the overlay: a power of 2 from 4K to 2G. Writes smaller than a
            block read the rest of the block from the plugin. The default is 64K; more than a
            few megabytes is rarely a good idea.

        cow-on-cache=false
            Cache (prefetch) requests do not copy data into the overlay (the default): it
            stays as small as possible.

        cow-on-cache=true
            Cache requests copy the data from the plugin into the overlay, so it can be
            read fast later (the readahead filter in front of cow sends them).

        cow-on-read=false
            Reads do not copy data into the overlay (the default).

        cow-on-read=true
            Reads copy the data they fetch into the overlay, so reading it again is fast:
            worth it over slow plugins (xz, curl...), at the cost of temporary space.

        cow-on-read=/PATH
            Copy on read while the file /PATH (an absolute path) exists, not otherwise: it
            can be switched while the server runs.

        -D cow.verbose=1
            Log every block operation (with -v).

    EXAMPLES
        Serve disk.img writable, leaving the file as it is:

            pynbd serve --filter=cow file disk.img

        Temporary write access to a compressed image, reads kept in the overlay because
        decompressing is slow:

            pynbd serve --filter=cow --filter=xz file disk.xz cow-on-read=true

        Save the changes as a qcow2 diff while the server still runs (it must not stop in
        between, or the changes are gone):

            qemu-img create -F raw -b nbd:localhost -f qcow2 diff.qcow2
            qemu-img rebase -F raw -b disk.img -f qcow2 diff.qcow2
    """

    name = "cow"
    version = "1.0"
    config_help = (
        "cow-block-size=<N>       Set COW block size.\n"
        "cow-on-cache=<BOOL>      Copy cache (prefetch) requests to the overlay.\n"
        "cow-on-read=<BOOL>|/PATH Copy read requests to the overlay.")

    #: ``-D cow.verbose=1``: a debug line for every block operation.
    debug_verbose = 0

    def __init__(self) -> None:
        self.blksize = 65536
        self.cow_on_cache = False
        #: True, False, or the path whose existence turns cow-on-read on.
        self.cow_on_read: bool | str = False
        self._store: BlockStore | None = None
        #: Held for every change of block states, with the overlay write that goes with
        #: it; never while the plugin is read.
        self._lock = threading.Lock()
        #: Serializes read-modify-write of partial blocks (they may read the plugin).
        self._rmw_lock = threading.Lock()

    # ---- configuration -------------------------------------------------------------------
    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "cow-block-size":
            r = parse_size(value)
            if r < 4096 or r > _UINT32_MAX or r & (r - 1):
                raise ConfigError("cow-block-size is out of range (4096..2G) "
                                  "or not a power of 2")
            self.blksize = r
        elif key == "cow-on-cache":
            self.cow_on_cache = parse_bool(value)
        elif key == "cow-on-read":
            self.cow_on_read = value if value.startswith("/") else parse_bool(value)
        else:
            next_config(key, value)

    def get_ready(self, thread_model: ThreadModel) -> None:
        self._store = BlockStore(temp_file("cow", "overlay"), self.blksize)

    def unload(self) -> None:
        if self._store is not None:
            self._store.close()

    @property
    def store(self) -> BlockStore:
        if self._store is None:
            raise CommandError(errno.EIO, "cow: the overlay was not set up")
        return self._store

    def _on_read(self) -> bool:
        cor = self.cow_on_read
        return cor if isinstance(cor, bool) else os.access(cor, os.F_OK)

    def _debug(self, fmt: str, *args: Any) -> None:
        if self.debug_verbose:
            log.debug("cow: " + fmt, *args)

    # ---- per connection ------------------------------------------------------------------
    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(True, export_name)  # the plugin is never written
        return None

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        self.get_size(next, h)  # sizes the overlay before any data call

    def get_size(self, next: Any, h: Any) -> int:
        size = int(next.get_size())
        log.debug("cow: underlying file size: %d", size)
        with self._lock:
            self.store.set_size(size)
        return size

    def block_size(self, next: Any, h: Any) -> tuple[int, int, int]:
        bs = next.block_size()
        if not bs:  # no constraints below: prefer whole overlay blocks
            return (1, self.blksize, _UINT32_MAX)
        minimum, preferred, maximum = bs
        if maximum >= self.blksize:
            preferred = max(preferred, self.blksize)
        return (minimum, preferred, maximum)

    def can_write(self, next: Any, h: Any) -> bool:
        return True

    def can_trim(self, next: Any, h: Any) -> bool:
        return True

    def can_zero(self, next: Any, h: Any) -> bool:
        return True

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        return True  # advertised, and always refused: zeroing here is never faster

    def can_extents(self, next: Any, h: Any) -> bool:
        return True

    def can_flush(self, next: Any, h: Any) -> bool:
        return True

    def can_fua(self, next: Any, h: Any) -> FuaMode:
        return FuaMode.NATIVE  # the overlay is thrown away: FUA and flush have no job

    def can_multi_conn(self, next: Any, h: Any) -> bool:
        return True  # one overlay, consistent between connections

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        next.can_cache()  # asked now, so that cache requests know how to pass it on
        return CacheMode.NATIVE

    # ---- reads ---------------------------------------------------------------------------
    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        st = self.store
        bs = st.blksize
        end = offset + count
        b, last = offset // bs, (end - 1) // bs + 1
        if not self.debug_verbose:
            with self._lock:  # the usual hit: all in the overlay, a view of it, no copy
                whole = st.run(b, last, _ALLOCATED_B) == last - b
            view = st.view(offset, count) if whole else None
            if view is not None:
                return view
        out: bytearray | None = None
        pos = offset
        while pos < end:
            with self._lock:
                state = st.states[b]
                n = st.run(b, last, bytes((state,)))
            hi = min(end, (b + n) * bs)
            self._debug("blk_read_multiple block %d (offset %d) run of length %d is %s",
                        b, b * bs, n, _STATE_NAMES[state])
            piece: Any
            if state == _NOT_ALLOCATED:
                data = st.read_below(next, b, n)
                if self._on_read():
                    self._keep(b, n, data)
                piece = data[pos - b * bs:hi - b * bs]
            elif state == _ALLOCATED:
                piece = st.view(pos, hi - pos)
                if piece is None:
                    piece = bytearray(hi - pos)
                    st.pread_into(memoryview(piece), pos)
            else:
                piece = zeros(hi - pos)
            if out is None and pos == offset and hi == end:
                return piece  # one run: no copy
            if out is None:
                out = bytearray(count)
            out[pos - offset:hi - offset] = piece
            pos = hi
            b += n
        return out

    def _keep(self, blk: int, n: int, data: Any) -> None:
        """Copy blocks just read from the plugin into the overlay: those still not
        allocated (a client may have written one meanwhile)."""
        st, bs = self.store, self.store.blksize
        with self._lock:
            b, end = blk, blk + n
            while b < end:
                state = st.states[b]
                k = st.run(b, end, bytes((state,)))
                if state == _NOT_ALLOCATED:
                    self._debug("cow-on-read saving %d blocks at offset %d into the cache",
                                k, b * bs)
                    st.write(b, data[(b - blk) * bs:(b - blk + k) * bs])
                    st.set_states(b, k, _ALLOCATED)
                b += k

    def _read_block(self, next: Any, blk: int) -> bytearray:
        st = self.store
        with self._lock:
            state = st.states[blk]
        if state == _ALLOCATED:
            return st.read(blk, 1)
        if state == _TRIMMED:
            return bytearray(st.blksize)
        data = st.read_below(next, blk, 1)
        if self._on_read():
            self._keep(blk, 1, data)
        return bytearray(data)

    # ---- writes --------------------------------------------------------------------------
    def _modify(self, next: Any, data: Any, count: int, offset: int, whole: Any) -> None:
        """Apply ``data`` (None: zeroes) to ``count`` bytes at ``offset``: partial blocks by
        read-modify-write under the RMW lock, whole blocks with ``whole(blk, n, data)``."""
        bs = self.store.blksize
        for rel, b, boff, k, partial in block_runs(offset, count, bs):
            piece = None if data is None else data[rel:rel + k]
            if partial:
                with self._rmw_lock:
                    block = self._read_block(next, b)
                    block[boff:boff + k] = piece if piece is not None else bytes(k)
                    self._write(b, 1, block)
            else:
                whole(b, k // bs, piece)

    def _write(self, blk: int, n: int, data: Any) -> None:
        st = self.store
        self._debug("blk_write block %d (offset %d)", blk, blk * st.blksize)
        with self._lock:
            if data is None:
                st.punch(blk, n)  # reads as zeroes, takes no space
            else:
                st.write(blk, data)
            st.set_states(blk, n, _ALLOCATED)

    def _trim(self, blk: int, n: int, data: Any) -> None:
        st = self.store
        self._debug("blk_trim block %d (offset %d)", blk, blk * st.blksize)
        with self._lock:
            st.punch(blk, n)
            st.set_states(blk, n, _TRIMMED)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        data = as_bytes(buf)
        self._modify(next, data, len(data), offset, self._write)
        # FUA is ignored on purpose: the overlay does not outlive the server.

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO:
            raise CommandError(errno.ENOTSUP, "cow: fast zero is not supported")
        self._modify(next, None, count, offset, self._write)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._modify(next, None, count, offset, self._trim)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        pass  # nothing to make durable: the overlay is thrown away at exit

    # ---- cache and extents ---------------------------------------------------------------
    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        mode = "cow" if self.cow_on_cache else {
            CacheMode.NONE: "ignore", CacheMode.EMULATE: "read",
            CacheMode.NATIVE: "passthrough"}[CacheMode(next.can_cache())]
        st = self.store
        bs = st.blksize
        b, last = offset // bs, -(-(offset + count) // bs)
        while b < last:
            with self._lock:
                state = st.states[b]
                n = st.run(b, min(last, b + max(1, MAX_RUN // bs)), bytes((state,)))
            self._debug("blk_cache block %d (offset %d) is %s", b, b * bs,
                        _STATE_NAMES[state])
            if state == _ALLOCATED:
                st.will_need(b, n)
            elif state == _NOT_ALLOCATED and mode != "ignore":
                if mode == "passthrough":
                    next.cache(min(n * bs, st.size - b * bs), b * bs, 0)
                else:
                    data = st.read_below(next, b, n)
                    if mode == "cow":
                        self._keep(b, n, data)
            b += n

    def extents(self, next: Any, h: Any, count: int, offset: int,
                flags: int) -> list[Extent]:
        st = self.store
        bs = st.blksize
        can_extents = bool(next.can_extents())
        b, last = offset // bs, -(-(offset + count) // bs)
        out: list[Extent] = []
        while b < last:
            with self._lock:
                state = st.states[b]
                n = st.run(b, last, bytes((state,)))
            if state != _NOT_ALLOCATED:
                if flags & Flag.REQ_ONE:
                    n = 1  # as nbdkit answers: the first block, not the run
                typ = EXTENT_HOLE | EXTENT_ZERO if state == _TRIMMED else 0
                out.append((b * bs, n * bs, typ))
            elif can_extents:
                # Ask the plugin about the whole run at once (some plugins are slow to ask).
                n = min(n, (_UINT32_MAX - bs + 1) // bs)
                start = b * bs
                out += _extents_full(next, min(n * bs, st.size - start), start, flags)
            else:
                out.append((b * bs, n * bs, 0))
            b += n
            if flags & Flag.REQ_ONE and out:
                break
        return out


def _extents_full(next: Any, count: int, offset: int, flags: int) -> list[Extent]:
    """Extents for all of ``count`` bytes at ``offset`` (a layer may answer for less), as
    nbdkit_extents_full: REQ_ONE is cleared to learn as much as the layer will say."""
    flags &= ~Flag.REQ_ONE
    out: list[Extent] = []
    end = offset + count
    while offset < end:
        got = next.extents(end - offset, offset, flags)
        for off, length, typ in got:
            length = min(length, end - off)
            if length > 0:
                out.append((off, length, typ))
                offset = off + length
    return out
