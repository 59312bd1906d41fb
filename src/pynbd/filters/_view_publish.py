"""The view filter's publisher (private): subscribers, batches, the wire format.

Each request is appended to :attr:`Publisher.records` as one record of eight 64-bit
integers (one ``array.extend``: atomic under the GIL, so request threads and the event loop
never take a lock); other messages (open, close, state) go to a dict, with a marker record
in their place so that the order is kept. One publisher thread wakes every
:data:`BATCH_INTERVAL`, takes what accumulated and writes each subscriber one line per run
of requests: the records' bytes in base64, which costs no Python work per request (JSON
of each request cost ~4 µs, as much as serving it). A subscriber whose unsent
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
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.server.listeners import listen_unix

__all__ = ["BATCH_INTERVAL", "CONTROL", "FIELDS", "MAX_BACKLOG", "PROTOCOL", "Publisher"]

log = logging.getLogger("pynbd.server")

#: Version of the event stream's format (in the hello message).
PROTOCOL = 1
#: Seconds between batches: 20 lines a second per viewer, whatever the request rate.
BATCH_INTERVAL = 0.05
#: Bytes a subscriber may leave unread before batches to it are dropped (a few seconds of a
#: busy disk's events: enough to ride out a stall, small enough to bound the server's memory).
MAX_BACKLOG = 8 << 20
#: Integers a record has: kind, offset, length, flags, error, time, duration, connection.
FIELDS = 8
#: The kind of a marker record: its offset field numbers a message in the control dict.
CONTROL = 0
#: Records one drain takes at most (bounds one line; the rest wait one turn).
MAX_BATCH = 200_000
_SEND_CHUNK = 1 << 20
_MARK = array.array("q", [CONTROL]).tobytes()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _events_line(records: array.array[int], start: int, end: int) -> bytes:
    """One ``events`` line: records [start, end) as little-endian bytes, in base64."""
    run = records[start * FIELDS:end * FIELDS]
    if sys.byteorder == "big":
        run.byteswap()
    return b'{"type":"events","count":%d,"data":"%s"}\n' % (
        end - start, base64.b64encode(run.tobytes()))


class _Subscriber:
    __slots__ = ("dropped", "out", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.out = bytearray()
        self.dropped = 0  # events this subscriber missed so far


class Publisher:
    """Listening sockets, subscribers and the thread that feeds them."""

    def __init__(self) -> None:
        #: Requests, FIELDS integers each (see the module's docstring).
        self.records = array.array("q")
        self._control: dict[int, dict[str, Any]] = {}
        self._seq = itertools.count(1)
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
                 "time": time.time_ns() // 1000, "exports": dict(self.exports)}
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
        if not data:  # the viewer went away; anything it sends is ignored
            self._drop(sub)

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
        seq = next(self._seq)
        self._control[seq] = msg
        self.records.extend((CONTROL, seq, 0, 0, 0, 0, 0, 0))

    def _take(self) -> array.array[int]:
        recs = self.records
        n = min(len(recs), MAX_BATCH * FIELDS)
        n -= n % FIELDS  # (always whole records: each was one extend)
        taken = recs[:n]
        del recs[:n]  # only what was taken: records appended meanwhile stay
        return taken

    def _batch(self) -> None:
        """Turn what accumulated into lines: a run of requests is one ``events`` line,
        every other message a line of its own."""
        taken = self._take()
        if not taken:
            return
        count = len(taken) // FIELDS
        kinds = taken[0::FIELDS].tobytes()
        lines: list[bytes] = []
        start = 0  # record index where the current run of requests began
        pos = kinds.find(_MARK)
        while pos >= 0:
            if pos % 8 == 0:
                i = pos // 8
                if i > start:
                    lines.append(_events_line(taken, start, i))
                msg = self._control.pop(taken[i * FIELDS + 1], None)
                if msg is not None:
                    lines.append(_dumps(msg))
                start = i + 1
            pos = kinds.find(_MARK, pos + 1)
        if count > start:
            lines.append(_events_line(taken, start, count))
        if not self._subs:
            return
        data = b"".join(lines)
        for sub in list(self._subs.values()):
            self._offer(sub, data, count)

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
