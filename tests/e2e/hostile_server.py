"""A tiny hostile NBD server for the client's tests (tests/e2e/test_client_hostile.py).

A thread with blocking sockets and raw bytes built with pynbd.protocol: it does a correct
handshake (fixed or plain newstyle, oldstyle, or a custom one) and then runs a scenario that
misbehaves on the connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pynbd.errors import CommandError, ProtocolError
from pynbd.protocol import options as O
from pynbd.protocol.constants import (
    NBDMAGIC,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    REQUEST,
    Cmd,
    HandshakeFlag,
    Opt,
    Rep,
    TxFlag,
)
from pynbd.protocol.handshake import NEED_DATA, ClientFlags, OptionRequest, ServerHandshake
from pynbd.protocol.transmission import (
    Request,
)

#: No single wait in these tests may take longer: a hang is a failure, not a stuck suite.
DEADLINE = 5.0
SIZE = 1 << 20
EFLAGS = (TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM
          | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_DF | TxFlag.SEND_CACHE)
CLEAN = (ProtocolError, ConnectionError, CommandError)


# --------------------------------------------------------------------------- the server


class Conn:
    """The server's side of one connection, blocking with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(DEADLINE * 2)
        self.buf = bytearray()

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            d = self.sock.recv(65536)
            if not d:
                raise EOFError
            self.buf += d

    def recv_exact(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(self) -> tuple[Request, bytes]:
        magic, flags, typ, cookie, off, length = REQUEST.unpack(self.recv_exact(REQUEST.size))
        assert magic == 0x25609513
        payload = self.recv_exact(length) if typ == Cmd.WRITE else b""
        return Request(flags, typ, cookie, off, length), payload

    def requests(self, n: int) -> list[Request]:
        return [self.request()[0] for _ in range(n)]

    def wait_eof(self) -> None:
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class Options:
    sr: bool = True
    contexts: tuple[str, ...] = ("base:allocation",)
    eflags: int = EFLAGS
    go: bool = True  # answer GO (else ERR_UNSUP, so the client falls back to EXPORT_NAME)
    style: str = "fixed"  # fixed | plain (non-fixed newstyle) | oldstyle | silent
    after_go: bytes = b""  # bytes sent right after GO's ACK
    custom: Callable[[Conn], None] | None = None  # replaces the whole handshake


def handshake(conn: Conn, opts: Options) -> None:
    if opts.custom is not None:
        opts.custom(conn)
        return
    if opts.style == "silent":
        return
    if opts.style == "oldstyle":
        conn.send(OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, SIZE, opts.eflags))
        return
    flags = HandshakeFlag.NO_ZEROES | (HandshakeFlag.FIXED_NEWSTYLE if opts.style == "fixed"
                                       else 0)
    hs = ServerHandshake(flags)
    conn.send(hs.greeting())
    while True:
        ev = hs.next_event()
        if ev is NEED_DATA:
            d = conn.sock.recv(65536)
            if not d:
                raise EOFError
            hs.receive_data(d)
            continue
        if isinstance(ev, ClientFlags):
            continue
        assert isinstance(ev, OptionRequest)
        if ev.opt == Opt.EXPORT_NAME:
            conn.send(hs.export_name_reply(SIZE, opts.eflags))
            conn.buf += hs.trailing_data
            return
        if ev.opt == Opt.STRUCTURED_REPLY and opts.sr:
            conn.send(hs.reply(Rep.ACK))
        elif ev.opt in (Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT) and opts.sr:
            _, queries = O.parse_meta_request(ev.data)
            out = b""
            for q in queries:
                if q in opts.contexts:
                    out += hs.reply(Rep.META_CONTEXT,
                                    O.build_rep_meta_context(opts.contexts.index(q) + 1, q))
            conn.send(out + hs.reply(Rep.ACK))
        elif ev.opt in (Opt.GO, Opt.INFO) and opts.go:
            out = hs.reply(Rep.INFO, O.build_info_export(SIZE, opts.eflags))
            conn.send(out + hs.reply(Rep.ACK) + (opts.after_go if ev.opt == Opt.GO else b""))
            if ev.opt == Opt.GO:
                conn.buf += hs.trailing_data
                return
        elif ev.opt == Opt.ABORT:
            conn.send(hs.reply(Rep.ACK))
            raise EOFError
        else:
            conn.send(hs.reply(Rep.ERR_UNSUP))


Scenario = Callable[[Conn], None]


@dataclass
class Hostile:
    sock: str
    thread: threading.Thread
    errors: list[BaseException]


@contextmanager
def hostile(scenario: Scenario, opts: Options | None = None) -> Iterator[Hostile]:
    """Serve one connection: `opts`' handshake, then `scenario(conn)`, then wait for EOF."""
    opts = opts or Options()
    d = os.path.join("/tmp", f"pynbd-hostile-{os.getpid()}-{threading.get_ident()}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "s.sock")
    if os.path.exists(path):
        os.unlink(path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    ls.settimeout(DEADLINE * 2)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            s, _ = ls.accept()
        except OSError:
            return
        conn = Conn(s)
        try:
            handshake(conn, opts)
            scenario(conn)
            conn.wait_eof()
        except (EOFError, ConnectionError, BrokenPipeError):
            pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            conn.close()

    t = threading.Thread(target=serve, name="hostile-nbd", daemon=True)
    t.start()
    try:
        yield Hostile(path, t, errors)
    finally:
        ls.close()
        t.join(DEADLINE * 3)
        assert not t.is_alive(), "hostile server thread stuck"
        shutil.rmtree(d, ignore_errors=True)
    if errors:
        raise errors[0]
