"""Replies of a hostile server: correct ones, then broken on purpose.

:func:`read_reply` and :func:`status_reply` build what a correct server sends (structured
chunks or a simple reply) for a fake disk; :func:`break_reply` changes them the ways a
broken or malicious server might: wrong magics and cookies, lying lengths, content chunks
out of range, overlapping or missing, holes of length 0, errors with errno 0, bad extents,
simple replies where chunks belong, cut-off streams.

Each reply records what it put on the wire (:class:`Sent`): the client oracle compares a
read it reports as successful with exactly these bytes. Mutations that desynchronise the
stream (lying lengths, random bytes) mark the reply, and then only the sentinel check holds
(a buffer pre-filled with a byte the server never sends must not keep any of it).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from fuzz import wire as W
from fuzz.mutate import SENTINEL, Stream, mutate

__all__ = ["Chunk", "Disk", "Sent", "break_reply", "read_reply", "serialize", "status_reply"]

#: Period of the fake disk's pattern (a prime: misplaced data does not line up by chance).
PERIOD = 4093
_TABLE = bytes(((i * 7 + 13) % 250) + 1 for i in range(PERIOD)).replace(bytes([SENTINEL]),
                                                                       b"\xfb")
#: Holes in the fake disk are whole blocks of this size.
BLOCK = 65536


class Disk:
    """The fake disk: a pattern, with some blocks holes (zero)."""

    def __init__(self, rng: random.Random) -> None:
        self.hole_mask = rng.getrandbits(64) if rng.random() < 0.7 else 0

    def is_hole(self, offset: int) -> bool:
        return bool(self.hole_mask >> ((offset // BLOCK) % 64) & 1)

    def data(self, offset: int, n: int) -> bytes:
        start = offset % PERIOD
        reps = (start + n) // PERIOD + 1
        return (_TABLE * reps)[start:start + n]

    def segments(self, offset: int, n: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) pieces of a range, split at block boundaries."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + n
        while pos < end:
            nxt = min(end, (pos // BLOCK + 1) * BLOCK)
            hole = self.is_hole(pos)
            if out and out[-1][2] == hole:
                o, k, _ = out[-1]
                out[-1] = (o, k + nxt - pos, hole)
            else:
                out.append((pos, nxt - pos, hole))
            pos = nxt
        return out


@dataclass
class Chunk:
    """One structured chunk (or, with ``simple``, a simple reply and its data)."""

    cookie: int
    type: int
    payload: bytes
    flags: int = 0
    magic: int = W.STRUCTURED_MAGIC
    length: int | None = None  # the header's length field when it lies
    simple: bool = False
    error: int = 0  # simple replies


@dataclass
class Sent:
    """What the server put on the wire for one request (by the cookie in each chunk)."""

    data: list[tuple[int, int, bytes | None]] = field(default_factory=list)  # off, len, bytes
    status: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)  # per chunk
    desync: bool = False  # the stream was broken in a way only the sentinel check survives
    how: list[str] = field(default_factory=list)


def serialize(chunks: list[Chunk]) -> bytes:
    out = []
    for c in chunks:
        if c.simple:
            out.append(W.SIMPLE.pack(c.magic, c.error, c.cookie) + c.payload)
            continue
        n = len(c.payload) if c.length is None else c.length
        out.append(W.CHUNK.pack(c.magic, c.flags, c.type, c.cookie, n & 0xFFFFFFFF) + c.payload)
    return b"".join(out)


def _data(cookie: int, off: int, data: bytes) -> Chunk:
    return Chunk(cookie, W.RT.OFFSET_DATA, W.U64.pack(off) + data)


def _hole(cookie: int, off: int, n: int) -> Chunk:
    return Chunk(cookie, W.RT.OFFSET_HOLE, struct.pack(">QI", off, n & 0xFFFFFFFF))


def _error(cookie: int, err: int, msg: bytes, off: int | None = None,
           mlen: int | None = None) -> Chunk:
    body = struct.pack(">IH", err, (len(msg) if mlen is None else mlen) & 0xFFFF) + msg
    if off is None:
        return Chunk(cookie, W.RT.ERROR, body)
    return Chunk(cookie, W.RT.ERROR_OFFSET, body + W.U64.pack(off))


def read_reply(rng: random.Random, disk: Disk, cookie: int, off: int, n: int,
               structured: bool) -> list[Chunk]:
    """What a correct server sends for a READ (sometimes a legitimate error)."""
    if not structured:
        if rng.random() < 0.05:
            return [Chunk(cookie, 0, b"", simple=True, magic=W.SIMPLE_MAGIC, error=W.EIO)]
        return [Chunk(cookie, 0, _simple_data(disk, off, n), simple=True, magic=W.SIMPLE_MAGIC)]
    chunks: list[Chunk] = []
    for o, k, hole in disk.segments(off, n):
        pieces = [(o, k)]
        if k > 1 and rng.random() < 0.3:  # split further: legal
            cut = rng.randint(1, k - 1)
            pieces = [(o, cut), (o + cut, k - cut)]
        for po, pk in pieces:
            chunks.append(_hole(cookie, po, pk) if hole else _data(cookie, po, disk.data(po, pk)))
    if rng.random() < 0.3:
        rng.shuffle(chunks)  # any order: legal
    if rng.random() < 0.05:
        chunks.append(_error(cookie, rng.choice((W.EIO, W.EINVAL, W.ENOSPC, 1000)),
                             b"fake failure"))
    if not chunks or rng.random() < 0.2:
        chunks.append(Chunk(cookie, W.RT.NONE, b""))
    chunks[-1].flags |= W.DONE
    return chunks


def _simple_data(disk: Disk, off: int, n: int) -> bytes:
    return b"".join(bytes(k) if hole else disk.data(o, k) for o, k, hole in disk.segments(off, n))


def status_reply(rng: random.Random, disk: Disk, cookie: int, off: int, n: int, flags: int,
                 contexts: dict[int, str]) -> list[Chunk]:
    """BLOCK_STATUS: one chunk per selected context, extents from the disk's holes."""
    chunks = []
    for cid in contexts:
        ext = [(k, 3 if hole else 0) for _, k, hole in disk.segments(off, max(n, 1))]
        if flags & W.CMD.REQ_ONE:
            ext = ext[:1]
        elif rng.random() < 0.2:
            ext = ext[:max(1, len(ext) - 1)]  # may cover less: legal
        body = W.U32.pack(cid) + b"".join(struct.pack(">II", k, f) for k, f in ext)
        chunks.append(Chunk(cookie, W.RT.BLOCK_STATUS, body))
    if not chunks:
        chunks.append(_error(cookie, W.EINVAL, b"no contexts"))
    chunks[-1].flags |= W.DONE
    return chunks


def plain_reply(cookie: int, structured: bool, error: int = 0) -> list[Chunk]:
    """A reply without data (WRITE, FLUSH, TRIM, ...)."""
    if not structured:
        return [Chunk(cookie, 0, b"", simple=True, magic=W.SIMPLE_MAGIC, error=error)]
    if error:
        c = _error(cookie, error, b"")
    else:
        c = Chunk(cookie, W.RT.NONE, b"")
    c.flags |= W.DONE
    return [c]


# --------------------------------------------------------------------------- breaking

#: Mutations after which the stream is out of step: only the sentinel check applies.
DESYNC = {"length-lie", "bytes", "cut", "magic", "simple"}


def _m_cookie(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    c = rng.choice(cs)
    c.cookie = rng.choice([*others, c.cookie + 1, rng.getrandbits(64), 0])


def _m_magic(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    rng.choice(cs).magic = rng.choice((W.SIMPLE_MAGIC, W.STRUCTURED_MAGIC, W.EXT_REPLY_MAGIC,
                                       0, 0xFFFFFFFF, W.REQUEST_MAGIC))


def _m_type(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    rng.choice(cs).type = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 99, 0x8000, 0x8001, 0x8002,
                                      0x8003, 0xFFFF))


def _m_flags(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    c = rng.choice(cs)
    c.flags ^= rng.choice((W.DONE, 2, 0x8000))


def _m_length(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    c = rng.choice(cs)
    n = len(c.payload)
    c.length = rng.choice((n + 1, n - 1, n + 8, max(0, n - 8), 0, 1 << 31, (1 << 32) - 1,
                           64 << 20, (64 << 20) + 9, n * 2))


def _m_offset(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    content = [c for c in cs if c.type in (W.RT.OFFSET_DATA, W.RT.OFFSET_HOLE)
               and len(c.payload) >= 8]
    if not content:
        return
    c = rng.choice(content)
    (o,) = W.U64.unpack_from(c.payload)
    o2 = rng.choice((o + 1, o - 1, o + 512, o - 4096, 0, 1 << 63, (1 << 64) - 1, o * 2)) \
        & ((1 << 64) - 1)
    c.payload = W.U64.pack(o2) + c.payload[8:]


def _m_dup(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    c = rng.choice(cs)
    cs.insert(rng.randrange(len(cs) + 1), Chunk(c.cookie, c.type, c.payload, c.flags & ~W.DONE,
                                                c.magic, c.length, c.simple, c.error))


def _m_drop(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    if len(cs) > 1:
        del cs[rng.randrange(len(cs) - 1)]
    else:
        cs[0].flags &= ~W.DONE


def _m_hole(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    holes = [c for c in cs if c.type == W.RT.OFFSET_HOLE and len(c.payload) == 12]
    if not holes:
        return
    c = rng.choice(holes)
    o, k = struct.unpack(">QI", c.payload)
    c.payload = struct.pack(">QI", o, rng.choice((0, k + 1, k - 1, 0xFFFFFFFF, k * 2))
                            & 0xFFFFFFFF)


def _m_error(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    cookie = cs[0].cookie
    kind = rng.randrange(4)
    if kind == 0:
        e = _error(cookie, 0, b"errno zero")
    elif kind == 1:
        e = _error(cookie, W.EIO, b"short", mlen=rng.choice((6, 200, 0xFFFF)))
    elif kind == 2:
        e = _error(cookie, W.EIO, b"where", off=rng.choice((0, 1 << 63, (1 << 64) - 1)))
    else:
        e = Chunk(cookie, 0x8000 | rng.randrange(3, 0x7FFF), rng.randbytes(rng.randint(0, 12)))
    cs.insert(rng.randrange(len(cs) + 1), e)


def _m_simple(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    c = cs[0]
    data = b"".join(x.payload[8:] for x in cs if x.type == W.RT.OFFSET_DATA)
    err = rng.choice((0, 0, W.EIO, 22))
    cs[:] = [Chunk(c.cookie, 0, data if not err else b"", simple=True, magic=W.SIMPLE_MAGIC,
                   error=err)]


def _m_status(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    st = [c for c in cs if c.type == W.RT.BLOCK_STATUS and len(c.payload) >= 4]
    if not st:
        return
    c = rng.choice(st)
    cid, body = W.U32.unpack_from(c.payload)[0], c.payload[4:]
    ext = [struct.unpack_from(">II", body, i) for i in range(0, len(body) - 7, 8)]
    kind = rng.randrange(6)
    if kind == 0:
        ext.insert(rng.randrange(len(ext) + 1), (0, rng.choice((0, 3))))
    elif kind == 1:
        cid = rng.choice((0, cid + 1, 0xFFFFFFFF))
    elif kind == 2:
        ext = []
    elif kind == 3:
        ext = [(0xFFFFFFFF, 0), *ext]
    elif kind == 4:
        ext = [(k, f | rng.choice((1 << 31, 0xFFFFFFFC))) for k, f in ext]
    else:
        ext = ext * 2
    c.payload = W.U32.pack(cid) + b"".join(struct.pack(">II", k, f) for k, f in ext) + (
        rng.randbytes(rng.choice((0, 0, 3))))


def _m_unsolicited(rng: random.Random, cs: list[Chunk], others: list[int]) -> None:
    cs.insert(0, Chunk(rng.getrandbits(64), W.RT.NONE, b"", W.DONE))


_MUTATIONS = {
    "cookie": _m_cookie, "magic": _m_magic, "type": _m_type, "flags": _m_flags,
    "length-lie": _m_length, "offset": _m_offset, "dup": _m_dup, "drop": _m_drop,
    "hole": _m_hole, "error": _m_error, "simple": _m_simple, "status": _m_status,
    "unsolicited": _m_unsolicited,
}


def break_reply(rng: random.Random, cs: list[Chunk], others: list[int]) -> tuple[bytes, list[str]]:
    """Break a reply (its chunks, then maybe its bytes); returns the bytes and what was done."""
    how = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        name = rng.choice(list(_MUTATIONS))
        _MUTATIONS[name](rng, cs, others)
        how.append(name)
    data = serialize(cs)
    r = rng.random()
    if r < 0.15:
        s = Stream().raw(data)
        data, _ = mutate(rng, s)
        how.append("bytes")
    elif r < 0.25 and data:
        data = data[:rng.randrange(len(data))]
        how.append("cut")
    return data, how
