"""The data commands: ``pread``, ``pwrite``, ``zero``, ``trim``, ``flush``, ``cache``,
``block_status``, their ``aio_`` forms, and disconnecting.

An aio call checks its arguments (strict mode: :mod:`pynbd.client.strict`), takes a cookie
and queues its request on the engine; the request is written, and its reply decoded, in the
calls that follow (``poll()``, ``aio_notify_*``, a blocking call), where its callbacks run: a
read's chunk callback as each chunk arrives, a block status's extent callback and then the
completion callback when the reply is complete. A blocking call is its aio call plus the
wait, as in libnbd.
"""

from __future__ import annotations

import ctypes
import errno as _errno
from collections.abc import Callable
from operator import index as _index
from typing import Any

from pynbd.client.engine import PendingCommand
from pynbd.client.strict import StrictRules
from pynbd.errors import CommandError
from pynbd.libnbd.buffers import Buffer, is_buffer, pin, zero
from pynbd.libnbd.callbacks import call, index, u32, u64
from pynbd.libnbd.calls import Handle, api
from pynbd.libnbd.constants import (
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    SHUTDOWN_MASK,
    U64,
)
from pynbd.libnbd.states import CLOSED, DEAD, READY, ST_CONN
from pynbd.protocol.constants import Cmd
from pynbd.protocol.transmission import build_request

__all__ = ["Command", "Commands"]

_READ, _WRITE, _BS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.BLOCK_STATUS)
#: The NBD command of each call that sends one.
_METHOD_CMD = {"flush": int(Cmd.FLUSH), "trim": int(Cmd.TRIM), "zero": int(Cmd.WRITE_ZEROES),
               "cache": int(Cmd.CACHE)}
#: Flags each call accepts (the generated STRICT_FLAGS table).
_OK_FLAGS = {
    "pread": 0, "pread_structured": CMD_FLAG_DF, "pwrite": CMD_FLAG_FUA, "flush": 0,
    "trim": CMD_FLAG_FUA, "cache": 0, "zero": CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    "block_status": CMD_FLAG_REQ_ONE,
}


class Command(PendingCommand):
    """A command from its aio call until it is retired: the engine's record of it in flight
    (its cookie is the wire's), with what libnbd keeps beside it."""

    __slots__ = ("cb_error", "chunk", "completion", "extent", "finished", "name", "nbuf",
                 "retire", "view")

    def __init__(self, cookie: int, name: str, offset: int, count: int, nbd_cmd: int,
                 flags: int, done: Callable[[Any], Any]) -> None:
        # the engine's record (PendingCommand), set here at once: this is the hot path
        self.cookie = cookie
        self.cmd = nbd_cmd
        self.offset = offset
        self.length = count
        self.flags = flags
        self.dest = None
        self.chunk_cb = None
        self.error = 0
        self.message = ""
        self.covered = None
        self.extents = None
        self.result = None
        self.fut = None
        self.nbytes = 0
        self.done = done
        self.failure = None
        # libnbd's
        self.name = name            # libnbd's command name in messages: read, write, ...
        self.view: memoryview | None = None
        self.nbuf: Buffer | None = None
        self.chunk: Callable[..., Any] | None = None
        self.extent: Callable[..., Any] | None = None
        self.completion: Callable[..., Any] | None = None
        self.cb_error = 0           # set by a failed chunk callback
        self.finished = False
        self.retire = False

    @property
    def count(self) -> int:
        return self.length

    def read_chunk(self, data: memoryview, offset: int, status: int, error: int) -> int:
        """A read's chunk, as it arrives: the program's chunk callback, libnbd's way (it may
        set the error; -1 fails the read with it, or EPROTO)."""
        assert self.chunk is not None
        ev = ctypes.c_int(error)
        if call(self.chunk, data, offset, status, ev) == -1 and not self.cb_error:
            if status == 3:
                self.cb_error = ev.value or error
            elif not error:
                self.cb_error = ev.value or _errno.EPROTO
        return 0

    def unpin(self) -> None:
        v, self.view = self.view, None
        if v is not None:
            try:
                v.release()
            except (BufferError, ValueError):
                pass
        self.nbuf = None
        self.dest = None


class Commands(Handle):
    """The data commands of :class:`pynbd.libnbd.NBD`."""

    _cookie: int
    #: Write each request in its aio call (once the program asked for the socket with
    #: aio_get_fd, to poll it itself); otherwise requests go out together at the next wait.
    _eager: bool
    _inflight: dict[int, Command]
    _done: dict[int, Command]

    def _cmd_checks(self, method: str, cmd: int, flags: int, offset: int, count: int) -> int:
        """libnbd's checks before a command is queued (they use no cookie), decided by the
        client's strict rules (pynbd.client.strict) with this handle's mask."""
        flags = u32(flags)
        rules = self._rules
        if rules is None:
            info = self._info
            eng = self._eng
            rules = self._rules = StrictRules(
                int(info.eflags), int(info.size), info.block_size,
                bool(eng is not None and eng.structured), bool(self._contexts))
        try:
            rules.check(cmd, offset, count, flags, _OK_FLAGS[method], self._strict,
                        self._disconnecting)
        except CommandError as e:
            raise self._err(e.message, e.errno) from None
        return flags

    def _new_cmd(self, name: str, nbd_cmd: int, flags: int, offset: int = 0,
                 count: int = 0) -> Command:
        cookie = self._cookie
        self._cookie += 1
        return Command(cookie, name, offset, count, nbd_cmd, flags, self._complete)

    def _queue(self, cmd: Command, payload: Any = None) -> Command:
        """Queue the command on the engine: it is written, and its reply decoded, as the
        calls that follow make progress."""
        eng = self._eng
        assert eng is not None
        if cmd.chunk is not None:
            cmd.chunk_cb = cmd.read_chunk
        self._inflight[cmd.cookie] = cmd
        eng.queue(cmd, payload)
        if self._eager:  # the program polls the socket itself: the request goes out now
            eng.write_queued()
        return cmd

    def _complete(self, cmd: Command) -> None:
        """The engine's ``done``: a command's reply was processed (in the caller's thread),
        or the connection failed. Its extent and completion callbacks run, and it is retired
        or kept for aio_command_completed."""
        if cmd.finished or self._gone:
            return
        err = cmd.cb_error
        if cmd.failure is not None:
            err = _errno.ENOTCONN
            if self._state == READY and not self._disconnecting:
                self._state = DEAD
        elif not err:
            err = cmd.error
        extent = cmd.extent
        if extent is not None and cmd.failure is None and not cmd.error and cmd.result:
            for ctx, ents in cmd.result.items():
                flat: list[int] = []
                for length, flags in ents:
                    flat.append(length)
                    flat.append(flags)
                ev = ctypes.c_int(0)
                if call(extent, ctx, cmd.offset, flat, ev) == -1 and not err:
                    err = ev.value or _errno.EPROTO
        cmd.error = err
        cmd.finished = True
        del self._inflight[cmd.cookie]
        completion = cmd.completion
        if completion is not None:
            ev = ctypes.c_int(err)
            r = call(completion, ev)
            if r == -1 and ev.value:
                cmd.error = ev.value
            if r == 1:
                cmd.retire = True
        cmd.chunk = cmd.extent = cmd.completion = cmd.chunk_cb = None
        if cmd.retire:
            cmd.unpin()
        else:
            self._done[cmd.cookie] = cmd

    def _retire(self, cmd: Command) -> None:
        """aio_command_completed on a done command: forget it; raise its error."""
        self._done.pop(cmd.cookie, None)
        cmd.unpin()
        if cmd.error:
            raise self._err(f"{cmd.name}: command failed", cmd.error)

    def _sync(self, cmd: Command) -> None:
        self._run_until(lambda: cmd.finished)
        self._retire(cmd)

    # ---- building the commands -----------------------------------------------------------
    def _aio_read(self, method: str, buf: Any, offset: Any, chunk: Any, completion: Any,
                  flags: Any, fresh: bool = False) -> Command:
        """``fresh``: ``buf`` is a new zeroed bytearray (pread), no need to zero it again."""
        # hot path (benchmarks/client_read.py): aio_pread of an nbd.Buffer, without flags,
        # that every strict check passes is made here in one function
        offset = _index(offset) & U64
        if type(buf) is Buffer and type(buf._o) is bytearray:
            nbuf: Buffer | None = buf
            mv = memoryview(buf._o)
            buf._init = True
        else:
            mv, nbuf = pin(buf, writable=True)
        n = mv.nbytes
        rules = self._rules
        if not (type(flags) is int and flags == 0 and rules is not None
                and not self._disconnecting and rules.read_ok(offset, n)):
            try:
                flags = self._cmd_checks(method, _READ, flags, offset, n)
            except BaseException:
                mv.release()
                raise
        cookie = self._cookie
        self._cookie = cookie + 1
        cmd = Command(cookie, "read", offset, n, _READ, flags, self._complete)
        cmd.view, cmd.nbuf, cmd.chunk, cmd.completion = mv, nbuf, chunk, completion
        cmd.dest, cmd.nbytes = mv, n
        if self._pread_init and nbuf is None and not fresh and n:
            zero(mv)  # libnbd zeroes the caller's buffer first (set_pread_initialize)
        return self._queue(cmd)

    def _aio_write(self, buf: Any, offset: Any, completion: Any, flags: Any) -> Command:
        offset = u64(offset)
        mv, nbuf = pin(buf, writable=False)
        try:
            flags = self._cmd_checks("pwrite", _WRITE, flags, offset, mv.nbytes)
        except BaseException:
            mv.release()
            raise
        cmd = self._new_cmd("write", _WRITE, flags, offset, mv.nbytes)
        cmd.view, cmd.nbuf, cmd.completion = mv, nbuf, completion
        cmd.nbytes = mv.nbytes
        return self._queue(cmd, mv)

    def _aio_simple(self, method: str, name: str, count: Any, offset: Any, completion: Any,
                    flags: Any) -> Command:
        count, offset = u64(count), u64(offset)
        nbd_cmd = _METHOD_CMD[method]
        flags = self._cmd_checks(method, nbd_cmd, flags, offset, count)
        cmd = self._new_cmd(name, nbd_cmd, flags, offset, count)
        cmd.completion = completion
        return self._queue(cmd)

    def _aio_block_status(self, count: Any, offset: Any, extent: Any, completion: Any,
                          flags: Any) -> Command:
        count, offset = u64(count), u64(offset)
        flags = self._cmd_checks("block_status", _BS, flags, offset, count)
        cmd = self._new_cmd("block-status", _BS, flags, offset, count)
        cmd.extent, cmd.completion = extent, completion
        return self._queue(cmd)

    # ---- the calls ------------------------------------------------------------------------
    @api(ST_CONN)
    def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        """Read ``count`` bytes at ``offset``; returns a bytearray."""
        n = index(count)
        if n < 0:
            raise SystemError("Negative size passed to PyByteArray_FromStringAndSize")
        buf = bytearray(n)
        self._sync(self._aio_read("pread", buf, offset, None, None, flags, fresh=True))
        return buf

    @api(ST_CONN)
    def pread_structured(self, count: int, offset: int,
                         chunk: Callable[[memoryview, int, int, Any], Any],
                         flags: int = 0) -> bytearray:
        """Read with ``chunk(subbuf, offset, status, error)`` called per reply chunk."""
        n = index(count)
        if n < 0:
            raise SystemError("Negative size passed to PyByteArray_FromStringAndSize")
        buf = bytearray(n)
        self._sync(self._aio_read("pread_structured", buf, offset, chunk, None, flags,
                                  fresh=True))
        return buf

    @api(ST_CONN)
    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        """Write ``buf`` (any bytes-like object) at ``offset``."""
        if isinstance(buf, str) or not is_buffer(buf):
            raise TypeError(f"a bytes-like object is required, not '{type(buf).__name__}'")
        self._sync(self._aio_write(buf, offset, None, flags))

    @api(ST_CONN)
    def flush(self, flags: int = 0) -> None:
        self._sync(self._aio_simple("flush", "flush", 0, 0, None, flags))

    @api(ST_CONN)
    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("trim", "trim", count, offset, None, flags))

    @api(ST_CONN)
    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("cache", "cache", count, offset, None, flags))

    @api(ST_CONN)
    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("zero", "write-zeroes", count, offset, None, flags))

    @api(ST_CONN)
    def block_status(self, count: int, offset: int,
                     extent: Callable[[str, int, list[int], Any], Any], flags: int = 0) -> None:
        """BLOCK_STATUS: ``extent(metacontext, offset, entries, error)`` per context, with
        ``entries`` a flat ``[length, flags, length, flags, ...]`` list."""
        self._sync(self._aio_block_status(count, offset, extent, None, flags))

    @api(ST_CONN)
    def aio_pread(self, buf: Any, offset: int, completion: Callable[..., Any] | None = None,
                  flags: int = 0) -> int:
        """Start a read into ``buf`` (an nbd.Buffer or writable buffer, pinned until the
        command is retired); returns the cookie."""
        return self._aio_read("pread", buf, offset, None, completion, flags).cookie

    @api(ST_CONN)
    def aio_pread_structured(self, buf: Any, offset: int, chunk: Callable[..., Any],
                             completion: Callable[..., Any] | None = None,
                             flags: int = 0) -> int:
        return self._aio_read("pread_structured", buf, offset, chunk, completion, flags).cookie

    @api(ST_CONN)
    def aio_pwrite(self, buf: Any, offset: int, completion: Callable[..., Any] | None = None,
                   flags: int = 0) -> int:
        return self._aio_write(buf, offset, completion, flags).cookie

    @api(ST_CONN)
    def aio_flush(self, completion: Callable[..., Any] | None = None, flags: int = 0) -> int:
        return self._aio_simple("flush", "flush", 0, 0, completion, flags).cookie

    @api(ST_CONN)
    def aio_trim(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                 flags: int = 0) -> int:
        return self._aio_simple("trim", "trim", count, offset, completion, flags).cookie

    @api(ST_CONN)
    def aio_cache(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                  flags: int = 0) -> int:
        return self._aio_simple("cache", "cache", count, offset, completion, flags).cookie

    @api(ST_CONN)
    def aio_zero(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                 flags: int = 0) -> int:
        return self._aio_simple("zero", "write-zeroes", count, offset, completion,
                                flags).cookie

    @api(ST_CONN)
    def aio_block_status(self, count: int, offset: int, extent: Callable[..., Any],
                         completion: Callable[..., Any] | None = None, flags: int = 0) -> int:
        return self._aio_block_status(count, offset, extent, completion, flags).cookie

    # ---- disconnecting -------------------------------------------------------------------
    def _start_disconnect(self) -> None:
        """NBD_CMD_DISC, queued after the commands in flight (the server answers them
        first, then hangs up: the handle is then CLOSED)."""
        if self._disconnecting:
            return
        self._disconnecting = True
        cookie = self._cookie
        self._cookie += 1  # NBD_CMD_DISC takes a cookie like any command
        eng = self._eng
        assert eng is not None
        eng._out.append(build_request(Cmd.DISC, cookie, 0, 0, 0, eng.extended))
        eng.write_queued()

    @api(ST_CONN)
    def aio_disconnect(self, flags: int = 0) -> None:
        """Queue NBD_CMD_DISC (after the commands in flight) without waiting."""
        self._check_flags("", flags, SHUTDOWN_MASK)
        self._start_disconnect()

    @api(ST_CONN)
    def shutdown(self, flags: int = 0) -> None:
        """Send NBD_CMD_DISC after the commands in flight and wait until the connection is
        closed (their completion callbacks run meanwhile)."""
        self._check_flags("", flags, SHUTDOWN_MASK)
        self._start_disconnect()
        self._run_until(lambda: self._refresh() in (CLOSED, DEAD))
