"""The two ends of ``pynbd copy``: NBD servers, local files and block devices, pipes, ``null:``.

Each end is one class with nbdcopy's operations (``copy/*-ops.c``): size and preferred block
size, read, write, zero, extents, flush, close. Operations that fail raise :class:`OpError`
carrying the errno and a libnbd-style detail; the copy loop turns it into nbdcopy's message.
Buffers are the caller's: reads land in the caller's memoryview (``pread_into``,
``os.preadv``) and writes send the caller's memoryview (``pwrite``, ``os.pwritev``).
"""

from __future__ import annotations

import errno as E
import fcntl
import os
import stat
import struct
import sys
from collections import deque
from collections.abc import Sequence

from pynbd.client.blocking import READ as BLOCKING_READ
from pynbd.client.blocking import WRITE as BLOCKING_WRITE
from pynbd.client.blocking import BlockingConnection
from pynbd.errors import CommandError, NBDError
from pynbd.protocol.constants import CONTEXT_BASE_ALLOCATION, CmdFlag

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

    from pynbd.client.engine import AsyncClient

__all__ = [
    "PROG",
    "CopyError",
    "End",
    "FileEnd",
    "NbdEnd",
    "NullEnd",
    "OpError",
    "PipeClosed",
    "PipeEnd",
    "add_run",
    "human_size",
    "open_local",
]

#: The program name that starts every message (nbdcopy's messages, named for this command).
PROG = "pynbd copy"
#: nbdcopy's size of ``null:`` (INT64_MAX: "infinite").
NULL_SIZE = (1 << 63) - 1
#: Preferred block size when an end says nothing usable (nbdcopy's default).
DEFAULT_PREFERRED = 4096
#: NBD_STATE_ZERO in base:allocation: the only bit nbdcopy trusts (reading as zero).
STATE_ZERO = 2
#: Linux ioctl asking a block device for its optimal I/O size.
BLKIOOPT = 0x1279
#: Linux ioctl zeroing a range of a block device.
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: Writes a blocking connection sends before it waits for the oldest one's reply (with
#: one thread per CPU, two keep the destination as busy as four connections with one did).
WRITES_BEHIND = 2
#: Longest block-status request (the NBD limit is 32 bits; stay well inside it).
MAX_EXTENTS_REQUEST = 1 << 30


class CopyError(Exception):
    """A fatal error: ``str()`` is the whole line printed (without the newline): nbdcopy's
    message, with ``pynbd copy`` where nbdcopy names itself."""


class OpError(Exception):
    """One read/write/zero/extents/flush failed."""

    def __init__(self, errno: int, detail: str, offset: int | None = None) -> None:
        super().__init__(detail)
        self.errno = errno
        self.detail = detail
        #: Where the failed request was, when it is not the request being made (a write
        #: whose reply was collected later).
        self.offset = offset


class PipeClosed(Exception):
    """The destination is a pipe whose reader went away (EPIPE): the copy ends as nbdcopy
    does, killed by SIGPIPE, without a message."""


def add_run(runs: list[tuple[int, int, bool]], start: int, length: int, flag: bool) -> None:
    """Append (start, length, flag) to runs, or lengthen the last run if it ends at start
    with the same flag."""
    if runs:
        s, n, f = runs[-1]
        if f == flag and s + n == start:
            runs[-1] = (s, n + length, f)
            return
    runs.append((start, length, flag))


def human_size(n: int) -> str:
    """libnbd's human_size(): the exact number with the largest exact binary suffix."""
    n &= (1 << 64) - 1
    suffixes = ("", "K", "M", "G", "T", "P", "E")
    i = 0
    while i < 6 and n != 0 and n % 1024 == 0:
        n //= 1024
        i += 1
    return f"{n}{suffixes[i]}"


def _strerror(e: BaseException) -> tuple[int, str]:
    if isinstance(e, CommandError):
        return e.errno, os.strerror(e.errno)
    if isinstance(e, OSError) and e.errno:
        return e.errno, os.strerror(e.errno)
    if isinstance(e, TimeoutError):
        return E.ETIMEDOUT, str(e) or os.strerror(E.ETIMEDOUT)
    return E.EIO, str(e) or type(e).__name__


class End:
    """One side of the copy. ``size`` is -1 for a stream whose size is unknown."""

    ops_name = ""
    name = ""
    size = -1
    preferred = DEFAULT_PREFERRED
    #: Largest read or write this end takes in one request.
    max_request = 32 * 1024 * 1024
    #: Needs the in-order (synchronous) copy: a stream.
    stream = False
    #: Writes and zeroes are discarded (null:): no need to look for zero blocks.
    discards = False
    #: The operations run in blocking calls in the calling thread, with no event loop (the
    #: blocking copy); their coroutines then never suspend. Set before :meth:`open`.
    blocking = False
    #: :meth:`read_ahead` starts reads (when blocking): an NBD end.
    reads_ahead = False

    def go_async(self) -> None:
        """From blocking operations to ones on the running event loop (the copy turned out
        to need one: a single connection, or a stream)."""
        self.blocking = False

    def is_read_only(self) -> bool:
        return False

    def can_multi_conn(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return False

    async def open_conn(self, index: int) -> None:
        """Open connection ``index`` (several connections: each worker thread opens its
        own, in blocking calls)."""

    def truncate(self, size: int) -> bool:
        """Make a destination regular file the source's size; True if it now reads as
        zeroes throughout (so zero ranges need no writing)."""
        return False

    async def extents(self, index: int, offset: int,
                      count: int) -> list[tuple[int, int, bool]]:
        return [(offset, count, False)]

    async def read_into(self, index: int, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def read_ahead(self, index: int, buf: memoryview, offset: int) -> Any:
        """Start a read whose data lands in ``buf`` while the caller does other work (a
        blocking end with ``reads_ahead``: the request is sent, its reply collected by
        :meth:`read_done`)."""
        raise NotImplementedError

    def read_done(self, index: int, token: Any) -> None:
        """Wait for the read :meth:`read_ahead` started (OpError if it failed)."""

    async def read_stream(self, buf: memoryview) -> int:
        """Read what comes next (a stream); 0 at the end."""
        raise NotImplementedError

    async def write(self, index: int, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    async def zero(self, index: int, offset: int, count: int, allocate: bool) -> bool:
        """Zero efficiently; False if this end cannot (the caller writes zeroes)."""
        return False

    async def settle(self, index: int) -> None:
        """Collect what is still owed on connection ``index`` (a write not waited for);
        OpError, with the write's offset, if it failed."""
        return

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def abandon(self) -> None:
        """Close at once after a failure (no waiting for the peer)."""


# ------------------------------------------------------------------------------- NBD


class NbdEnd(End):
    """An NBD server: a URI, or ``[ CMD ARGS ]`` started with socket activation."""

    ops_name = "nbd_ops"
    reads_ahead = True

    def __init__(self, name: str, *, uri: str | None = None,
                 argv: Sequence[str] | None = None, reading: bool, extents: bool) -> None:
        self.name = name
        self.uri = uri
        self.argv = list(argv) if argv is not None else None
        self.reading = reading
        self.want_extents = extents and reading
        #: connection index -> client; each client belongs to the event loop that opened it
        self.clients: dict[int, AsyncClient] = {}
        #: connection index -> connection, when blocking
        self.conns: dict[int, BlockingConnection] = {}
        #: connection index -> (cookie, offset) of a write sent and not yet waited for
        self._behind: dict[int, deque[tuple[int, int]]] = {}
        self._can_zero = False
        self._can_flush = False

    async def _open_one(self) -> Any:
        metas = (CONTEXT_BASE_ALLOCATION,) if self.want_extents else ()
        try:
            if self.blocking:
                assert self.uri is not None
                return BlockingConnection.connect(self.uri, meta_contexts=metas)
            from pynbd.client.engine import AsyncClient

            if self.argv is not None:
                c = await AsyncClient.connect(socket_activation=self.argv, meta_contexts=metas)
            else:
                c = await AsyncClient.connect(self.uri, meta_contexts=metas)
        except (OSError, NBDError, ValueError, EOFError) as e:
            call = ("nbd_connect_systemd_socket_activation" if self.argv is not None
                    else "nbd_connect_uri")
            if isinstance(e, OSError) and e.errno:
                what = f"connect: {os.strerror(e.errno)}"
            else:
                what = str(e) or type(e).__name__
            raise CopyError(f"{PROG}: {self.name}: {call}: {what}") from None
        return self._tune(c)

    @property
    def first(self) -> Any:
        """Connection 0 (where the export's properties are read)."""
        return self.conns[0] if self.blocking else self.clients[0]

    def _open(self) -> bool:
        return bool(self.conns if self.blocking else self.clients)

    def go_async(self) -> None:
        from pynbd.client.engine import AsyncClient

        for i, b in list(self.conns.items()):
            self.clients[i] = self._tune(AsyncClient.adopt(b))
            del self.conns[i]
        self.blocking = False

    @staticmethod
    def _tune(c: AsyncClient) -> AsyncClient:
        # A pending command may wait forever on a server that stopped answering; nbdcopy
        # waits too (no timeout), so none is set here.
        c.max_bytes_in_flight = 1 << 62  # the copy bounds bytes in flight itself
        c.max_in_flight = 1 << 30
        return c

    async def open(self) -> None:
        c = await self._open_one()
        if self.blocking:
            self.conns[0] = c
        else:
            self.clients[0] = c
        self.size = c.size
        self._can_zero = c.can_zero()
        self._can_flush = c.can_flush()
        pref = c.block_size()[1] if c.export.block_size else 0
        self.preferred = pref if pref > 0 and pref & (pref - 1) == 0 else DEFAULT_PREFERRED
        if c.export.block_size:
            mx = c.block_size()[2]
            while mx & (mx - 1):  # the largest power of two within the maximum
                mx &= mx - 1
            self.max_request = max(mx, 4096)

    def is_read_only(self) -> bool:
        return self._open() and self.first.is_read_only()

    def can_multi_conn(self) -> bool:
        return self._open() and self.first.can_multi_conn()

    def can_extents(self) -> bool:
        return self._open() and self.first.can_meta_context(CONTEXT_BASE_ALLOCATION)

    def can_zero(self) -> bool:
        return self._can_zero

    async def open_conn(self, index: int) -> None:
        conns: dict[int, Any] = self.conns if self.blocking else self.clients
        if index not in conns:
            conns[index] = await self._open_one()

    def _c(self, index: int) -> Any:
        """The connection: an AsyncClient (awaitable commands), or a BlockingConnection
        when blocking (the same commands, returning at once)."""
        return self.conns[index] if self.blocking else self.clients[index]

    async def _call(self, r: Any) -> Any:
        return r if self.blocking else await r

    async def extents(self, index: int, offset: int,
                      count: int) -> list[tuple[int, int, bool]]:
        c = self._c(index)
        out: list[tuple[int, int, bool]] = []
        end = offset + count
        while offset < end:
            n = min(end - offset, MAX_EXTENTS_REQUEST)
            try:
                res = await self._call(c.block_status(n, offset))
            except (NBDError, OSError) as e:
                errno, msg = _strerror(e)
                raise OpError(errno, f"nbd_block_status: block-status: command failed: "
                                     f"{msg}") from None
            old = offset
            for length, flags in res.get(CONTEXT_BASE_ALLOCATION, ()):
                length = min(length, end - offset)
                if length <= 0:
                    break
                add_run(out, offset, length, bool(flags & STATE_ZERO))
                offset += length
            if offset == old:
                raise CopyError(f"{self.name}: NBD server is broken: it is not returning "
                                f"extent information.\nTry {PROG} --no-extents as a "
                                "workaround.")
        return out

    async def read_into(self, index: int, buf: memoryview, offset: int) -> None:
        try:
            await self._call(self._c(index).pread_into(buf, offset))
        except (NBDError, OSError) as e:
            errno, msg = _strerror(e)
            raise OpError(errno, f"nbd_pread: read: command failed: {msg}") from None

    def read_ahead(self, index: int, buf: memoryview, offset: int) -> Any:
        try:
            return self.conns[index].send(BLOCKING_READ, offset, buf.nbytes, into=buf)
        except OSError as e:
            errno, msg = _strerror(e)
            raise OpError(errno, f"nbd_pread: read: command failed: {msg}") from None

    def read_done(self, index: int, token: Any) -> None:
        try:
            self.conns[index].reply(token)
        except (NBDError, OSError) as e:
            errno, msg = _strerror(e)
            raise OpError(errno, f"nbd_pread: read: command failed: {msg}") from None

    def _settle(self, index: int, keep: int = 0) -> None:
        """Collect the replies to the writes sent on connection ``index`` until at most
        ``keep`` are left, oldest first."""
        behind = self._behind.get(index)
        while behind and len(behind) > keep:
            cookie, offset = behind.popleft()
            try:
                self.conns[index].reply(cookie)
            except (NBDError, OSError) as e:
                errno, msg = _strerror(e)
                raise OpError(errno, f"nbd_pwrite: write: command failed: {msg}",
                              offset) from None

    async def settle(self, index: int) -> None:
        if self.blocking:
            self._settle(index)

    async def write(self, index: int, buf: memoryview, offset: int) -> None:
        if offset + len(buf) > self.size:
            raise OpError(E.ENOSPC, "nbd_pwrite: request out of bounds: "
                                    + os.strerror(E.ENOSPC))
        if self.blocking:
            # Write behind: once sent, the buffer is the kernel's copy and may be refilled;
            # the replies are collected, oldest first, so that no more than WRITES_BEHIND
            # are owed, and all of them before any other command on this connection (the
            # server works on these writes while the next pieces are read).
            self._settle(index, WRITES_BEHIND - 1)
            try:
                cookie = self.conns[index].send(BLOCKING_WRITE, offset, len(buf), 0, buf)
            except OSError as e:
                errno, msg = _strerror(e)
                raise OpError(errno, f"nbd_pwrite: write: command failed: {msg}") from None
            self._behind.setdefault(index, deque()).append((cookie, offset))
            return
        try:
            await self._call(self._c(index).pwrite(buf, offset))
        except (NBDError, OSError) as e:
            errno, msg = _strerror(e)
            raise OpError(errno, f"nbd_pwrite: write: command failed: {msg}") from None

    async def zero(self, index: int, offset: int, count: int, allocate: bool) -> bool:
        if not self._can_zero:
            return False
        if self.blocking:
            self._settle(index)
        try:
            await self._call(self._c(index).zero(count, offset,
                                                 CmdFlag.NO_HOLE if allocate else 0))
        except (NBDError, OSError) as e:
            errno, msg = _strerror(e)
            raise OpError(errno, f"nbd_zero: write_zeroes: command failed: {msg}") from None
        return True

    async def _flush_one(self, c: Any) -> None:
        try:
            await self._call(c.flush())
        except (NBDError, OSError) as e:
            errno, msg = _strerror(e)
            if isinstance(e, CommandError) and not self._can_flush:
                msg = f"{e.message}: {os.strerror(errno)}"
            raise OpError(errno, f"nbd_flush: {msg}") from None

    async def flush(self) -> None:
        for i in list(self._behind):
            self._settle(i)
        for c in [*self.clients.values(), *self.conns.values()]:
            await self._flush_one(c)

    async def close(self) -> None:
        for i in list(self._behind):
            self._settle(i)
        clients, self.clients = self.clients, {}
        conns, self.conns = self.conns, {}
        for c in clients.values():
            await c.close()
        for b in conns.values():
            b.close()

    def abandon(self) -> None:
        clients, self.clients = self.clients, {}
        conns, self.conns = self.conns, {}
        for c in clients.values():
            c.abort()
        for b in conns.values():
            b.abort()


# ------------------------------------------------------------------------------- local


_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os has only posix_fallocate); OSError on failure."""
    import ctypes  # only when a file is zeroed

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _try_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2): True if done, False if the file system does not do ``mode``; OpError
    for any other failure."""
    try:
        _fallocate(fd, mode, offset, length)
    except OSError as e:
        if e.errno in (E.EOPNOTSUPP, E.ENOSYS, E.EINVAL):
            return False
        raise OpError(e.errno or E.EIO, f"fallocate: {os.strerror(e.errno or E.EIO)}") from None
    return True


class FileEnd(End):
    """A regular file or a block device, read and written with preadv/pwritev."""

    ops_name = "file_ops"

    def __init__(self, name: str, fd: int, size: int, preferred: int, is_block: bool) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.preferred = preferred
        self.is_block = is_block
        self._punch = not is_block
        self._zero_range = not is_block
        self._seek = not is_block
        self._nowait = _RWF_NOWAIT != 0
        if not is_block:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass

    def can_extents(self) -> bool:
        return self._seek

    def can_zero(self) -> bool:
        return True

    def truncate(self, size: int) -> bool:
        # nbdcopy empties a regular-file destination first (its old content is discarded),
        # then sets the source's size: the file is all holes. A stream source has no size:
        # the file is then written from the start as is.
        if self.is_block or size < 0:
            return False
        try:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise CopyError(f"{self.name}: truncate: {os.strerror(e.errno or E.EIO)}") from None
        self.size = size
        return True

    async def extents(self, index: int, offset: int,
                      count: int) -> list[tuple[int, int, bool]]:
        if not self._seek:
            return [(offset, count, False)]
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + count
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != E.ENXIO:
                        raise
                    data = end  # nothing but a hole up to the end of the file
                if data > pos:
                    n = min(data, end) - pos
                    out.append((pos, n, True))
                    pos += n
                    continue
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                out.append((pos, hole - pos, False))
                pos = hole
        except OSError as e:
            if e.errno in (E.EINVAL, E.EOPNOTSUPP):
                self._seek = False
                return [(offset, count, False)]
            raise OpError(e.errno or E.EIO, f"lseek: {os.strerror(e.errno or E.EIO)}") from None
        return out

    async def read_into(self, index: int, buf: memoryview, offset: int) -> None:
        fd, want, got = self.fd, len(buf), 0
        try:
            if self.blocking:
                while got < want:
                    n = os.preadv(fd, [buf[got:]], offset + got)
                    if n == 0:
                        raise OpError(E.EIO, "unexpected end of file")
                    got += n
                return
            if self._nowait:
                # From the page cache without blocking the event loop; what is not cached
                # is read on a worker thread.
                try:
                    got = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
                except BlockingIOError:
                    got = 0
                except OSError as e:
                    if e.errno not in (E.EOPNOTSUPP, E.EINVAL):
                        raise
                    self._nowait = False
                    got = 0
            while got < want:
                import asyncio

                loop = asyncio.get_running_loop()
                n = await loop.run_in_executor(None, os.preadv, fd, [buf[got:]], offset + got)
                if n == 0:
                    raise OpError(E.EIO, "unexpected end of file")
                got += n
        except OSError as e:
            raise OpError(e.errno or E.EIO, f"pread: {os.strerror(e.errno or E.EIO)}") from None

    async def read_stream(self, buf: memoryview) -> int:
        raise NotImplementedError

    async def write(self, index: int, buf: memoryview, offset: int) -> None:
        fd, want, done = self.fd, len(buf), 0
        try:
            while done < want:
                done += os.pwritev(fd, [buf[done:]] if done else [buf], offset + done)
        except OSError as e:
            raise OpError(e.errno or E.EIO, f"pwrite: {os.strerror(e.errno or E.EIO)}") from None

    async def zero(self, index: int, offset: int, count: int, allocate: bool) -> bool:
        fd = self.fd
        if self.is_block:
            try:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, count))
                return True
            except OSError:
                return False
        if not allocate and self._punch:
            if _try_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count):
                return True
            self._punch = False
        if self._zero_range:
            if _try_fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, count):
                return True
            self._zero_range = False
        return False

    async def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OpError(e.errno or E.EIO, f"fsync: {os.strerror(e.errno or E.EIO)}") from None

    async def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as e:
                raise CopyError(f"{self.name}: close: {os.strerror(e.errno or E.EIO)}") \
                    from None

    def abandon(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class PipeEnd(End):
    """Standard input/output, a pipe, a socket or a character device: a stream."""

    ops_name = "pipe_ops"
    stream = True

    def __init__(self, name: str, fd: int, own: bool) -> None:
        self.name = name
        self.fd = fd
        self.own = own
        self.size = -1

    def can_multi_conn(self) -> bool:
        return False

    async def read_stream(self, buf: memoryview) -> int:
        """Fill buf from the stream as far as it goes; short only at the end."""
        got, want = 0, len(buf)
        try:
            while got < want:
                n = os.readv(self.fd, [buf[got:]])
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise OpError(e.errno or E.EIO, f"read: {os.strerror(e.errno or E.EIO)}") from None
        return got

    async def read_into(self, index: int, buf: memoryview, offset: int) -> None:
        n = await self.read_stream(buf)
        if n < len(buf):
            raise OpError(E.EIO, "unexpected end of file")

    async def write(self, index: int, buf: memoryview, offset: int) -> None:
        done, want = 0, len(buf)
        try:
            while done < want:
                done += os.writev(self.fd, [buf[done:]] if done else [buf])
        except BrokenPipeError:
            raise PipeClosed from None
        except OSError as e:
            raise OpError(e.errno or E.EIO, f"write: {os.strerror(e.errno or E.EIO)}") from None

    async def close(self) -> None:
        if self.own and self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def abandon(self) -> None:
        if self.own and self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


class NullEnd(End):
    """``null:``: discards everything, has no end, zeroes instantly."""

    ops_name = "null_ops"
    discards = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = NULL_SIZE

    def can_zero(self) -> bool:
        return True

    async def write(self, index: int, buf: memoryview, offset: int) -> None:
        return None

    async def zero(self, index: int, offset: int, count: int, allocate: bool) -> bool:
        return True


def open_local(filename: str, writing: bool) -> tuple[End, bool]:
    """nbdcopy's open_local(): ``-``, a file, a device or a pipe. Returns the end and
    whether it forces synchronous mode."""
    forced_sync = False
    own = True
    if filename == "-":
        forced_sync, own = True, False
        fd = sys.stdout.fileno() if writing else sys.stdin.fileno()
        if writing and os.isatty(fd):
            raise CopyError(f"{PROG}: refusing to write to tty")
    else:
        flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(filename, flags)
        except OSError as e:
            if not writing:
                raise CopyError(f"{PROG}: {filename}: {os.strerror(e.errno or E.EIO)}") \
                    from None
            try:
                fd = os.open(filename, flags | os.O_TRUNC | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as e2:
                raise CopyError(f"{PROG}: {filename}: {os.strerror(e2.errno or E.EIO)}") \
                    from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        if own:
            os.close(fd)
        raise CopyError(f"{PROG}: {filename}: {os.strerror(e.errno or E.EIO)}") from None
    if stat.S_ISREG(st.st_mode):
        pref = st.st_blksize if st.st_blksize > 0 and st.st_blksize & (st.st_blksize - 1) == 0 \
            else DEFAULT_PREFERRED
        return FileEnd(filename, fd, st.st_size, pref, False), forced_sync
    if stat.S_ISBLK(st.st_mode):
        try:
            opt = struct.unpack("I", fcntl.ioctl(fd, BLKIOOPT, b"\0" * 4))[0]
        except OSError:
            opt = 0
        if opt <= 0 or opt & (opt - 1):
            opt = DEFAULT_PREFERRED
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            size = st.st_size
        return FileEnd(filename, fd, size, opt, True), forced_sync
    return PipeEnd(filename, fd, own=own), True
