"""The view filter's publisher (private): subscribers, batches, the wire format.

Each request is packed into a record of 40 bytes (:data:`RECORD`) and appended to
:attr:`Publisher.queue`, a deque, through :attr:`Publisher.put` (its ``append``, bound
once): appending is atomic, so request threads and the event loop never take a lock. Other
messages (open, close, state) go into the same deque as dicts, so the order is kept. One publisher thread wakes every
:data:`BATCH_INTERVAL`, takes what accumulated and writes each subscriber one line per run
of requests: the records joined, in base64 (or as they are, after a line giving their
size, for a subscriber that asked for binary records), which costs no Python work per
request; each batch is encoded once per format. (JSON
of each request cost ~4 µs on the publisher thread, as much as serving the request;
``array.extend`` of eight integers ~2.8 µs; ``struct.pack`` plus ``append`` costs
~0.5 µs, and records of 40 bytes cost a third less to join, encode and send than eight
64-bit integers.) A subscriber whose unsent
backlog passes :data:`MAX_BACKLOG` misses batches (their events are counted and the count
is sent with the next batch that fits): the disk never waits for its viewer.

The wire format is newline-delimited JSON (one object per line), documented in
:class:`pynbd.filters.view.ViewFilter`'s manual page.
"""

from __future__ import annotations

import base64
import collections
import errno
import itertools
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.server.listeners import listen_unix

__all__ = ["BATCH_INTERVAL", "BINARY_REQUEST", "MAX_BACKLOG", "PROTOCOL", "RECORD", "Publisher"]

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
#: (i64, µs). 40 bytes.
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


#: What a subscriber sends to have its records without base64 (see the manual page).
BINARY_REQUEST = {"type": "format", "events": "binary"}
#: Bytes of requests a subscriber may send before a newline (more: it is disconnected).
_MAX_REQUEST = 4096


class _Subscriber:
    __slots__ = ("binary", "dropped", "inbuf", "out", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.out = bytearray()
        self.dropped = 0  # events this subscriber missed so far
        self.binary = False  # it asked for binary records
        self.inbuf = b""  # what it sent, up to the next newline


class Publisher:
    """Listening sockets, subscribers and the thread that feeds them."""

    def __init__(self) -> None:
        #: Requests (packed records) and other messages (dicts), in order.
        self.queue: collections.deque[bytes | dict[str, Any]] = collections.deque()
        #: ``queue.append``, bound once (rebound when the queue is swapped): what the
        #: request path calls.
        self.put = self.queue.append
        #: The deque taken last time, and how much of it was taken (see :meth:`_take`).
        self._prev: tuple[collections.deque[Any], int] | None = None
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
                 "binary": True}
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
        # Lines of JSON; the one request known is BINARY_REQUEST, anything else is ignored.
        lines = (sub.inbuf + data).split(b"\n")
        sub.inbuf = lines.pop()
        if len(sub.inbuf) > _MAX_REQUEST:
            self._drop(sub)
            return
        for line in lines:
            try:
                if json.loads(line) == BINARY_REQUEST:
                    sub.binary = True
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
        self.queue.append(msg)

    def _take(self) -> list[Any]:
        """What accumulated. The deque is swapped for a new one, but a request thread may
        still append to the old one (it read ``queue`` just before the swap): the old
        one's stragglers are taken first the next time."""
        stragglers: list[Any] = []
        if self._prev is not None:
            prev, done = self._prev
            if len(prev) > done:
                stragglers.extend(itertools.islice(prev, done, None))
        q = self.queue
        new: collections.deque[Any] = collections.deque()
        self.queue = new
        self.put = new.append
        taken = list(q)
        self._prev = (q, len(taken))
        return stragglers + taken if stragglers else taken

    def _batch(self) -> None:
        """Send what accumulated to every subscriber, encoded once for each format asked
        (base64 lines, binary records)."""
        items = self._take()
        if not items or not self._subs:
            return
        encoded: dict[bool, bytes] = {}
        for sub in list(self._subs.values()):
            data = encoded.get(sub.binary)
            if data is None:
                data = encoded[sub.binary] = _encode(
                    items, _events_binary if sub.binary else _events_line)
            self._offer(sub, data, len(items))

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


def _encode(items: list[Any], events: Any) -> bytes:
    """Requests and messages as the stream: a run of requests is one ``events`` message
    (made by ``events`` from the records joined), every other message a line of its own."""
    try:
        return events(b"".join(items))  # type: ignore[no-any-return]  # requests only: the usual case
    except TypeError:  # messages among them
        pass
    lines = []
    run: list[bytes] = []
    for it in items:
        if isinstance(it, dict):
            if run:
                lines.append(events(b"".join(run)))
                run = []
            lines.append(_dumps(it))
        else:
            run.append(it)
    if run:
        lines.append(events(b"".join(run)))
    return b"".join(lines)
