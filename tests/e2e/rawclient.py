"""A tiny blocking NBD client that speaks raw bytes, for end-to-end tests.

It uses the sans-IO pieces of :mod:`pynbd.protocol` (wire structs, option payload builders,
request builder; replies are split by tests/rawreply_helpers.py) but none of pynbd's client,
so a test can send anything — malformed, lying or out of order — and see exactly what the
server answers.

    c = RawClient(sock)
    c.negotiate(structured=True, meta=["base:allocation"])
    r = c.cmd(Cmd.READ, 0, 4096)
    assert r.error == 0 and r.data == bytes(4096)
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import dataclass, field
from typing import Self

from rawreply_helpers import Chunk, ReplyParser, SimpleReply

from pynbd.protocol import options as O
from pynbd.protocol.constants import (
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    OPT_HEADER,
    OPT_REPLY_HEADER,
    REPLY_MAGIC_OPT,
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Opt,
    Rep,
)
from pynbd.protocol.transmission import build_request

__all__ = ["Hangup", "OptReply", "RawClient", "Reply"]

#: How long any single wait for the server may take before the test fails.
DEFAULT_TIMEOUT = 5.0


class Hangup(Exception):
    """The server closed the connection."""


@dataclass
class OptReply:
    opt: int
    rep: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return self.rep >= 1 << 31


@dataclass
class Reply:
    """A complete reply to one request (a simple reply, or every chunk up to DONE)."""

    cookie: int
    error: int = 0
    data: bytes = b""
    simple: bool = False
    chunks: list[Chunk] = field(default_factory=list)


class RawClient:
    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.hflags = 0
        self.structured = False
        self.extended = False
        self.size: int | None = None
        self.eflags: int | None = None
        self._parser: ReplyParser | None = None
        self._read_len: dict[int, int] = {}
        self._partial: dict[int, Reply] = {}
        self._cookies = itertools.count(1)

    # ---- bytes -------------------------------------------------------------------------
    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                raise Hangup(f"server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def expect_hangup(self, timeout: float | None = None) -> bytes:
        """Wait until the server closes the connection; return what it sent before that."""
        deadline = time.monotonic() + (timeout or self.timeout)
        got = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server did not hang up within the timeout (sent {bytes(got)!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(self.timeout)
            if not chunk:
                return bytes(got)
            got += chunk

    def expect_silence(self, seconds: float = 0.2) -> None:
        """Assert the server sends nothing and keeps the connection open for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(self.timeout)
        raise AssertionError(f"expected silence, got {data!r}" if data else "server hung up")

    # ---- handshake ---------------------------------------------------------------------
    def greeting(self) -> int:
        """Read the newstyle greeting; return the handshake flags."""
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        self.hflags = flags
        return flags

    def oldstyle_greeting(self) -> tuple[int, int]:
        """Read the 152-byte oldstyle greeting; return (size, flags)."""
        data = self.recv_exact(OLDSTYLE_GREETING.size)
        magic, old, size, flags = OLDSTYLE_GREETING.unpack(data)
        assert magic == NBDMAGIC and old == OLDSTYLE_MAGIC
        assert data[-124:] == bytes(124)
        self.size, self.eflags = size, flags & 0xFFFF
        self._parser = ReplyParser()
        return size, flags

    def start(self, flags: int | None = None) -> int:
        """Greeting, then the client flags (default: echo FIXED_NEWSTYLE and NO_ZEROES)."""
        h = self.greeting()
        if flags is None:
            flags = h & (ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        self.send(int(flags).to_bytes(4, "big"))
        return h

    def send_option(self, opt: int, data: bytes = b"", length: int | None = None) -> None:
        n = len(data) if length is None else length
        self.send(OPT_HEADER.pack(IHAVEOPT, opt, n) + data)

    def read_option_reply(self) -> OptReply:
        magic, opt, rep, n = OPT_REPLY_HEADER.unpack(self.recv_exact(OPT_REPLY_HEADER.size))
        assert magic == REPLY_MAGIC_OPT, hex(magic)
        return OptReply(opt, rep, self.recv_exact(n))

    def option(self, opt: int, data: bytes = b"") -> list[OptReply]:
        """Send one option; return every reply up to and including the final one."""
        self.send_option(opt, data)
        out = []
        while True:
            r = self.read_option_reply()
            assert r.opt == opt, f"reply for option {r.opt}, expected {opt}"
            out.append(r)
            if r.rep == Rep.ACK or r.is_error:
                return out

    def structured_reply(self) -> None:
        (r,) = self.option(Opt.STRUCTURED_REPLY)
        assert r.rep == Rep.ACK, hex(r.rep)
        self.structured = True

    def extended_headers(self) -> None:
        (r,) = self.option(Opt.EXTENDED_HEADERS)
        assert r.rep == Rep.ACK, hex(r.rep)
        self.extended = self.structured = True

    def set_meta(self, queries: list[str], name: str = "") -> dict[int, str]:
        replies = self.option(Opt.SET_META_CONTEXT, O.build_meta_request(name, queries))
        assert replies[-1].rep == Rep.ACK, hex(replies[-1].rep)
        return dict(O.parse_rep_meta_context(r.data) for r in replies[:-1])

    def go(self, name: str = "", infos: tuple[int, ...] = (), opt: int = Opt.GO) -> list[OptReply]:
        """GO (or INFO); on success remember size and flags (and enter transmission for GO)."""
        replies = self.option(opt, O.build_info_request(name, infos))
        if replies[-1].rep == Rep.ACK:
            for r in replies[:-1]:
                assert r.rep == Rep.INFO
                info = O.parse_info_reply(r.data)
                if info.kind == 0:
                    self.size, self.eflags = info.size, info.flags
            if opt == Opt.GO:
                self.enter_transmission()
        return replies

    def export_name(self, name: str = "", zeroes: bool = True) -> tuple[int, int]:
        """EXPORT_NAME; read size, flags and (if ``zeroes``) the 124 zero bytes."""
        self.send_option(Opt.EXPORT_NAME, name.encode())
        data = self.recv_exact(10)
        self.size, self.eflags = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big")
        if zeroes:
            assert self.recv_exact(124) == bytes(124)
        self.enter_transmission()
        return self.size, self.eflags

    def negotiate(self, structured: bool = False, extended: bool = False,
                  meta: list[str] | None = None, name: str = "") -> None:
        """The usual fixed-newstyle handshake, up to transmission."""
        self.start()
        if extended:
            self.extended_headers()
        elif structured:
            self.structured_reply()
        if meta:
            self.set_meta(meta, name)
        replies = self.go(name)
        assert replies[-1].rep == Rep.ACK, f"GO failed: {replies[-1]}"

    # ---- transmission ------------------------------------------------------------------
    def enter_transmission(self) -> None:
        """Start parsing replies (after a GO ACK read by hand)."""
        self._parser = ReplyParser(self.structured, self.extended)

    def cookie(self) -> int:
        return next(self._cookies)

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", cookie: int | None = None, send: bool = True) -> tuple[int, bytes]:
        """Build (and send, unless ``send=False``) one request; return (cookie, bytes)."""
        if cookie is None:
            cookie = self.cookie()
        data = build_request(cmd, cookie, offset, length, flags, self.extended) + payload
        if cmd == Cmd.READ and not self.structured:
            self._read_len[cookie] = length
        if send:
            self.send(data)
        return cookie, data

    def read_reply(self) -> Reply:
        """The next complete reply (chunks of other requests are kept until they finish)."""
        assert self._parser is not None, "not in transmission"
        while True:
            ev = self._parser.next_reply(self._read_len)
            if ev is None:
                try:
                    data = self.sock.recv(1 << 20)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                if not data:
                    raise Hangup("server closed the connection while a reply was expected")
                self._parser.receive_data(data)
                continue
            if isinstance(ev, SimpleReply):
                self._read_len.pop(ev.cookie, None)
                return Reply(ev.cookie, ev.error, ev.data, simple=True)
            r = self._partial.setdefault(ev.cookie, Reply(ev.cookie))
            r.chunks.append(ev)
            if ev.error and not r.error:
                r.error = ev.error
            if ev.done:
                del self._partial[ev.cookie]
                if r.chunks and any(c.type == 1 for c in r.chunks):
                    parts = sorted((c.data_offset, c.data) for c in r.chunks if c.type == 1)
                    r.data = b"".join(d for _, d in parts)
                return r

    def cmd(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> Reply:
        """Send one request and return its reply."""
        cookie, _ = self.request(cmd, offset, length, flags, payload)
        r = self.read_reply()
        assert r.cookie == cookie, f"reply for cookie {r.cookie}, expected {cookie}"
        return r

    def pread(self, offset: int, length: int) -> bytes:
        r = self.cmd(Cmd.READ, offset, length)
        assert r.error == 0, f"READ failed with {r.error}"
        assert len(r.data) == length
        return r.data

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> None:
        r = self.cmd(Cmd.WRITE, offset, len(data), flags | (32 if self.extended else 0), data)
        assert r.error == 0, f"WRITE failed with {r.error}"

    def disconnect(self) -> None:
        self.request(Cmd.DISC)


FIXED = int(HandshakeFlag.FIXED_NEWSTYLE)
NO_ZEROES = int(HandshakeFlag.NO_ZEROES)
