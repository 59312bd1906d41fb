"""The view filter: publish every request to live viewers. Its manual page is
:class:`ViewFilter`'s docstring."""

from __future__ import annotations

import errno
import ipaddress
import itertools
import struct
import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._params import parse_size
from pynbd.filters._view_publish import RECORD, Publisher
from pynbd.plugin import Filter, ThreadModel, connection

__all__ = ["ViewFilter"]

_now = time.time_ns
_pack = RECORD.pack
#: A record as its first 8 bytes (kind, flags, error, connection) and the rest: the same 40
#: bytes as :data:`RECORD`. Reads and writes without flags (most of them) pack a header made
#: once per connection, three integers fewer to convert per request.
_pack_tail = struct.Struct("<8sQQqq").pack
_head = struct.Struct("<BBHI").pack
#: A request's kind as the first integer of its record: the letter's code.
_CODE = {k: ord(k) for k in "RWTZCFE"}

#: Extents a state message lists at most (the rest of the disk is reported as data).
MAX_STATE_EXTENTS = 1 << 18
#: Bytes asked of ``extents`` at once while building a state message.
_STATE_CHUNK = 1 << 30


class _Handle:
    __slots__ = ("conn", "export", "next", "rhead", "whead")

    def __init__(self, conn: int, export: str) -> None:
        self.conn = conn & 0xFFFFFFFF
        self.export = export
        self.next: Any = None
        self.rhead = _head(82, 0, 0, self.conn)  # R, no flags, no error
        self.whead = _head(87, 0, 0, self.conn)  # W


def _error(e: BaseException) -> int:
    err = getattr(e, "errno", None)
    return err if isinstance(err, int) and err else errno.EIO


class ViewFilter(Filter):
    """NAME
        view - publish every request to live viewers

    SYNOPSIS
        pynbd serve --filter=view PLUGIN view-socket=PATH [view-address=HOST:PORT]
                    [view-backlog=SIZE] [PLUGIN-ARGS...]

        pynbd view PATH [PATH...]

    DESCRIPTION
        view is a filter that tells viewers about every request that passes it: its kind,
        offset, length, flags, result, time and connection. `pynbd view` draws them live in
        a browser, one cell per block, several exports side by side (see docs/view.md); any
        program can read the stream, which is newline-delimited JSON. nbdkit has no such
        filter (its log filter and a script reading the log come closest).

        Viewers connect to a Unix socket (view-socket) and/or a TCP port on loopback
        (view-address); any number may connect and leave at any time. With no viewer
        connected the filter only checks one flag per request. Events are sent in batches
        (20 a second); a viewer that falls behind by more than a few megabytes misses
        batches, and is told how many events it missed: a viewer never slows the disk down.

        A viewer that connects is told the exports seen so far and their sizes at once;
        the next request (or the next client connecting) then publishes the export's state,
        its allocated blocks and holes from the layer below's extents.

    PARAMETERS
        view-socket=PATH
            Listen for viewers on the Unix socket PATH (replacing a stale socket file, never
            a live one). The file is removed when the server exits.

        view-address=HOST:PORT
            Listen for viewers on a TCP port. HOST must be a loopback address (127.0.0.1,
            ::1 in brackets, or localhost): the stream tells anyone who connects what the
            clients do.

        At least one of them is required.

        view-backlog=SIZE
            Bytes of events a viewer may leave unread before it misses batches (default
            8M; 4K at least).

    STREAM FORMAT
        One JSON object per line. The first is

            {"type":"hello","protocol":1,"server":"pynbd","pid":N,"time":T,
             "exports":{"NAME":SIZE,...},"binary":true,"ns":true}

        then, in order:

            {"type":"events","count":N,"data":BASE64}
                N requests as they completed: DATA is N records of 40 bytes, in base64,
                each (little-endian) KIND u8, FLAGS u8, ERROR u16, CONN u32, OFFSET u64,
                LENGTH u64, TIME i64, DURATION i64 (Python's struct "<BBHIQQqq").
                KIND is the code of the letter R (read),
                W (write), T (trim), Z (zero), C (cache), F (flush) or E (extents);
                FLAGS are the request's (FUA 2, MAY_TRIM 1, REQ_ONE 4, FAST_ZERO 8);
                ERROR is 0 or the errno it failed with; TIME the moment it started,
                DURATION how long it took, both in microseconds (TIME since the Unix
                epoch); CONN the connection number. Requests of one connection appear in
                the order they completed, each once. (Records, not JSON: encoding each
                request as JSON cost as much as serving it.)

            {"type":"open","conn":CONN,"export":NAME,"size":SIZE,"time":T}
            {"type":"close","conn":CONN,"time":T}
                A client connected to export NAME, or went away.

            {"type":"state","export":NAME,"size":SIZE,"extents":[[OFFSET,LENGTH,TYPE],...],
             "time":T}
                The export's allocation when the viewer connected (TYPE: 0 data,
                1 hole, 2 zero, 3 hole and zero).

            {"type":"dropped","count":N}
                The viewer was behind: N events before the next line were not sent.

        Viewers must ignore types and fields they do not know.

        A viewer may send the line {"type":"format","events":"binary"}, or the line
        {"type":"format","events":"binary","time":"ns"} (anything else it sends is
        ignored). From the next batch on, its events messages are then

            {"type":"events","count":N,"size":M}
                followed (after the newline) by the M bytes of the N records as they are:
                no base64 to encode or decode;

            {"type":"events","count":N,"size":M,"time":"ns"}
                the same, but TIME and DURATION in nanoseconds: the records as the
                filter packs them, the least work for the server (`pynbd view` asks for
                these when the hello says "ns":true).

    EXAMPLES
        Watch mkfs.ext4 on a RAM disk in the browser:

            pynbd serve --filter=view memory 1G view-socket=/tmp/view.sock
            pynbd view /tmp/view.sock --open
            nbdfuse or qemu-nbd ... ; mkfs.ext4 ...

        Read the raw stream:

            socat - UNIX-CONNECT:/tmp/view.sock
    """

    name = "view"
    version = "1.0"
    nonblocking = True
    config_help = (
        "view-socket=<PATH>            Unix socket viewers connect to.\n"
        "view-address=<HOST>:<PORT>    Loopback TCP address viewers connect to.\n"
        "view-backlog=<SIZE>           Unread bytes before a viewer misses events.")

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.addresses: list[tuple[str, int]] = []
        self.pub = Publisher()
        self._ids = itertools.count(1)

    # Configuration ---------------------------------------------------------------------
    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "view-socket":
            if not value:
                raise ConfigError("view-socket: the path must not be empty")
            self.paths.append(value)
        elif key == "view-address":
            self.addresses.append(_parse_address(value))
        elif key == "view-backlog":
            backlog = parse_size(value)
            if backlog < 4096:
                raise ConfigError(f"view-backlog: {value} is too small (4K at least)")
            self.pub.max_backlog = backlog
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if not self.paths and not self.addresses:
            raise ConfigError("view: view-socket=PATH or view-address=HOST:PORT is required")

    def get_ready(self, thread_model: ThreadModel) -> None:
        for p in self.paths:
            self.pub.listen_path(p)
        for host, port in self.addresses:
            self.pub.listen_address(host, port)

    def after_fork(self) -> None:
        self.pub.start()

    def cleanup(self) -> None:
        self.pub.stop()

    # Connection ------------------------------------------------------------------------
    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        info = connection()
        conn = info.id if info is not None and info.id else next(self._ids)
        return _Handle(conn, export_name)

    def prepare(self, next: Any, h: _Handle, readonly: bool) -> None:
        h.next = next
        size = next.get_size()
        self.pub.exports[h.export] = size
        if self.pub.active:
            self.pub.message({"type": "open", "conn": h.conn, "export": h.export,
                              "size": size, "time": time.time_ns() // 1000})
            if self.pub.want_state:
                self._state(h)

    def finalize(self, next: Any, h: _Handle) -> None:
        if self.pub.active:
            self.pub.message({"type": "close", "conn": h.conn,
                              "time": time.time_ns() // 1000})

    def _state(self, h: _Handle) -> None:
        """Publish the export's allocation (asked by a viewer that just connected)."""
        self.pub.want_state = False
        next = h.next
        size = next.get_size()
        extents: list[list[int]] = []
        pos = 0
        try:
            while pos < size and len(extents) < MAX_STATE_EXTENTS:
                for off, length, typ in next.extents(min(_STATE_CHUNK, size - pos), pos, 0):
                    if extents and extents[-1][2] == typ:
                        extents[-1][1] += length
                    else:
                        extents.append([off, length, typ])
                    pos = off + length
        except Exception:  # noqa: BLE001 -- a layer whose extents fail: all data
            extents, pos = [], 0
        if pos < size:
            extents.append([pos, size - pos, 0])
        self.pub.message({"type": "state", "export": h.export, "size": size,
                          "extents": extents, "time": time.time_ns() // 1000})

    # Data ------------------------------------------------------------------------------
    # Each method: with no viewer, one attribute test and the call; with viewers, the
    # clock read around the call and the record appended (no lock) through ``pub.put``
    # (the bound ``extend`` of the publisher's bytearray). Written out per method, not
    # through a helper taking *args: the helper cost ~0.5 µs a request. Flags and errno are
    # masked to their record fields: a record that does not fit must never fail a request.
    def _failed(self, h: _Handle, kind: str, offset: int, count: int, flags: int, t0: int,
                e: BaseException) -> None:
        self.pub.put(_pack(_CODE[kind], flags & 0xFF, _error(e) & 0xFFFF, h.conn,
                           offset, count, t0, _now() - t0))

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        pub = self.pub
        if not pub.active:
            return next.pread(count, offset, flags)
        if pub.want_state:
            self._state(h)
        t0 = _now()
        try:
            r = next.pread(count, offset, flags)
        except Exception as e:
            self._failed(h, "R", offset, count, flags, t0, e)
            raise
        pub.put(_pack_tail(h.rhead if not flags else _head(82, flags & 0xFF, 0, h.conn),
                           offset, count, t0, _now() - t0))
        return r

    def pwrite(self, next: Any, h: _Handle, buf: Any, offset: int, flags: int) -> None:
        pub = self.pub
        if not pub.active:
            return next.pwrite(buf, offset, flags)  # type: ignore[no-any-return]
        if pub.want_state:
            self._state(h)
        try:
            count = buf.nbytes  # a memoryview: the server's buffers
        except AttributeError:
            count = memoryview(buf).nbytes
        t0 = _now()
        try:
            next.pwrite(buf, offset, flags)
        except Exception as e:
            self._failed(h, "W", offset, count, flags, t0, e)
            raise
        pub.put(_pack_tail(h.whead if not flags else _head(87, flags & 0xFF, 0, h.conn),
                           offset, count, t0, _now() - t0))
        return None

    def _other(self, kind: str, fn: Any, h: _Handle, count: int, offset: int,
               flags: int) -> Any:
        """The rarer requests (trim, zero, cache, flush, extents), through one helper."""
        pub = self.pub
        if pub.want_state:
            self._state(h)
        t0 = _now()
        try:
            r = fn(flags) if kind == "F" else fn(count, offset, flags)
        except Exception as e:
            self._failed(h, kind, offset, count, flags, t0, e)
            raise
        pub.put(_pack(_CODE[kind], flags & 0xFF, 0, h.conn, offset, count, t0, _now() - t0))
        return r

    def trim(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        if not self.pub.active:
            return next.trim(count, offset, flags)  # type: ignore[no-any-return]
        return self._other("T", next.trim, h, count, offset, flags)  # type: ignore[no-any-return]

    def zero(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        if not self.pub.active:
            return next.zero(count, offset, flags)  # type: ignore[no-any-return]
        return self._other("Z", next.zero, h, count, offset, flags)  # type: ignore[no-any-return]

    def cache(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        if not self.pub.active:
            return next.cache(count, offset, flags)  # type: ignore[no-any-return]
        return self._other("C", next.cache, h, count, offset, flags)  # type: ignore[no-any-return]

    def flush(self, next: Any, h: _Handle, flags: int) -> None:
        if not self.pub.active:
            return next.flush(flags)  # type: ignore[no-any-return]
        return self._other("F", next.flush, h, 0, 0, flags)  # type: ignore[no-any-return]

    def extents(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        if not self.pub.active:
            return next.extents(count, offset, flags)
        return self._other("E", next.extents, h, count, offset, flags)


def _parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) on loopback, else a clear ConfigError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"view-address: expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"view-address: {host} is not a loopback address "
                              "(use 127.0.0.1, [::1] or localhost)")
    return host, int(port)
