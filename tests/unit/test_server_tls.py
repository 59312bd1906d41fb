"""The server's TLS configuration: --tls* parsing, the SSL context, the psktool file and the
URIs --run and --print-uri give (no network)."""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

from pynbd.errors import ConfigError
from pynbd.server.listeners import make_uri
from pynbd.server.options import UsageError, parse_args
from pynbd.server.tls import certificate_dirs, make_context, read_psk


@pytest.mark.parametrize("value, mode", [
    ("require", "require"), ("required", "require"), ("force", "require"), ("on", "on"),
    ("yes", "on"), ("1", "on"), ("off", "off"), ("no", "off"), ("0", "off"),
    ("REQUIRE", "require"),
])
def test_tls_modes(value: str, mode: str) -> None:
    assert parse_args([f"--tls={value}", "memory", "1M"]).tls == mode


def test_tls_options() -> None:
    o = parse_args(["--tls=on", "--tls-certificates=rel/dir", "--tls-verify-peer",
                    "--tls-psk=keys.psk", "memory", "1M"])
    assert o.tls_certificates is not None and o.tls_certificates.endswith("/rel/dir")
    assert Path(o.tls_certificates).is_absolute()
    assert o.tls_verify_peer and o.tls_psk == "keys.psk"


@pytest.mark.parametrize("argv, message", [
    (["--tls=maybe"], "could not decipher boolean (maybe)"),
    (["--tls=require", "-o"], "cannot use oldstyle protocol (-o) and require TLS"),
])
def test_bad_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args([*argv, "memory", "1M"])


def test_oldstyle_with_tls_on_is_allowed() -> None:
    assert parse_args(["--tls=on", "-o", "memory", "1M"]).oldstyle


def test_default_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert certificate_dirs(None) == [Path("/home/u/.pki/nbdkit"), Path("/etc/pki/nbdkit")]
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert certificate_dirs(None) == [Path("/etc/pki/nbdkit")]
    assert certificate_dirs("/x") == [Path("/x")]


def test_off_has_no_context() -> None:
    assert make_context("off", "/nonexistent", True, None) is None


def test_missing_certificates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError) as e:
        make_context("require", str(tmp_path), False, None)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert make_context("on", str(tmp_path), False, None) is None
    assert "TLS is disabled" in caplog.text


def test_context_from_directory(tmp_path: Path) -> None:
    from tls_certs import make_x509

    d = make_x509(tmp_path / "x509")
    ctx = make_context("require", str(d), False, None)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    ctx = make_context("require", str(d), True, None)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED


def test_psk_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff10\n\nbob:zz\ncarol:0a\n")
    assert read_psk(str(f), "alice") == b"\x00\xff\x10"
    assert read_psk(str(f), "carol") == b"\x0a"
    assert read_psk(str(f), "dave") is None
    assert "unknown PSK username 'dave'" in caplog.text
    assert read_psk(str(f), "bob") is None
    assert "not hexadecimal" in caplog.text


def test_psk_needs_python_313_or_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file or directory"):
        make_context("require", None, False, str(tmp_path / "none.psk"))
    f = tmp_path / "keys.psk"
    f.write_text("alice:00\n")
    if sys.version_info < (3, 13):
        with pytest.raises(ConfigError, match="Python 3.13"):
            make_context("require", None, False, str(f))
    else:
        assert make_context("require", None, False, str(f)) is not None


@pytest.mark.parametrize("argv, where, uri", [
    (["--tls=require"], {"unix_path": "/s"}, "nbds+unix:///?socket=/s"),
    (["--tls=on"], {"unix_path": "/s"}, "nbd+unix:///?socket=/s"),
    (["--tls=require", "-e", "x"], {"port": 10809}, "nbds://localhost:10809/x"),
    (["--tls=require"], {"vsock_port": 10809}, "nbds+vsock://1:10809"),
])
def test_uris(argv: list[str], where: dict[str, object], uri: str) -> None:
    o = parse_args([*argv, "memory", "1M"])
    kw = {"unix_path": None, "port": None, "vsock_port": None, **where}
    assert make_uri(o, **kw) == uri  # type: ignore[arg-type]


def _stream_pair(tmp_path: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, Any, socket.socket]:
    """A server TlsStream over a socket pair, its handshake done in memory; the client's
    SSLObject, its outgoing BIO, the stream and the client's end of the socket pair."""
    from tls_certs import make_x509

    from pynbd.server.tls import TlsStream
    from pynbd.stream import FdStream

    d = make_x509(tmp_path / "x509")
    sctx = make_context("require", str(d), False, None)
    assert sctx is not None
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(str(d / "ca-cert.pem"))
    cctx.check_hostname = False
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = sctx.wrap_bio(si, so, server_side=True)
    client = cctx.wrap_bio(ci, co)
    for _ in range(10):
        for o in (client, server):
            try:
                o.do_handshake()
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
    client.write(b"early")  # lands in the server's BIO before the stream exists
    si.write(co.read())
    a, b = socket.socketpair()
    return client, co, TlsStream(FdStream(None, a.fileno(), owner=a), server, si, so), b


@pytest.mark.parametrize("cut", [1, 3, 5, 7, 4096, 16405, 16406, 16411, 50000])
def test_stream_reads_records_cut_anywhere(tmp_path: Path, cut: int) -> None:
    """Ciphertext arrives cut at every kind of place (inside a record's 5-byte header, at
    its end, inside its body): the stream returns every byte in order, and never says
    'nothing here' while a whole record waits inside it."""
    client, co, stream, peer = _stream_pair(tmp_path)
    data = bytes(range(256)) * 700  # 179,200 bytes: 11 records of 16 KiB and a short one
    client.write(data[:1000])
    client.write(data[1000:])
    wire = co.read()
    want = b"early" + data
    got = bytearray()
    buf = memoryview(bytearray(70000))
    try:
        for i in range(0, len(wire), cut):
            peer.sendall(wire[i:i + cut])
            while True:
                try:
                    n = stream.readinto(buf)
                except BlockingIOError:
                    break
                got += buf[:n]
        assert bytes(got) == want
        assert stream._next is not None  # the framing was followed to the end
    finally:
        stream.close()
        peer.close()
