"""The file ``pynbd fuse`` shows: :class:`NbdFile` answers the kernel's FUSE requests for
one file backed by an NBD export, on the main process's event loop (the worker processes
use its rules and answers too, see :mod:`pynbd.tools._fuse_sync`)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import sys
import time
from collections.abc import Coroutine
from typing import Any

from pynbd.tools import _fuse_kernel as fk
from pynbd.tools._fuse_cli import PROG, Options, errmsg

__all__ = ["ATTR_VALID", "BUFFER_POOL", "FILE_INO", "MAX_REQUEST_SIZE", "RELEASE_TIMEOUT",
           "ROOT_INO", "SPILL", "NbdFile"]

#: Seconds the file's size and the directory entry may be cached by the kernel (they never
#: change while mounted; libfuse's default timeout is 1 s).
ATTR_VALID = 1.0
#: Seconds to let requests still in flight finish at shutdown (nbdfuse's RELEASE_TIMEOUT).
RELEASE_TIMEOUT = 5.0
#: Largest single NBD request; bigger FUSE requests cannot happen (the kernel's max is 1 MiB)
#: but fallocate ranges can be any size and are split at this.
MAX_REQUEST_SIZE = 32 * 1024 * 1024
#: Requests in flight on one connection before the next connection is used (multi-conn).
SPILL = 16
#: Read buffers kept per size for reuse (the kernel has at most max_background + a few
#: synchronous reads outstanding).
BUFFER_POOL = 64

ROOT_INO = 1
FILE_INO = 2  # in directory mode; in file ("naked") mode the root is the file


class _Eager:
    """Runs a request's coroutine now, up to its first wait, then on from the done-callbacks
    of the futures it waits for: a FUSE request reaches the server in the callback that read
    it, with no task and no extra loop iteration. The coroutines run here await only futures
    (the client's replies, its flow-control slots and the -s lock), never a timer or a task."""

    __slots__ = ("_waiting", "coro", "owner")

    def __init__(self, coro: Coroutine[Any, Any, None], owner: set[Any]) -> None:
        self.coro = coro
        self.owner = owner
        self._waiting: asyncio.Future[Any] | None = None
        owner.add(self)  # before the first step: it may also be the last
        self._step(None)

    def _step(self, _fut: Any, exc: BaseException | None = None) -> None:
        self._waiting = None
        try:
            y = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except BaseException as e:  # noqa: BLE001
            self.owner.discard(self)
            if not isinstance(e, (StopIteration, asyncio.CancelledError)):
                print(f"{PROG}: internal error: {e!r}", file=sys.stderr)
            return
        if y is None:  # a bare yield (asyncio.sleep(0))
            asyncio.get_running_loop().call_soon(self._step, None)
        else:
            y._asyncio_future_blocking = False
            self._waiting = y
            y.add_done_callback(self._step)

    def cancel(self) -> None:
        w = self._waiting
        if w is not None:
            w.remove_done_callback(self._step)
            self._step(None, asyncio.CancelledError())


class NbdFile:
    """Answers FUSE requests for one file backed by an NBD export."""

    def __init__(self, o: Options, nbd: Any) -> None:
        self.o = o
        self.nbd = nbd
        self.clients: list[Any] = list(getattr(nbd, "clients", [nbd]))
        self.size: int = nbd.size
        self.readonly = o.readonly
        self.can_flush: bool = nbd.can_flush()
        self.can_trim: bool = nbd.can_trim()
        self.can_zero: bool = nbd.can_zero()
        self.file_ino = ROOT_INO if o.file_mode else FILE_INO
        self.name = os.fsencode(o.filename)
        t = time.time_ns()
        self.start = (t // 1_000_000_000, t % 1_000_000_000)
        self.ch: fk.FuseDevice | None = None
        self.tasks: set[_Eager] = set()
        self.lock = asyncio.Lock() if o.single else None
        self._last_error = ""
        self._buffers: dict[int, list[bytearray]] = {}
        self.open_flags = 0
        if o.direct_io:
            self.open_flags |= fk.FOPEN_DIRECT_IO | fk.FOPEN_PARALLEL_DIRECT_WRITES
        if o.kernel_cache:
            self.open_flags |= fk.FOPEN_KEEP_CACHE

    # -- attributes
    def file_attr(self) -> tuple[int, ...]:
        mode = stat.S_IFREG | (0o444 if self.readonly else 0o666)
        return fk.FuseChannel.attr(self.file_ino, mode, self.size, 1, self.o.uid, self.o.gid,
                                   self.start)

    def root_attr(self) -> tuple[int, ...]:
        return fk.FuseChannel.attr(ROOT_INO, stat.S_IFDIR | 0o755, 0, 2, self.o.uid,
                                   self.o.gid, self.start)

    def debug(self, what: str) -> None:
        if self.o.verbose:
            print(f"{PROG}: {what}", file=sys.stderr)

    # -- dispatch (runs in the channel's read callback; body valid only now)
    def handle(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        ch = self.ch
        assert ch is not None
        if opcode == fk.READ:
            _, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(body, 0)
            if self.o.verbose:
                self.debug(f"read: count={size}, offset={offset}")
            self._spawn(self._read(unique, offset, size))
        elif opcode == fk.WRITE:
            _, offset, size, _, _, _, _ = fk.WRITE_IN.unpack_from(body, 0)
            if self.o.verbose:
                self.debug(f"write: count={size}, offset={offset}")
            if self.readonly:
                ch.reply_error(unique, errno.EACCES)
                return
            data = bytes(body[fk.WRITE_IN.size:fk.WRITE_IN.size + size])
            self._spawn(self._write(unique, offset, data))
        elif opcode in (fk.FSYNC, fk.FSYNCDIR):
            self.debug("fsync")
            self._spawn(self._fsync(unique))
        elif opcode == fk.FALLOCATE:
            _, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(body, 0)
            self.debug(f"fallocate: mode={mode}, offset={offset}, len={length}")
            self._spawn(self._fallocate(unique, mode, offset, length))
        else:
            self.handle_meta(opcode, unique, nodeid, body)

    def handle_meta(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        """Every request but the four that go to the server (read, write, fsync,
        fallocate): answered from what is known, at once."""
        ch = self.ch
        assert ch is not None
        if opcode == fk.GETATTR:
            if nodeid == self.file_ino:
                ch.reply_attr(unique, self.file_attr(), ATTR_VALID)
            elif nodeid == ROOT_INO:
                ch.reply_attr(unique, self.root_attr(), ATTR_VALID)
            else:
                ch.reply_error(unique, errno.ENOENT)
        elif opcode == fk.LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            self.debug(f"lookup: {os.fsdecode(name)}")
            if not self.o.file_mode and nodeid == ROOT_INO and name == self.name:
                ch.reply_entry(unique, FILE_INO, self.file_attr(), ATTR_VALID)
            else:
                ch.reply_error(unique, errno.ENOENT)
        elif opcode == fk.OPEN:
            (flags,) = fk.struct.unpack_from("=I", body, 0)
            self.debug(f"open: flags={flags:#o}")
            if nodeid != self.file_ino:
                ch.reply_error(unique, errno.EISDIR)
            elif self.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
                ch.reply_error(unique, errno.EACCES)
            else:
                ch.reply_open(unique, self.open_flags)
        elif opcode == fk.SETATTR:
            (valid,) = fk.SETATTR_VALID.unpack_from(body, 0)[:1]
            if valid & (fk.FATTR_MODE | fk.FATTR_UID | fk.FATTR_GID):
                ch.reply_error(unique, errno.EPERM)  # the mode and owner are fixed
            elif valid & fk.FATTR_SIZE and self.readonly:
                ch.reply_error(unique, errno.EACCES)
            else:
                # A size change (O_TRUNC, ftruncate) is accepted and changes nothing, as on a
                # block device: the size is the export's (`cp disk.raw MOUNT/nbd` works).
                # Times (touch) have nowhere to go either.
                ch.reply_attr(unique, self.file_attr() if nodeid == self.file_ino
                              else self.root_attr(), ATTR_VALID)
        elif opcode in (fk.RELEASE, fk.RELEASEDIR):
            ch.reply(unique)
        elif opcode == fk.OPENDIR:
            if nodeid == ROOT_INO and not self.o.file_mode:
                ch.reply_open(unique, 0)
            else:
                ch.reply_error(unique, errno.ENOTDIR)
        elif opcode == fk.READDIR:
            _, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(body, 0)
            entries = [(ROOT_INO, ".", fk.DT_DIR), (ROOT_INO, "..", fk.DT_DIR),
                       (FILE_INO, self.o.filename, fk.DT_REG)]
            ch.reply_dirents(unique, entries, offset, size)
        elif opcode == fk.STATFS:
            ch.reply_statfs(unique)
        else:
            # FLUSH (close needs no server round trip), xattrs, ACCESS, ...: ENOSYS, which
            # the kernel remembers, so it does not ask again.
            ch.reply_error(unique, errno.ENOSYS)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        _Eager(coro, self.tasks)

    def _pick(self) -> Any:
        """The connection for the next request: the first one with fewer than SPILL requests
        in flight. Few requests share one connection, so a batch goes out in one write and
        its replies come back in one read; more spill over to the other connections."""
        for c in self.clients:
            if c.in_flight < SPILL:
                return c
        return min(self.clients, key=lambda c: c.in_flight)

    def flush_requests(self) -> None:
        """Send the NBD requests queued while reading a batch of FUSE requests now, in one
        write per connection, rather than one loop iteration later."""
        for c in self.clients:
            c.send_now()

    def reply_failure(self, unique: int, e: BaseException) -> None:
        err = getattr(e, "errno", None)
        if not isinstance(err, int) or err <= 0 or isinstance(e, ConnectionError):
            err = errno.EIO
        msg = f"{PROG}: {errmsg(e)}"
        if msg != self._last_error or self.o.verbose:  # a dead server: say it once
            print(msg, file=sys.stderr)
            self._last_error = msg
        assert self.ch is not None
        self.ch.reply_error(unique, err)

    async def _locked(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self.lock is None:
            return await coro
        async with self.lock:
            return await coro

    # -- data
    async def _read(self, unique: int, offset: int, count: int) -> None:
        assert self.ch is not None
        if offset >= self.size:
            self.ch.reply(unique)
            return
        count = min(count, self.size - offset, MAX_REQUEST_SIZE)
        # A buffer from the pool: the reply lands in it and the kernel copies it out in
        # writev, after which it is free again (no allocation, no page faults per read).
        free = self._buffers.get(count)
        buf = free.pop() if free else bytearray(count)
        try:
            if self.lock is None:
                await self._pick().pread_into(buf, offset)
            else:
                await self._locked(self._pick().pread_into(buf, offset))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        self.ch.reply(unique, buf)
        free = self._buffers.setdefault(count, [])
        if len(free) < BUFFER_POOL:
            free.append(buf)

    def write_length(self, offset: int, count: int) -> int:
        """How much of a write at ``offset`` fits the export; -errno when none of it may be
        written (the export cannot grow: as writing past a disk's end)."""
        if offset >= self.size:
            return -errno.ENOSPC if count else 0
        return min(count, self.size - offset)

    async def _write(self, unique: int, offset: int, data: bytes) -> None:
        assert self.ch is not None
        n = self.write_length(offset, len(data))
        if n <= 0:
            self.ch.reply_error(unique, -n)
            return
        if n < len(data):
            data = data[:n]
        try:
            if self.lock is None:
                await self._pick().pwrite(data, offset)
            else:
                await self._locked(self._pick().pwrite(data, offset))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        self.ch.reply(unique, fk.WRITE_OUT.pack(len(data), 0))

    async def _fsync(self, unique: int) -> None:
        assert self.ch is not None
        if not self.readonly and self.can_flush:
            try:
                await self._locked(self.nbd.flush())
            except Exception as e:  # noqa: BLE001
                self.reply_failure(unique, e)
                return
        self.ch.reply(unique)

    def fallocate_plan(self, mode: int, offset: int, length: int) -> tuple[str, int] | int:
        """What a fallocate asks of the server: ("trim" | "zero" | "write", end), or an
        errno to answer at once."""
        if self.readonly:
            return errno.EACCES
        if mode & fk.FALLOC_FL_PUNCH_HOLE:
            if not self.can_trim:
                return errno.EOPNOTSUPP
            op = "trim"
        elif mode & fk.FALLOC_FL_ZERO_RANGE:
            op = "zero" if self.can_zero else "write"
        else:  # plain allocation: nothing to do on a block device, and not promised
            return errno.EOPNOTSUPP
        return op, min(offset + length, self.size)

    @staticmethod
    def fallocate_steps(op: str, offset: int, end: int) -> list[tuple[int, int]]:
        """(offset, count) of each request a fallocate is split into."""
        step = MAX_REQUEST_SIZE if op != "write" else 1 << 20
        return [(pos, min(end - pos, step)) for pos in range(offset, end, step)]

    async def _fallocate(self, unique: int, mode: int, offset: int, length: int) -> None:
        ch = self.ch
        assert ch is not None
        plan = self.fallocate_plan(mode, offset, length)
        if isinstance(plan, int):
            ch.reply_error(unique, plan)
            return
        op, end = plan
        try:
            for pos, n in self.fallocate_steps(op, offset, end):
                if op == "trim":
                    await self._locked(self._pick().trim(n, pos))
                elif op == "zero":
                    await self._locked(self._pick().zero(n, pos))
                else:
                    await self._locked(self._pick().pwrite(bytes(n), pos))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        ch.reply(unique)

    async def drain(self) -> bool:
        """Let requests in flight finish (at most RELEASE_TIMEOUT), then flush the server's
        cache. False when the server did not answer in time (nothing more is asked of it)."""
        if self.tasks:
            deadline = time.monotonic() + RELEASE_TIMEOUT
            while self.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            stuck = bool(self.tasks)
            for t in list(self.tasks):
                t.cancel()
            if stuck:
                print(f"{PROG}: requests still in flight after {RELEASE_TIMEOUT:g} s; "
                      "giving up on them", file=sys.stderr)
                return False
        if not self.readonly and self.can_flush and not getattr(self.nbd, "failure", None):
            try:
                await asyncio.wait_for(self.nbd.flush(), RELEASE_TIMEOUT)
            except TimeoutError:
                print(f"{PROG}: flush at unmount: timed out", file=sys.stderr)
                return False
            except Exception as e:  # noqa: BLE001
                print(f"{PROG}: flush at unmount: {errmsg(e)}", file=sys.stderr)
        return True


# ----------------------------------------------------------------------------------------
# running
