"""A raw NBD server in a thread that advertises whatever size it is told to, for testing
what clients do with sizes a real server would never send (2^63 and more, CVE-2023-5215).

It negotiates with pynbd.protocol's server handshake, by one of three paths: ``go`` (NBD_OPT_GO
and NBD_OPT_INFO answered with NBD_INFO_EXPORT), ``export-name`` (GO refused with
ERR_UNSUP, so the client falls back to NBD_OPT_EXPORT_NAME) or ``oldstyle``. Structured
replies are refused; in transmission a READ gets zeroes in a simple reply, DISC ends the
connection and anything else succeeds. It serves any number of connections, one thread each,
until the ``with`` block ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pynbd.protocol import options as O
from pynbd.protocol.constants import (
    NBDMAGIC,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    REQUEST,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
    TxFlag,
)
from pynbd.protocol.handshake import NEED_DATA, ClientFlags, OptionRequest, ServerHandshake

__all__ = ["PATHS", "RawServer", "raw_server"]

#: The ways the server can tell a client the export's size.
PATHS = ("go", "export-name", "oldstyle")
EFLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.CAN_MULTI_CONN
#: No socket operation in the server may wait longer (a stuck client is a test failure).
TIMEOUT = 20.0


@dataclass
class RawServer:
    sock: str
    size: int
    path: str
    #: The commands received, in every connection.
    commands: list[int] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


def _recv(s: socket.socket, buf: bytearray, n: int) -> bytes | None:
    while len(buf) < n:
        d = s.recv(65536)
        if not d:
            return None
        buf += d
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _negotiate(s: socket.socket, size: int, path: str) -> bytearray | None:
    """The handshake; the bytes the client sent after it (None: it went away)."""
    if path == "oldstyle":
        s.sendall(OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, EFLAGS))
        return bytearray()
    hs = ServerHandshake()
    s.sendall(hs.greeting())
    while True:
        ev = hs.next_event()
        if ev is NEED_DATA:
            d = s.recv(65536)
            if not d:
                return None
            hs.receive_data(d)
            continue
        if isinstance(ev, ClientFlags):
            continue
        assert isinstance(ev, OptionRequest)
        if ev.opt == Opt.EXPORT_NAME:
            s.sendall(hs.export_name_reply(size, EFLAGS))
            return bytearray(hs.trailing_data)
        if ev.opt in (Opt.GO, Opt.INFO) and path == "go":
            s.sendall(hs.reply(Rep.INFO, O.build_info_export(size, EFLAGS)) + hs.reply(Rep.ACK))
            if ev.opt == Opt.GO:
                return bytearray(hs.trailing_data)
        elif ev.opt == Opt.ABORT:
            s.sendall(hs.reply(Rep.ACK))
            return None
        else:
            s.sendall(hs.reply(Rep.ERR_UNSUP))


def _serve_one(s: socket.socket, srv: RawServer) -> None:
    s.settimeout(TIMEOUT)
    try:
        buf = _negotiate(s, srv.size, srv.path)
        if buf is None:
            return
        while True:
            hdr = _recv(s, buf, REQUEST.size)
            if hdr is None:
                return
            _, _, cmd, cookie, _, length = REQUEST.unpack(hdr)
            srv.commands.append(cmd)
            if cmd == Cmd.DISC:
                return
            if cmd == Cmd.WRITE and _recv(s, buf, length) is None:
                return
            data = bytes(length) if cmd == Cmd.READ else b""
            s.sendall(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + data)
    except OSError:
        pass
    finally:
        s.close()


@contextmanager
def raw_server(size: int, path: str = "go") -> Iterator[RawServer]:
    """Serve connections on a Unix socket advertising ``size`` by ``path`` (see PATHS)."""
    assert path in PATHS, path
    d = tempfile.mkdtemp(prefix="pynbd-raw-", dir="/tmp")
    srv = RawServer(os.path.join(d, "s.sock"), size, path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(srv.sock)
    ls.listen(64)
    threads: list[threading.Thread] = []

    def accept() -> None:
        while True:
            try:
                s, _ = ls.accept()
            except OSError:
                return
            t = threading.Thread(target=_serve_one, args=(s, srv), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, name="raw-nbd", daemon=True)
    acceptor.start()
    try:
        yield srv
    finally:
        ls.shutdown(socket.SHUT_RDWR)
        ls.close()
        acceptor.join(TIMEOUT)
        for t in threads:
            t.join(TIMEOUT)
        assert not acceptor.is_alive() and not any(t.is_alive() for t in threads), \
            "raw server thread stuck"
        shutil.rmtree(d, ignore_errors=True)

