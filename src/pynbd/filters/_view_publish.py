"""The view filter's publisher (private): subscribers, batches, the wire format.

Each request is packed into a record of 40 bytes (:data:`RECORD`) and appended to
:attr:`Publisher.records`, one bytearray, through :attr:`Publisher.put` (its ``extend``,
bound once): extending is one C call under the GIL, so request threads and the event loop
never take a lock, and no object per request outlives the request (the packed record is
freed at once, its memory reused by the next). Other messages (open, close, state) are
kept apart with the place in the records where they came, so the order is kept. One
publisher thread wakes every :data:`BATCH_INTERVAL`, takes what accumulated (one copy of
the records, no Python work per request) and writes each subscriber one line per run of
requests: the records in base64 (or as they are, after a line giving their size, for a
subscriber that asked for binary records); each batch is encoded once per format. (JSON
of each request cost ~4 µs on the publisher thread, as much as serving the request;
``array.extend`` of eight integers ~2.8 µs; ``struct.pack`` plus ``append`` costs
~0.5 µs, and records of 40 bytes cost a third less to join, encode and send than eight
64-bit integers. A deque of records, one bytes object each, cost the publisher thread
~50 ns a record to join and free, against ~1 ns for the bytearray.) A subscriber whose unsent
backlog passes :data:`MAX_BACKLOG` misses batches (their events are counted and the count
is sent with the next batch that fits): the disk never waits for its viewer.

The wire format is newline-delimited JSON (one object per line), documented in
:class:`pynbd.filters.view.ViewFilter`'s manual page.
"""

from __future__ import annotations

import array
import base64
import errno
import itertools
import json
import logging
import operator
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.server.listeners import listen_unix

__all__ = ["BATCH_INTERVAL", "BINARY_REQUEST", "MAX_BACKLOG", "NS_REQUEST", "PROTOCOL", "RECORD",
           "Publisher", "records_to_us"]

log = logging.getLogger("pynbd.server")

#: Version of the event stream's format (in the hello message).
PROTOCOL = 1
#: Seconds between batches: 20 lines a second per viewer, whatever the request rate.
BATCH_INTERVAL = 0.05
#: Bytes a subscriber may leave unread before batches to it are dropped (a few seconds of a
#: busy disk's events: enough to ride out a stall, small enough to bound the server's memory).
MAX_BACKLOG = 8 << 20
#: A request, little-endian: kind (the letter's code, u8), flags (u8), error (u16),
#: connection (u32), offset (u64), length (u64), time (i64, µs since the epoch), duration
#: (i64, µs). 40 bytes. The filter packs time and duration in nanoseconds (no division
#: per request): they are sent so to a subscriber that asked for it (:data:`NS_REQUEST`),
#: and divided, a batch at a time (:func:`records_to_us`), for the others.
RECORD = struct.Struct("<BBHIQQqq")
_SEND_CHUNK = 1 << 20


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _events_line(records: bytes) -> bytes:
    """One ``events`` line: packed records, in base64."""
    return b'{"type":"events","count":%d,"data":"%s"}\n' % (
        len(records) // RECORD.size, base64.b64encode(records))


def _events_binary(records: bytes) -> bytes:
    """One ``events`` message for a subscriber that asked for binary records: a line
    saying how many bytes of records follow it, then the records as they are."""
    return b'{"type":"events","count":%d,"size":%d}\n%s' % (
        len(records) // RECORD.size, len(records), records)


def _events_ns(records: bytes) -> bytes:
    """As :func:`_events_binary`, the records' time and duration in nanoseconds."""
    return b'{"type":"events","count":%d,"size":%d,"time":"ns"}\n%s' % (
        len(records) // RECORD.size, len(records), records)


_BIG = sys.byteorder == "big"


def records_to_us(records: bytes | bytearray) -> bytes:
    """Records as the filter packs them (time and duration in ns) with those two in µs:
    each record read as five 64-bit integers, the fourth and fifth divided (floor)."""
    a = array.array("q")
    a.frombytes(records)
    if _BIG:
        a.byteswap()
    n = len(a) // 5
    for i in (3, 4):
        a[i::5] = array.array("q", map(operator.floordiv, a[i::5], itertools.repeat(1000, n)))
    if _BIG:
        a.byteswap()
    return a.tobytes()


#: How each format of the stream makes an ``events`` message of records.
_EVENTS = {"base64": _events_line, "binary": _events_binary, "ns": _events_ns}
#: What a subscriber sends to have its records without base64 (see the manual page).
BINARY_REQUEST = {"type": "format", "events": "binary"}
#: The same, with time and duration in nanoseconds (as the filter packs them: the least
#: work for the server).
NS_REQUEST = {"type": "format", "events": "binary", "time": "ns"}
#: Bytes of requests a subscriber may send before a newline (more: it is disconnected).
_MAX_REQUEST = 4096


class _Subscriber:
    __slots__ = ("dropped", "format", "inbuf", "out", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.out = bytearray()
        self.dropped = 0  # events this subscriber missed so far
        self.format = "base64"  # or "binary" or "ns", as it asked
        self.inbuf = b""  # what it sent, up to the next newline


class Publisher:
    """Listening sockets, subscribers and the thread that feeds them."""

    def __init__(self) -> None:
        #: The requests' packed records since the last batch, one after the other (the
        #: same object for the publisher's life: only its contents are taken).
        self.records = bytearray()
        #: ``records.extend``, bound once: what the request path calls.
        self.put = self.records.extend
        #: Other messages since the last batch, each with where it came in the stream of
        #: records (bytes of records taken before it, since the start).
        self._messages: list[tuple[int, dict[str, Any]]] = []
        #: Bytes of records taken so far; guarded with ``_messages`` by ``_lock`` (the
        #: request path takes no lock).
        self._taken = 0
        self._lock = threading.Lock()
        #: True while at least one subscriber is connected (read lock-free by the hot path).
        self.active = False
        #: Set when a subscriber arrived: the next request publishes the export's state.
        self.want_state = False
        #: What a new subscriber is told first: export name -> size (known so far).
        self.exports: dict[str, int] = {}
        #: Unread bytes a subscriber may have before batches to it are dropped.
        self.max_backlog = MAX_BACKLOG
        self._listeners: list[socket.socket] = []
        self._paths: list[str] = []
        self._subs: dict[int, _Subscriber] = {}
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False

    # ---- setting up ------------------------------------------------------------------
    def listen_path(self, path: str) -> None:
        try:
            s = listen_unix(path)
        except OSError as e:
            raise ConfigError(f"view-socket: {path}: {e.strerror}") from None
        self._listeners.append(s)
        self._paths.append(path)

    def listen_address(self, host: str, port: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ConfigError(f"view-address: {host}: {e.strerror}") from None
        fam, _, _, _, addr = infos[0]
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(16)
        except OSError as e:
            s.close()
            raise ConfigError(f"view-address: {host}:{port}: {e.strerror}") from None
        self._listeners.append(s)

    def start(self) -> None:
        """Start the publisher thread (after the server went into the background)."""
        if self._thread is not None:
            return
        sel = self._sel = selectors.DefaultSelector()
        for s in self._listeners:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, "listen")
        self._wake_r.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="view-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued, close every subscriber and listener, remove socket files."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        for sub in list(self._subs.values()):
            sub.sock.close()
        self._subs.clear()
        for s in self._listeners:
            s.close()
        for p in self._paths:
            try:
                os.unlink(p)
            except OSError:
                pass
        self._listeners.clear()
        self._paths.clear()
        self._wake_r.close()
        self._wake_w.close()

    # ---- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        assert self._sel is not None
        next_batch = time.monotonic() + BATCH_INTERVAL
        while not self._stop:
            timeout = max(next_batch - time.monotonic(), 0)
            for key, mask in self._sel.select(timeout):
                self._ready(key, mask)
            if time.monotonic() >= next_batch:
                self._batch()
                next_batch = time.monotonic() + BATCH_INTERVAL
        self._batch()
        for sub in list(self._subs.values()):  # a last effort, without waiting long
            if sub.dropped:
                sub.out += _dumps({"type": "dropped", "count": sub.dropped})
            sub.sock.setblocking(True)
            sub.sock.settimeout(0.5)
            try:
                sub.sock.sendall(sub.out)
            except OSError:
                pass

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "wake":
            try:
                self._wake_r.recv(64)
            except OSError:
                pass
        elif key.data == "listen":
            self._accept(key.fileobj)  # type: ignore[arg-type]
        else:
            sub = self._subs.get(key.fd)
            if sub is None:
                return
            if mask & selectors.EVENT_READ:
                self._read(sub)
            if mask & selectors.EVENT_WRITE and sub.sock.fileno() >= 0:
                self._flush(sub)

    def _accept(self, lsock: socket.socket) -> None:
        assert self._sel is not None
        try:
            sock, addr = lsock.accept()
        except OSError:
            return
        sock.setblocking(False)
        sub = _Subscriber(sock, str(addr) if addr else "unix")
        hello = {"type": "hello", "protocol": PROTOCOL, "server": "pynbd", "pid": os.getpid(),
                 "time": time.time_ns() // 1000, "exports": dict(self.exports),
                 "binary": True, "ns": True}
        sub.out += _dumps(hello)
        self._subs[sock.fileno()] = sub
        self._sel.register(sock, selectors.EVENT_READ, "sub")
        self.active = True
        self.want_state = True
        log.debug("view: subscriber %s connected", sub.peer)
        self._flush(sub)

    def _read(self, sub: _Subscriber) -> None:
        try:
            data = sub.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the viewer went away
            self._drop(sub)
            return
        # Lines of JSON; the requests known are BINARY_REQUEST and NS_REQUEST, anything
        # else is ignored.
        lines = (sub.inbuf + data).split(b"\n")
        sub.inbuf = lines.pop()
        if len(sub.inbuf) > _MAX_REQUEST:
            self._drop(sub)
            return
        for line in lines:
            try:
                req = json.loads(line)
                if req == BINARY_REQUEST:
                    sub.format = "binary"
                elif req == NS_REQUEST:
                    sub.format = "ns"
            except ValueError:
                pass

    def _drop(self, sub: _Subscriber) -> None:
        assert self._sel is not None
        fd = sub.sock.fileno()
        if fd >= 0:
            self._sel.unregister(sub.sock)
            self._subs.pop(fd, None)
        sub.sock.close()
        self.active = bool(self._subs)
        log.debug("view: subscriber %s went away", sub.peer)

    def _flush(self, sub: _Subscriber) -> None:
        assert self._sel is not None
        while sub.out:
            try:
                n = sub.sock.send(memoryview(sub.out)[:_SEND_CHUNK])
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    self._drop(sub)
                    return
                continue
            del sub.out[:n]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if sub.out else 0)
        self._sel.modify(sub.sock, want, "sub")

    def message(self, msg: dict[str, Any]) -> None:
        """Queue a message other than a request, in order with the requests."""
        with self._lock:
            self._messages.append((self._taken + len(self.records), msg))

    def _take(self) -> tuple[bytearray, list[tuple[int, dict[str, Any]]]]:
        """The records that accumulated, and the other messages with where they came in
        them. Requests may append records meanwhile (each append is whole and atomic):
        those after the length read here stay for the next time."""
        with self._lock:
            recs = self.records
            n = len(recs)
            data = recs[:n]
            del recs[:n]
            base = self._taken
            self._taken = base + n
            messages, self._messages = self._messages, []
        return data, [(at - base, msg) for at, msg in messages]

    def _batch(self) -> None:
        """Send what accumulated to every subscriber, encoded once for each format asked
        (base64 lines, binary records, binary records in ns)."""
        data, messages = self._take()
        if not (data or messages) or not self._subs:
            return
        count = len(data) // RECORD.size + len(messages)
        encoded: dict[str, bytes] = {}
        us: bytes | None = None  # the records in µs, made once if a subscriber wants them
        for sub in list(self._subs.values()):
            out = encoded.get(sub.format)
            if out is None:
                recs: bytes | bytearray = data
                if sub.format != "ns":
                    recs = us = records_to_us(data) if us is None else us
                out = encoded[sub.format] = _encode(recs, messages, _EVENTS[sub.format])
            self._offer(sub, out, count)

    def _offer(self, sub: _Subscriber, data: bytes, count: int) -> None:
        if sub.out and len(sub.out) + len(data) > self.max_backlog:
            # The viewer is behind (the kernel's buffer is full and so is our backlog): it
            # misses this batch, counted. (One batch is always taken when nothing waits.)
            sub.dropped += count
            return
        if sub.dropped:
            sub.out += _dumps({"type": "dropped", "count": sub.dropped})
            sub.dropped = 0
        sub.out += data
        self._flush(sub)


def _encode(data: bytes | bytearray, messages: list[tuple[int, dict[str, Any]]], events: Any) -> bytes:
    """Requests and messages as the stream: a run of requests is one ``events`` message
    (made by ``events`` from its records), every other message a line of its own, placed
    where it came among the records (``messages``: (offset in ``data``, message))."""
    if not messages:  # requests only: the usual case
        return events(data)  # type: ignore[no-any-return]
    lines = []
    pos = 0
    for at, msg in messages:
        if at > pos:
            lines.append(events(data[pos:at]))
            pos = at
        lines.append(_dumps(msg))
    if pos < len(data):
        lines.append(events(data[pos:]))
    return b"".join(lines)
