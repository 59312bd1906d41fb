"""The client's TLS pieces without an NBD server: NBD_OPT_STARTTLS in the sans-IO handshake,
the settings an nbds URI gives, psktool files, the SSL context's checks, and TlsStream over
a socket pair with an in-process TLS peer (joined small writes, a large write, reads that
leave decrypted bytes inside OpenSSL)."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import threading
from pathlib import Path

import pytest
from tls_certs import make_x509

from pynbd.client.tls import (
    TLS_REQUIRE,
    TLSConfig,
    TLSError,
    context_for,
    handshake,
    read_psk,
    wrap,
)
from pynbd.client.tls_stream import TlsStream
from pynbd.errors import RemoteProtocolError
from pynbd.protocol._uriparse import checked, split
from pynbd.protocol.client import ClientHandshake, CState
from pynbd.protocol.constants import IHAVEOPT, NBDMAGIC, OPT_REPLY_HEADER, REPLY_MAGIC_OPT, Opt


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_x509(tmp_path_factory.mktemp("pki"))


def _negotiating() -> ClientHandshake:
    hs = ClientHandshake()
    hs.receive_data(NBDMAGIC.to_bytes(8, "big") + IHAVEOPT.to_bytes(8, "big") + b"\0\x03")
    hs.next_event()
    hs.client_flags()
    return hs


def _ack(opt: int) -> bytes:
    return OPT_REPLY_HEADER.pack(REPLY_MAGIC_OPT, opt, 1, 0)


def test_starttls_ack_returns_to_options() -> None:
    hs = _negotiating()
    hs.option(Opt.STARTTLS)
    hs.receive_data(_ack(Opt.STARTTLS))
    ev = hs.next_event()
    assert ev.type == 1 and hs.state is CState.OPTIONS  # type: ignore[attr-defined]


def test_starttls_ack_followed_by_plain_bytes_is_refused() -> None:
    hs = _negotiating()
    hs.option(Opt.STARTTLS)
    hs.receive_data(_ack(Opt.STARTTLS) + b"\x16\x03\x01")
    with pytest.raises(RemoteProtocolError, match="after accepting NBD_OPT_STARTTLS"):
        hs.next_event()


@pytest.mark.parametrize(("uri", "want"), [
    ("nbd://h/", None),
    ("nbds://h/", (TLS_REQUIRE, None, True, None, None, None)),
    ("nbds+unix://alice@/?socket=/s&tls-psk-file=/k", (TLS_REQUIRE, None, True, "alice", "/k",
                                                        None)),
    ("nbds://h/?tls-certificates=/c&tls-verify-peer=false&tls-hostname=n",
     (TLS_REQUIRE, "/c", False, None, None, "n")),
])
def test_settings_from_uri(uri: str, want: tuple[object, ...] | None) -> None:
    cfg = TLSConfig.from_uri(checked(split(uri)))
    if want is None:
        assert cfg is None
    else:
        assert cfg is not None
        assert (cfg.mode, cfg.certificates, cfg.verify_peer, cfg.username, cfg.psk_file,
                cfg.hostname) == want


def test_psk_files(tmp_path: Path) -> None:
    f = tmp_path / "k.psk"
    f.write_text("bob:00ff\nalice:0102\n")
    assert read_psk(str(f), "alice") == b"\x01\x02"
    with pytest.raises(TLSError, match="username carol was not found in PSK file"):
        read_psk(str(f), "carol")
    f.write_text("alice:xyz\n")
    with pytest.raises(TLSError, match="not hexadecimal"):
        read_psk(str(f), "alice")
    with pytest.raises(TLSError, match="open: .*none.psk: No such file") as ei:
        read_psk(str(tmp_path / "none.psk"), "alice")
    assert ei.value.libnbd_text == f"open: {tmp_path}/none.psk"


def test_context_checks(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="tls-certificates: .*nonesuch: No such file"):
        context_for(TLSConfig(certificates=str(tmp_path / "nonesuch")), "h")
    with pytest.raises(TLSError, match="no ca-cert.pem in this directory"):
        context_for(TLSConfig(certificates=str(tmp_path)), "h")
    ctx, name, user = context_for(TLSConfig(certificates=str(pki)), "localhost")
    assert (ctx.verify_mode, ctx.check_hostname, name, user) == (ssl.CERT_REQUIRED, True,
                                                                  "localhost", None)
    ctx, name, _ = context_for(TLSConfig(certificates=str(pki)), None)  # a Unix socket
    assert (ctx.verify_mode, ctx.check_hostname, name) == (ssl.CERT_REQUIRED, False, None)
    ctx, name, _ = context_for(TLSConfig(certificates=str(pki), hostname="n"), None)
    assert (ctx.check_hostname, name) == (True, "n")
    ctx, _, _ = context_for(TLSConfig(certificates=str(pki), verify_peer=False), "h")
    assert ctx.verify_mode == ssl.CERT_NONE


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="PSK callbacks exist")
def test_psk_needs_python_3_13(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("a:00\n")
    with pytest.raises(TLSError, match=r"needs Python 3\.13 or later; this is Python 3\."):
        context_for(TLSConfig(psk_file=str(tmp_path / "k"), username="a"), None)


def _peer(sock: object, pki: Path, script: list[tuple[str, int]]) -> threading.Thread:
    """A TLS server on ``sock`` (blocking, in a thread): ``("echo", n)`` reads n bytes and
    sends them back; ``("send", n)`` sends n bytes of a pattern."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server-cert.pem", pki / "server-key.pem")

    def run() -> None:
        s = ctx.wrap_socket(sock, server_side=True)  # type: ignore[arg-type]
        for what, n in script:
            if what == "echo":
                buf = bytearray()
                while len(buf) < n:
                    buf += s.recv(n - len(buf))
                s.sendall(buf)
            else:
                s.sendall(bytes(i & 0xFF for i in range(n)))
        s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_tls_stream_over_a_socket_pair(pki: Path) -> None:
    import socket

    mine, theirs = socket.socketpair()
    small = [os.urandom(n) for n in (1, 28, 100, 4096, 7)]
    big = os.urandom(3 * 1024 * 1024 + 5)
    total = sum(map(len, small)) + len(big)
    peer = _peer(theirs, pki, [("echo", total), ("send", 100_000)])

    async def go() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        mine.setblocking(False)
        ssock, peerinfo = wrap(mine, TLSConfig(certificates=str(pki)), None)

        async def wait(fd: int, events: int) -> None:
            fut = loop.create_future()
            (loop.add_reader if events & 1 else loop.add_writer)(fd, fut.set_result, None)
            try:
                await fut
            finally:
                (loop.remove_reader if events & 1 else loop.remove_writer)(fd)

        await handshake(ssock, wait, peerinfo)
        st = TlsStream(loop, ssock)
        st.write([*small, memoryview(big)])
        got = bytearray()
        done = loop.create_future()
        out = bytearray(total + 100_000)
        view = memoryview(out)

        def reader() -> None:
            # small views: a record is left part-read inside OpenSSL, which the stream's
            # reader wrapper must drain although the descriptor is not readable
            try:
                n = st.readinto(view[len(got):len(got) + 1000])
            except BlockingIOError:
                return
            got.extend(view[len(got):len(got) + n])
            if (n == 0 or len(got) == len(out)) and not done.done():
                done.set_result(None)

        st.set_reader(reader)
        await asyncio.wait_for(done, 30)
        await st.drain()
        st.close()
        return bytes(got[:total]), bytes(got[total:])

    echoed, tail = asyncio.run(go())
    peer.join(10)
    assert echoed == b"".join(small) + big
    assert tail == bytes(i & 0xFF for i in range(100_000))
