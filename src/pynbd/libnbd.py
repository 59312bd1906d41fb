"""libnbd's Python API (``import nbd``) on top of pynbd's asyncio client engine.

``import pynbd.libnbd as nbd`` and programs written for libnbd's Python bindings (Debian's
python3-libnbd 1.14.2) run unchanged: the same ``nbd.NBD`` methods with the same signatures,
constants, ``nbd.Buffer``, ``nbd.Error`` (``"nbd_pread: request out of bounds: Invalid
argument (EINVAL)"``), cookies, ``poll`` and completion-callback rules. Failures read as
libnbd's: NBD URIs are parsed as libnbd does (libxml2's RFC 3986 parser, then lib/uri.c's
checks, in its order and words), connections that fail name getaddrinfo() or connect(2)
as libnbd does, a subprocess server that cannot be run prints the child's line on stderr,
and option mode stays in negotiation with a plain newstyle server (``opt_go()`` sends
NBD_OPT_EXPORT_NAME; ``opt_list``/``opt_info`` fail with ENOTSUP). The calls libnbd 1.16
added that need no new protocol work are here too: ``close()``, ``nbd.ClosedHandle``,
``nbd.nbd()``, ``stats_*``, ``SIZE_PAYLOAD``, ``STRICT_PAYLOAD``, ``supports_vsock()``.

How it works
------------
There is one implementation of every operation: the engine
(:class:`pynbd.client.engine.AsyncClient`). A process-wide event loop runs in a daemon thread
(started on the first connect, restarted in a forked child). A synchronous call is its aio call
plus a wait, as in libnbd (``lib/rw.c``): ``h.pread()`` checks its arguments, takes a cookie,
submits the engine coroutine to the loop and then waits for *its* completion.

aio calls return the cookie at once. When the engine finishes a command, the loop thread only
queues it on the handle; everything the user sees - chunk, extent and completion callbacks,
the move to the "done" list, auto-retirement - happens in the caller's thread, inside the next
``poll()``, ``aio_notify_read()``, sync command, ``shutdown()`` or ``aio_command_completed``-
driving loop on that handle. That is libnbd's rule ("callbacks run inside the library call that
processed the reply") with "processed the reply" read as "took it off the handle's queue":

- chunk callbacks of one read run one after another when that read has completed, not as each
  chunk arrives (the engine records the chunks; the user's callback then sees the same
  ``(subbuf, offset, status, error)`` tuples, ``subbuf`` slicing the caller's buffer);
- ``aio_in_flight()`` counts commands whose completion has not been processed yet; a completed
  command stays "in flight" until a ``poll()`` (or a sync call) picks it up, as in libnbd;
- ``poll(timeout)`` returns 1 as soon as anything was processed (one call may process several
  replies; libnbd processes at most what one ``poll(2)`` round reads), 0 on timeout.

``aio_get_fd()`` returns the read end of a pipe that becomes readable when the handle has
completions to process (not the socket: the socket belongs to the event loop), and
``aio_get_direction()`` says READ while connecting or connected, so programs driving the
handle from their own ``select``/``poll`` loop with ``aio_notify_read()`` work too.

Each handle has a lock held for the whole of every call, as libnbd: calls from several
threads on one handle run one at a time; callbacks run with the lock held.

Differences from libnbd (and why)
---------------------------------
- No TLS yet (the engine has none): ``supports_tls()`` is False, and ``set_tls(TLS_REQUIRE)``
  and ``nbds://`` URIs fail as in a libnbd built without GnuTLS ("libnbd was compiled
  without TLS support", ENOTSUP; for a URI after the checks lib/uri.c makes first).
  ``TLS_ALLOW`` is accepted and means plain NBD (such a libnbd refuses it too).
- Strict mode defaults to 1.14's ``STRICT_MASK`` (0x1f); ``STRICT_PAYLOAD`` (1.16) is
  accepted by ``set_strict_mode`` but off by default.
- ``connection_state()`` reports the public states only (START, CONNECT.START, NEGOTIATING,
  READY, CLOSED, DEAD), never libnbd's internal sub-states; ``aio_is_processing()`` is False.
- Debug output is libnbd's per-call ``enter:``/``leave:`` trace (same format); the engine's
  internal state-machine messages do not exist.
- ``get_uri()`` after ``connect_systemd_socket_activation`` raises EINVAL (the engine removes
  its temporary socket once connected, so there is nothing to reconnect to).
- ``stats_bytes_*`` count protocol bytes exactly; ``stats_chunks_received`` counts one chunk
  per structured read data/hole chunk and one per other reply, not the final empty chunk of a
  structured reply.
- ``nbd.Buffer(n)`` is zero-filled, not uninitialised (Python cannot allocate otherwise); the
  ``_o``/``_init`` bookkeeping is libnbd's.
- ``close()`` (and garbage collection, and exit) is polite: commands still in flight may
  finish (for up to 10 s, their callbacks are not called) and NBD_CMD_DISC is sent; libnbd
  just hangs up.
- ``connect_systemd_socket_activation`` keeps its end of the listening socket open until it
  is connected, so a server that cannot be run or exits at once always resets the
  connection ("recv: Connection reset by peer"); libnbd closes it first and, when the
  server is already gone, rarely reports "connect: Connection refused" instead. The server
  is started through ``/bin/sh -c 'exec ...'`` (LISTEN_PID is still the server's pid).
- An aio connect runs getaddrinfo() and connect(2) in the call, as libnbd (their failures
  fail the call); the rest of an aio connect or option makes progress in the background and
  its completion is processed by ``poll()``: until then ``connection_state()`` reads
  CONNECT.START (libnbd may finish it inside the aio call when the server answers quickly).
- The type of a raised error is ``pynbd.libnbd.Error`` (libnbd: ``nbd.Error``).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import contextvars
import ctypes
import errno as _errno
import functools
import itertools
import operator
import os
import re
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar

from pynbd.client.engine import PROC_EXIT_GRACE as _PROC_EXIT_GRACE
from pynbd.client.engine import AsyncClient
from pynbd.client.strict import StrictRules
from pynbd.errors import CommandError, OptionError, ProtocolError, RemoteProtocolError
from pynbd.protocol._uriparse import libnbd_queries, parse_libxml2
from pynbd.protocol.client import ExportSizeError
from pynbd.protocol.constants import Cmd, Rep, TxFlag

__all__ = [
    "AIO_DIRECTION_BOTH",
    "AIO_DIRECTION_READ",
    "AIO_DIRECTION_WRITE",
    "ALLOW_TRANSPORT_MASK",
    "ALLOW_TRANSPORT_TCP",
    "ALLOW_TRANSPORT_UNIX",
    "ALLOW_TRANSPORT_VSOCK",
    "CMD_FLAG_DF",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_FUA",
    "CMD_FLAG_MASK",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "CONTEXT_BASE_ALLOCATION",
    "HANDSHAKE_FLAG_FIXED_NEWSTYLE",
    "HANDSHAKE_FLAG_MASK",
    "HANDSHAKE_FLAG_NO_ZEROES",
    "NAMESPACE_BASE",
    "NBD",
    "READ_DATA",
    "READ_ERROR",
    "READ_HOLE",
    "SHUTDOWN_ABANDON_PENDING",
    "SHUTDOWN_MASK",
    "SIZE_MAXIMUM",
    "SIZE_MINIMUM",
    "SIZE_PAYLOAD",
    "SIZE_PREFERRED",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRICT_ALIGN",
    "STRICT_BOUNDS",
    "STRICT_COMMANDS",
    "STRICT_FLAGS",
    "STRICT_MASK",
    "STRICT_PAYLOAD",
    "STRICT_ZERO_SIZE",
    "TLS_ALLOW",
    "TLS_DISABLE",
    "TLS_REQUIRE",
    "Buffer",
    "ClosedHandle",
    "Error",
    "__version__",
    "nbd",
    "package_name",
]

# ==========================================================================================
# constants (libnbd's names and values)

TLS_DISABLE = 0
TLS_ALLOW = 1
TLS_REQUIRE = 2

SIZE_MINIMUM = 0
SIZE_PREFERRED = 1
SIZE_MAXIMUM = 2
SIZE_PAYLOAD = 3  # 1.16

CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_MASK = 0x1f

HANDSHAKE_FLAG_FIXED_NEWSTYLE = 0x01
HANDSHAKE_FLAG_NO_ZEROES = 0x02
HANDSHAKE_FLAG_MASK = 0x03

STRICT_COMMANDS = 0x01
STRICT_FLAGS = 0x02
STRICT_BOUNDS = 0x04
STRICT_ZERO_SIZE = 0x08
STRICT_ALIGN = 0x10
STRICT_PAYLOAD = 0x20  # 1.16; not part of the 1.14 mask (nor of the default)
STRICT_MASK = 0x1f

ALLOW_TRANSPORT_TCP = 0x01
ALLOW_TRANSPORT_UNIX = 0x02
ALLOW_TRANSPORT_VSOCK = 0x04
ALLOW_TRANSPORT_MASK = 0x07

SHUTDOWN_ABANDON_PENDING = 0x10000
SHUTDOWN_MASK = 0x10000

AIO_DIRECTION_READ = 1
AIO_DIRECTION_WRITE = 2
AIO_DIRECTION_BOTH = 3
READ_DATA = 1
READ_HOLE = 2
READ_ERROR = 3
NAMESPACE_BASE = "base:"
CONTEXT_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2

#: The libnbd release whose API and behaviour this module reproduces.
_LIBNBD_VERSION = "1.14.2"

#: libnbd refuses reads and writes larger than this (_MAX_REQUEST_SIZE in lib/internal.h).
_MAX_REQUEST_SIZE = 64 * 1024 * 1024
#: Every mask set_strict_mode accepts (1.14's bits plus 1.16's STRICT_PAYLOAD).
_STRICT_ACCEPTED = STRICT_MASK | STRICT_PAYLOAD
#: How long close() waits for a polite NBD_CMD_DISC before it just hangs up.
_CLOSE_TIMEOUT = 10.0
#: While poll() waits with nothing in flight it checks this often whether the server hung up.
_IDLE_CHECK = 0.05

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

#: NBD URI scheme -> (transport, TLS), as lib/uri.c compares them (case-sensitively).
_URI_SCHEMES = {"nbd": ("tcp", False), "nbds": ("tcp", True), "nbd+unix": ("unix", False),
                "nbds+unix": ("unix", True), "nbd+vsock": ("vsock", False),
                "nbds+vsock": ("vsock", True)}
_TRANSPORT_BIT = {"tcp": ALLOW_TRANSPORT_TCP, "unix": ALLOW_TRANSPORT_UNIX,
                  "vsock": ALLOW_TRANSPORT_VSOCK}


# ==========================================================================================
# exceptions


class Error(Exception):
    """Exception thrown when the underlying libnbd call fails.

    ``args == (message, errnum)``. Use ``.string`` for the printable message, ``.errnum`` for
    the numeric errno (0 if the error did not correspond to a system error) and ``.errno`` for
    its Python name (``"EINVAL"``), or None.
    """

    @property
    def string(self) -> Any:
        return self.args[0]

    @property
    def errnum(self) -> Any:
        return self.args[1]

    @property
    def errno(self) -> str | None:
        try:
            return _errno.errorcode[self.args[1]]
        except (KeyError, IndexError, TypeError):
            return None

    def __str__(self) -> str:
        if self.errno:
            return f"{self.string} ({self.errno})"
        return f"{self.string}"


class ClosedHandle(ValueError):
    """Raised by every method of an :class:`NBD` handle after :meth:`NBD.close`."""


def _mkerr(ctx: str, msg: str, errnum: int = 0) -> Error:
    text = f"{ctx}: {msg}" if ctx else msg
    if errnum:
        text += ": " + os.strerror(errnum)
    return Error(text, errnum)


# ==========================================================================================
# nbd.Buffer


class Buffer:
    """Asynchronous I/O persistent buffer."""

    def __init__(self, len: int) -> None:
        """Allocate an uninitialized AIO buffer used for nbd.aio_pread."""
        self._o: Any = bytearray(len)

    @classmethod
    def from_buffer(cls, buf: Any) -> Buffer:
        """Create an AIO buffer that shares an existing buffer-like object."""
        self = cls(0)
        with memoryview(buf):
            self._o = buf
        self._init = True
        return self

    @classmethod
    def from_bytearray(cls, ba: Any) -> Buffer:
        """Create an AIO buffer from a bytearray or other buffer-like object (a copy), or from
        anything ``bytearray()`` accepts."""
        return cls.from_buffer(bytearray(ba))

    def to_buffer(self) -> Any:
        """Return a shared view of the AIO buffer contents."""
        if not hasattr(self, "_init"):
            self._o = bytearray(len(self._o))
            self._init = True
        return self._o

    def to_bytearray(self) -> bytearray:
        """Copy an AIO buffer into a new bytearray."""
        if not hasattr(self, "_init"):
            return bytearray(len(self._o))
        return bytearray(self._o)

    def size(self) -> int:
        """Return the size of an AIO buffer."""
        return len(self)

    def __len__(self) -> int:
        return len(self._o)

    def is_zero(self, offset: int = 0, size: int = -1) -> bool:
        """True if every byte in ``[offset, offset+size)`` (``size=-1``: to the end) is zero."""
        with memoryview(self._o) as m:
            n = m.nbytes
            offset = operator.index(offset)
            size = operator.index(size)
            if offset < 0 or offset > n:
                raise IndexError("offset out of range")
            if size == -1:
                size = n - offset
            elif size < 0:
                raise IndexError("size cannot be negative, except -1 to mean to the end of "
                                 "the buffer")
            if size > n - offset:
                raise IndexError("size out of range")
            if size == 0 or not hasattr(self, "_init"):
                return True
            view = m.cast("B")[offset:offset + size]
            return not any(view) if size < 64 else view == bytes(size)


# Plain ints for what every command checks (enum operators are Python functions).
_TX_DF, _TX_FAST_ZERO = int(TxFlag.SEND_DF), int(TxFlag.SEND_FAST_ZERO)
_TX_WRITE_ZEROES = int(TxFlag.SEND_WRITE_ZEROES)


def _pin(buf: Any, writable: bool) -> tuple[memoryview, Buffer | None]:
    """The contiguous byte view an aio call holds until the command is retired."""
    nbuf = buf if isinstance(buf, Buffer) else None
    obj = buf._o if nbuf is not None else buf
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError("aio_buffer: expecting buffer or nbd.Buffer instance") from None
    if writable and mv.readonly:
        mv.release()
        raise BufferError("underlying buffer is not writable")
    if not mv.contiguous:
        mv.release()
        raise BufferError("underlying buffer is not C-contiguous")
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format != "B":
        flat = mv.cast("B")
        mv.release()
        mv = flat
    if nbuf is not None:
        nbuf._init = True
    return mv, nbuf


# ==========================================================================================
# the event loop shared by every handle of the process


class _Runtime:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="pynbd-libnbd", daemon=True)
        self._lock = threading.Lock()
        self._queue: list[Any] = []  # coroutines to start, in call order
        self._scheduled = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def spawn(self, coro: Any) -> None:
        """Start ``coro`` as a task on the loop; calls keep their order; one wake-up per batch."""
        with self._lock:
            self._queue.append(coro)
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            self.loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        with self._lock:
            queue, self._queue = self._queue, []
            self._scheduled = False
        for coro in queue:
            t = self.loop.create_task(coro)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread


_rt: _Runtime | None = None
_rt_lock = threading.Lock()


def _runtime() -> _Runtime:
    global _rt
    rt = _rt
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _rt_lock:
        if _rt is None or _rt.pid != os.getpid():
            _rt = _Runtime()
        return _rt


# ==========================================================================================
# the engine, configured per handle


class _Stats:
    __slots__ = ("bytes_received", "bytes_sent", "chunks_received", "chunks_sent")

    def __init__(self) -> None:
        self.bytes_sent = self.chunks_sent = self.bytes_received = self.chunks_received = 0


class _CountingStream:
    """Counts the protocol bytes (and request/option headers) going through the engine's stream."""

    def __init__(self, inner: Any, stats: _Stats) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_stats", stats)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def write(self, bufs: list[Any]) -> None:
        st = self._stats
        for b in bufs:
            n = memoryview(b).nbytes
            st.bytes_sent += n
            if isinstance(b, bytes) and n != 4:  # headers/options; not the client flags
                st.chunks_sent += 1
        self._inner.write(bufs)

    def readinto(self, view: memoryview) -> int:
        n = self._inner.readinto(view)
        self._stats.bytes_received += n
        return n  # type: ignore[no-any-return]

    def readinto2(self, first: memoryview, then: memoryview) -> int:
        n = self._inner.readinto2(first, then)
        self._stats.bytes_received += n
        return n  # type: ignore[no-any-return]

    async def read_some(self, n: int = 65536) -> bytes:
        """Negotiation reads. Unlike the stream's own read_some, a reset connection raises
        (libnbd: "recv: Connection reset by peer") and EOF raises :class:`_HangUp`."""
        inner = self._inner
        rfd = getattr(inner, "rfd", None)
        if rfd is None:
            data: bytes = await inner.read_some(n)
        else:
            loop = asyncio.get_running_loop()
            while True:
                if inner.closed:
                    data = b""
                    break
                try:
                    data = os.read(rfd, n)
                    break
                except BlockingIOError:
                    pass
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(rfd, _wake, fut)
                try:
                    await fut
                finally:
                    if not inner.closed:
                        loop.remove_reader(rfd)
        if not data:
            raise _HangUp("server closed the connection during the handshake")
        self._stats.bytes_received += len(data)
        return data


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _HangUp(RemoteProtocolError):
    """The server closed the connection while negotiating (libnbd: "recv: server
    disconnected unexpectedly")."""


_SETTINGS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("pynbd_libnbd_settings")


class _Engine(AsyncClient):
    """The engine with a handle's pre-connect settings applied, byte counting, and libnbd's
    ways of starting a subprocess server and of option mode on a plain newstyle server."""

    def __init__(self) -> None:
        super().__init__()
        settings = dict(_SETTINGS.get({}))
        self.lib_stats: _Stats = settings.pop("lib_stats", None) or _Stats()
        #: ["connect"] until the socket is connected, then ["handshake"].
        self.lib_phase: list[str] = settings.pop("lib_phase", None) or ["connect"]
        self.lib_in_handshake = False
        for k, v in settings.items():
            setattr(self, k, v)

    async def _handshake(self, *a: Any, **kw: Any) -> Any:
        self.lib_phase[0] = "handshake"
        if self.stream is not None and not isinstance(self.stream, _CountingStream):
            self.stream = _CountingStream(self.stream, self.lib_stats)  # type: ignore[assignment]
        self.lib_in_handshake = True
        try:
            return await super()._handshake(*a, **kw)
        finally:
            self.lib_in_handshake = False

    async def _export_name(self, name: str) -> None:
        # libnbd in option mode stays in negotiation with a plain newstyle server too, and
        # sends NBD_OPT_EXPORT_NAME at opt_go().
        if self.opt_mode and self.lib_in_handshake:
            return
        await super()._export_name(name)

    async def lib_export_name(self, name: str) -> None:
        """opt_go() on a plain newstyle server: NBD_OPT_EXPORT_NAME, then transmission."""
        await super()._export_name(name)

    def _start_command(self, argv: list[str]) -> socket.socket:
        """connect_command: a program that cannot be run gets libnbd's child's message on
        stderr, and the handle then sees the server hang up, as in libnbd."""
        from pynbd.client.spawn import start_command

        mine, theirs = socket.socketpair()
        try:
            self._proc = start_command(argv, theirs)
        except OSError as e:
            _child_perror(argv[0], e)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._proc_grace = _PROC_EXIT_GRACE
        return mine

    def _spawn_activated(self, argv: list[str], ls: socket.socket) -> None:
        """connect_systemd_socket_activation as libnbd does it: a program that cannot be run
        gets libnbd's child's message on stderr (and the handle then sees the connection
        reset, "recv: Connection reset by peer", as in libnbd)."""
        failed = _exec_error(argv[0])
        if failed is not None:
            _child_perror(argv[0], failed)
        else:
            super()._spawn_activated(argv, ls)

    async def _recv_event(self) -> Any:
        ev = await super()._recv_event()
        self.lib_stats.chunks_received += 1
        return ev


async def _connect_engine(settings: dict[str, Any], kw: dict[str, Any]) -> _Engine:
    _SETTINGS.set(settings)
    pending = kw.pop("pending", None)
    if pending is not None:
        sock, rest = pending
        try:
            await _finish_connect(sock)
        except OSError:
            sock.close()
            if not rest:
                raise
            sock = await _tcp_connect(rest)
        except BaseException:
            sock.close()
            raise
        _nodelay(sock)
        kw["sock"] = sock
    return await _Engine.connect(**kw)  # type: ignore[return-value]


async def _finish_connect(sock: socket.socket) -> None:
    """Wait for a non-blocking connect(2) in progress; raise its failure."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _tcp_connect(addrs: list[Any]) -> socket.socket:
    """Try each getaddrinfo() address in turn, as libnbd; raise the last failure."""
    loop = asyncio.get_running_loop()
    last: OSError = OSError(_errno.ECONNREFUSED, os.strerror(_errno.ECONNREFUSED))
    for family, kind, proto, _canon, addr in addrs:
        try:
            s = socket.socket(family, kind, proto)
        except OSError as e:
            last = e
            continue
        s.setblocking(False)
        try:
            await loop.sock_connect(s, addr)
        except OSError as e:
            s.close()
            last = e
            continue
        except BaseException:
            s.close()
            raise
        return s
    raise last


def _exec_error(prog: str) -> OSError | None:
    """What execvp(prog) would fail with before running anything (None: it would run)."""
    def check(path: str) -> OSError | None:
        if not os.path.exists(path):
            return FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return PermissionError(_errno.EACCES, os.strerror(_errno.EACCES))
        return None

    if not prog:
        return FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))
    if "/" in prog:
        return check(prog)
    seen: OSError | None = None
    for d in os.environ.get("PATH", "/bin:/usr/bin").split(os.pathsep):
        err = check(os.path.join(d or ".", prog))
        if err is None:
            return None
        if isinstance(err, PermissionError):
            seen = err
    return seen or FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))


def _child_perror(prog: str, err: OSError) -> None:
    """The line libnbd's child writes on stderr when it cannot run the server."""
    text = f"{prog}: {os.strerror(err.errno or _errno.ENOENT)}\n"
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        os.write(2, text.encode("utf-8", "surrogateescape"))


# ==========================================================================================
# handle states


_CREATED, _CONNECTING, _NEGOTIATING, _READY, _CLOSED, _DEAD = (
    "created", "connecting", "negotiating", "ready", "closed", "dead")

_STATE_TEXT = {
    _CREATED: ("START", "Handle after being initially created"),
    _CONNECTING: ("CONNECT.START", "Initial call to connect(2) on the socket"),
    _NEGOTIATING: ("NEGOTIATING", "Connection is ready to negotiate an NBD option"),
    _READY: ("READY", "Connection is ready to process NBD commands"),
    _CLOSED: ("CLOSED", "Connection is closed"),
    _DEAD: ("DEAD", "Connection is in an unrecoverable error state, can only be closed"),
}
_STATE_DESC = [(_CREATED, "newly created"), (_CONNECTING, "connecting"),
               (_NEGOTIATING, "negotiating"), (_READY, "connected with the server"),
               (_CLOSED, "shut down"), (_DEAD, "dead")]

_ST_CREATED = frozenset({_CREATED})
_ST_CREATED_NEG = frozenset({_CREATED, _NEGOTIATING})
_ST_NEG = frozenset({_NEGOTIATING})
_ST_INFO = frozenset({_NEGOTIATING, _READY, _CLOSED})
_ST_CONN = frozenset({_READY})
_ST_INFLIGHT = frozenset({_READY, _CLOSED, _DEAD})
_ST_URI = frozenset({_CONNECTING, _NEGOTIATING, _READY, _CLOSED, _DEAD})

#: NBD_REP_ERR_* -> errno, as libnbd's option state machines map them.
_REP_ERRNO: dict[int, int] = {
    Rep.ERR_POLICY: _errno.ENOTSUP, Rep.ERR_PLATFORM: _errno.ENOTSUP,
    Rep.ERR_INVALID: _errno.EINVAL, Rep.ERR_TOO_BIG: _errno.EINVAL,
    Rep.ERR_TLS_REQD: _errno.ENOTSUP, Rep.ERR_UNKNOWN: _errno.ENOENT,
    Rep.ERR_SHUTDOWN: _errno.ESHUTDOWN, Rep.ERR_BLOCK_SIZE_REQD: _errno.EINVAL,
    Rep.ERR_UNSUP: _errno.ENOTSUP,
}


def _go_failure_text(reply: int, export: str) -> tuple[str, int]:
    """libnbd's message for a refused NBD_OPT_GO when not in option mode."""
    if reply in (Rep.ERR_POLICY, Rep.ERR_PLATFORM):
        return "handshake: server policy prevents NBD_OPT_GO", 0
    if reply in (Rep.ERR_INVALID, Rep.ERR_TOO_BIG):
        return "handshake: server rejected NBD_OPT_GO as invalid", _errno.EINVAL
    if reply == Rep.ERR_TLS_REQD:
        return "handshake: server requires TLS encryption first", _errno.ENOTSUP
    if reply == Rep.ERR_UNKNOWN:
        return f"handshake: server has no export named '{export}'", _errno.ENOENT
    if reply == Rep.ERR_SHUTDOWN:
        return "handshake: server is shutting down", _errno.ESHUTDOWN
    if reply == Rep.ERR_BLOCK_SIZE_REQD:
        return "handshake: server requires specific block sizes", _errno.EINVAL
    return f"handshake: unknown reply from NBD_OPT_GO: 0x{reply:x}", 0


def _failure(exc: BaseException, *, connecting: bool = False) -> tuple[str, int]:
    """(message, errno) for an exception out of the engine that ended the connection."""
    if isinstance(exc, CommandError):
        return exc.message, exc.errno
    if isinstance(exc, _HangUp):
        return "recv: server disconnected unexpectedly", 0
    if isinstance(exc, ExportSizeError):  # libnbd >= 1.16.5's words (there from get_size)
        return str(exc), exc.errno
    if isinstance(exc, ProtocolError):
        return (f"handshake: {exc}" if connecting else f"protocol error: {exc}"), _errno.EPROTO
    if isinstance(exc, OSError) and exc.errno:
        return "recv", exc.errno
    if isinstance(exc, (ConnectionError, EOFError)):
        return "recv: server disconnected unexpectedly", 0
    return str(exc) or type(exc).__name__, 0


def _index(x: Any) -> int:
    return operator.index(x)


def _u64(x: Any) -> int:
    return operator.index(x) & _U64


def _u32(x: Any) -> int:
    return operator.index(x) & _U32


def _call(fn: Callable[..., Any], *args: Any) -> int:
    """Call a user callback as libnbd's Python glue does: an exception prints its traceback and
    counts as -1 (AssertionError aborts the process); a non-int result counts as 0."""
    try:
        r = fn(*args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - libnbd prints any failure and goes on
        # The traceback starts at the callback, as when libnbd's C code calls it.
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        traceback.print_exception(type(e), e, tb)
        if isinstance(e, AssertionError):
            sys.stderr.flush()
            os.abort()
        return -1
    if isinstance(r, bool) or not isinstance(r, int):
        return int(r) if isinstance(r, bool) else 0
    return r


def _check_list(value: Any, what: str = "list") -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expecting a {what} parameter")
    return [os.fsdecode(v) if isinstance(v, bytes) else str(v) for v in value]


# ==========================================================================================
# NBD URIs as libnbd 1.14 reads them: the URI parser's libxml2 behaviour
# (pynbd.protocol._uriparse.parse_libxml2), then lib/uri.c's checks (_uri_target below).


def _scan_u32(text: str) -> int | None:
    """sscanf(text, "%" SCNu32): leading space, a sign, digits; None if no number."""
    m = re.match(r"\s*([+-]?)([0-9]+)", text)
    if m is None:
        return None
    v = min(int(m.group(2)), _U64)
    if m.group(1) == "-":
        v = -v & _U64
    return v & _U32


# ==========================================================================================
# commands


class _Cmd:
    __slots__ = (
        "chunk",
        "completion",
        "cookie",
        "count",
        "done",
        "error",
        "exc",
        "extent",
        "name",
        "nbuf",
        "offset",
        "records",
        "result",
        "retire",
        "view",
    )

    def __init__(self, cookie: int, name: str, offset: int = 0, count: int = 0) -> None:
        self.cookie = cookie
        self.name = name            # libnbd's command name in messages: read, write, ...
        self.offset = offset
        self.count = count
        self.view: memoryview | None = None
        self.nbuf: Buffer | None = None
        self.chunk: Callable[..., Any] | None = None
        self.extent: Callable[..., Any] | None = None
        self.completion: Callable[..., Any] | None = None
        self.records: list[tuple[int, int, int, int, int]] | None = None
        self.result: Any = None
        self.exc: BaseException | None = None
        self.error = 0
        self.done = False           # processed in the caller's thread
        self.retire = False

    def unpin(self) -> None:
        v, self.view = self.view, None
        if v is not None:
            with contextlib.suppress(BufferError, ValueError):
                v.release()
        self.nbuf = None


#: The NBD command of each method that sends one.
_CMD_READ, _CMD_WRITE, _CMD_BS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.BLOCK_STATUS)
_METHOD_CMD = {"flush": int(Cmd.FLUSH), "trim": int(Cmd.TRIM), "zero": int(Cmd.WRITE_ZEROES),
               "cache": int(Cmd.CACHE)}

# Flags each command accepts (the generated STRICT_FLAGS table).
_OK_FLAGS = {
    "pread": 0, "pread_structured": CMD_FLAG_DF, "pwrite": CMD_FLAG_FUA, "flush": 0,
    "trim": CMD_FLAG_FUA, "cache": 0, "zero": CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    "block_status": CMD_FLAG_REQ_ONE,
}

_live: weakref.WeakSet[NBD] = weakref.WeakSet()
_names = itertools.count(1)


_F = TypeVar("_F", bound=Callable[..., Any])


def _api(states: frozenset[str] | None = None) -> Callable[[_F], _F]:
    """Wrap an NBD method: closed-handle check, the handle lock, the permitted-state check,
    error context ``nbd_<method>`` and the debug trace."""

    def deco(fn: _F) -> _F:
        ctx = "nbd_" + fn.__name__

        @functools.wraps(fn)
        def wrapper(self: NBD, *args: Any, **kw: Any) -> Any:
            if self._gone:
                raise ClosedHandle("NBD handle is closed")
            with self._lock:
                outer, self._ctx = self._ctx, ctx
                try:
                    if self._debug_on:
                        self._trace_enter(fn, args, kw)
                    try:
                        if states is not None:
                            self._check_state(states)
                        r = fn(self, *args, **kw)
                    except Error as e:
                        if self._debug_on:
                            self._debug_msg(f'leave: error="{e.string}"')
                        # Raised from the call itself, as from libnbd's C code: no internal
                        # frames or chained engine exceptions in the traceback.
                        e.__cause__ = None
                        e.__suppress_context__ = True
                        raise e.with_traceback(None) from None
                    if self._debug_on:
                        self._debug_msg(f"leave: ret={_render(r, True)}")
                    return r
                finally:
                    self._ctx = outer

        return wrapper  # type: ignore[return-value]

    return deco


def _render(v: Any, ret: bool = False) -> str:
    if v is None:
        return "0" if ret else "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, int):
        return str(v)
    if callable(v):
        return "<fun>"
    if isinstance(v, (bytes, bytearray, memoryview, Buffer)):
        return f"<buf len={len(v)}>"
    if isinstance(v, list):
        return "[" + " ".join(_render(x) for x in v) + "]"
    return repr(v)


# ==========================================================================================
# the handle


class NBD:
    """NBD handle."""

    def __init__(self) -> None:
        """Create a new NBD handle."""
        self._gone = False
        self._lock = threading.RLock()
        self._ctx = ""
        self._name = f"nbd{next(_names)}"
        self._debug_on = os.environ.get("LIBNBD_DEBUG") == "1"
        self._debug_cb: Callable[..., Any] | None = None
        self._private = 0
        # settings
        self._export_name = ""
        self._full_info = False
        self._tls = TLS_DISABLE
        self._tls_verify = True
        self._tls_username: str | None = None
        self._tls_certs: str | None = None
        self._tls_psk: str | None = None
        self._request_sr = True
        self._request_bs = True
        self._pread_init = True
        self._hflags = HANDSHAKE_FLAG_MASK
        self._strict = STRICT_MASK
        self._opt_mode = False
        self._meta: list[str] = []
        self._allow_transports = ALLOW_TRANSPORT_MASK
        self._allow_tls = TLS_ALLOW
        self._allow_local_file = False
        # connection
        self._state = _CREATED
        self._eng: _Engine | None = None
        self._stats = _Stats()
        self._info: Any = None                  # ExportInfo once the server sent it
        self._contexts: set[str] = set()
        self._rules: StrictRules | None = None  # strict mode's checks, once connected
        self._uri: dict[str, Any] | None = None  # how we connected, for get_uri
        self._disconnecting = False
        self._cookie = 1
        self._inflight: dict[int, _Cmd] = {}
        self._done: collections.OrderedDict[int, _Cmd] = collections.OrderedDict()
        self._cv = threading.Condition(threading.Lock())
        self._ready: list[Any] = []
        self._pipe: tuple[int, int] | None = None
        self._signalled = False
        self._pending_opt: Any = None            # an aio option or connect in progress
        self._connecting: list[asyncio.Task[Any]] = []  # the connect task, while it runs
        self._phase = ["connect"]                # "handshake" once the socket is connected
        _live.add(self)

    # ---- plumbing ------------------------------------------------------------------------
    def __del__(self) -> None:
        if getattr(self, "_gone", True):
            return
        with contextlib.suppress(Exception):
            self._teardown(wait=not sys.is_finalizing())

    def __repr__(self) -> str:
        return f"<nbd.NBD {self._name} {_STATE_TEXT[self._state][0]}>"

    def _err(self, msg: str, errnum: int = 0) -> Error:
        return _mkerr(self._ctx, msg, errnum)

    def _debug_msg(self, msg: str) -> None:
        cb = self._debug_cb
        if cb is not None:
            _call(cb, self._ctx, msg)
        else:
            sys.stderr.write(f"libnbd: debug: {self._name}: {self._ctx}: {msg}\n")
            sys.stderr.flush()

    def _trace_enter(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     kw: dict[str, Any]) -> None:
        import inspect

        try:
            bound = inspect.signature(fn).bind(self, *args, **kw)
            bound.apply_defaults()
            parts = [f"{k}={_render(v)}" for k, v in list(bound.arguments.items())[1:]]
        except TypeError:
            parts = []
        self._debug_msg("enter: " + " ".join(parts) if parts else "enter:")

    def _refresh(self) -> str:
        """The state as libnbd knows it. Like libnbd, a handle learns that the server hung up
        only when it next reads: in poll() (:meth:`_notice_hangup`) or from the failure of a
        command it sends - not behind the caller's back."""
        return self._state

    def _notice_hangup(self) -> bool:
        """poll() with nothing in flight: did the connection end (libnbd would read EOF)?"""
        eng = self._eng
        if self._state == _READY and eng is not None and not self._disconnecting and \
                (eng.failure is not None or eng.closed):
            self._state = _DEAD
            return True
        return False

    def _check_state(self, allowed: frozenset[str]) -> None:
        st = self._refresh()
        if st not in allowed:
            want = ", or ".join(d for s, d in _STATE_DESC if s in allowed)
            raise self._err(f"invalid state: {_STATE_TEXT[st][0]}: the handle must be {want}",
                            _errno.ENOTCONN if st == _CREATED else _errno.EINVAL)

    def _check_flags(self, name: str, value: int, mask: int, what: str = "flags") -> int:
        value = _u32(value)
        if value & ~mask:
            raise self._err(f"{what}: invalid value for flag: 0x{value:x}", _errno.EINVAL)
        return value

    def _check_enum(self, value: Any, top: int, what: str) -> int:
        v = _index(value)
        if not 0 <= v <= top:
            raise self._err(f"{what}: invalid value for parameter: {v}", _errno.EINVAL)
        return v

    # ---- the caller-side event queue -----------------------------------------------------
    def _post(self, item: Any) -> None:
        """Loop thread: hand a finished command / connect / option to the caller's thread."""
        with self._cv:
            self._ready.append(item)
            self._cv.notify_all()
            if self._pipe is not None and not self._signalled:
                self._signalled = True
                with contextlib.suppress(OSError):
                    os.write(self._pipe[1], b"!")

    def _drain(self) -> int:
        """Process everything the loop finished: callbacks run here, in the caller's thread."""
        with self._cv:
            items, self._ready = self._ready, []
            if self._signalled:
                self._signalled = False
                with contextlib.suppress(OSError):
                    os.read(self._pipe[0], 4096)  # type: ignore[index]
        first_exc: Error | None = None
        for it in items:
            try:
                if isinstance(it, _Cmd):
                    self._complete(it)
                else:
                    it()
            except Error as e:
                if first_exc is None:
                    first_exc = e
        if first_exc is not None:
            raise first_exc
        return len(items)

    def _wait(self, timeout: float | None) -> bool:
        """Wait until something is queued (True) or ``timeout`` seconds pass (False)."""
        with self._cv:
            if self._ready:
                return True
            if timeout is None:
                while not self._ready:
                    self._cv.wait()
                return True
            return self._cv.wait_for(lambda: bool(self._ready), timeout)

    def _wait_for(self, pred: Callable[[], bool]) -> None:
        """Process completions until ``pred()`` holds (a sync call's wait loop)."""
        while not pred():
            self._wait(None)
            self._drain()

    def _spawn_cmd(self, cmd: _Cmd, coro: Any) -> None:
        async def run() -> None:
            try:
                cmd.result = await coro
            except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
                cmd.exc = e
            self._post(cmd)

        self._inflight[cmd.cookie] = cmd
        _runtime().spawn(run())

    def _spawn_other(self, coro: Any, then: Callable[[Any, BaseException | None], None]) -> None:
        """Run an option/connect coroutine; ``then(result, exc)`` runs in the caller's thread."""
        async def run() -> None:
            try:
                r = await coro
            except BaseException as e:  # noqa: BLE001
                self._post(functools.partial(then, None, e))
                return
            self._post(functools.partial(then, r, None))

        _runtime().spawn(run())

    # ---- completion processing -----------------------------------------------------------
    def _complete(self, cmd: _Cmd) -> None:
        if cmd.done:
            return
        exc = cmd.exc
        err = 0
        if exc is not None:
            if isinstance(exc, CommandError):
                err = exc.errno or _errno.EIO
            else:
                err = _errno.ENOTCONN
                if self._state == _READY and not self._disconnecting:
                    self._state = _DEAD
        if cmd.chunk is not None and cmd.records is not None and cmd.view is not None:
            for start, n, off, status, e in cmd.records:
                sub = cmd.view[start:start + n].toreadonly()
                ev = ctypes.c_int(e)
                if _call(cmd.chunk, sub, off, status, ev) == -1 and not err:
                    err = ev.value or _errno.EPROTO
        if cmd.extent is not None and exc is None and isinstance(cmd.result, dict):
            for ctx, ents in cmd.result.items():
                flat: list[int] = []
                for length, flags in ents:
                    flat.append(length)
                    flat.append(flags)
                ev = ctypes.c_int(0)
                if _call(cmd.extent, ctx, cmd.offset, flat, ev) == -1 and not err:
                    err = ev.value or _errno.EPROTO
        if cmd.name == "read" or cmd.name == "block-status":
            n_chunks = len(cmd.records) if cmd.records else 1
        else:
            n_chunks = 1
        self._stats.chunks_received += n_chunks
        cmd.error = err
        cmd.done = True
        self._inflight.pop(cmd.cookie, None)
        if cmd.completion is not None:
            ev = ctypes.c_int(err)
            r = _call(cmd.completion, ev)
            if r == -1 and ev.value:
                cmd.error = ev.value
            if r == 1:
                cmd.retire = True
        cmd.chunk = cmd.extent = cmd.completion = None
        cmd.records = None
        if cmd.retire:
            cmd.unpin()
        else:
            self._done[cmd.cookie] = cmd

    def _retire(self, cmd: _Cmd) -> None:
        """aio_command_completed on a done command: forget it; raise its error."""
        self._done.pop(cmd.cookie, None)
        cmd.unpin()
        if cmd.error:
            raise self._err(f"{cmd.name}: command failed", cmd.error)

    # ==================================================================================
    # handle settings, identity, debug
    @_api()
    def set_debug(self, debug: bool) -> None:
        """Set or clear the debug flag."""
        self._debug_on = bool(debug)

    @_api()
    def get_debug(self) -> bool:
        """Return the state of the debug flag."""
        return self._debug_on

    @_api()
    def set_debug_callback(self, debug: Callable[[str, str], Any]) -> None:
        """Send debug messages to ``debug(context, msg)`` instead of stderr."""
        if not callable(debug):
            raise TypeError("callback parameter debug is not callable")
        self._debug_cb = debug

    @_api()
    def clear_debug_callback(self) -> None:
        """Remove the debug callback; messages go to stderr again."""
        self._debug_cb = None

    @_api()
    def set_handle_name(self, handle_name: str) -> None:
        """Set the handle name used in debug output."""
        self._name = str(handle_name)

    @_api()
    def get_handle_name(self) -> str:
        """Get the handle name (``nbd1``, ``nbd2``... unless set)."""
        return self._name

    @_api()
    def set_private_data(self, private_data: int) -> int:
        """Store an unsigned integer for the application; return the previous value."""
        old, self._private = self._private, _index(private_data) & _U64
        return old

    @_api()
    def get_private_data(self) -> int:
        """Return the private data (0 if never set)."""
        return self._private

    @_api(_ST_CREATED_NEG)
    def set_export_name(self, export_name: str) -> None:
        """Set the export name requested by GO/INFO/EXPORT_NAME."""
        self._export_name = str(export_name)

    @_api()
    def get_export_name(self) -> str:
        """Return the requested export name (not the canonical one)."""
        return self._export_name

    @_api(_ST_CREATED_NEG)
    def set_request_block_size(self, request: bool) -> None:
        """Whether GO/INFO request NBD_INFO_BLOCK_SIZE."""
        self._request_bs = bool(request)

    @_api()
    def get_request_block_size(self) -> bool:
        return self._request_bs

    @_api(_ST_CREATED_NEG)
    def set_full_info(self, request: bool) -> None:
        """Also request NBD_INFO_NAME and NBD_INFO_DESCRIPTION."""
        self._full_info = bool(request)

    @_api()
    def get_full_info(self) -> bool:
        return self._full_info

    @_api(_ST_INFO)
    def get_canonical_export_name(self) -> str:
        """NBD_INFO_NAME from the server; ENOTSUP if none was sent."""
        self._need_info("export flags")
        name = self._info.canonical_name
        if name is None:
            raise self._err("server did not advertise a canonical name", _errno.ENOTSUP)
        return str(name)

    @_api(_ST_INFO)
    def get_export_description(self) -> str:
        """NBD_INFO_DESCRIPTION from the server; ENOTSUP if none was sent."""
        self._need_info("export flags")
        desc = self._info.description
        if desc is None:
            raise self._err("server did not advertise a description", _errno.ENOTSUP)
        return str(desc)

    @_api(_ST_CREATED)
    def set_tls(self, tls: int) -> None:
        """TLS_DISABLE, TLS_ALLOW (plain NBD here: no TLS support yet) or TLS_REQUIRE (ENOTSUP)."""
        v = self._check_enum(tls, TLS_REQUIRE, "tls")
        if v == TLS_REQUIRE:
            raise self._err("libnbd was compiled without TLS support", _errno.ENOTSUP)
        self._tls = v

    @_api()
    def get_tls(self) -> int:
        return self._tls

    @_api(_ST_INFO)
    def get_tls_negotiated(self) -> bool:
        """Whether TLS is in use (never, yet)."""
        return False

    @_api(_ST_CREATED)
    def set_tls_certificates(self, dir: str) -> None:
        self._tls_certs = os.fsdecode(dir)

    @_api(_ST_CREATED)
    def set_tls_verify_peer(self, verify: bool) -> None:
        self._tls_verify = bool(verify)

    @_api()
    def get_tls_verify_peer(self) -> bool:
        return self._tls_verify

    @_api(_ST_CREATED)
    def set_tls_username(self, username: str) -> None:
        self._tls_username = str(username)

    @_api()
    def get_tls_username(self) -> str:
        """The TLS username (default: the login name; ENXIO if the process has none)."""
        if self._tls_username is not None:
            return self._tls_username
        try:
            return os.getlogin()
        except OSError as e:
            raise self._err("getlogin_r", e.errno or _errno.ENXIO) from None

    @_api(_ST_CREATED)
    def set_tls_psk_file(self, filename: str) -> None:
        self._tls_psk = os.fsdecode(filename)

    @_api(_ST_CREATED)
    def set_request_structured_replies(self, request: bool) -> None:
        """Whether connecting sends NBD_OPT_STRUCTURED_REPLY."""
        self._request_sr = bool(request)

    @_api()
    def get_request_structured_replies(self) -> bool:
        return self._request_sr

    @_api(_ST_INFO)
    def get_structured_replies_negotiated(self) -> bool:
        """Whether structured replies are in use."""
        return bool(self._eng is not None and self._eng.structured)

    @_api(_ST_CREATED)
    def set_handshake_flags(self, flags: int) -> None:
        """Handshake flags the client may use (HANDSHAKE_FLAG_*)."""
        self._hflags = self._check_flags("", flags, HANDSHAKE_FLAG_MASK)

    @_api()
    def get_handshake_flags(self) -> int:
        """Before connecting the flags the client will use; afterwards the negotiated ones."""
        eng = self._eng
        if eng is not None and self._state != _CONNECTING:
            hs = eng.hs
            if eng.protocol == "oldstyle":
                return 0
            return int(getattr(hs, "server_flags", self._hflags)) & self._hflags
        return self._hflags

    @_api()
    def set_pread_initialize(self, request: bool) -> None:
        """Whether read buffers are zeroed before a read."""
        self._pread_init = bool(request)

    @_api()
    def get_pread_initialize(self) -> bool:
        return self._pread_init

    @_api()
    def set_strict_mode(self, flags: int) -> None:
        """Which client-side checks run before a command is sent (STRICT_*)."""
        self._strict = self._check_flags("", flags, _STRICT_ACCEPTED)

    @_api()
    def get_strict_mode(self) -> int:
        return self._strict

    @_api(_ST_CREATED)
    def set_opt_mode(self, enable: bool) -> None:
        """Stop in the Negotiating state after the handshake so opt_* calls can be used."""
        self._opt_mode = bool(enable)

    @_api()
    def get_opt_mode(self) -> bool:
        return self._opt_mode

    @_api(_ST_CREATED_NEG)
    def add_meta_context(self, name: str) -> None:
        """Append a meta context to request (e.g. CONTEXT_BASE_ALLOCATION)."""
        self._meta.append(str(name))

    @_api()
    def get_nr_meta_contexts(self) -> int:
        return len(self._meta)

    @_api()
    def get_meta_context(self, i: int) -> str:
        i = _index(i) & _U64
        if i >= len(self._meta):
            raise self._err("meta context request out of range", _errno.EINVAL)
        return self._meta[i]

    @_api(_ST_CREATED_NEG)
    def clear_meta_contexts(self) -> None:
        self._meta.clear()

    @_api(_ST_CREATED)
    def set_uri_allow_transports(self, mask: int) -> None:
        self._allow_transports = self._check_flags("", mask, ALLOW_TRANSPORT_MASK, "mask")

    @_api(_ST_CREATED)
    def set_uri_allow_tls(self, tls: int) -> None:
        self._allow_tls = self._check_enum(tls, TLS_REQUIRE, "tls")

    @_api(_ST_CREATED)
    def set_uri_allow_local_file(self, allow: bool) -> None:
        self._allow_local_file = bool(allow)

    # ==================================================================================
    # connecting
    def _settings(self) -> dict[str, Any]:
        return {"handshake_flags": self._hflags, "full_info": self._full_info,
                "request_block_size": self._request_bs, "lib_stats": self._stats,
                "lib_phase": self._phase}

    def _connect_kw(self, **where: Any) -> dict[str, Any]:
        return dict(where, export_name=self._export_name, opt_mode=self._opt_mode,
                    meta_contexts=() if self._opt_mode else list(self._meta),
                    structured=self._request_sr, strict=0)

    def _connect_now(self, where: dict[str, Any], host: str) -> dict[str, Any]:
        """connect(2) in the call, as libnbd: a non-blocking socket whose failure is known at
        once fails the call (TCP: after every address was tried); a connect still in
        progress is finished by the event loop."""
        family: int
        if "unix" in where:
            family, addrs = int(socket.AF_UNIX), [where["unix"]]
        elif "vsock" in where:
            family, addrs = int(getattr(socket, "AF_VSOCK", -2)), [where["vsock"]]
        elif "tcp_addrs" in where:
            family, addrs = -1, where["tcp_addrs"]
        else:
            return where
        last = 0
        for i, a in enumerate(addrs):
            try:
                if family == -1:
                    s = socket.socket(a[0], a[1], a[2])
                    addr = a[4]
                else:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    addr = a
            except OSError as e:
                last = e.errno or _errno.EAFNOSUPPORT
                continue
            if family == socket.AF_UNIX and addr == "":
                # libnbd passes the whole (zeroed) sockaddr_un: an abstract name of NULs.
                addr = "\0" * 108
            s.setblocking(False)
            try:
                s.connect(addr)
            except BlockingIOError:
                # libnbd reads SO_ERROR at once: a refusal over loopback is already known.
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err and err != _errno.EINPROGRESS:
                    s.close()
                    last = err
                    continue
                return {"pending": (s, addrs[i + 1:])}
            except OSError as e:
                s.close()
                last = e.errno or _errno.EINVAL
                continue
            return {"pending": (s, [])}
        if host:
            # libnbd goes back to START when every address failed: it can connect again.
            self._state = _CREATED
            raise self._err(f"connect: {host}: could not connect to remote host", last)
        self._state = _DEAD
        raise self._err("connect", last)

    def _start_connect(self, where: dict[str, Any], host: str = "") -> None:
        where = self._connect_now(where, host)
        self._state = _CONNECTING
        self._phase = ["connect"]
        coro = _connect_engine(self._settings(), self._connect_kw(**where))
        self._pending_opt = "connect"
        then = functools.partial(self._connected, host)
        holder: list[asyncio.Task[Any]] = []
        self._connecting = holder

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            holder.append(task)
            try:
                eng = await coro
            except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
                if not self._gone:
                    self._post(functools.partial(then, None, e))
                return
            if self._gone:  # closed while connecting: nobody will use this connection
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(eng.close(), _CLOSE_TIMEOUT)
                return
            self._post(functools.partial(then, eng, None))

        _runtime().spawn(run())

    def _connected(self, host: str, eng: _Engine | None, exc: BaseException | None) -> None:
        self._pending_opt = None
        self._connecting = []
        if exc is not None:
            self._state = _DEAD
            if isinstance(exc, OptionError):
                msg, num = _go_failure_text(exc.reply, self._export_name)
            elif isinstance(exc, OSError) and exc.errno and self._phase[0] == "connect":
                # connect(2) failed: no NBD byte was exchanged.
                if host:
                    # libnbd tries each address in turn and, when all fail, goes back to
                    # START: the handle can connect again.
                    self._state = _CREATED
                    msg = f"connect: {host}: could not connect to remote host"
                else:
                    msg = "connect"
                num = exc.errno
            else:
                msg, num = _failure(exc, connecting=True)
            raise self._err(msg, num)
        assert eng is not None
        self._eng = eng
        if self._opt_mode and not eng.connected:
            # Option mode stops in negotiation, with a plain newstyle server too.
            self._state = _NEGOTIATING
        else:
            self._became_ready()

    def _became_ready(self) -> None:
        eng = self._eng
        assert eng is not None
        self._state = _READY
        self._info = eng.export
        self._rules = None
        self._contexts = set(eng.meta_contexts.values()) \
            if (eng.structured and eng.protocol != "oldstyle") else set()

    def _connect_blocking(self, where: dict[str, Any], host: str = "") -> None:
        self._start_connect(where, host)
        self._wait_for(lambda: self._pending_opt is None)

    @_api(_ST_CREATED)
    def connect_uri(self, uri: str) -> None:
        """Connect to an NBD URI (nbd://, nbd+unix://, nbd+vsock://; nbds: no TLS yet)."""
        self._connect_blocking(*self._uri_target(uri))

    @_api(_ST_CREATED)
    def aio_connect_uri(self, uri: str) -> None:
        self._start_connect(*self._uri_target(uri))

    def _uri_target(self, uri: str) -> tuple[dict[str, Any], str]:
        """lib/uri.c (1.14) over libxml2's parser: the same checks, order and messages. As in
        a libnbd built without TLS, an nbds URI fails at the TLS step with ENOTSUP."""
        raw = str(uri)
        u = parse_libxml2(raw)
        if u is None:
            raise self._err(f"unable to parse URI: {raw}", _errno.EINVAL)
        scheme = u.scheme
        if scheme is None:
            hint = ""
            if raw.startswith("/") and self._allow_transports & ALLOW_TRANSPORT_UNIX:
                hint = ': to open a local socket use "nbd+unix://?socket=PATH"'
            elif raw[:9].lower() == "localhost" and self._allow_transports & ALLOW_TRANSPORT_TCP:
                hint = ': to open a local port use "nbd://localhost" or "nbd://localhost:PORT"'
            raise self._err("NBD URI does not have a scheme: valid NBD URIs should start with "
                            "a scheme like nbd://, nbds:// or nbd+unix://" + hint,
                            _errno.EINVAL)
        spec = _URI_SCHEMES.get(scheme)
        if spec is None:
            raise self._err(f"unknown NBD URI scheme: {scheme}", _errno.EINVAL)
        transport, tls = spec
        if not raw.startswith("://", len(scheme)):
            raise self._err(f"URI must begin with '{scheme}://'", _errno.EINVAL)
        if not self._allow_transports & _TRANSPORT_BIT[transport]:
            raise self._err(f"URI transport {scheme} is not permitted", _errno.EPERM)
        if (tls and self._allow_tls == TLS_DISABLE) or \
                (not tls and self._allow_tls == TLS_REQUIRE):
            raise self._err(f"URI TLS setting {scheme} is not permitted", _errno.EPERM)
        queries = libnbd_queries(u.query_raw)
        unixsocket = None
        for name, value in queries:
            if name == "socket":
                unixsocket = value
        if transport == "unix" and unixsocket is None:
            raise self._err("cannot parse socket parameter from NBD URI (did you mean to use "
                            f'"{scheme}:///?socket=..."?)', _errno.EINVAL)
        if transport != "unix" and unixsocket is not None:
            plain = "nbds" if tls else "nbd"
            raise self._err(f'socket parameter is incompatible with "{scheme}:" (did you mean '
                            f'to use "{plain}+unix:///?socket=..."?)', _errno.EINVAL)
        if tls:
            raise self._err("libnbd was compiled without TLS support", _errno.ENOTSUP)
        for name, value in queries:
            if name in ("tls-certificates", "tls-psk-file"):
                if not self._allow_local_file:
                    raise self._err(f"local file access ({name}) is not allowed, call "
                                    "nbd_set_uri_allow_local_file to enable this",
                                    _errno.EPERM)
                if name == "tls-certificates":
                    self._tls_certs = value
                else:
                    self._tls_psk = value
        if u.user is not None:
            self._tls_username = u.user
        self._export_name = u.path[1:] if u.path else ""
        if transport == "unix":
            assert unixsocket is not None
            self._uri = {"transport": "unix", "socket": unixsocket}
            return {"unix": unixsocket}, ""
        port = u.port if u.port > 0 else 10809
        if transport == "vsock":
            cid = 2
            if u.server:
                c = _scan_u32(u.server)
                if c is None:
                    raise self._err(f"cannot parse vsock CID from NBD URI: {u.server}",
                                    _errno.EINVAL)
                cid = c
            self._uri = {"transport": "vsock", "host": str(cid), "port": port}
            return {"vsock": (cid, port)}, ""
        server = u.server or "localhost"
        if len(server) >= 2 and server[0] == "[" and server[-1] == "]":
            server = server[1:-1]
        return self._tcp_target(server, str(port))

    @_api(_ST_CREATED)
    def connect_unix(self, unixsocket: str) -> None:
        """Connect to a Unix-domain socket."""
        path = os.fsdecode(unixsocket)
        self._uri = {"transport": "unix", "socket": path}
        self._connect_blocking({"unix": path})

    @_api(_ST_CREATED)
    def aio_connect_unix(self, unixsocket: str) -> None:
        path = os.fsdecode(unixsocket)
        self._uri = {"transport": "unix", "socket": path}
        self._start_connect({"unix": path})

    @_api(_ST_CREATED)
    def aio_connect(self, addr: str) -> None:
        """Connect to a raw address: in Python only an AF_UNIX path."""
        if not isinstance(addr, str):
            raise TypeError("aio_connect: addr must be a str (an AF_UNIX path)")
        self._uri = {"transport": "unix", "socket": addr}
        self._start_connect({"unix": addr})

    def _tcp_target(self, hostname: str, port: Any) -> tuple[dict[str, Any], str]:
        """getaddrinfo() in the call, as libnbd (its failure leaves the handle in START);
        the addresses are then tried in turn."""
        host = str(hostname)
        p = str(port)
        try:
            addrs = socket.getaddrinfo(host, p, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise self._err(f'getaddrinfo: hostname "{host}" port "{p}": {e.strerror}',
                            0) from None
        except UnicodeError:
            raise self._err(f'getaddrinfo: hostname "{host}" port "{p}": '
                            "Name or service not known", 0) from None
        num = int(p) if p.isdigit() else (addrs[0][4][1] if addrs else 10809)
        self._uri = {"transport": "tcp", "host": host, "port": num}
        return {"tcp_addrs": addrs}, f"{host}:{p}"

    @_api(_ST_CREATED)
    def connect_tcp(self, hostname: str, port: str) -> None:
        """Connect over TCP; ``port`` is a string (a number or a service name)."""
        self._connect_blocking(*self._tcp_target(hostname, port))

    @_api(_ST_CREATED)
    def aio_connect_tcp(self, hostname: str, port: str) -> None:
        self._start_connect(*self._tcp_target(hostname, port))

    @_api(_ST_CREATED)
    def connect_vsock(self, cid: int, port: int) -> None:
        """Connect over AF_VSOCK."""
        c, p = _u32(cid), _u32(port)
        self._uri = {"transport": "vsock", "host": str(c), "port": p}
        self._connect_blocking({"vsock": (c, p)})

    @_api(_ST_CREATED)
    def aio_connect_vsock(self, cid: int, port: int) -> None:
        c, p = _u32(cid), _u32(port)
        self._uri = {"transport": "vsock", "host": str(c), "port": p}
        self._start_connect({"vsock": (c, p)})

    def _socket_target(self, sock: int) -> dict[str, Any]:
        fd = _index(sock)
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            raise self._err("getsockopt", e.errno or _errno.EBADF) from None
        self._uri = None
        return {"sock": s}

    @_api(_ST_CREATED)
    def connect_socket(self, sock: int) -> None:
        """Take over an already-connected socket (an fd; the handle closes it)."""
        self._connect_blocking(self._socket_target(sock))

    @_api(_ST_CREATED)
    def aio_connect_socket(self, sock: int) -> None:
        self._start_connect(self._socket_target(sock))

    def _argv(self, argv: Any) -> list[str]:
        args = _check_list(argv)
        if not args:
            raise self._err("missing command name in argv list", _errno.EINVAL)
        return args

    @_api(_ST_CREATED)
    def connect_command(self, argv: list[str]) -> None:
        """Run a server subprocess talking NBD on its stdin/stdout."""
        args = self._argv(argv)
        self._uri = None
        self._connect_blocking({"command": args})

    @_api(_ST_CREATED)
    def aio_connect_command(self, argv: list[str]) -> None:
        args = self._argv(argv)
        self._uri = None
        self._start_connect({"command": args})

    @_api(_ST_CREATED)
    def connect_systemd_socket_activation(self, argv: list[str]) -> None:
        """Run a server subprocess with a listening socket passed as fd 3."""
        args = self._argv(argv)
        self._uri = None
        self._connect_blocking({"socket_activation": args})

    @_api(_ST_CREATED)
    def aio_connect_systemd_socket_activation(self, argv: list[str]) -> None:
        args = self._argv(argv)
        self._uri = None
        self._start_connect({"socket_activation": args})

    # ==================================================================================
    # option negotiation
    def _opt_prepare(self) -> _Engine:
        eng = self._eng
        assert eng is not None
        eng.full_info = self._full_info
        eng.request_block_size = self._request_bs
        return eng

    async def _opt_go_or_info(self, go: bool) -> Any:
        eng = self._opt_prepare()
        name = self._export_name
        if (eng.structured or eng.extended) and self._meta:
            try:
                await eng.opt_set_meta_context(list(self._meta), name)
            except OptionError:
                eng.meta_contexts = {}
        if go:
            if eng.protocol == "newstyle":
                await eng.lib_export_name(name)
            else:
                await eng.opt_go(name)
            return None
        return await eng.opt_info(name)

    def _start_opt(self, kind: str, coro: Any, done: Callable[[Any, int], None],
                   completion: Callable[..., Any] | None) -> None:
        self._state = _CONNECTING
        self._pending_opt = kind

        def then(result: Any, exc: BaseException | None) -> None:
            self._pending_opt = None
            err = 0
            if exc is None:
                done(result, 0)
            elif isinstance(exc, OptionError):
                # GO and INFO map the reply to an errno; libnbd 1.14 reports every refused
                # LIST or LIST_META_CONTEXT as ENOTSUP.
                err = _REP_ERRNO.get(exc.reply, _errno.ENOTSUP) if kind in ("go", "info") \
                    else _errno.ENOTSUP
                done(None, err)
            elif isinstance(exc, ExportSizeError) and kind == "info":
                # The server's replies were well-formed: negotiation goes on (another export
                # may be fine), but this one is refused, with its own message.
                self._state = _NEGOTIATING
                self._info = None
                if completion is not None:
                    _call(completion, ctypes.c_int(exc.errno))
                raise self._err(str(exc), exc.errno)
            else:
                self._state = _DEAD
                msg, err = _failure(exc)
                if completion is not None:
                    _call(completion, ctypes.c_int(err or _errno.ENOTCONN))
                raise self._err(msg, err)
            if completion is not None:
                _call(completion, ctypes.c_int(err))

        self._spawn_other(coro, then)

    def _go_done(self, result: Any, err: int) -> None:
        if err:
            self._state = _NEGOTIATING
            self._info = None
            return
        self._became_ready()

    def _info_done(self, result: Any, err: int) -> None:
        self._state = _NEGOTIATING
        if err:
            self._info = None  # 1.14: a failed opt_info forgets what an earlier one learned
            return
        eng = self._eng
        assert eng is not None
        self._info = result
        self._contexts = set(eng.meta_contexts.values()) if eng.structured else set()

    def _opt_blocking(self, kind: str, coro: Any, done: Callable[[Any, int], None],
                      what: str) -> Any:
        box: dict[str, Any] = {}

        def record(result: Any, err: int) -> None:
            box["r"], box["err"] = result, err
            done(result, err)

        self._start_opt(kind, coro, record, None)
        self._wait_for(lambda: self._pending_opt is None)
        if box.get("err"):
            raise self._err(f"server replied with error to {what} request", box["err"])
        return box.get("r")

    def _need_fixed(self) -> None:
        eng = self._eng
        if eng is None or eng.protocol != "newstyle-fixed":
            raise self._err("server is not using fixed newstyle protocol", _errno.ENOTSUP)

    @_api(_ST_NEG)
    def opt_go(self) -> None:
        """NBD_OPT_GO for the current export name; enters transmission."""
        self._opt_blocking("go", self._opt_go_or_info(True), self._go_done, "opt_go")

    @_api(_ST_NEG)
    def aio_opt_go(self, completion: Callable[..., Any] | None = None) -> None:
        self._start_opt("go", self._opt_go_or_info(True), self._go_done, completion)

    @_api(_ST_NEG)
    def opt_info(self) -> None:
        """NBD_OPT_INFO: learn size, flags and contexts while staying in negotiation."""
        self._need_fixed()
        self._opt_blocking("info", self._opt_go_or_info(False), self._info_done, "opt_info")

    @_api(_ST_NEG)
    def aio_opt_info(self, completion: Callable[..., Any] | None = None) -> None:
        self._need_fixed()
        self._start_opt("info", self._opt_go_or_info(False), self._info_done, completion)

    def _abort_done(self, result: Any, err: int) -> None:
        self._state = _CLOSED
        self._info = None

    def _abort_plain(self) -> bool:
        """A plain newstyle server has no NBD_OPT_ABORT: libnbd just drops the connection
        (DEAD) and the call succeeds."""
        eng = self._eng
        assert eng is not None
        if eng.protocol == "newstyle-fixed":
            return False
        self._state = _DEAD
        self._info = None
        self._spawn_other(eng.close(), lambda result, exc: None)
        return True

    @_api(_ST_NEG)
    def opt_abort(self) -> None:
        """NBD_OPT_ABORT; the handle is closed afterwards."""
        eng = self._eng
        assert eng is not None
        if self._abort_plain():
            return
        self._disconnecting = True
        self._opt_blocking("abort", eng.opt_abort(), self._abort_done, "opt_abort")

    @_api(_ST_NEG)
    def aio_opt_abort(self) -> None:
        eng = self._eng
        assert eng is not None
        if self._abort_plain():
            return
        self._disconnecting = True
        self._start_opt("abort", eng.opt_abort(), self._abort_done, None)

    def _list_done(self, cb: Callable[..., Any], box: dict[str, Any]) -> Callable[[Any, int], None]:
        def done(result: Any, err: int) -> None:
            self._state = _NEGOTIATING
            if not err:
                for name, desc in result:
                    _call(cb, name, desc)
                box["count"] = len(result)
        return done

    @_api(_ST_NEG)
    def opt_list(self, list: Callable[[str, str], Any]) -> int:
        """NBD_OPT_LIST: ``list(name, description)`` per export; returns the count."""
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        box: dict[str, Any] = {}
        self._opt_blocking("list", eng.opt_list(), self._list_done(list, box), "list")
        return int(box.get("count", 0))

    @_api(_ST_NEG)
    def aio_opt_list(self, list: Callable[[str, str], Any],
                     completion: Callable[..., Any] | None = None) -> None:
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        self._start_opt("list", eng.opt_list(), self._list_done(list, {}), completion)

    def _meta_list_start(self) -> Any:
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        if not eng.structured:
            raise self._err("server lacks structured replies", _errno.ENOTSUP)
        return eng.opt_list_meta_context(list(self._meta), self._export_name)

    def _ctx_done(self, cb: Callable[..., Any], box: dict[str, Any]) -> Callable[[Any, int], None]:
        def done(result: Any, err: int) -> None:
            self._state = _NEGOTIATING
            if not err:
                for name in result:
                    _call(cb, name)
                box["count"] = len(result)
        return done

    @_api(_ST_NEG)
    def opt_list_meta_context(self, context: Callable[[str], Any]) -> int:
        """NBD_OPT_LIST_META_CONTEXT for the add_meta_context list; ``context(name)`` per
        reply; returns the count."""
        box: dict[str, Any] = {}
        self._opt_blocking("list_meta", self._meta_list_start(), self._ctx_done(context, box),
                           "list meta context")
        return int(box.get("count", 0))

    @_api(_ST_NEG)
    def aio_opt_list_meta_context(self, context: Callable[[str], Any],
                                  completion: Callable[..., Any] | None = None) -> int:
        self._start_opt("list_meta", self._meta_list_start(), self._ctx_done(context, {}),
                        completion)
        return 0

    # ==================================================================================
    # export and connection information
    def _need_info(self, what: str = "export flags") -> None:
        if self._info is None:
            raise self._err(f"server has not returned {what}, you need to connect to the "
                            "server first", _errno.EINVAL)

    def _eflags(self) -> int:
        self._need_info("export flags")
        fl = int(self._info.eflags)
        eng = self._eng
        if fl & _TX_DF and not (eng is not None and eng.structured):
            fl &= ~_TX_DF
        if fl & _TX_FAST_ZERO and not fl & _TX_WRITE_ZEROES:
            fl &= ~_TX_FAST_ZERO
        return fl

    @_api(_ST_INFO)
    def get_size(self) -> int:
        """The export size in bytes."""
        self._need_info("export size")
        return int(self._info.size)

    @_api(_ST_INFO)
    def get_block_size(self, size_type: int) -> int:
        """SIZE_MINIMUM / PREFERRED / MAXIMUM as advertised (0 if not); SIZE_PAYLOAD: the
        largest payload this client sends."""
        t = self._check_enum(size_type, SIZE_PAYLOAD, "size_type")
        self._need_info("export flags")
        bs = self._info.block_size
        if t == SIZE_PAYLOAD:
            return min(bs[2], _MAX_REQUEST_SIZE) if bs else _MAX_REQUEST_SIZE
        return int(bs[t]) if bs else 0

    @_api(_ST_INFO)
    def get_protocol(self) -> str:
        """``"oldstyle"``, ``"newstyle"`` or ``"newstyle-fixed"``."""
        assert self._eng is not None
        return str(self._eng.protocol)

    def _flag(self, bit: int) -> bool:
        return bool(self._eflags() & bit)

    @_api(_ST_INFO)
    def is_read_only(self) -> bool:
        return self._flag(TxFlag.READ_ONLY)

    @_api(_ST_INFO)
    def can_flush(self) -> bool:
        return self._flag(TxFlag.SEND_FLUSH)

    @_api(_ST_INFO)
    def can_fua(self) -> bool:
        return self._flag(TxFlag.SEND_FUA)

    @_api(_ST_INFO)
    def is_rotational(self) -> bool:
        return self._flag(TxFlag.ROTATIONAL)

    @_api(_ST_INFO)
    def can_trim(self) -> bool:
        return self._flag(TxFlag.SEND_TRIM)

    @_api(_ST_INFO)
    def can_zero(self) -> bool:
        return self._flag(TxFlag.SEND_WRITE_ZEROES)

    @_api(_ST_INFO)
    def can_fast_zero(self) -> bool:
        return self._flag(TxFlag.SEND_FAST_ZERO)

    @_api(_ST_INFO)
    def can_df(self) -> bool:
        return self._flag(TxFlag.SEND_DF)

    @_api(_ST_INFO)
    def can_multi_conn(self) -> bool:
        return self._flag(TxFlag.CAN_MULTI_CONN)

    @_api(_ST_INFO)
    def can_cache(self) -> bool:
        return self._flag(TxFlag.SEND_CACHE)

    @_api(_ST_INFO)
    def can_meta_context(self, metacontext: str) -> bool:
        """Whether the server agreed to the meta context ``metacontext``."""
        self._need_info("export flags")
        return str(metacontext) in self._contexts

    @_api()
    def get_package_name(self) -> str:
        return "libnbd"

    @_api()
    def get_version(self) -> str:
        return _LIBNBD_VERSION

    @_api()
    def supports_tls(self) -> bool:
        return False

    @_api()
    def supports_vsock(self) -> bool:
        return hasattr(socket, "AF_VSOCK")

    @_api()
    def supports_uri(self) -> bool:
        return True

    @_api(_ST_URI)
    def get_uri(self) -> str:
        """An NBD URI for this connection (EINVAL for command/socket connections)."""
        from pynbd.protocol.uri import NBDURI, format_uri

        u = self._uri
        if u is None:
            raise self._err("cannot construct a URI for this connection type", _errno.EINVAL)
        kw: dict[str, Any] = {"transport": u["transport"], "export": self._export_name}
        if u["transport"] == "unix":
            kw["socket"] = u["socket"]
        else:
            kw["host"] = u["host"]
            kw["port"] = u["port"]
        if self._tls_username is not None and self._tls != TLS_DISABLE:
            kw["user"] = self._tls_username
        return format_uri(NBDURI(**kw), always_port=True)

    # ==================================================================================
    # data commands
    def _cmd_checks(self, method: str, cmd: int, flags: int, offset: int, count: int) -> int:
        """libnbd's checks before a command is queued (they use no cookie), decided by the
        client's strict rules (pynbd.client.strict) with this handle's mask."""
        flags = _u32(flags)
        if self._rules is None:
            info = self._info
            eng = self._eng
            self._rules = StrictRules(int(info.eflags), int(info.size), info.block_size,
                                      bool(eng is not None and eng.structured),
                                      bool(self._contexts))
        try:
            self._rules.check(cmd, offset, count, flags, _OK_FLAGS[method], self._strict,
                              self._disconnecting)
        except CommandError as e:
            raise self._err(e.message, e.errno) from None
        return flags

    def _new_cmd(self, name: str, offset: int = 0, count: int = 0) -> _Cmd:
        cookie = self._cookie
        self._cookie += 1
        return _Cmd(cookie, name, offset, count)

    def _eng_ready(self) -> _Engine:
        eng = self._eng
        assert eng is not None
        return eng

    def _aio_read(self, method: str, buf: Any, offset: Any, chunk: Any, completion: Any,
                  flags: Any, fresh: bool = False) -> _Cmd:
        """``fresh``: ``buf`` is a new zeroed bytearray (pread), no need to zero it again."""
        offset = _u64(offset)
        mv, nbuf = _pin(buf, writable=True)
        try:
            flags = self._cmd_checks(method, _CMD_READ, flags, offset, mv.nbytes)
        except BaseException:
            mv.release()
            raise
        cmd = self._new_cmd("read", offset, mv.nbytes)
        cmd.view, cmd.nbuf, cmd.chunk, cmd.completion = mv, nbuf, chunk, completion
        if self._pread_init and nbuf is None and not fresh and mv.nbytes:
            _zero(mv)  # libnbd zeroes the caller's buffer first (set_pread_initialize)
        records: list[tuple[int, int, int, int, int]] = []
        cmd.records = records

        def rec(data: memoryview, off: int, status: int, error: int) -> int:
            records.append((off - offset, len(data), off, status, error))
            return 0

        self._spawn_cmd(cmd, self._eng_ready().pread_into(mv, offset, flags, chunk_cb=rec))
        return cmd

    def _aio_write(self, buf: Any, offset: Any, completion: Any, flags: Any) -> _Cmd:
        offset = _u64(offset)
        mv, nbuf = _pin(buf, writable=False)
        try:
            flags = self._cmd_checks("pwrite", _CMD_WRITE, flags, offset, mv.nbytes)
        except BaseException:
            mv.release()
            raise
        cmd = self._new_cmd("write", offset, mv.nbytes)
        cmd.view, cmd.nbuf, cmd.completion = mv, nbuf, completion
        self._spawn_cmd(cmd, self._eng_ready().pwrite(mv, offset, flags))
        return cmd

    def _aio_simple(self, method: str, name: str, count: Any, offset: Any, completion: Any,
                    flags: Any) -> _Cmd:
        count, offset = _u64(count), _u64(offset)
        flags = self._cmd_checks(method, _METHOD_CMD[method], flags, offset, count)
        cmd = self._new_cmd(name, offset, count)
        cmd.completion = completion
        eng = self._eng_ready()
        if method == "flush":
            coro = eng.flush(flags)
        elif method == "trim":
            coro = eng.trim(count, offset, flags)
        elif method == "zero":
            coro = eng.zero(count, offset, flags)
        else:
            coro = eng.cache(count, offset, flags)
        self._spawn_cmd(cmd, coro)
        return cmd

    def _aio_block_status(self, count: Any, offset: Any, extent: Any, completion: Any,
                          flags: Any) -> _Cmd:
        count, offset = _u64(count), _u64(offset)
        flags = self._cmd_checks("block_status", _CMD_BS, flags, offset, count)
        cmd = self._new_cmd("block-status", offset, count)
        cmd.extent, cmd.completion = extent, completion
        self._spawn_cmd(cmd, self._eng_ready().block_status(count, offset, flags))
        return cmd

    def _sync(self, cmd: _Cmd) -> None:
        self._wait_for(lambda: cmd.done)
        self._retire(cmd)

    @_api(_ST_CONN)
    def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        """Read ``count`` bytes at ``offset``; returns a bytearray."""
        n = _index(count)
        if n < 0:
            raise SystemError("Negative size passed to PyByteArray_FromStringAndSize")
        buf = bytearray(n)
        self._sync(self._aio_read("pread", buf, offset, None, None, flags, fresh=True))
        return buf

    @_api(_ST_CONN)
    def pread_structured(self, count: int, offset: int,
                         chunk: Callable[[memoryview, int, int, Any], Any],
                         flags: int = 0) -> bytearray:
        """Read with ``chunk(subbuf, offset, status, error)`` called per reply chunk."""
        n = _index(count)
        if n < 0:
            raise SystemError("Negative size passed to PyByteArray_FromStringAndSize")
        buf = bytearray(n)
        self._sync(self._aio_read("pread_structured", buf, offset, chunk, None, flags,
                                  fresh=True))
        return buf

    @_api(_ST_CONN)
    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        """Write ``buf`` (any bytes-like object) at ``offset``."""
        if isinstance(buf, str) or not _is_buffer(buf):
            raise TypeError(f"a bytes-like object is required, not '{type(buf).__name__}'")
        self._sync(self._aio_write(buf, offset, None, flags))

    @_api(_ST_CONN)
    def flush(self, flags: int = 0) -> None:
        self._sync(self._aio_simple("flush", "flush", 0, 0, None, flags))

    @_api(_ST_CONN)
    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("trim", "trim", count, offset, None, flags))

    @_api(_ST_CONN)
    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("cache", "cache", count, offset, None, flags))

    @_api(_ST_CONN)
    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self._sync(self._aio_simple("zero", "write-zeroes", count, offset, None, flags))

    @_api(_ST_CONN)
    def block_status(self, count: int, offset: int,
                     extent: Callable[[str, int, list[int], Any], Any], flags: int = 0) -> None:
        """BLOCK_STATUS: ``extent(metacontext, offset, entries, error)`` per context, with
        ``entries`` a flat ``[length, flags, length, flags, ...]`` list."""
        self._sync(self._aio_block_status(count, offset, extent, None, flags))

    @_api(_ST_CONN)
    def aio_pread(self, buf: Any, offset: int, completion: Callable[..., Any] | None = None,
                  flags: int = 0) -> int:
        """Start a read into ``buf`` (an nbd.Buffer or writable buffer, pinned until the
        command is retired); returns the cookie."""
        return self._aio_read("pread", buf, offset, None, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_pread_structured(self, buf: Any, offset: int, chunk: Callable[..., Any],
                             completion: Callable[..., Any] | None = None,
                             flags: int = 0) -> int:
        return self._aio_read("pread_structured", buf, offset, chunk, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_pwrite(self, buf: Any, offset: int, completion: Callable[..., Any] | None = None,
                   flags: int = 0) -> int:
        return self._aio_write(buf, offset, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_flush(self, completion: Callable[..., Any] | None = None, flags: int = 0) -> int:
        return self._aio_simple("flush", "flush", 0, 0, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_trim(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                 flags: int = 0) -> int:
        return self._aio_simple("trim", "trim", count, offset, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_cache(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                  flags: int = 0) -> int:
        return self._aio_simple("cache", "cache", count, offset, completion, flags).cookie

    @_api(_ST_CONN)
    def aio_zero(self, count: int, offset: int, completion: Callable[..., Any] | None = None,
                 flags: int = 0) -> int:
        return self._aio_simple("zero", "write-zeroes", count, offset, completion,
                                flags).cookie

    @_api(_ST_CONN)
    def aio_block_status(self, count: int, offset: int, extent: Callable[..., Any],
                         completion: Callable[..., Any] | None = None, flags: int = 0) -> int:
        return self._aio_block_status(count, offset, extent, completion, flags).cookie

    # ---- disconnecting -------------------------------------------------------------------
    def _start_disconnect(self) -> None:
        if self._disconnecting:
            return
        self._disconnecting = True
        self._cookie += 1  # NBD_CMD_DISC takes a cookie like any command
        eng = self._eng_ready()

        def then(result: Any, exc: BaseException | None) -> None:
            # The server hangs up after NBD_CMD_DISC: whatever the engine saw, this is a
            # clean close.
            if self._state in (_READY, _CONNECTING):
                self._state = _CLOSED

        self._spawn_other(eng.close(), then)

    @_api(_ST_CONN)
    def aio_disconnect(self, flags: int = 0) -> None:
        """Queue NBD_CMD_DISC (after the commands in flight) without waiting."""
        self._check_flags("", flags, SHUTDOWN_MASK)
        self._start_disconnect()

    @_api(_ST_CONN)
    def shutdown(self, flags: int = 0) -> None:
        """Send NBD_CMD_DISC after the commands in flight and wait until the connection is
        closed (their completion callbacks run meanwhile)."""
        self._check_flags("", flags, SHUTDOWN_MASK)
        self._start_disconnect()
        self._wait_for(lambda: self._state in (_CLOSED, _DEAD))

    # ==================================================================================
    # event loop, completion and state queries
    @_api()
    def poll(self, timeout: int) -> int:
        """Wait up to ``timeout`` ms (-1: forever) for replies and process them (callbacks run
        here); 1 if anything was processed, 0 on timeout."""
        t = _index(timeout)
        st = self._refresh()
        if st not in (_CONNECTING, _READY):
            raise self._err(f"nothing to poll for in state {_STATE_TEXT[st][0]}", _errno.EINVAL)
        deadline = None if t < 0 else _now() + t / 1000
        while True:
            if self._ready:
                self._drain()
                return 1
            idle = not self._inflight and self._pending_opt is None and not self._disconnecting
            remaining = None if deadline is None else max(0.0, deadline - _now())
            step = remaining
            if idle:
                step = _IDLE_CHECK if remaining is None else min(remaining, _IDLE_CHECK)
            if self._wait(step):
                continue
            if idle and self._notice_hangup():
                return 1  # the server hung up
            if remaining is not None and _now() >= deadline:  # type: ignore[operator]
                return 0

    @_api()
    def aio_get_fd(self) -> int:
        """A file descriptor that is readable when the handle has replies to process."""
        if self._eng is None and self._state == _CREATED:
            raise self._err("connection has not been established", _errno.ENOTCONN)
        with self._cv:
            if self._pipe is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                self._pipe = (r, w)
                if self._ready and not self._signalled:
                    self._signalled = True
                    os.write(w, b"!")
            return self._pipe[0]

    @_api()
    def aio_get_direction(self) -> int:
        """AIO_DIRECTION_READ while connecting or connected, else 0."""
        return AIO_DIRECTION_READ if self._refresh() in (_CONNECTING, _READY) else 0

    @_api()
    def aio_notify_read(self) -> None:
        """Process whatever has completed (the fd from aio_get_fd was readable)."""
        self._drain()

    @_api()
    def aio_notify_write(self) -> None:
        """Nothing to do: the event loop thread does the writing."""
        self._drain()

    @_api()
    def aio_is_created(self) -> bool:
        return self._state == _CREATED

    @_api()
    def aio_is_connecting(self) -> bool:
        return self._refresh() == _CONNECTING

    @_api()
    def aio_is_negotiating(self) -> bool:
        return self._refresh() == _NEGOTIATING

    @_api()
    def aio_is_ready(self) -> bool:
        return self._refresh() == _READY

    @_api()
    def aio_is_processing(self) -> bool:
        return False

    @_api()
    def aio_is_dead(self) -> bool:
        return self._refresh() == _DEAD

    @_api()
    def aio_is_closed(self) -> bool:
        return self._refresh() == _CLOSED

    @_api()
    def aio_command_completed(self, cookie: int) -> bool:
        """False while pending (or unknown); True once done and retired; raises nbd.Error
        with the command's errno if it failed."""
        c = _index(cookie)
        cmd = self._done.get(c)
        if cmd is None:
            return False
        self._retire(cmd)
        return True

    @_api()
    def aio_peek_command_completed(self) -> int:
        """The first completed, unretired cookie; 0 if commands are in flight but none is
        done; EINVAL when nothing is in flight."""
        if self._done:
            return next(iter(self._done))
        if self._inflight:
            return 0
        raise self._err("no commands are in flight", _errno.EINVAL)

    @_api(_ST_INFLIGHT)
    def aio_in_flight(self) -> int:
        """Commands issued whose replies have not been processed yet."""
        return len(self._inflight)

    @_api()
    def connection_state(self) -> str:
        """``"STATE: description"``."""
        short, text = _STATE_TEXT[self._refresh()]
        return f"{short}: {text}"

    @_api()
    def kill_subprocess(self, signum: int) -> None:
        """Signal the server started by connect_command (0 means SIGTERM)."""
        import signal as _signal

        s = _index(signum)
        if s < 0:
            raise self._err("signum: invalid value for parameter", _errno.EINVAL)
        proc = getattr(self._eng, "_proc", None) if self._eng is not None else None
        if proc is None:
            raise self._err("no subprocess exists", _errno.ESRCH)
        try:
            proc.send_signal(s or _signal.SIGTERM)
        except OSError as e:
            raise self._err("kill", e.errno or _errno.ESRCH) from None

    # ---- statistics (1.16) ---------------------------------------------------------------
    @_api()
    def stats_bytes_sent(self) -> int:
        return self._stats.bytes_sent

    @_api()
    def stats_chunks_sent(self) -> int:
        return self._stats.chunks_sent

    @_api()
    def stats_bytes_received(self) -> int:
        return self._stats.bytes_received

    @_api()
    def stats_chunks_received(self) -> int:
        return self._stats.chunks_received

    # ---- closing (1.16) ------------------------------------------------------------------
    def close(self) -> None:
        """Close the handle and its connection. Any later call raises nbd.ClosedHandle."""
        if self._gone:
            raise ClosedHandle("NBD handle is closed")
        with self._lock:
            self._teardown(wait=True)

    def _teardown(self, wait: bool) -> None:
        if self._gone:
            return
        if self._debug_on and not self._ctx and wait:
            self._ctx = "nbd_close"
            try:
                self._debug_msg("closing handle")
            finally:
                self._ctx = ""
        self._gone = True
        _live.discard(self)
        eng = self._eng
        self._eng = None
        for cmd in list(self._inflight.values()) + list(self._done.values()):
            cmd.unpin()
        self._inflight.clear()
        self._done.clear()
        if self._pipe is not None:
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None
        rt = _rt
        holder, self._connecting = self._connecting, []
        if self._pending_opt == "connect" and rt is not None and rt.pid == os.getpid() and rt.thread.is_alive():
            # A connect in progress is cancelled, which stops a server it started.
            async def cancel() -> None:
                # Spawned after the connect: its task has started and is in holder.
                t = holder[0] if holder else None
                if t is not None and not t.done():
                    t.cancel()
                    await asyncio.wait({t}, timeout=_CLOSE_TIMEOUT)

            if wait and not rt.in_loop_thread():
                with contextlib.suppress(Exception):
                    rt.run(cancel())
            else:
                rt.spawn(cancel())
        if eng is None:
            return
        if rt is None or rt.pid != os.getpid() or not rt.thread.is_alive():
            with contextlib.suppress(Exception):
                if eng.stream is not None:
                    eng.stream.close()
            return

        async def bye() -> None:
            try:
                await asyncio.wait_for(eng.close(), _CLOSE_TIMEOUT)
            except BaseException:  # noqa: BLE001 - closing must not fail
                if eng.stream is not None:
                    with contextlib.suppress(Exception):
                        eng.stream.close()

        if wait and not rt.in_loop_thread():
            with contextlib.suppress(Exception):
                rt.run(bye())
        else:
            rt.spawn(bye())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._gone:
            self.close()


def _now() -> float:
    return time.monotonic()


def _zero(mv: memoryview) -> None:
    """memset the (writable, contiguous) buffer to zeroes without a temporary copy."""
    c = ctypes.c_char.from_buffer(mv)
    ctypes.memset(ctypes.addressof(c), 0, mv.nbytes)
    del c


def _is_buffer(obj: Any) -> bool:
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


@contextlib.contextmanager
def nbd() -> Iterator[NBD]:
    """A new handle, closed when the ``with`` block ends (libnbd 1.16)."""
    h = NBD()
    try:
        yield h
    finally:
        if not h._gone:
            h.close()


@atexit.register
def _close_all() -> None:
    for h in list(_live):
        with contextlib.suppress(Exception):
            h._teardown(wait=True)


# As in libnbd, importing the module creates two handles (nbd1, nbd2): the first handle a
# program creates is nbd3.
package_name = NBD().get_package_name()
__version__ = NBD().get_version()
