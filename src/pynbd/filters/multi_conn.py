"""The multi-conn filter: enable, emulate or disable multi-conn. Its manual page is
:class:`MultiConnFilter`'s docstring."""

from __future__ import annotations

import errno
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_bool
from pynbd.plugin import Filter, Flag, FuaMode, ThreadModel, connection

__all__ = ["MultiConnFilter"]

_MODES = ("auto", "emulate", "plugin", "unsafe", "disable")
_TRACK = {"connection": "conn", "conn": "conn", "fast": "fast", "off": "off"}
_WRITE, _READ = 1, 2  # what may have filled a connection's cache since its last flush


class _Group:
    """The connections that share flushes (all of them, or one export's)."""

    __slots__ = ("conns", "dirty", "name")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.conns: list[_Handle] = []
        self.dirty = False


class _Handle:
    __slots__ = ("dirty", "group", "mode", "name", "next")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.next: Any = None
        self.mode = "auto"
        self.dirty = 0
        self.group: _Group | None = None


class MultiConnFilter(Filter):
    """NAME
        multi-conn - pynbd multi-conn filter: enable, emulate or disable multi-conn

    SYNOPSIS
        pynbd serve --filter=multi-conn PLUGIN [multi-conn-mode=MODE]
                    [multi-conn-track-dirty=LEVEL] [multi-conn-exportname=BOOL]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        NBD_FLAG_CAN_MULTI_CONN ("multi-conn") tells a client that it may connect several
        times to the same export and that flushes are consistent across connections: a
        write answered on one connection, then a flush answered on another, makes the data
        visible to a read on a third. Clients go much faster with it; without it they must
        assume every connection caches writes of its own.

        Plugins have to opt in to multi-conn. This filter can give a plugin that does not
        the consistent flushes multi-conn needs, by repeating each flush on every
        connection; it also has modes for measuring and testing clients and plugins.

        The filter assumes that all connections to the plugin see the same data, apart
        from caching: it must not be used with a plugin that gives every connection
        different data for the same export name (a temporary disk per client).

        Combine with the fua filter for more control over flushes. The cache filter also
        makes flushes consistent, at the price of a cache this filter does not need.

        This is nbdkit-multi-conn-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        multi-conn-mode=auto
            The default: like disable when the server's thread model is
            SERIALIZE_CONNECTIONS, like plugin when the plugin advertises multi-conn, and
            like emulate otherwise. Multi-conn is advertised exactly when the plugin has it
            or can be given it.

        multi-conn-mode=emulate
            Keep track of every connection; a flush on one (or a FUA write, which implies
            one) is repeated on every connection to the plugin. Multi-conn is advertised. A
            client cannot connect if the plugin cannot flush.

        multi-conn-mode=disable
            Never advertise multi-conn, even if the plugin has it, and never repeat
            flushes: to test that a client with several connections flushes each one.

        multi-conn-mode=plugin
            Advertise multi-conn exactly when the plugin does, and never repeat flushes;
            multi-conn-track-dirty still saves flushes.

        multi-conn-mode=unsafe
            Always advertise multi-conn, even if the plugin does not have it. Dangerous: a
            client relying on consistent flushes may corrupt data.

        multi-conn-track-dirty=connection
            The default (conn is the same). A connection is dirty after a write, zero or
            trim since its last flush, or after a read while another connection was dirty;
            a flush on a clean connection (from the client, or repeated by emulate) is not
            sent to the plugin.

        multi-conn-track-dirty=fast
            Track only whether any connection wrote since the last flush: if none did, a
            flush is skipped. A flush on one connection counts as a flush of all of them.
            Safe with emulate; possibly unsafe with plugin when the plugin has no
            multi-conn, since reads that cached stale data are not tracked.

        multi-conn-track-dirty=off
            Send every flush to the plugin. With emulate, a client that flushes every
            connection itself then makes a number of flushes growing with the square of the
            number of connections.

        multi-conn-exportname=false
            The default: emulation flushes every connection, whatever its export name:
            safe, but a client of one export pays for flushes of another.

        multi-conn-exportname=true
            Emulation flushes only the connections to the same export name: faster when the
            plugin serves different data per export, unsafe when it serves the same data
            under every name without multi-conn of its own.

    EXAMPLES
        Consistent flushes over a plugin that lacks them:

            pynbd serve --filter=multi-conn file disk.img

        Save flushes when a client flushes every connection of a plugin that already has
        multi-conn:

            pynbd serve --filter=multi-conn file disk.img \\
                multi-conn-mode=plugin multi-conn-track-dirty=fast
    """

    name = "multi-conn"
    nonblocking = True
    config_help = (
        "multi-conn-mode=<MODE>          'auto' (default), 'emulate', 'plugin',\n"
        "                                'disable', or 'unsafe'.\n"
        "multi-conn-track-dirty=<LEVEL>  'conn' (default), 'fast', or 'off'.\n"
        "multi-conn-exportname=<BOOL>    true to limit emulation by export name.")

    def __init__(self) -> None:
        self.mode = "auto"
        self.track = "conn"
        self.byname = False
        self._lock = threading.Lock()
        self._groups: list[_Group] = []

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "multi-conn-mode":
            if value not in _MODES:
                raise ConfigError(f"unknown multi-conn mode '{value}'")
            self.mode = value
        elif key == "multi-conn-track-dirty":
            if value not in _TRACK:
                raise ConfigError(f"unknown multi-conn track-dirty setting '{value}'")
            self.track = _TRACK[value]
        elif key in ("multi-conn-exportname", "multi-conn-export-name"):
            self.byname = parse_bool(value)
        else:
            next_config(key, value)

    # ---- connections and their groups ---------------------------------------------------
    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        return _Handle(export_name if self.byname else None)

    def prepare(self, next: Any, h: _Handle, readonly: bool) -> None:
        h.next = next
        h.mode = self.mode
        if h.mode == "auto":
            h.mode = "plugin" if next.can_multi_conn() else "emulate"
            info = connection()
            server = info.server if info is not None else None
            if getattr(server, "thread_model", None) == ThreadModel.SERIALIZE_CONNECTIONS:
                h.mode = "disable"
        if h.mode == "emulate" and not next.can_flush():
            raise CommandError(errno.EINVAL, "emulating multi-conn requires working flush")
        with self._lock:
            group = self._group_of(h)
            if group is None:
                group = _Group(h.name)
                self._groups.append(group)
            group.conns.append(h)
            h.group = group

    def _group_of(self, h: _Handle) -> _Group | None:
        """The group a new connection joins (the only one, or its export name's)."""
        for g in self._groups:
            if not self.byname or g.name == h.name:
                return g
        return None

    def finalize(self, next: Any, h: _Handle) -> None:
        with self._lock:
            group = h.group
            if group is None:
                return
            group.conns.remove(h)
            if not group.conns:
                self._groups.remove(group)
            h.group = None

    # ---- what is advertised ------------------------------------------------------------
    def can_fua(self, next: Any, h: _Handle) -> FuaMode:
        # A native FUA would not reach the other connections: emulating it with our
        # (replicated) flush is what keeps them consistent.
        fua = FuaMode(next.can_fua())
        if fua == FuaMode.NATIVE and h.mode == "emulate":
            return FuaMode.EMULATE
        return fua

    def can_multi_conn(self, next: Any, h: _Handle) -> bool:
        if h.mode == "plugin":
            return bool(next.can_multi_conn())
        return h.mode in ("emulate", "unsafe")

    # ---- data ----------------------------------------------------------------------------
    def _mark(self, h: _Handle, write: bool) -> None:
        # No lock, as in nbdkit: a client must wait for a flush's answer before sending
        # what depends on it, so a race here is the client's own.
        if self.track == "off" or h.group is None:
            return
        if self.track == "conn":
            h.dirty |= _WRITE if write else _READ
        if write:
            h.group.dirty = True

    def _write_flags(self, h: _Handle, flags: int) -> tuple[int, bool]:
        """Mark the write; return the flags to pass down and whether to flush after."""
        if flags & Flag.FUA:
            if h.mode != "emulate":
                return flags, False
            self._mark(h, True)
            return flags & ~Flag.FUA, True
        self._mark(h, True)
        return flags, False

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        self._mark(h, False)
        return next.pread(count, offset, flags)

    def cache(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        self._mark(h, False)
        next.cache(count, offset, flags)

    def pwrite(self, next: Any, h: _Handle, buf: Any, offset: int, flags: int) -> None:
        flags, flush = self._write_flags(h, flags)
        next.pwrite(buf, offset, flags)
        if flush:
            self.flush(next, h, 0)

    def zero(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        flags, flush = self._write_flags(h, flags)
        next.zero(count, offset, flags)
        if flush:
            self.flush(next, h, 0)

    def trim(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        flags, flush = self._write_flags(h, flags)
        next.trim(count, offset, flags)
        if flush:
            self.flush(next, h, 0)

    def flush(self, next: Any, h: _Handle, flags: int) -> None:
        group = h.group
        assert group is not None
        if h.mode == "emulate":
            with self._lock:
                for other in group.conns:
                    if self.track == "off" or other.dirty & _WRITE or (
                            group.dirty and (self.track == "fast" or other.dirty & _READ)):
                        other.next.flush(flags)
                        other.dirty = 0
                group.dirty = False
            return
        # Not emulating: skip the flush when nothing is dirty.
        if self.track != "off" and not group.dirty:
            return
        next.flush(flags)
        if self.track == "conn":
            if next.can_multi_conn():
                with self._lock:
                    for other in group.conns:
                        other.dirty = 0
                    group.dirty = False
            else:
                h.dirty = 0
        elif self.track == "fast":
            group.dirty = False
