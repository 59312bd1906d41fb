"""The plugin and filter interface: what third parties write against.

A plugin is one class deriving from :class:`Plugin`; a filter one class deriving from
:class:`Filter`. The class docstring is the manual page (NAME, SYNOPSIS, DESCRIPTION,
PARAMETERS, EXAMPLES) printed by ``pynbd serve PLUGIN --help``.

The callbacks are nbdkit's, with Python names and types. ``h`` is the per-connection handle
returned by :meth:`Plugin.open`. A capability not overridden is derived the way nbdkit derives
it (``can_write`` is true iff ``pwrite`` is overridden, and so on), and the server emulates what
is missing (zero by writing zeroes, FUA by flush, extents as all data).

Methods are plain ``def`` or ``async def``. Plain methods run in worker threads unless the
class sets ``nonblocking = True`` (pure work on memory: they then run on the event loop, which
is much faster for small requests). ``async def`` methods run on the event loop.

Errors, from any callback: raise :class:`~pynbd.errors.CommandError` (``errno``, message) or
:class:`OSError`; the client gets the matching NBD error (anything else becomes EIO, and the
log one line naming the plugin and callback). During configuration raise
:class:`~pynbd.errors.ConfigError` with a message for the user.

Lifecycle (nbdkit's): ``config`` for each parameter, ``config_complete``, the thread model
(:meth:`Plugin.get_thread_model`), ``get_ready``, [the server forks into the background],
``after_fork``; then per connection ``preconnect``, ``list_exports`` / ``default_export`` when
the client asks, ``open`` (and for filters ``prepare``), the export's properties (each asked
once per connection), the data calls, (``finalize``) ``close``; at exit ``cleanup``.

What the current connection is (export name, peer, TLS) is :func:`connection`, callable from
any callback that runs for a connection.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeAlias, TypeVar

from pynbd.errors import ConfigError

__all__ = [
    "CALLBACKS",
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "CacheMode",
    "ConnectionInfo",
    "Extent",
    "Filter",
    "Flag",
    "FuaMode",
    "Plugin",
    "ThreadModel",
    "ZeroMode",
    "completions",
    "connection",
    "parse_bool",
    "parse_size",
    "shutdown",
]


class ThreadModel(enum.IntEnum):
    """nbdkit's thread models, from strictest to loosest."""

    SERIALIZE_CONNECTIONS = 0
    SERIALIZE_ALL_REQUESTS = 1
    SERIALIZE_REQUESTS = 2
    PARALLEL = 3


class FuaMode(enum.IntEnum):
    NONE = 0
    EMULATE = 1
    NATIVE = 2


class ZeroMode(enum.IntEnum):
    """What ``can_zero`` may return besides a bool (nbdkit's NBDKIT_ZERO_*, for filters):
    NONE withdraws WRITE_ZEROES from the export, EMULATE advertises it and writes zeroes,
    NATIVE calls ``zero``. A bool means NATIVE (True) or EMULATE (False)."""

    NONE = 0
    EMULATE = 1
    NATIVE = 2


class CacheMode(enum.IntEnum):
    NONE = 0
    EMULATE = 1
    NATIVE = 2


class Flag(enum.IntFlag):
    """Flags passed to data callbacks (nbdkit's NBDKIT_FLAG_*)."""

    MAY_TRIM = 1
    FUA = 2
    REQ_ONE = 4
    FAST_ZERO = 8


EXTENT_HOLE = 1
EXTENT_ZERO = 2

#: An extent as returned by ``extents``: (offset, length, type) with type a mix of
#: EXTENT_HOLE and EXTENT_ZERO (0 = allocated data).
Extent = tuple[int, int, int]

_T = TypeVar("_T")
#: What a data callback returns: its value, or (``async def``) an awaitable of it.
MaybeAwaitable: TypeAlias = _T | Awaitable[_T]

_SIZE_SUFFIX = {
    "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "p": 1 << 50, "e": 1 << 60,
}


def parse_size(text: str, what: str = "size") -> int:
    """Parse nbdkit's size syntax: ``512``, ``64K``, ``1M``, ``10G``, ``8E``, ``2s``..."""
    s = text.strip()
    if not s:
        raise ConfigError(f"could not parse {what}: empty string")
    mult = 1
    if s[-1].isalpha():
        suffix = s[-1].lower()
        if suffix not in _SIZE_SUFFIX:
            raise ConfigError(f"could not parse {what}: {text!r}: unknown suffix")
        mult = _SIZE_SUFFIX[suffix]
        s = s[:-1]
    if not s.isdigit() or not s.isascii():
        raise ConfigError(f"could not parse {what}: {text!r}")
    value = int(s) * mult
    if value > (1 << 63) - 1:
        raise ConfigError(f"{what} {text!r} is too large (the maximum is 2^63-1)")
    return value


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_bool(text: str, what: str = "value") -> bool:
    """Parse nbdkit's booleans: 1/true/t/yes/y/on and 0/false/f/no/n/off."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ConfigError(f"could not decode boolean {what}: {text!r}")


class ConnectionInfo:
    """Facts about one client connection, for plugins and filters (:func:`connection`).

    ``export_name`` is the name the client asked for (set once it asked), ``peer`` the
    socket address as text (``""`` for stdin/stdout), ``peer_pid``/``peer_uid``/``peer_gid``
    the Unix-socket peer's credentials (None on other transports), ``tls`` whether the
    connection is encrypted, ``id`` the server's connection number (as in its log lines),
    ``readonly`` whether the export is served read-only, ``family`` and ``peer_address`` the
    socket's address family and the peer's address as the socket module gives them.
    """

    __slots__ = ("_conn", "export_name", "family", "id", "peer", "peer_address", "peer_gid",
                 "peer_pid", "peer_uid", "readonly", "server", "tls")

    def __init__(self, id: int = 0, peer: str = "", peer_pid: int | None = None,
                 peer_uid: int | None = None, peer_gid: int | None = None, tls: bool = False,
                 readonly: bool = False, server: Any = None) -> None:
        self.id = id
        self.peer = peer
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.peer_gid = peer_gid
        self.tls = tls
        self.readonly = readonly
        self.export_name: str | None = None
        #: The server (for :meth:`shutdown`-like requests); None outside a server.
        self.server = server
        self._conn: Any = None  # the server's connection object (set by the server)
        #: The socket's address family (socket.AF_UNIX, AF_INET, AF_INET6, AF_VSOCK) and the
        #: peer's address as the socket module gives it; None on stdin/stdout.
        self.family: int | None = None
        self.peer_address: Any = None

    def __repr__(self) -> str:
        return (f"ConnectionInfo(id={self.id}, peer={self.peer!r}, "
                f"export_name={self.export_name!r}, tls={self.tls})")

    @property
    def closing(self) -> bool:
        """Whether this connection is going away (the client hung up or broke the protocol,
        a plugin asked to disconnect it, or the server is shutting down): a callback that
        waits (a delay, a pause) should give up."""
        if getattr(self.server, "closing", False):
            return True
        return bool(getattr(self._conn, "closing", False))

    def disconnect(self, force: bool = False) -> None:
        """Drop this client (nbdkit_disconnect): with ``force`` at once, else once the
        requests in flight are answered. Callable from any thread."""
        conn = self._conn
        if conn is not None:
            conn.loop.call_soon_threadsafe(conn.disconnect, force)


_current = threading.local()
#: The connection of a coroutine callback awaited on the event loop (set in its task's
#: context, so it stays right while other connections' callbacks run between its steps).
_task_connection: contextvars.ContextVar[ConnectionInfo | None] = \
    contextvars.ContextVar("pynbd_connection", default=None)


def connection() -> ConnectionInfo | None:
    """The connection the calling callback serves, or None outside a connection
    (configuration, ``get_ready``, ``cleanup``...). Works on the event loop and in worker
    threads alike."""
    return _task_connection.get() or getattr(_current, "conn", None)


def shutdown() -> None:
    """Ask the server to shut down (nbdkit_shutdown): it stops accepting clients, finishes
    what is in flight and exits. Asynchronous and callable from any callback or thread."""
    for server in list(_servers):
        loop = getattr(server, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(server.shutdown)


#: Servers running in this process (each registers itself when it starts serving).
_servers: weakref.WeakSet[Any] = weakref.WeakSet()


def _set_connection(info: ConnectionInfo | None) -> None:
    """For the server: the connection whose callbacks run next on this thread."""
    _current.conn = info


class _Deferred(threading.local):
    calls: list[Callable[[], None]] | None = None


_deferred = _Deferred()


class completions:  # used as a function: ``with completions():``
    """Around ``done`` calls a plugin makes in a batch on the event loop (``start_pread``,
    ``start_pwrite``; e.g. every request one wake-up found finished): the server answers
    them when the block ends, in one write, instead of in a later turn of the loop."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = _deferred.calls is not None  # nested: the outer block runs them
        if not self._outer:
            _deferred.calls = []

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            return
        calls, _deferred.calls = _deferred.calls, None
        for call in calls or ():
            try:
                call()
            except Exception:  # one connection's failure must not stop the others
                logging.getLogger("pynbd.server").exception("answering completions")


def _defer(call: Callable[[], None]) -> bool:
    """For the server: run ``call`` when the open :class:`completions` block ends
    (False, and nothing done, outside one)."""
    calls = _deferred.calls
    if calls is None:
        return False
    calls.append(call)
    return True


#: nbdkit's callback names, in the order ``--dump-plugin`` lists its ``has_X=1`` lines.
CALLBACKS = ("load", "unload", "dump_plugin", "config", "config_complete", "config_help",
             "thread_model", "get_ready", "after_fork", "cleanup", "preconnect",
             "list_exports", "default_export", "open", "close", "export_description",
             "get_size", "block_size", "can_write", "can_flush", "is_rotational", "can_trim",
             "can_zero", "can_fast_zero", "can_extents", "can_fua", "can_multi_conn",
             "can_cache", "pread", "pwrite", "flush", "trim", "zero", "extents", "cache")
# pynbd method names that stand for an nbdkit callback of another name
_METHOD_OF = {"thread_model": "get_thread_model", "config_help": ""}


class Plugin:
    """Base class of plugins. Override what the plugin does; the rest has nbdkit's defaults."""

    #: Short name used on the command line (``pynbd serve NAME``).
    name: ClassVar[str] = ""
    #: Plugin version string.
    version: ClassVar[str] = ""
    #: A bare command-line value ``V`` means ``KEY=V`` (nbdkit's magic_config_key).
    magic_config_key: ClassVar[str | None] = None
    #: The loosest thread model the plugin supports.
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    #: Plain methods never block: run them on the event loop instead of a worker thread.
    nonblocking: ClassVar[bool] = False
    #: Short parameter help shown by ``--help`` (nbdkit's config_help).
    config_help: ClassVar[str] = ""

    # Configuration ---------------------------------------------------------------------
    def load(self) -> None:
        """Called once, right after the plugin is created (before any ``config``)."""

    def unload(self) -> None:
        """Called once at exit, after ``cleanup`` (also when configuration failed)."""

    def config(self, key: str, value: str) -> None:
        raise ConfigError(f"{self.name}: unknown parameter '{key}'")

    def config_complete(self) -> None:
        pass

    def get_ready(self) -> None:
        pass

    def after_fork(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def dump_plugin(self) -> list[str]:
        """Extra ``key=value`` lines for ``--dump-plugin``."""
        return []

    def get_thread_model(self) -> ThreadModel:
        """The thread model, asked once after ``config_complete`` (nbdkit's ``thread_model``
        callback): it may only be stricter than the class's :attr:`thread_model`."""
        return self.thread_model

    def callbacks(self) -> frozenset[str]:
        """The nbdkit callbacks this plugin defines (``--dump-plugin``'s ``has_X=1`` lines).

        By default: the methods this class overrides. A plugin that hosts another
        (nbdkit's python or sh plugins) answers for what its script defines.
        """
        have: set[str] = set()
        for cb in CALLBACKS:
            method = _METHOD_OF.get(cb, cb)
            if cb == "pread":
                if _overrides(self, "pread", Plugin) or _overrides(self, "pread_into", Plugin):
                    have.add(cb)
            elif cb == "config_help":
                if type(self).config_help:
                    have.add(cb)
            elif method and _overrides(self, method, Plugin):
                have.add(cb)
        have.update(("open", "get_size"))  # always answered (nbdkit requires them)
        return frozenset(have)

    # Connection ------------------------------------------------------------------------
    def preconnect(self, readonly: bool) -> None | Awaitable[None]:
        pass

    def list_exports(self, readonly: bool, is_tls: bool) -> MaybeAwaitable[list[tuple[str, str]] | None]:
        """Exports as (name, description); None means just the default export."""
        return None

    def default_export(self, readonly: bool, is_tls: bool) -> MaybeAwaitable[str | None]:
        """The canonical name of the default export ``""``; None refuses ``""``."""
        return ""

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        """Return the per-connection handle (any object)."""
        return None

    def close(self, h: Any) -> None | Awaitable[None]:
        pass

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: Any) -> MaybeAwaitable[int]:
        raise NotImplementedError

    def export_description(self, h: Any) -> str | None:
        return None

    def block_size(self, h: Any) -> tuple[int, int, int] | None:
        """(minimum, preferred, maximum) or None for no constraints."""
        return None

    def can_write(self, h: Any) -> bool:
        return _overrides(self, "pwrite", Plugin)

    def can_flush(self, h: Any) -> bool:
        return _overrides(self, "flush", Plugin)

    def is_rotational(self, h: Any) -> bool:
        return False

    def can_trim(self, h: Any) -> bool:
        return _overrides(self, "trim", Plugin)

    def can_zero(self, h: Any) -> bool:
        """Whether to call ``zero``; WRITE_ZEROES is advertised either way (emulated)."""
        return _overrides(self, "zero", Plugin)

    def can_fast_zero(self, h: Any) -> bool:
        """Default: yes when zero is not implemented or can_zero says no (a fast zero
        request then fails fast instead of writing)."""
        return not _overrides(self, "zero", Plugin) or not self.can_zero(h)

    def can_extents(self, h: Any) -> bool:
        return _overrides(self, "extents", Plugin)

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.EMULATE if self.can_flush(h) else FuaMode.NONE

    def can_multi_conn(self, h: Any) -> bool:
        return False

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE if _overrides(self, "cache", Plugin) else CacheMode.NONE

    # Data ------------------------------------------------------------------------------
    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        """Return ``count`` bytes (any buffer: bytes, bytearray, memoryview).

        Override this to hand out a buffer you already have (no copy), or override
        :meth:`pread_into` to fill a buffer the server owns.
        """
        buf = bytearray(count)
        self.pread_into(h, memoryview(buf), offset, flags)
        return buf

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        raise NotImplementedError(f"{self.name}: pread is not implemented")

    def pread_nowait(self, h: Any, count: int, offset: int, flags: int) -> Any:
        """Optional fast path for blocking plugins, called on the event loop.

        Return the data if it can be had without blocking (a file's page cache, say), or
        raise :class:`BlockingIOError`: the server then calls :meth:`pread` in a worker
        thread. Used only under the PARALLEL thread model with no filters.
        """
        raise BlockingIOError

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None | Awaitable[None]:
        raise NotImplementedError

    def flush(self, h: Any, flags: int) -> None | Awaitable[None]:
        raise NotImplementedError

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None | Awaitable[None]:
        raise NotImplementedError

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None | Awaitable[None]:
        """Write zeroes. Raise OSError(ENOTSUP) to make the server fall back to pwrite."""
        raise NotImplementedError

    def extents(self, h: Any, count: int, offset: int, flags: int) -> MaybeAwaitable[list[Extent]]:
        """Ascending, contiguous extents starting at or before ``offset``."""
        raise NotImplementedError

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None | Awaitable[None]:
        raise NotImplementedError


class Filter:
    """Base class of filters: middleware over ``next``, the layer below.

    The first ``--filter`` on the command line is the outermost (closest to the client).
    Every per-connection method receives ``next`` first: the layer below opened for this
    connection, with the plugin's methods minus the handle (``next.pread(count, offset,
    flags)``, ``next.get_size()``, ``next.can_write()``...) and the server's emulation (zero
    by writing, FUA by flush, extents as data). A method not overridden passes straight
    through. Data methods have the plugin's signatures after ``next, h``::

        def pread(self, next, h, count, offset, flags):   # return the data (any buffer)
            return next.pread(count, offset + self.offset, flags)

    Methods run in worker threads (with the thread model's locks) unless the class sets
    ``nonblocking = True`` (pure work on memory, never waiting: then on the event loop) or
    they are ``async def``. A filter that sleeps, does I/O or waits must not set it.

    Pre-connection hooks take the next layer's function first: ``preconnect(next_preconnect,
    readonly)``, ``list_exports(next_list_exports, readonly, is_tls)``,
    ``default_export(next_default_export, readonly, is_tls)``, ``open(next_open, readonly,
    export_name, is_tls)``. ``prepare(next, h, readonly)`` runs after every layer is open
    (inner layers first); ``finalize(next, h)`` before any is closed (outer first).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    #: Plain methods never block: run them on the event loop (see the class docstring).
    nonblocking: ClassVar[bool] = False
    config_help: ClassVar[str] = ""

    # Configuration ---------------------------------------------------------------------
    def load(self) -> None:
        """Called once, right after the filter is created."""

    def unload(self) -> None:
        """Called once at exit, after ``cleanup``."""

    def config(self, next_config: Any, key: str, value: str) -> None:
        """Consume own keys; pass others down with ``next_config(key, value)``."""
        next_config(key, value)

    def config_complete(self) -> None:
        pass

    def get_thread_model(self) -> ThreadModel:
        """Asked once after ``config_complete``; the strictest model of all layers wins."""
        return self.thread_model

    def get_ready(self, thread_model: ThreadModel) -> None:
        """Called once configured, plugin first; ``thread_model`` is the server's final
        model (as nbdkit passes it). An override may also take no argument."""

    def after_fork(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def dump_plugin(self) -> list[str]:
        """Extra ``key=value`` lines this filter adds to ``--dump-plugin``."""
        return []

    # Connection ------------------------------------------------------------------------
    def preconnect(self, next_preconnect: Any, readonly: bool) -> None:
        """Accept or refuse (raise) a client before it negotiates."""
        next_preconnect(readonly)

    def list_exports(self, next_list_exports: Any, readonly: bool,
                     is_tls: bool) -> list[tuple[str, str]] | None:
        """The exports to list; ``next_list_exports(readonly, is_tls)`` asks the layer below
        (a list of (name, description), or None for just the default export)."""
        return next_list_exports(readonly, is_tls)  # type: ignore[no-any-return]

    def default_export(self, next_default_export: Any, readonly: bool,
                       is_tls: bool) -> str | None:
        return next_default_export(readonly, is_tls)  # type: ignore[no-any-return]

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        """Open the layer below with ``next_open(readonly, export_name)``; return a handle."""
        next_open(readonly, export_name)
        return None

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        pass

    def finalize(self, next: Any, h: Any) -> None:
        pass

    def close(self, h: Any) -> None:
        pass


def _overrides(obj: object, method: str, base: type) -> bool:
    return getattr(type(obj), method, None) is not getattr(base, method, None)
