"""What ``pynbd view`` knows about each export (private): blocks, their state, counters.

A :class:`Panel` is one source (one view socket, or one source of a recording): the
export's size, one byte of state per block (hole or data, from the filter's ``state``
message and the writes, trims and zeroes since), the last request that touched each block
and when, and counters per kind of request. :class:`Model` holds the panels and a history
of the messages of the last minutes (for the page's timeline). The filter's records are
applied a batch at a time with numpy when it is installed (:mod:`._view_batch`), else one
by one.
"""

from __future__ import annotations

import array
import base64
import collections
import struct
from typing import Any

from pynbd.tools import _view_batch

__all__ = ["BACKGROUND", "COLOURS", "DATA", "HOLE", "KINDS", "MAX_BLOCKS", "Model", "Panel",
           "as_json", "blend", "block_colour", "decode_events", "event_count", "first_time",
           "message_time", "records"]

#: Kinds drawn on the grid (flush and extents touch no block; they are only counted).
KINDS = {"R": "read", "W": "write", "T": "trim", "Z": "zero", "C": "cache", "F": "flush",
         "E": "extents"}
#: Colours of the requests, as in the "better loop mounts" demo: writes red, reads black,
#: trims light purple, zeroes white (a cache request is drawn like a read, in grey).
COLOURS: dict[str, tuple[int, int, int]] = {
    "W": (224, 0, 0), "R": (0, 0, 0), "T": (200, 160, 255), "Z": (255, 255, 255),
    "C": (80, 80, 80),
}
#: A block's resting colours: a hole (never written, trimmed or zeroed) and data.
HOLE = (200, 200, 200)
DATA = (96, 112, 144)
#: Around and between the grids.
BACKGROUND = (245, 245, 245)
_CODES = {k: ord(k) for k in KINDS}
#: The view filter's record (pynbd.filters._view_publish.RECORD).
_RECORD = struct.Struct("<BBHIQQqq")
_NAMES = {ord(k): k for k in KINDS}
#: Apply the filter's records a batch at a time (numpy); False: one by one.
BATCHED = _view_batch.HAVE_NUMPY


def records(msg: dict[str, Any]) -> bytes | bytearray | None:
    """The records of an ``events`` message of the filter (whole ones), else None: its
    ``raw`` bytes (binary records, as ``pynbd view`` asks for them) or its ``data``
    (in base64), time and duration in µs."""
    if msg.get("type") != "events":
        return None
    raw = msg.get("raw")
    if raw is None:
        data = msg.get("data")
        if data is None:
            return None
        raw = base64.b64decode(data)
    if msg.get("time") == "ns":  # (``follow`` makes them µs as they arrive)
        return _view_batch.ns_to_us(raw)
    part = len(raw) % _RECORD.size
    return raw[:len(raw) - part] if part else raw  # type: ignore[no-any-return]


def as_json(msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` as it can be written in JSON (binary records in base64, as ``data``)."""
    raw = msg.get("raw")
    if raw is None:
        return msg
    out = {k: v for k, v in msg.items() if k not in ("raw", "size")}
    out["data"] = base64.b64encode(raw).decode()
    return out


def decode_events(msg: dict[str, Any]) -> list[Any]:
    """The requests of an ``events`` message: ``events`` (lists, as nbdkit logs are
    replayed), or the filter's 40-byte records (``raw``, or ``data`` in base64), as
    sequences (KIND, OFFSET, LENGTH, FLAGS, ERROR, TIME, DURATION, CONN); KIND is a
    letter or its code."""
    raw = records(msg)
    if raw is None:
        return list(msg.get("events", ()))
    return [(k, o, n, f, e, t, d, c) for k, f, e, c, o, n, t, d in _RECORD.iter_unpack(raw)]


def _raw_time(raw: bytes, index: int) -> float | None:
    """The start (seconds) of record ``index`` (-1: the last) of binary records."""
    n = len(raw) // _RECORD.size
    if not n:
        return None
    off = (index % n) * _RECORD.size + 24  # TIME's place in the record
    return int.from_bytes(raw[off:off + 8], "little", signed=True) / 1e6


def _record_time(data: str, index: int) -> float | None:
    """The start (seconds) of record ``index`` (-1: the last) of an ``events`` message's
    ``data``, decoding only the few base64 characters that hold it."""
    size = len(data) // 4 * 3 - (data[-2:].count("=") if data else 0)
    n = size // _RECORD.size
    if not n:
        return None
    off = (index % n) * _RECORD.size + 24  # TIME's place in the record
    group = off // 3
    chunk = base64.b64decode(data[4 * group:4 * group + 16])
    return int.from_bytes(chunk[off % 3:off % 3 + 8], "little", signed=True) / 1e6


def event_count(msg: dict[str, Any]) -> int:
    if "count" in msg:
        return int(msg["count"])
    return len(msg.get("events", ()))
#: Blocks one panel may have (the block size grows to fit: 4M bytes of state per panel).
MAX_BLOCKS = 1 << 22
#: Seconds of history kept for the timeline, and messages at most.
HISTORY_SECONDS = 300.0
HISTORY_EVENTS = 2_000_000


def blend(a: tuple[int, int, int], b: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """``a`` turning into ``b`` as ``f`` goes from 0 to 1."""
    return (round(a[0] + (b[0] - a[0]) * f), round(a[1] + (b[1] - a[1]) * f),
            round(a[2] + (b[2] - a[2]) * f))


def block_colour(base: int, kind: int, age: float, fade: float) -> tuple[int, int, int]:
    """The colour of a block: ``base`` 0 hole / 1 data, ``kind`` the last request's letter
    code (0: none), ``age`` seconds since it, ``fade`` seconds to fade (0: never)."""
    rest = DATA if base else HOLE
    if not kind:
        return rest
    colour = COLOURS.get(chr(kind))
    if colour is None:
        return rest
    if fade <= 0:
        return colour
    f = age / (fade / 2 if kind == 82 else fade)  # reads flash: they fade twice as fast
    if f >= 1:
        return rest
    return blend(colour, rest, max(f, 0.0))


class Panel:
    """One export as the viewer draws it."""

    def __init__(self, name: str, block: int) -> None:
        self.name = name
        self.block = block
        self.size = 0
        self.nblocks = 0
        self.base = bytearray()  # 0 hole, 1 data
        self.kind = bytearray()  # last request's letter, 0 none
        self.when = array.array("d")  # and its time (seconds since the epoch)
        self.counters: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
        self.errors = 0
        self.dropped = 0
        self.last_time = 0.0
        #: Working space of :mod:`._view_batch` (an array of one integer per block).
        self.scratch: Any = None

    def resize(self, size: int) -> None:
        if size <= self.size:
            return
        block = self.block
        while -(-size // block) > MAX_BLOCKS:
            block *= 2
        if block != self.block:  # too many blocks: coarser cells, state kept as is
            self.block = block
            self.base = bytearray()
            self.kind = bytearray()
            self.when = array.array("d")
        n = -(-size // block)
        grow = n - len(self.base)
        self.base += bytes(grow)
        self.kind += bytes(grow)
        self.when.extend(array.array("d", bytes(8 * grow)))
        self.size, self.nblocks = size, n

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        a = min(offset // self.block, self.nblocks)
        b = min(-(-(offset + length) // self.block), self.nblocks)
        return a, b

    def state(self, size: int, extents: list[list[int]]) -> None:
        self.resize(size)
        for off, length, typ in extents:
            a, b = self._range(off, length)
            if b > a:
                self.base[a:b] = (b"\0" if typ & 1 else b"\1") * (b - a)

    def events(self, evs: list[Any]) -> None:
        """Apply a batch of requests. (Kept in one loop with locals: a busy disk sends
        tens of thousands a second, and this runs for each.)"""
        counters, colours, block = self.counters, COLOURS, self.block
        kind_arr, when_arr, base_arr = self.kind, self.when, self.base
        last = self.last_time
        names = _NAMES
        for ev in evs:
            kind, offset, length, _flags, err, t_us = ev[0], ev[1], ev[2], ev[3], ev[4], ev[5]
            kind = names.get(kind, kind)
            c = counters.get(kind)
            if c is None:
                continue
            t = t_us / 1e6
            if t > last:  # noqa: PLR1730 -- cheaper than max() in this loop
                last = t
            if err:
                self.errors += 1
                continue
            c[0] += 1
            c[1] += length
            if kind not in colours or length <= 0:
                continue
            a = offset // block
            b = -(-(offset + length) // block)
            if b > self.nblocks:
                self.resize(offset + length)
                kind_arr, when_arr, base_arr = self.kind, self.when, self.base
                block = self.block  # (coarser if the export became very large)
                a, b = offset // block, min(-(-(offset + length) // block), self.nblocks)
            code = _CODES[kind]
            if b == a + 1:  # one block: most requests
                kind_arr[a] = code
                when_arr[a] = t
                if kind == "W":
                    base_arr[a] = 1
                elif kind == "T" or kind == "Z":
                    base_arr[a] = 0
            elif b > a:
                self._mark(a, b, kind, t)
        self.last_time = last

    def event(self, ev: list[Any]) -> None:
        self.events([ev])

    def _mark(self, a: int, b: int, kind: str, t: float) -> None:
        n = b - a
        self.kind[a:b] = kind.encode() * n
        self.when[a:b] = array.array("d", [t]) * n
        if kind == "W":
            self.base[a:b] = b"\1" * n
        elif kind in "TZ":
            self.base[a:b] = b"\0" * n

    def apply(self, msg: dict[str, Any], raw: bytes | bytearray | None = None) -> None:
        """Apply one message of the filter's stream (``raw``: an ``events`` message's
        records, decoded already)."""
        typ = msg.get("type")
        if typ == "events":
            if raw is None:
                raw = records(msg)
            if raw is not None and BATCHED:
                _view_batch.apply_records(self, raw)
            else:
                self.events(decode_events(msg))
        elif typ == "state":
            self.state(int(msg.get("size", 0)), msg.get("extents", []))
        elif typ == "open":
            self.resize(int(msg.get("size", 0)))
        elif typ == "hello":
            for size in msg.get("exports", {}).values():
                self.resize(int(size))
        elif typ == "dropped":
            self.dropped += int(msg.get("count", 0))

    def colour(self, i: int, now: float, fade: float) -> tuple[int, int, int]:
        return block_colour(self.base[i], self.kind[i], now - self.when[i], fade)


class Model:
    """All panels, and the recent messages (for the page's timeline and late pages)."""

    def __init__(self, names: list[str], block: int) -> None:
        self.block = block
        self.panels = [Panel(n, block) for n in names]
        #: (source, message) of the last minutes, oldest first.
        self.history: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._history_events = 0
        #: The panels as they were before the oldest message in history.
        self.origin = [Panel(n, block) for n in names]

    @property
    def now(self) -> float:
        """The time of the latest request seen (seconds since the epoch)."""
        return max((p.last_time for p in self.panels), default=0.0)

    def apply(self, src: int, msg: dict[str, Any], raw: bytes | bytearray | None = None) -> None:
        self.panels[src].apply(msg, raw)
        self.history.append((src, msg))
        self._history_events += event_count(msg) + 1
        self._trim_history()

    def _trim_history(self) -> None:
        h = self.history
        cutoff = self.now - HISTORY_SECONDS
        while h and (self._history_events > HISTORY_EVENTS or message_time(h[0][1]) < cutoff):
            src, msg = h.popleft()
            self._history_events -= event_count(msg) + 1
            self.origin[src].apply(msg)


def message_time(msg: dict[str, Any]) -> float:
    """When a message happened (an events message: its last request's start)."""
    if msg.get("type") == "events":
        if "raw" in msg or "data" in msg:
            t = _raw_time(msg["raw"], -1) if "raw" in msg else _record_time(msg["data"], -1)
            if t is not None:
                return t
        elif msg.get("events"):
            return float(msg["events"][-1][5]) / 1e6
    return float(msg.get("time", 0)) / 1e6


def first_time(msg: dict[str, Any]) -> float | None:
    """When a message began (an events message: its first request's start), or None."""
    if msg.get("type") == "events":
        if "raw" in msg or "data" in msg:
            t0 = _raw_time(msg["raw"], 0) if "raw" in msg else _record_time(msg["data"], 0)
            if t0 is not None:
                return t0
        elif msg.get("events"):
            return float(msg["events"][0][5]) / 1e6
    t = msg.get("time")
    return float(t) / 1e6 if t else None
