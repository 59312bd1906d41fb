"""The memory plugin: a sparse RAM disk. Its manual page is :class:`MemoryPlugin`'s docstring."""

from __future__ import annotations

import mmap
import threading
from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
    parse_size,
)
from pynbd.plugins._common import zeroes
from pynbd.plugins._memory_alloc import make_store, parse_allocator

__all__ = ["MemoryPlugin"]

# Pages of 32 KiB, as nbdkit's sparse allocator (the granularity of holes in extents and of
# memory given back). Measured (4k pread/pwrite, 256k pread) at 32, 64, 128 and 256 KiB: 4k
# requests cost the same whatever the size; only 256k reads differ, by whether they must join
# pages (a copy) -- which runs (below) avoid without coarser holes.
_SHIFT = 15
_PAGE = 1 << _SHIFT
_MASK = _PAGE - 1
#: Shared zeroes handed out (as read-only views, never copied) for reads of absent pages.
_ZERO_BYTES = bytes(_PAGE)
_ZERO = memoryview(_ZERO_BYTES)
#: A private all-zero bytearray: ``_ZERO_CMP == view`` is a memcmp for any buffer (bytes and
#: memoryview comparisons would copy or go byte by byte). Never written.
_ZERO_CMP = bytearray(_PAGE)
_HOLE = EXTENT_HOLE | EXTENT_ZERO
#: Most pages allocated as one run: bounds the memory a run keeps alive once most of its
#: pages are freed (its bytearray lives while any page does).
_MAX_RUN = 256
#: Pages examined by one extents call at most when many pages are allocated: bounds the
#: work per request (the answer then stops early; clients ask again from where it ended).
_EXTENTS_WINDOW = 1 << 16


class _Run:
    """Consecutive pages allocated together by one write covering them all.

    The pages are slices of one bytearray, so a read spanning them is one slice of ``view``
    (read-only, no copy). ``intact`` turns false, for good, once any of its pages is freed.
    """

    __slots__ = ("end", "intact", "start", "view", "wview")

    def __init__(self, start: int, end: int, wview: memoryview) -> None:
        self.start = start
        self.end = end
        self.wview = wview
        self.view = wview.toreadonly()
        self.intact = True


#: Pages per slab: one anonymous mapping of 8 MiB (a run never spans two slabs).
_SLAB_PAGES = _MAX_RUN


class _Allocator:
    """Pages carved out of anonymous memory maps ("slabs").

    Fresh anonymous memory is zero and costs nothing until touched, so allocating a page
    writes nothing: a 4 KiB write into a new 32 KiB page faults in one 4 KiB frame, not
    eight (a zero-filled bytearray would touch them all). A freed page is given back to the
    kernel with madvise(MADV_DONTNEED), which also makes it read as zeroes again, and reused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._next = _SLAB_PAGES  # next never-used page index in the newest slab
        self._free: list[tuple[int, int]] = []  # (slab number, page index) given back

    def alloc(self, k: int = 1) -> tuple[memoryview, int, int]:
        """k contiguous zero pages (k <= _SLAB_PAGES): (writable view, slab, first index)."""
        with self._lock:
            if k == 1 and self._free:
                sn, i = self._free.pop()
            else:
                if self._next + k > _SLAB_PAGES:
                    # the rest of the newest slab goes to single-page allocations
                    last = len(self._maps) - 1
                    self._free.extend((last, j) for j in range(self._next, _SLAB_PAGES))
                    # private: MADV_DONTNEED then gives zero pages (shared maps keep data)
                    mm = mmap.mmap(-1, _SLAB_PAGES << _SHIFT, flags=mmap.MAP_PRIVATE)
                    self._maps.append(mm)
                    self._views.append(memoryview(mm))
                    self._next = 0
                sn, i = len(self._maps) - 1, self._next
                self._next += k
            return self._views[sn][i << _SHIFT:(i + k) << _SHIFT], sn, i

    def release(self, sn: int, i: int) -> None:
        """Give page i of slab sn back to the kernel; it reads as zeroes when reused."""
        with self._lock:
            self._maps[sn].madvise(mmap.MADV_DONTNEED, i << _SHIFT, _PAGE)
            self._free.append((sn, i))


class MemoryPlugin(Plugin):
    """NAME
        memory - pynbd virtual memory plugin (a sparse RAM disk)

    SYNOPSIS
        pynbd serve memory [size=]SIZE [allocator=sparse|malloc[,mlock=true]|zstd]

    DESCRIPTION
        memory is a plugin for pynbd which stores a single disk image in virtual memory and
        discards it when pynbd exits. It is meant for testing and benchmarking clients, and for
        scratch space.

        The disk is sparse: it starts out as zeroes, and memory is only used for the parts that
        are written, in pages of 32 KiB. Trimming or zeroing a whole page gives its memory back,
        and so does zeroing the last non-zero byte of a page. So a disk far larger than the
        machine's RAM can be served, up to the largest size NBD allows, 2^63-1 bytes
        ("the giant disk"): only what clients write takes memory.

        All clients share the same disk: what one connection writes, every other connection
        reads. Requests are answered on the server's event loop. Page memory comes from
        anonymous memory maps, so a new page costs nothing until written and a freed page is
        given back to the kernel at once. Flush and FUA do nothing (there is nothing to make durable), and the
        plugin advertises multi-conn, trim, fast zero, cache and block status (extents: holes
        for pages never written or given back, data for the rest).

        This is nbdkit-memory-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk, in bytes or with a suffix: 512, 64K, 1M, 10G, 8E,
            2s (sectors of 512 bytes). At most 2^63-1. This parameter is required; "size=" may
            be omitted (it is the magic parameter), so "memory 1G" works.

        allocator=sparse
            The default: a sparse table of pages, as described above.

        allocator=malloc[,mlock=true]
            The whole disk is one block of memory, reserved (not touched) at start: no
            holes (block status reports data everywhere), and no page table to walk. With
            mlock=true the block is locked in RAM (see mlock(2); the memory limits of the
            user apply).

        allocator=zstd
            Pages of 32 KiB are kept compressed with zstd (needs the zstandard package:
            pip install 'pynbd[zstd]'), so compressible data takes less memory, at the cost
            of compressing on each write and decompressing on each read. Pages of zeroes are
            holes. (nbdkit 1.32 crashes on block status with this allocator; pynbd reports
            the holes.)

    EXAMPLES
        A 1 GiB RAM disk on a Unix socket, used by qemu-img:

            pynbd serve -U - memory 1G --run 'qemu-img info "$uri"'

        The giant disk, 2^63-1 bytes, mostly holes:

            pynbd serve memory size=9223372036854775807

        Format and mount it with the kernel client:

            pynbd serve memory 10G
            nbd-client localhost /dev/nbd0
            mkfs.ext4 /dev/nbd0
    """

    name = "memory"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = (
        "[size=]<SIZE>         (required) Size of the backing disk\n"
        "allocator=sparse|malloc[,mlock=true]|zstd  Backend allocation strategy"
    )

    def __init__(self) -> None:
        self._size: int | None = None
        #: page number -> writable memoryview of _PAGE bytes (a bytearray, or a slice of a
        #: run's bytearray)
        self._pages: dict[int, memoryview] = {}
        #: page number -> its run, for pages allocated as part of a run
        self._runs: dict[int, _Run] = {}
        # Writers run without a lock. Trim/zero, which may free a page that still holds a
        # writer's bytes, run under _lock and bump _seq (odd while in progress: a seqlock).
        # A writer that sees _seq change under it redoes its write under the lock.
        self._lock = threading.RLock()  # re-entered: a redone write may allocate pages
        self._seq = 0
        self._alloc = _Allocator()
        #: page number -> (slab number, page index) of its memory, to give it back
        self._loc: dict[int, tuple[int, int]] = {}
        #: allocator=malloc or zstd: the store that serves the data calls (else None)
        self._allocator = "sparse"
        self._store: Any = None

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key == "size":
            self._size = parse_size(value, "size")
        elif key == "allocator":
            parse_allocator(value)
            self._allocator = value
        else:
            raise ConfigError(f"memory: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self._size is None:
            raise ConfigError("memory: you must specify size=<SIZE> on the command line")
        self._store = make_store(self._allocator, self._size)

    def dump_plugin(self) -> list[str]:
        return ["memory_allocators=sparse,malloc,zstd", f"memory_page_size={_PAGE}"]

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: Any) -> int:
        assert self._size is not None
        return self._size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def can_fast_zero(self, h: Any) -> bool:
        return True

    # Data ------------------------------------------------------------------------------
    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        if self._store is not None:
            return self._store.pread(count, offset)
        a = offset & _MASK
        b = a + count
        if b <= _PAGE:
            # Within one page: a copy of its bytes (a page given back by trim or zero may be
            # reused for another offset while a reply still waits to be sent, so no views of
            # pages leave the plugin), or a view of the shared zeroes.
            page = self._pages.get(offset >> _SHIFT)
            if page is None:
                return _ZERO[a:b]
            return page[a:b].tobytes()
        return self._pread_span(count, offset)

    def _pread_span(self, count: int, offset: int) -> Any:
        pn = offset >> _SHIFT
        last = (offset + count - 1) >> _SHIFT
        run = self._runs.get(pn)
        if run is not None and run.intact and last < run.end:
            # All in one run: one copy of one slice of its memory.
            start = offset - (run.start << _SHIFT)
            return run.view[start:start + count].tobytes()
        get = self._pages.get
        a = offset & _MASK
        parts = []
        present = False
        left = count
        while left > 0:
            n = _PAGE - a
            n = min(n, left)
            page = get(pn)
            if page is None:
                parts.append(_ZERO[a:a + n])
            else:
                parts.append(page[a:a + n])
                present = True
            left -= n
            pn += 1
            a = 0
        if not present:
            return zeroes(count)
        return b"".join(parts)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        if self._store is not None:
            self._store.pwrite(buf, offset)
            return
        seq = self._seq
        a = offset & _MASK
        count = len(buf)
        if a + count <= _PAGE:
            pages = self._pages
            pn = offset >> _SHIFT
            page = pages.get(pn)
            if page is None:
                page = self._new_page(pn)
            page[a:a + count] = buf
        else:
            self._write_span(buf, offset)
        if seq & 1 or seq != self._seq:
            # A trim or zero ran meanwhile and may have freed a page we wrote into.
            with self._lock:
                self._write_span(buf, offset)

    def _write_span(self, buf: Any, offset: int) -> None:
        pages = self._pages
        get = pages.get
        src = memoryview(buf).cast("B")
        pn = offset >> _SHIFT
        total = len(src)
        run = self._runs.get(pn)
        if run is not None and run.intact and (offset + total - 1) >> _SHIFT < run.end:
            # All in one run: one copy into its buffer.
            start = offset - (run.start << _SHIFT)
            run.wview[start:start + total] = src
            return
        a = offset & _MASK
        pos = 0
        while pos < total:
            n = _PAGE - a
            n = min(n, total - pos)
            page = get(pn)
            if page is None:
                if n == _PAGE and pos + 2 * _PAGE <= total and get(pn + 1) is None:
                    # Two or more whole absent pages: allocate them as one run.
                    k = 2
                    while (k < _MAX_RUN and pos + (k + 1) * _PAGE <= total
                           and get(pn + k) is None):
                        k += 1
                    self._new_run(pn, k, src[pos:pos + k * _PAGE])
                    pos += k * _PAGE
                    pn += k
                    continue
                page = self._new_page(pn)
            page[a:a + n] = src[pos:pos + n]
            pos += n
            pn += 1
            a = 0

    def _new_page(self, pn: int) -> memoryview:
        """Page pn, allocated (zero) if absent."""
        with self._lock:
            page = self._pages.get(pn)
            if page is None:
                page, sn, i = self._alloc.alloc(1)
                self._pages[pn] = page
                self._loc[pn] = (sn, i)
            return page

    def _new_run(self, pn: int, k: int, data: memoryview) -> None:
        with self._lock:
            view, sn, first = self._alloc.alloc(k)
            view[:] = data
            run = _Run(pn, pn + k, view)
            pages = self._pages
            runs = self._runs
            for i in range(k):
                mine = view[i << _SHIFT:(i + 1) << _SHIFT]
                page = pages.setdefault(pn + i, mine)
                if page is mine:
                    runs[pn + i] = run
                    self._loc[pn + i] = (sn, first + i)
                else:  # allocated meanwhile by an overlapping write: write there too
                    page[:] = mine
                    run.intact = False
                    self._alloc.release(sn, first + i)

    def flush(self, h: Any, flags: int) -> None:
        pass

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._zero_range(count, offset)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        # Zeroing is always fast here (and FUA a no-op), whatever the flags say.
        self._zero_range(count, offset)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def _zero_range(self, count: int, offset: int) -> None:
        if count <= 0:
            return
        if self._store is not None:
            self._store.zero(count, offset)
            return
        end = offset + count
        first = offset >> _SHIFT
        last = (end - 1) >> _SHIFT
        with self._lock:
            if first == last:
                self._zero_partial(first, offset & _MASK, count)
                return
            # Head and tail pages may be partial; the pages between are freed outright.
            full_lo, full_hi = first, last + 1  # [full_lo, full_hi) wholly covered
            a = offset & _MASK
            if a:
                self._zero_partial(first, a, _PAGE - a)
                full_lo += 1
            tail = end & _MASK
            if tail:
                self._zero_partial(last, 0, tail)
                full_hi -= 1
            self._free_pages(full_lo, full_hi)

    def _free(self, pn: int) -> None:
        """Forget page pn (locked). Its run, if any, can no longer serve spanning reads."""
        run = self._runs.pop(pn, None)
        if run is not None:
            run.intact = False
        if self._pages.pop(pn, None) is not None:
            loc = self._loc.pop(pn, None)
            if loc is not None:
                self._alloc.release(*loc)

    def _zero_partial(self, pn: int, a: int, n: int) -> None:
        """Zero n bytes at a in page pn, freeing the page if it is then all zero (locked)."""
        page = self._pages.get(pn)
        if page is None:
            return
        if n == _PAGE:
            self._free(pn)
            return
        self._seq += 1  # odd: a lock-free writer finishing now must redo under the lock
        try:
            page[a:a + n] = _ZERO[:n]
            if _ZERO_CMP == page:
                self._free(pn)
        finally:
            self._seq += 1

    def _free_pages(self, lo: int, hi: int) -> None:
        pages = self._pages
        if hi <= lo or not pages:
            return
        if hi - lo <= len(pages):
            doomed = pages.keys() & range(lo, hi)
        else:
            doomed = {k for k in list(pages) if lo <= k < hi}
        for pn in doomed:
            self._free(pn)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        size = self._size
        assert size is not None
        if self._store is not None:
            return self._store.extents(count, offset, flags, size)  # type: ignore[no-any-return]
        end = offset + count
        end = min(end, size)
        if end <= offset:
            return []
        pages = self._pages
        p0 = offset >> _SHIFT
        p1 = ((end - 1) >> _SHIFT) + 1
        npages = len(pages)
        if npages > _EXTENTS_WINDOW and p1 - p0 > _EXTENTS_WINDOW:
            p1 = p0 + _EXTENTS_WINDOW
        # Allocated page numbers in [p0, p1), whichever is cheaper: walk the range or the keys.
        if p1 - p0 <= npages:
            alloc = sorted(pages.keys() & range(p0, p1))
        else:
            alloc = sorted([k for k in list(pages) if p0 <= k < p1])
        req_one = flags & Flag.REQ_ONE
        out: list[Extent] = []
        cur = p0  # first page not yet described
        i = 0
        n = len(alloc)
        while i < n:
            k = alloc[i]
            if k > cur:
                out.append((cur << _SHIFT, (k - cur) << _SHIFT, _HOLE))
                if req_one:
                    return out
            j = i + 1
            while j < n and alloc[j] == alloc[j - 1] + 1:
                j += 1
            cur = alloc[j - 1] + 1
            out.append((k << _SHIFT, (cur - k) << _SHIFT, 0))
            if req_one:
                return out
            i = j
        if cur < p1:
            out.append((cur << _SHIFT, (p1 - cur) << _SHIFT, _HOLE))
        # The last page of the disk may be partial.
        lo, length, typ = out[-1]
        if lo + length > size:
            out[-1] = (lo, size - lo, typ)
        return out
