"""A hostile NBD server on a Unix socket, for fuzzing the clients.

One connection per case, served by a thread with blocking sockets. A :class:`Setup` (drawn
from the case's seed) says how the server negotiates, what it claims (the export's size and
flags, sometimes absurd: 2^63 and more, no HAS_FLAGS, a broken block size) and how it breaks
the handshake and its replies (:mod:`hostile_replies`). Whatever it does, it ends the
connection itself: after the client's NBD_CMD_DISC or EOF, or after :data:`QUIET` seconds
without a request, so a client that then still waits is hung.

Everything it put on the wire is recorded in a :class:`Record` for the oracles.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field

from fuzz import hostile_replies as R
from fuzz import wire as W
from fuzz.mutate import SENTINEL, Stream, mutate

__all__ = ["HostileServer", "Record", "Setup", "make_setup"]

#: Seconds without a request before the server hangs up (ends dropped replies and stalls).
QUIET = 0.2
#: Longest any receive may block (a client that neither sends nor closes).
RECV_TIMEOUT = 10.0
_HANDSHAKE_BREAKS = ("rep-magic", "rep-opt", "rep-type", "rep-len", "rep-extra", "no-ack",
                     "info-size", "info-short", "info-flags", "info-none", "block-size",
                     "meta-id0", "meta-dup", "meta-unasked", "cut", "bytes", "greeting")
EVIL_SIZES = (0, 1, 511, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 63) + 512)


@dataclass
class Setup:
    style: str = "fixed"  # fixed | plain | oldstyle
    size: int = 1 << 20
    eflags: int = 0
    sr: bool = True
    go: bool = True  # answer GO (else ERR_UNSUP: the client falls back to EXPORT_NAME)
    block_size: tuple[int, int, int] | None = None
    hs_break: str | None = None
    hs_break_at: int = 0
    p_break: float = 0.0  # chance each reply is broken
    stall_after: int = -1  # stop answering after this many requests
    ctx_base: int = 1


def make_setup(rng: random.Random) -> Setup:
    s = Setup()
    s.style = rng.choices(("fixed", "plain", "oldstyle"), (90, 5, 5))[0]
    s.size = rng.choice(((1 << 20), (4 << 20) + 512 * rng.randint(0, 8), 12345 * 512)) \
        if rng.random() < 0.95 else rng.choice(EVIL_SIZES)
    s.eflags = 1 | rng.getrandbits(11) << 1 & ~2  # HAS_FLAGS, random features, writable
    if rng.random() < 0.05:
        s.eflags = rng.getrandbits(16)
    s.sr = rng.random() < 0.85
    s.go = rng.random() < 0.95
    if rng.random() < 0.3:
        s.block_size = rng.choice(((1, 4096, 32 << 20), (512, 4096, 1 << 20),
                                   (4096, 4096, 65536), (3, 1000, 10), (0, 0, 0)))
    if rng.random() < 0.2:
        s.hs_break = rng.choice(_HANDSHAKE_BREAKS)
        s.hs_break_at = rng.randrange(4)
    s.p_break = rng.choice((0.0, 0.0, 0.05, 0.3, 1.0))
    if rng.random() < 0.05:
        s.stall_after = rng.randrange(4)
    s.ctx_base = rng.choice((1, 2, 1000, 0xFFFFFFF0))
    return s


@dataclass
class Record:
    """What the server said, for the oracles."""

    advertised_size: int | None = None  # the size the client was told (last), if any
    contexts: dict[int, str] = field(default_factory=dict)  # as sent in META_CONTEXT
    structured: bool = False
    sent: dict[tuple[int, int, int], R.Sent] = field(default_factory=dict)
    requests: int = 0
    client_errors: list[str] = field(default_factory=list)  # the client broke the protocol
    closed_at: float | None = None
    crashed: str | None = None  # the fake server itself failed (a fuzzer bug)
    raw_sentinel: bool = False  # the sentinel byte appeared anywhere in the replies
    close_reason: str = ""  # disc, eof (the client ended it), quiet, cut, ... (the server did)
    how: list[str] = field(default_factory=list)


class _Closed(Exception):
    pass


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def recv_exact(self, n: int, timeout: float = RECV_TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        while len(self.buf) < n:
            try:
                d = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError:
                raise _Closed("quiet") from None
            except OSError:
                d = b""
            if not d:
                raise _Closed("eof")
            self.buf += d
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def readable_soon(self, wait: float = 0.005) -> bool:
        """Whether more request bytes are here or come within ``wait`` seconds (a client
        sends a batch at once: waiting a little makes batches, and so the case, repeatable)."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return False
        try:
            d = self.sock.recv(1 << 20)
        except OSError:
            return False
        if not d:
            return False
        self.buf += d
        return True

    def send(self, data: bytes) -> None:
        """Send everything, reading meanwhile: a client may be sending while it should be
        reading (pipelined writes), and neither side may wait for the other."""
        view = memoryview(data)
        self.sock.settimeout(0)
        while view:
            r, w, _ = select.select([self.sock], [self.sock], [], RECV_TIMEOUT)
            if not r and not w:
                raise _Closed("send stuck")
            try:
                if r and len(self.buf) < 256 << 20:
                    d = self.sock.recv(1 << 20)
                    if not d:
                        raise _Closed("eof while sending")
                    self.buf += d
                if w:
                    view = view[self.sock.send(view):]
            except BlockingIOError:
                continue
            except OSError:
                raise _Closed("send") from None


class HostileServer:
    """Listens on ``path``; :meth:`serve` takes the next connection as one case."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ls.bind(path)
        self.ls.listen(8)
        self.thread: threading.Thread | None = None

    def close(self) -> None:
        self.ls.close()

    def serve(self, setup: Setup, rng: random.Random) -> Record:
        rec = Record()
        self.thread = threading.Thread(target=self._serve, args=(setup, rng, rec),
                                       name="hostile-nbd", daemon=True)
        self.thread.start()
        return rec

    def join(self, timeout: float) -> bool:
        assert self.thread is not None
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _serve(self, setup: Setup, rng: random.Random, rec: Record) -> None:
        self.ls.settimeout(RECV_TIMEOUT)
        try:
            sock, _ = self.ls.accept()
        except OSError:
            rec.closed_at = time.monotonic()
            return
        conn = _Conn(sock)
        try:
            tx = _Handshake(conn, setup, rng, rec).run()
            if tx:
                _Transmission(conn, setup, rng, rec).run()
        except _Closed as e:
            rec.close_reason = str(e)
        except Exception:  # noqa: BLE001 - a bug in the fuzzer: reported, never hidden
            rec.crashed = traceback.format_exc()
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            rec.closed_at = time.monotonic()


# --------------------------------------------------------------------------- handshake


class _Handshake:
    def __init__(self, conn: _Conn, setup: Setup, rng: random.Random, rec: Record) -> None:
        self.c, self.s, self.rng, self.rec = conn, setup, rng, rec
        self.sr = False
        self.no_zeroes = False

    def run(self) -> bool:
        s, c = self.s, self.c
        if s.style == "oldstyle":
            self.rec.advertised_size = s.size
            c.send(self._maybe_break(struct.pack(">QQQI", W.NBDMAGIC, W.OLDSTYLE_MAGIC, s.size,
                                                 s.eflags) + bytes(124), "greeting"))
            return True
        hflags = (1 | 2) if s.style == "fixed" else 2
        c.send(self._maybe_break(W.GREETING.pack(W.NBDMAGIC, W.IHAVEOPT, hflags), "greeting"))
        (cflags,) = struct.unpack(">I", c.recv_exact(4, QUIET))
        self.no_zeroes = bool(cflags & hflags & 2)
        for i in range(64):
            magic, opt, n = W.OPT_HEADER.unpack(c.recv_exact(16, QUIET))
            if magic != W.IHAVEOPT:
                self.rec.client_errors.append(f"option magic {magic:#x}")
                raise _Closed("bad option magic")
            if n > 1 << 20:
                self.rec.client_errors.append(f"option of {n} bytes")
                raise _Closed("huge option")
            data = c.recv_exact(n)
            if opt == W.OPT.EXPORT_NAME:
                self._export_name()
                return True
            if s.style == "plain":
                raise _Closed("plain newstyle knows only EXPORT_NAME")
            replies, go = self._answer(opt, data)
            out = b"".join(W.OPT_REPLY.pack(W.OPT_REPLY_MAGIC, opt, r, len(d)) + d
                           for r, d in replies)
            if s.hs_break and i == s.hs_break_at:
                out = self._break(out, opt, replies)
            c.send(out)
            if opt == W.OPT.ABORT:
                raise _Closed("abort")
            if go:
                self.rec.structured = self.sr
                return True
        raise _Closed("too many options")

    def _export_name(self) -> None:
        self.rec.advertised_size = self.s.size
        self.rec.structured = self.sr
        out = struct.pack(">QH", self.s.size, self.s.eflags & 0xFFFF)
        if not self.no_zeroes:
            out += bytes(124)
        self.c.send(self._maybe_break(out, "info-size"))

    def _answer(self, opt: int, data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        s = self.s
        if opt == W.OPT.STRUCTURED_REPLY:
            self.sr = s.sr and not data
            return [(W.REP.ACK if self.sr else W.REP.ERR_UNSUP, b"")], False
        if opt in (W.OPT.SET_META_CONTEXT, W.OPT.LIST_META_CONTEXT):
            return self._meta(opt, data), False
        if opt in (W.OPT.GO, W.OPT.INFO):
            if not s.go:
                return [(W.REP.ERR_UNSUP, b"")], False
            out = [(W.REP.INFO, struct.pack(">HQH", 0, s.size, s.eflags & 0xFFFF))]
            if s.block_size:
                out.append((W.REP.INFO, struct.pack(">HIII", 3, *s.block_size)))
            if opt == W.OPT.GO:
                self.rec.advertised_size = s.size
            return [*out, (W.REP.ACK, b"")], opt == W.OPT.GO
        if opt == W.OPT.LIST:
            return [(W.REP.SERVER, W.U32.pack(0)), (W.REP.ACK, b"")], False
        if opt == W.OPT.ABORT:
            return [(W.REP.ACK, b"")], False
        return [(W.REP.ERR_UNSUP, b"")], False

    def _meta(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        if not self.sr:
            return [(W.REP.ERR_INVALID, b"")]
        try:
            (n,) = struct.unpack_from(">I", data)
            (k,) = struct.unpack_from(">I", data, 4 + n)
            pos, queries = 8 + n, []
            for _ in range(k):
                (m,) = struct.unpack_from(">I", data, pos)
                queries.append(data[pos + 4:pos + 4 + m].decode())
                pos += 4 + m
        except (struct.error, UnicodeDecodeError):
            self.rec.client_errors.append(f"malformed meta context request {data[:40]!r}")
            return [(W.REP.ERR_INVALID, b"")]
        out = []
        for q in queries:
            if q == "base:allocation":
                cid = self.s.ctx_base
                if opt == W.OPT.SET_META_CONTEXT:
                    self.rec.contexts = {cid: q}
                out.append((W.REP.META_CONTEXT, W.U32.pack(cid) + q.encode()))
        return [*out, (W.REP.ACK, b"")]

    def _maybe_break(self, out: bytes, which: str) -> bytes:
        if self.s.hs_break != which and not (which == "info-size" and self.s.hs_break
                                             in ("cut", "bytes")):
            return out
        return self._break(out, 0, [])

    def _break(self, out: bytes, opt: int, replies: list[tuple[int, bytes]]) -> bytes:
        """Break one option's replies the way ``hs_break`` says."""
        b, rng = self.s.hs_break, self.rng
        self.rec.how.append(f"handshake:{b}")
        hdr = W.OPT_REPLY
        if b == "greeting" or b == "bytes" or not replies:
            data, _ = mutate(rng, Stream().raw(out))
            return data
        if b == "cut":
            raise_after = out[:rng.randrange(max(1, len(out)))]
            self.c.send(raise_after)
            raise _Closed("cut")
        r0, d0 = replies[0]
        if b == "rep-magic":
            return hdr.pack(rng.getrandbits(64), opt, r0, len(d0)) + d0 + out
        if b == "rep-opt":
            return hdr.pack(W.OPT_REPLY_MAGIC, opt ^ rng.choice((1, 2, 1 << 31)), r0, len(d0)) + d0
        if b == "rep-type":
            return hdr.pack(W.OPT_REPLY_MAGIC, opt, rng.choice((5, 99, (1 << 31) + 99, 0)), 0)
        if b == "rep-len":
            return hdr.pack(W.OPT_REPLY_MAGIC, opt, r0, rng.choice(
                (len(d0) + 1, max(0, len(d0) - 1), 0xFFFFFFFF, 1 << 25))) + d0 + out
        if b == "rep-extra":
            return out + hdr.pack(W.OPT_REPLY_MAGIC, opt, W.REP.ACK, 0)
        if b == "no-ack":
            return out[:len(out) - hdr.size] if replies[-1][0] == W.REP.ACK else out
        return self._break_info(out, opt, replies)

    def _break_info(self, out: bytes, opt: int, replies: list[tuple[int, bytes]]) -> bytes:
        b, rng, s = self.s.hs_break, self.rng, self.s
        new = list(replies)
        if b == "info-size" and opt == W.OPT.GO:
            size = rng.choice(EVIL_SIZES)
            self.rec.advertised_size = size
            new[0] = (W.REP.INFO, struct.pack(">HQH", 0, size, s.eflags & 0xFFFF))
        elif b == "info-short" and opt == W.OPT.GO:
            new[0] = (W.REP.INFO, new[0][1][:rng.randrange(12)])
        elif b == "info-flags" and opt == W.OPT.GO:
            new[0] = (W.REP.INFO, struct.pack(">HQH", 0, s.size, rng.getrandbits(16) & ~1))
        elif b == "info-none" and opt == W.OPT.GO:
            new = new[1:]
        elif b == "block-size" and opt == W.OPT.GO:
            new.insert(1, (W.REP.INFO, struct.pack(">HIII", 3, *rng.choice(
                ((0, 0, 0), (3, 512, 1), (65536 * 2, 4096, 4096), (1, 1, 0xFFFFFFFF))))))
        elif b == "meta-id0" and new and new[0][0] == W.REP.META_CONTEXT:
            new[0] = (W.REP.META_CONTEXT, W.U32.pack(0) + new[0][1][4:])
            self.rec.contexts = {0: "base:allocation"}
        elif b == "meta-dup" and new and new[0][0] == W.REP.META_CONTEXT:
            new.insert(0, new[0])
        elif b == "meta-unasked" and opt == W.OPT.SET_META_CONTEXT:
            new.insert(0, (W.REP.META_CONTEXT, W.U32.pack(77) + b"qemu:dirty-bitmap:x"))
            self.rec.contexts[77] = "qemu:dirty-bitmap:x"
        else:
            return out
        return b"".join(W.OPT_REPLY.pack(W.OPT_REPLY_MAGIC, opt, r, len(d)) + d for r, d in new)


# --------------------------------------------------------------------------- transmission


class _Transmission:
    def __init__(self, conn: _Conn, setup: Setup, rng: random.Random, rec: Record) -> None:
        self.c, self.s, self.rng, self.rec = conn, setup, rng, rec
        self.disk = R.Disk(rng)
        self.by_cookie: dict[int, tuple[int, int, int]] = {}
        self.in_flight: set[int] = set()

    def run(self) -> None:
        while True:
            batch = [self._request(QUIET)]
            while self.c.readable_soon() and len(batch) < 64:
                batch.append(self._request(RECV_TIMEOUT))
            replies = [self._reply(*r) for r in batch if r is not None]
            if any(r is None for r in batch):  # NBD_CMD_DISC: answer the rest, then close
                self._send(replies)
                raise _Closed("disc")
            self._send(replies)

    def _request(self, timeout: float) -> tuple[int, int, int, int, int] | None:
        magic, flags, cmd, cookie, off, n = W.REQUEST.unpack(self.c.recv_exact(28, timeout))
        if magic != W.REQUEST_MAGIC:
            self.rec.client_errors.append(f"request magic {magic:#x}")
            raise _Closed("bad request magic")
        if cmd == W.CMD.WRITE:
            if n > 64 << 20:
                self.rec.client_errors.append(f"WRITE of {n} bytes")
                raise _Closed("huge write")
            self.c.recv_exact(n)
        if cmd == W.CMD.DISC:
            return None
        if cookie in self.in_flight:
            self.rec.client_errors.append(f"cookie {cookie} reused while in flight")
        self.in_flight.add(cookie)
        self.by_cookie[cookie] = (cmd, off, n)
        self.rec.requests += 1
        return flags, cmd, cookie, off, n

    def _reply(self, flags: int, cmd: int, cookie: int, off: int, n: int) -> bytes:
        s, rng = self.s, self.rng
        if 0 <= s.stall_after < self.rec.requests:
            return b""
        sr = self.rec.structured
        if cmd == W.CMD.READ:
            chunks = R.read_reply(rng, self.disk, cookie, off, n, sr)
        elif cmd == W.CMD.BLOCK_STATUS and sr:
            chunks = R.status_reply(rng, self.disk, cookie, off, n, flags, self.rec.contexts)
        else:
            chunks = R.plain_reply(cookie, sr, rng.choice((0,) * 19 + (W.EIO,)))
        self.in_flight.discard(cookie)
        how: list[str] = []
        if rng.random() < s.p_break:
            data, how = R.break_reply(rng, chunks, list(self.in_flight))
        else:
            data = R.serialize(chunks)
        self._record(chunks, how)
        return data

    def _record(self, chunks: list[R.Chunk], how: list[str]) -> None:
        desync = bool(R.DESYNC.intersection(how))
        for ch in chunks:
            req = self.by_cookie.get(ch.cookie)
            if req is None:
                continue
            sent = self.rec.sent.setdefault(req, R.Sent())
            sent.how += how
            sent.desync |= desync
            p = ch.payload
            if ch.simple:
                if req[0] == W.CMD.READ and not ch.error:
                    sent.data.append((req[1], len(p), p))
                    sent.desync |= len(p) != req[2]  # the client takes req[2] bytes
            elif ch.type == W.RT.OFFSET_DATA and len(p) >= 8:
                sent.data.append((W.U64.unpack_from(p)[0], len(p) - 8, p[8:]))
            elif ch.type == W.RT.OFFSET_HOLE and len(p) == 12:
                o, k = struct.unpack(">QI", p)
                sent.data.append((o, k, None))
            elif ch.type == W.RT.BLOCK_STATUS and len(p) >= 4:
                (cid,) = W.U32.unpack_from(p)
                sent.status.setdefault(cid, []).append(
                    [struct.unpack_from(">II", p, i) for i in range(4, len(p) - 7, 8)])
        if how:
            self.rec.how += how

    def _send(self, replies: list[bytes]) -> None:
        if len(replies) > 1 and self.rng.random() < 0.3:
            self.rng.shuffle(replies)  # replies in any order: legal
        data = b"".join(replies)
        if data:
            self.rec.raw_sentinel |= SENTINEL in data
            self.c.send(data)
