"""The copying loops of ``pynbd copy`` (nbdcopy's multi-thread-copying.c and synch-copying.c).

The copy: the source is cut into 128 MiB work ranges handed out in order to one worker per
connection. A worker asks the source for the range's extents (only the ZERO bit is trusted,
as nbdcopy does), turns zero extents into one zero request each on the destination and cuts
data extents into request-size pieces. A lane owns one preallocated buffer: read a piece into
it, look for zero blocks of ``--sparse`` size, write the data runs from the same buffer and
zero the zero runs, then take the next piece. Nothing is copied in Python; every completion
is checked, and the first failure ends the copy with nbdcopy's message.

With one connection the worker runs ``lanes`` coroutines on the event loop, many requests in
flight. With several (multi-conn on both ends), each worker is a thread with one lane on
its own connections in blocking calls (the ends opened ``blocking``;
:mod:`pynbd.client.blocking` for NBD): from an NBD source the next piece's read is sent
before the reply to the one in hand is waited for (two reads in flight), and writes'
replies are collected while the next pieces are read (two writes behind): the same
coroutines, which then never suspend, driven to the end without an event loop. Measured on
2 cores against event loops in threads: 1 GiB to null: in 25-30% less time, and no slower
into nbdkit: a thread spends its time in system calls (where the others run), no loop
wakes up per request, and asyncio is never imported.

Synchronous copy (``--synchronous``, and always when either end is a stream): in order, one
request-size chunk after another, with several reads in flight when the source is NBD.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

from pynbd.tools._copy_ends import PROG, CopyError, End, OpError, add_run

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Options", "Progress", "copy_blocking", "copy_multi", "copy_sync", "zero_runs"]

#: Work range a worker takes at a time (nbdcopy's THREAD_WORK_SIZE).
THREAD_WORK_SIZE = 128 * 1024 * 1024
#: Interpreter switch interval while worker threads run (Python's default is 5 ms).
SWITCH_INTERVAL = 0.0005
#: Seconds the other workers get to finish their requests after a failure.
STOP_WAIT = 5.0
#: How often the terminal bar is redrawn between nbdcopy's own updates (seconds).
BAR_INTERVAL = 0.2


class Options:
    """What the copy loops need of the command line."""

    def __init__(self, *, allocated: bool = False, destination_is_zero: bool = False,
                 extents: bool = True, request_size: int = 1 << 18, requests: int = 64,
                 queue_size: int = 16 << 20, sparse_size: int = 4096, connections: int = 1,
                 flush: bool = False) -> None:
        self.allocated = allocated
        self.destination_is_zero = destination_is_zero
        self.extents = extents
        self.request_size = request_size
        self.requests = requests
        self.queue_size = queue_size
        self.sparse_size = sparse_size
        self.connections = connections
        self.flush = flush


def _rate(bps: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if bps < 1024 or unit == "GiB":
            return f"{bps:.1f} {unit}/s"
        bps /= 1024
    return ""  # not reached


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """nbdcopy's progress bar on the terminal (``/dev/tty``), with the rate and the time
    left after it once they can be estimated; or nbdcopy's ``N/100`` lines on a
    descriptor (``--progress=FD``), exactly as nbdcopy writes them."""

    SPINNER = ("▝", "▐", "▗", "▃", "▖", "▍", "▘", "▀")
    #: Width of the rate and time-left field (padded, so a shorter one leaves nothing).
    EXTRA_WIDTH = 30
    #: Seconds of copying before a rate is shown.
    RATE_AFTER = 0.5

    def __init__(self, enabled: bool, fd: int = -1) -> None:
        self.enabled = enabled
        self.fd = fd
        self.tty = -2  # not opened yet
        self.spin = 0
        self.last = 0.0
        self.start = time.monotonic()
        self.high = 0  # furthest position drawn between nbdcopy's own updates
        self.rated = False  # a rate was drawn: later lines are padded to wipe it
        self.lock = threading.Lock()  # workers in several threads draw it

    def __call__(self, pos: int, size: int) -> None:
        if not self.enabled or size == 0:
            return
        with self.lock:
            self._draw(pos, size)

    def _draw(self, pos: int, size: int) -> None:
        frac = min(max(pos / size, 0.0), 1.0)
        if self.fd >= 0:
            msg = "100/100\n" if frac == 1 else f"{int(100 * frac)}/100\n"
            self._write(self.fd, msg)
            return
        if self.tty == -2:
            try:
                self.tty = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                self.tty = -1
        if self.tty < 0:
            return
        self.last = time.monotonic()
        if frac == 1:
            msg = "█ 100% [****************************************]"
            if self.rated:
                msg += " " * self.EXTRA_WIDTH
            msg += "\n"
            self.enabled = False
        else:
            stars = 0
            while stars < 40 and stars < 40 * frac:
                stars += 1
            extra = ""
            elapsed = self.last - self.start
            if size > 1 and pos > 0 and elapsed >= self.RATE_AFTER:
                rate = pos / elapsed
                extra = f" {_rate(rate)}, {_clock((size - pos) / rate)} left"
                self.rated = True
            if self.rated:
                extra = f"{extra:<{self.EXTRA_WIDTH}}"
            msg = (f"{self.SPINNER[self.spin]} {int(100 * frac):3d}% "
                   f"[{'*' * stars}{'-' * (40 - stars)}]{extra}\r")
            self.spin = (self.spin + 1) % len(self.SPINNER)
        self._write(self.tty, msg)

    def tick(self, pos: int, size: int) -> None:
        """An extra redraw of the terminal bar between work ranges, at most every
        BAR_INTERVAL (the lines written to a descriptor stay exactly nbdcopy's)."""
        if self.enabled and self.fd < 0 and self.tty != -1 and \
                time.monotonic() - self.last >= BAR_INTERVAL:
            with self.lock:
                self.high = max(self.high, pos)
                self._draw(self.high, size)

    @staticmethod
    def _write(fd: int, msg: str) -> None:
        try:
            os.write(fd, msg.encode())
        except OSError:
            pass

    def close(self) -> None:
        if self.tty >= 0:
            os.close(self.tty)
            self.tty = -1


# ----------------------------------------------------------------------------- zero blocks

_zero_cache: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _zero_cache.get(n)
    if z is None:
        z = _zero_cache[n] = bytes(n)
    return z


def zero_runs(buf: bytearray, length: int, offset: int,
              sparse: int) -> list[tuple[int, int, bool]] | None:
    """Split buf[:length] (which holds the disk from ``offset``) into runs of data and of
    whole all-zero ``sparse``-sized blocks aligned on the disk, as nbdcopy does.

    Returns None when there is no zero block (the common case, found with one strided
    probe of each block's last byte), else [(start, length, is_zero), ...] relative to buf.
    """
    first = -offset % sparse
    if first >= length:
        return None
    nblocks = (length - first) // sparse
    if nblocks == 0:
        return None
    # A block whose last byte is not zero is data: look closer only at the others.
    probe = memoryview(buf)[first + sparse - 1:first + nblocks * sparse:sparse].tobytes()
    k = probe.find(0)
    if k < 0:
        return None
    zero = _zeros(sparse)
    if k == 0 and probe.count(0) == nblocks and \
            buf.startswith(_zeros(nblocks * sparse), first):
        flags = [True] * nblocks
    else:
        flags = [False] * nblocks
        startswith = buf.startswith
        while k >= 0:
            if startswith(zero, first + k * sparse):
                flags[k] = True
            k = probe.find(0, k + 1)
        if True not in flags:
            return None
    runs: list[tuple[int, int, bool]] = []
    if first:
        runs.append((0, first, False))
    pos = first
    for z in flags:
        add_run(runs, pos, sparse, z)
        pos += sparse
    if pos < length:
        add_run(runs, pos, length - pos, False)
    return runs


# ----------------------------------------------------------------------------- the copy


class _NoLock:
    """The refill lock of a worker with one lane (the blocking copy): never contended."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _asyncio() -> Any:
    """asyncio, imported when first needed: the blocking copy runs without it (a shorter
    start-up)."""
    import asyncio

    return asyncio


class _Failed(Exception):
    """The copy failed; the message is already recorded."""


class _Copy:
    def __init__(self, src: End, dst: End, opts: Options, progress: Progress) -> None:
        self.src = src
        self.dst = dst
        self.o = opts
        self.progress = progress
        self.next_offset = 0
        self.error: str | None = None
        self.zero_buf = _zeros(opts.request_size)
        #: Set on the first failure: every worker stops taking work.
        self.stop = False
        self.lock = threading.Lock()

    def fail(self, msg: str) -> _Failed:
        with self.lock:
            if self.error is None:
                self.error = msg
            self.stop = True
        return _Failed(msg)

    # -- zero ranges on the destination (fill_dst_range_with_zeroes) --------------------
    async def fill_zero(self, index: int, offset: int, count: int) -> None:
        if self.o.destination_is_zero:
            return
        dst = self.dst
        try:
            if await dst.zero(index, offset, count, self.o.allocated):
                return
            # The destination cannot zero: write zeroes.
            zb = memoryview(self.zero_buf)
            rs = len(zb)
            while count > 0:
                n = min(count, rs)
                await dst.write(index, zb[:n], offset)
                offset += n
                count -= n
        except OpError as e:
            raise self.write_failed(e, offset) from None

    def write_failed(self, e: OpError, offset: int) -> _Failed:
        """nbdcopy's message for a failed write (or zero): at the offset of the request
        that failed, which for a write collected later is not the one in hand."""
        at = e.offset if e.offset is not None else offset
        return self.fail(f"{PROG}: write at offset {at} failed: {os.strerror(e.errno)}")

    # -- multi-connection ---------------------------------------------------------------
    def take_range(self) -> tuple[int, int] | None:
        size = self.src.size
        with self.lock:
            off = self.next_offset
            if off >= size or self.stop:
                return None
            count = min(THREAD_WORK_SIZE, size - off)
            self.next_offset = off + THREAD_WORK_SIZE
            self.progress(off, size)
        return off, count

    async def worker(self, index: int) -> None:
        """Copy work ranges until none is left: ``lanes`` coroutines on the event loop, or
        one lane in this thread for the blocking copy."""
        w = _Worker(self, index)
        dst = self.dst
        # null: never looks at what it is given: every lane reads into one buffer, which
        # stays in the CPU cache (measured: 20-25% faster than a buffer per lane).
        shared = bytearray(self.o.request_size) if dst.discards else None
        if self.src.blocking:
            # in this thread (returns at once); from NBD, two reads in flight
            await (w.lane_ahead if self.src.reads_ahead else w.lane)(shared)
            try:
                await dst.settle(index)
            except OpError as e:
                raise self.write_failed(e, 0) from None
            return
        nlanes = max(1, min(self.o.requests, self.o.queue_size // self.o.request_size))
        async with _asyncio().TaskGroup() as tg:
            for _ in range(nlanes):
                tg.create_task(w.lane(shared))

    async def run_multi(self) -> None:
        """One connection: its worker runs on this event loop, many requests in flight."""
        try:
            await self._worker_group(0)
        except _Failed:
            pass
        if self.error is not None:
            raise CopyError(self.error)

    async def run_blocking(self) -> None:
        """Every worker in a thread of its own, one request at a time on its own
        connections, in blocking calls (both ends opened ``blocking``): the same worker
        coroutines, driven to the end without an event loop, for they never wait on one.
        Each thread spends its time in system calls, where it lets the others run; nothing
        is queued between threads and no loop wakes up per request. This coroutine blocks
        too: it is driven without an event loop (``negotiate.drive``)."""
        src, dst = self.src, self.dst
        assert src.blocking and dst.blocking
        threads = [threading.Thread(target=self._blocking_main, args=(i,),
                                    name=f"pynbd-copy-{i}", daemon=True)
                   for i in range(self.o.connections)]
        self._opened = threading.Barrier(len(threads))
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            for t in threads:
                t.start()
            self._join(threads)
        finally:
            sys.setswitchinterval(old_interval)
        if self.error is not None:
            raise CopyError(self.error)

    def _join(self, threads: list[threading.Thread]) -> None:
        """Wait for the threads; after a failure, give the others STOP_WAIT to finish the
        request in hand, then cut the connections they may be blocked on."""
        deadline = None
        for t in threads:
            while t.is_alive():
                t.join(0.1)
                if self.stop and t.is_alive():
                    now = time.monotonic()
                    deadline = deadline or now + STOP_WAIT
                    if now >= deadline:
                        self.src.abandon()
                        self.dst.abandon()
                        t.join(STOP_WAIT)
                        break

    def _blocking_main(self, index: int) -> None:
        coro = self._blocking_worker(index)
        try:
            try:
                coro.send(None)
            except StopIteration:
                return
            coro.close()
            raise RuntimeError("a blocking copy worker waited on an event loop")
        except (_Failed, threading.BrokenBarrierError):
            self._opened.abort()  # a thread that failed to connect releases the others
        except BaseException as e:  # noqa: BLE001 - recorded; the main thread reports it
            self.fail(str(e) if isinstance(e, CopyError)
                      else f"{PROG}: {e or type(e).__name__}")
            self._opened.abort()

    async def _blocking_worker(self, index: int) -> None:
        # Each thread connects its own connections (the handshakes run in parallel); no
        # data moves until every connection is open, as nbdcopy opens all of its first, so
        # a failure to connect is reported as that, never after part of the copy.
        await self.src.open_conn(index)
        await self.dst.open_conn(index)
        self._opened.wait()
        await self.worker(index)

    async def _worker_group(self, index: int) -> None:
        try:
            async with _asyncio().TaskGroup() as tg:
                tg.create_task(self.worker(index))
        except BaseExceptionGroup as eg:
            for e in _leaves(eg):
                if isinstance(e, CopyError):
                    self.fail(str(e))
                elif not isinstance(e, _Failed):
                    self.fail(f"{PROG}: {e or type(e).__name__}")
            raise _Failed(self.error or "") from None

    # -- synchronous ----------------------------------------------------------------------
    async def run_sync(self) -> None:
        src, o = self.src, self.o
        rs = o.request_size
        progress = self.progress
        if src.size < 0:
            buf = bytearray(rs)
            mv = memoryview(buf)
            offset = 0
            while True:
                try:
                    n = await src.read_stream(mv)
                except OpError as e:
                    raise CopyError(f"{src.name}: {e.detail}") from None
                if n == 0:
                    break
                await self._sync_write(mv[:n], offset)
                offset += n
                progress(offset, src.size)
                if n < rs:
                    break
            return
        # Known size: request-size chunks in order (the progress lines are nbdcopy's: one
        # per chunk of data); several reads in flight, written out in order.
        depth = max(1, min(o.requests, o.queue_size // rs)) if not src.stream else 1
        bufs = [bytearray(rs) for _ in range(depth)]
        size = src.size
        offset = 0
        while offset < size:
            count = min(rs * depth, size - offset)
            if o.extents:
                try:
                    exts = await src.extents(0, offset, count)
                except OpError as e:
                    raise CopyError(f"{src.name}: {e.detail}") from None
            else:
                exts = [(offset, count, False)]
            for eoff, elen, ezero in exts:
                if ezero:
                    await self._sync_zero(eoff, elen)
                    offset = eoff + elen
                    continue
                pieces = []
                while elen > 0:
                    # cut at request-size boundaries of the disk, as nbdcopy's loop does
                    n = min(elen, rs - eoff % rs)
                    pieces.append((eoff, n))
                    eoff += n
                    elen -= n
                views = [memoryview(bufs[i])[:n] for i, (_, n) in enumerate(pieces)]
                reads = [src.read_into(0, v, off) for v, (off, _) in zip(views, pieces)]
                results = await _asyncio().gather(*reads, return_exceptions=True)
                for (off, n), v, r in zip(pieces, views, results):
                    if isinstance(r, OpError):
                        raise CopyError(f"{src.name}: {r.detail}")
                    if isinstance(r, BaseException):
                        raise r
                    await self._sync_write(v, off)
                    offset = off + n
                    progress(offset, size)

    async def _sync_write(self, v: memoryview, offset: int) -> None:
        try:
            await self.dst.write(0, v, offset)
        except OpError as e:
            raise CopyError(f"{self.dst.name}: {e.detail}") from None

    async def _sync_zero(self, offset: int, count: int) -> None:
        dst = self.dst
        if self.o.destination_is_zero and not dst.stream:
            return
        try:
            if not dst.stream and await dst.zero(0, offset, count, self.o.allocated):
                return
        except OpError as e:
            raise CopyError(f"{dst.name}: {e.detail}") from None
        zb = memoryview(self.zero_buf)
        while count > 0:
            n = min(count, len(zb))
            await self._sync_write(zb[:n], offset)
            offset += n
            count -= n


class _Worker:
    """One worker of a copy: the pieces of its current work range, shared by its lanes."""

    def __init__(self, copy: _Copy, index: int) -> None:
        self.copy = copy
        self.index = index
        self.pieces: deque[tuple[int, int, bool]] = deque()
        self.lock: Any = _NoLock() if copy.src.blocking else _asyncio().Lock()
        self.done = False

    async def refill(self) -> bool:
        """Cut the next work range into pieces: a zero extent whole, data extents into
        request-size pieces. False when no work is left."""
        copy, pieces, index = self.copy, self.pieces, self.index
        src, rs = copy.src, copy.o.request_size
        async with self.lock:
            while not pieces and not self.done:
                r = copy.take_range()
                if r is None:
                    self.done = True
                    break
                off, count = r
                if copy.o.extents:
                    try:
                        exts = await src.extents(index, off, count)
                    except OpError as e:
                        raise copy.fail(f"{src.name}: {e.detail}") from None
                    except CopyError as e:
                        raise copy.fail(str(e)) from None
                else:
                    exts = [(off, count, False)]
                for eoff, elen, ezero in exts:
                    if ezero:
                        pieces.append((eoff, elen, True))
                        continue
                    while elen > 0:
                        n = min(elen, rs)
                        pieces.append((eoff, n, False))
                        eoff += n
                        elen -= n
        return bool(pieces)

    async def lane(self, shared: bytearray | None) -> None:
        """Read a piece into this lane's buffer (or ``shared``), write its data runs and
        zero its zero runs; then the next piece, until none is left or the copy stops."""
        copy, index, pieces = self.copy, self.index, self.pieces
        src, o = copy.src, copy.o
        rs, size, progress = o.request_size, src.size, copy.progress
        buf = shared if shared is not None else bytearray(rs)
        mv = memoryview(buf)
        read_into, put, refill = src.read_into, self.put, self.refill
        popleft = pieces.popleft
        while True:
            if not pieces and not await refill():
                return
            if not pieces:
                continue
            if copy.stop:
                return
            off, n, is_zero = popleft()
            progress.tick(off, size)
            if is_zero:
                await copy.fill_zero(index, off, n)
                continue
            v = mv if n == rs else mv[:n]
            try:
                await read_into(index, v, off)
            except OpError as e:
                raise copy.fail(f"{PROG}: read at offset {off} failed: "
                                f"{os.strerror(e.errno)}") from None
            await put(buf, v, off)

    async def lane_ahead(self, shared: bytearray | None) -> None:
        """The blocking copy's lane from an NBD source: the next piece's read is sent
        before the reply to the piece in hand is waited for (two buffers, two reads in
        flight on the connection), so the server has the next request while this thread
        receives and writes the last one."""
        copy, index, pieces = self.copy, self.index, self.pieces
        src, rs, size = copy.src, copy.o.request_size, copy.src.size
        progress = copy.progress
        bufs = [shared, shared] if shared is not None else [bytearray(rs), bytearray(rs)]
        held: tuple[Any, bytearray, memoryview, int] | None = None
        turn = 0
        while not copy.stop and (pieces or await self.refill()):
            off, n, is_zero = pieces.popleft()
            progress.tick(off, size)
            if is_zero:
                if held is not None:
                    await self.finish(*held)
                    held = None
                await copy.fill_zero(index, off, n)
                continue
            buf = bufs[turn]
            turn ^= 1
            v = memoryview(buf)[:n]
            try:
                token = src.read_ahead(index, v, off)
            except OpError as e:
                raise copy.fail(f"{PROG}: read at offset {off} failed: "
                                f"{os.strerror(e.errno)}") from None
            if held is not None:
                await self.finish(*held)
            held = (token, buf, v, off)
        if held is not None and not copy.stop:
            await self.finish(*held)

    async def finish(self, token: Any, buf: bytearray, v: memoryview, off: int) -> None:
        """Collect a read :meth:`lane_ahead` started, then put its data."""
        try:
            self.copy.src.read_done(self.index, token)
        except OpError as e:
            raise self.copy.fail(f"{PROG}: read at offset {off} failed: "
                                 f"{os.strerror(e.errno)}") from None
        await self.put(buf, v, off)

    async def put(self, buf: bytearray, v: memoryview, off: int) -> None:
        """Write a piece read into ``buf`` (``v``): its data runs written, its zero runs
        zeroed (blocks of ``--sparse`` size found in it)."""
        copy, index, o = self.copy, self.index, self.copy.o
        dst = copy.dst
        sparse = 0 if (o.allocated or dst.discards) else o.sparse_size
        n = v.nbytes
        runs = zero_runs(buf, n, off, sparse) if sparse else None
        if runs is None:
            try:
                await dst.write(index, v, off)
            except OpError as e:
                raise copy.write_failed(e, off) from None
            return
        mv = memoryview(buf)
        for start, length, z in runs:
            if z:
                await copy.fill_zero(index, off + start, length)
                continue
            try:
                await dst.write(index, mv[start:start + length], off + start)
            except OpError as e:
                raise copy.write_failed(e, off + start) from None


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            out += _leaves(e)
        else:
            out.append(e)
    return out


async def copy_multi(src: End, dst: End, opts: Options, progress: Progress) -> None:
    await _Copy(src, dst, opts, progress).run_multi()


async def copy_blocking(src: End, dst: End, opts: Options, progress: Progress) -> None:
    await _Copy(src, dst, opts, progress).run_blocking()


async def copy_sync(src: End, dst: End, opts: Options, progress: Progress) -> None:
    await _Copy(src, dst, opts, progress).run_sync()

