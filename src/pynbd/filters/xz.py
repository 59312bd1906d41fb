"""The xz filter: serve the uncompressed contents of an xz file, with random access. Its
manual page is :class:`XzFilter`'s docstring."""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._formats_xz import XzIndex, decode_block, read_index
from pynbd.filters._params import parse_size, parse_unsigned
from pynbd.filters._xz_decoder import DecoderPool
from pynbd.plugin import CacheMode, Filter, completions

__all__ = ["XzFilter"]

log = logging.getLogger("pynbd.server")


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Loading:
    """A block being decoded by one thread while others wait for it: threads on ``done`` (a
    lock held until the block is in: cheaper to make than an Event, one per block),
    requests on the event loop as ``waiters`` (``(answer, start, length)``: ``answer(error,
    view)`` is called on ``loop`` with those bytes of the block)."""

    __slots__ = ("data", "done", "error", "loop", "waiters")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.data: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: list[tuple[Callable[..., None], int, int]] | None = None

    def answer(self) -> None:
        """On the loop: every waiter, in one batch (one write per connection)."""
        waiters, self.waiters = self.waiters or [], None
        err = self.error
        view = None if err is not None else memoryview(self.data).toreadonly()
        with completions():
            for answer, start, length in waiters:
                if view is None:
                    answer(err, None)
                else:
                    answer(None, view[start:start + length])


class BlockCache:
    """Decoded blocks, least recently used out first, shared by the connections that read
    the same file; a block is decoded once however many requests want it at a time."""

    def __init__(self, depth: int, evicted: Callable[[Any], None]) -> None:
        self.depth = depth
        self.evicted = evicted  # called with each block that leaves the cache
        self.capacity = 0
        self.blocks: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.loading: dict[int, _Loading] = {}
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def grow(self, n: int) -> None:
        """``n`` connections more (or fewer): each may keep ``depth`` blocks."""
        with self.lock:
            self.capacity += n * self.depth
            while len(self.blocks) > max(self.capacity, 0):
                self.blocks.popitem(last=False)

    def get(self, i: int, load: Callable[[], Any]) -> Any:
        with self.lock:
            data = self.blocks.get(i)
            if data is not None:
                self.blocks.move_to_end(i)
                self.hits += 1
                return data
            pending = self.loading.get(i)
            mine = pending is None
            if pending is None:
                pending = self.loading[i] = _Loading()
                self.misses += 1
            else:
                self.hits += 1
        if not mine:
            with pending.done:  # released when the block is in; then to the next waiter
                pass
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data
        return self.fill(i, pending, load)

    def attach(self, i: int, waiter: tuple[Callable[..., None], int, int],
               loop: asyncio.AbstractEventLoop) -> tuple[Any, _Loading | None]:
        """On the loop: ``(block, None)`` when block ``i`` is cached; else ``waiter`` is
        answered when it is decoded, and ``(None, load)`` comes back, with the load to run
        (:meth:`fill`) when nobody had started it, else None."""
        with self.lock:
            data = self.blocks.get(i)
            if data is not None:
                self.blocks.move_to_end(i)
                self.hits += 1
                return data, None
            pending = self.loading.get(i)
            new = pending is None
            if pending is None:
                pending = self.loading[i] = _Loading()
                self.misses += 1
            else:
                self.hits += 1
            if pending.waiters is None:
                pending.waiters = []
                pending.loop = loop
            pending.waiters.append(waiter)
        return None, (pending if new else None)

    def fill(self, i: int, pending: _Loading, load: Callable[[], Any]) -> Any:
        """Decode block ``i`` (``load()``) into the cache, then wake who waits for it."""
        try:
            data = load()
        except BaseException as e:
            pending.error = e
            raise
        else:
            pending.data = data
            with self.lock:
                self.blocks[i] = data
                old = None
                if len(self.blocks) > max(self.capacity, 1):
                    old = self.blocks.popitem(last=False)[1]
            if old is not None:  # (one in, at most one out: grow() removes the rest)
                self.evicted(old)
                del old
            return data
        finally:
            with self.lock:
                del self.loading[i]
                waiters = pending.waiters
            pending.done.release()
            if waiters and pending.loop is not None:
                try:  # one wake-up of the loop for all the requests waiting for the block
                    pending.loop.call_soon_threadsafe(pending.answer)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass


class _Decoders:
    """The ``n`` threads that decode the blocks requests on the event loop wait for
    (started with the first job), first come, first served: one per CPU."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.started = False
        self.lock = threading.Lock()

    def submit(self, job: Callable[[], Any]) -> None:
        if not self.started:
            with self.lock:
                if not self.started:
                    for k in range(self.n):
                        threading.Thread(target=self._work, name=f"pynbd-xz-{k}",
                                         daemon=True).start()
                    self.started = True
        self.jobs.put(job)

    def stop(self) -> None:
        """The threads end once the jobs queued are done."""
        with self.lock:
            if self.started:
                for _ in range(self.n):
                    self.jobs.put(None)
                self.started = False

    def _work(self) -> None:
        get = self.jobs.get
        while True:
            job = get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001, S110 - handed to the waiters already
                pass
            del job


class _Shared:
    """One xz file's index and block cache, and how many connections use them."""

    def __init__(self, index: XzIndex, depth: int, pool: DecoderPool) -> None:
        self.index = index
        self.cache = BlockCache(depth, pool.release)
        self.refs = 0


class _Handle:
    __slots__ = ("key", "loop", "shared")

    def __init__(self) -> None:
        self.shared: _Shared | None = None
        self.key: tuple[str, int, bytes] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class _Gather:
    """A read over several blocks, answered once every part is in."""

    __slots__ = ("done", "error", "left", "out")

    def __init__(self, count: int, parts: int, done: Callable[..., None]) -> None:
        self.out = bytearray(count)
        self.left = parts
        self.done = done
        self.error: BaseException | None = None

    def part(self, pos: int) -> Callable[..., None]:
        """What answers the part at ``pos`` of the read."""
        def got(err: BaseException | None, view: Any) -> None:
            if err is not None:
                self.error = self.error or err
            else:
                self.out[pos:pos + len(view)] = view
            self.left -= 1
            if not self.left:
                self.done(self.error, None if self.error else self.out)
        return got


class XzFilter(Filter):
    """NAME
        xz - pynbd xz filter: serve the uncompressed contents of an xz file

    SYNOPSIS
        pynbd serve --filter=xz PLUGIN [PLUGIN-ARGS...] [xz-max-block=SIZE] [xz-max-depth=N]

        pynbd serve --filter=xz file FILENAME.xz
        pynbd serve --filter=xz curl https://example.com/FILENAME.xz

    DESCRIPTION
        xz decompresses the xz file that the plugin below serves, on the fly, and serves the
        uncompressed disk. It is read-only: clients cannot write, and the plugin is always
        opened read-only.

        An xz file is cut into streams and blocks, and the file's index says where every
        block starts: a read decompresses only the block (or blocks) it falls in. How fast
        random access is therefore depends on the block size the file was made with; one
        big block (what xz makes by default with one thread) means decompressing the whole
        file for every read that misses the cache. Make images for serving with small blocks:

            xz --best --block-size=16777216 disk.img

        and check with "xz --list disk.img.xz" (the Blocks column). Smaller blocks compress
        slightly worse (by well under 1% for 16 MiB blocks) and read much faster at random.

        Decompressed blocks are kept in a cache, least recently used out first, shared by
        the connections reading the same file (same export, same index): each connection
        may keep up to xz-max-depth blocks, so memory use is at most the largest block size
        times xz-max-depth per connection. Requests are served in parallel: different
        blocks decompress at the same time on several cores, and requests that need a block
        being decompressed wait for it instead of decompressing it again. Every block's
        integrity check (CRC32, CRC64 or SHA-256) is verified as it is decompressed; a
        corrupt block fails the read with EIO.

        The export's description is the plugin's, as "expansion of xz-compressed image:
        DESCRIPTION". Extents are not reported (the whole disk is data); cache requests
        decompress the blocks they cover into the cache.

        At most two blocks per CPU decompress at a time (more would only share the same
        CPUs and thrash their caches); up to that many decoders are kept between blocks,
        each with its dictionary (the size xz was run with: 8 MiB for the default -6).
        When xz is the outermost filter (and nothing below it serializes requests), reads
        do not take a worker thread each: a read of a cached block is answered at once,
        the others when their block is decompressed, all the reads waiting for a block
        together (one wake-up, one write), and blocks decompress in one thread per CPU.

        This is nbdkit-xz-filter(1) for pynbd, with nbdkit 1.32's parameters and messages.
        It calls liblzma (as nbdkit does) through ctypes, into buffers it reuses; where
        liblzma cannot be loaded that way, through the standard library's lzma module.

    PARAMETERS
        xz-max-block=SIZE
            The largest uncompressed block the filter accepts (default 512M): a connection
            to a file with a larger block fails, with a message saying how to fix it.

        xz-max-depth=N
            How many decompressed blocks each connection may keep in the cache (default 8,
            at least 1).

    EXAMPLES
        Serve a compressed disk image made with 16 MiB blocks:

            xz --block-size=16M -k disk.img
            pynbd serve --filter=xz file disk.img.xz

        Serve one over HTTP, caching 32 blocks per connection:

            pynbd serve --filter=xz curl https://example.com/disk.img.xz xz-max-depth=32

        Serve a disk image inside an xz-compressed tar file:

            pynbd serve --filter=tar --filter=xz file disk.tar.xz tar-entry=disk.img
    """

    name = "xz"
    version = "1.32.5"
    config_help = (
        "xz-max-block=<SIZE> (optional) Maximum block size allowed (default: 512M)\n"
        "xz-max-depth=<N>    (optional) Maximum blocks in cache (default: 8)")

    def __init__(self) -> None:
        self.max_block = 512 << 20
        self.max_depth = 8
        self._files: dict[tuple[str, int, bytes], _Shared] = {}
        self._lock = threading.Lock()
        self._pool = DecoderPool(2 * _ncpu())
        # one per CPU: each keeps a CPU (and its cache) to itself, as nbdkit's threads do; more
        # would take turns on the CPUs, each turn refilling the CPU's cache with its block
        self._decoders = _Decoders(_ncpu())

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "xz-max-block":
            self.max_block = parse_size(value)
        elif key == "xz-max-depth":
            depth = parse_unsigned("xz-max-depth", value)
            if depth == 0:
                raise ConfigError("'xz-max-depth' parameter must be >= 1")
            self.max_depth = depth
        else:
            next_config(key, value)

    def cleanup(self) -> None:
        self._decoders.stop()

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(True, export_name)  # the plugin is only ever read
        return _Handle()

    def prepare(self, next: Any, h: _Handle, readonly: bool) -> None:
        index = read_index(next)
        log.debug("xz: size %d bytes (%.1fM)", index.size, index.size / 1048576)
        log.debug("xz: %d streams, %d blocks", index.nr_streams, len(index.starts))
        if self.max_block < index.max_block:
            raise CommandError(errno.EIO, (
                "xz file largest block is bigger than maxblock\n"
                "Either recompress the xz file with smaller blocks (see nbdkit-xz-filter(1))\n"
                "or make maxblock parameter bigger.\n"
                f"maxblock = {self.max_block} (bytes)\n"
                f"largest block in xz file = {index.max_block} (bytes)"))
        key = (next.export_name, next.get_size(), index.fingerprint)
        with self._lock:
            shared = self._files.get(key)
            if shared is None:
                shared = self._files[key] = _Shared(index, self.max_depth, self._pool)
            shared.refs += 1
        shared.cache.grow(1)
        h.shared, h.key = shared, key

    def close(self, h: _Handle) -> None:
        shared = h.shared
        if shared is None:
            return
        c = shared.cache
        log.debug("cache: hits = %d, misses = %d", c.hits, c.misses)
        c.grow(-1)
        with self._lock:
            shared.refs -= 1
            if shared.refs == 0 and self._files.get(h.key) is shared:  # type: ignore[arg-type]
                del self._files[h.key]  # type: ignore[arg-type]

    def export_description(self, next: Any, h: _Handle) -> str | None:
        base = next.export_description()
        return None if base is None else f"expansion of xz-compressed image: {base}"

    def get_size(self, next: Any, h: _Handle) -> int:
        assert h.shared is not None
        return h.shared.index.size

    def can_write(self, next: Any, h: _Handle) -> bool:
        return False

    def can_extents(self, next: Any, h: _Handle) -> bool:
        return False

    def can_multi_conn(self, next: Any, h: _Handle) -> bool:
        return True  # the data never changes

    def can_cache(self, next: Any, h: _Handle) -> CacheMode:
        return CacheMode.EMULATE  # a cache request reads: the blocks land in the cache

    def _block(self, next: Any, shared: _Shared, i: int) -> Any:
        return shared.cache.get(i, lambda: decode_block(next, shared.index, i, self._pool))

    def start_pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int,
                    done: Callable[..., None]) -> None:
        """A READ from the event loop (:mod:`pynbd.server.coroutines`): answered at once
        from the cache, else when the block is decoded, by one of the filter's threads,
        with the other reads that wait for it."""
        shared = h.shared
        assert shared is not None
        idx = shared.index
        i = idx.locate(offset)
        rel = offset - idx.starts[i]
        if h.loop is None:
            h.loop = asyncio.get_running_loop()
        if rel + count <= idx.sizes[i]:
            return self._want(next, h, shared, i, (done, rel, count))
        g = _Gather(count, 0, done)
        parts = []
        pos = 0
        while pos < count:
            n = min(idx.sizes[i] - rel, count - pos)
            parts.append((i, (g.part(pos), rel, n)))
            pos += n
            i, rel = i + 1, 0
        g.left = len(parts)
        for i, waiter in parts:
            self._want(next, h, shared, i, waiter)
        return None

    def _want(self, next: Any, h: _Handle, shared: _Shared, i: int,
              waiter: tuple[Callable[..., None], int, int]) -> None:
        assert h.loop is not None
        data, pending = shared.cache.attach(i, waiter, h.loop)
        if data is not None:
            answer, rel, n = waiter
            answer(None, memoryview(data).toreadonly()[rel:rel + n])
        elif pending is not None:
            load = functools.partial(decode_block, next, shared.index, i, self._pool)
            self._decoders.submit(functools.partial(shared.cache.fill, i, pending, load))

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        shared = h.shared
        assert shared is not None
        idx = shared.index
        i = idx.locate(offset)
        data = self._block(next, shared, i)
        rel = offset - idx.starts[i]
        if rel + count <= len(data):
            # no copy: the view is read-only, and the block is reused only once unreferenced
            return memoryview(data).toreadonly()[rel:rel + count]
        out = bytearray(count)
        done = len(data) - rel
        out[:done] = memoryview(data)[rel:]
        while done < count:
            i += 1
            data = self._block(next, shared, i)
            n = min(len(data), count - done)
            out[done:done + n] = memoryview(data)[:n]
            done += n
        return out
