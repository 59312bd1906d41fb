"""pynbd's clients over TLS against real TLS servers: nbdkit ``--tls=require`` (X.509 over
Unix and TCP, PSK) and qemu-nbd ``--tls-creds`` (X.509, PSK). The asyncio engine, the
blocking connection and multi-conn move data; every failure (wrong CA, expired certificate,
wrong host name, wrong PSK, a server without TLS, a plain client to a TLS server) is one
clear error; the tools (info, copy, dump) take TLS URIs and ``pynbd info`` shows TLS as
nbdinfo does. PSK runs under Python 3.13 (tls_client_helpers.run_py313)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest
from fuse_helpers import fuse_mount  # noqa: F401 (fixture)
from helpers import run_async, run_peer, run_pynbd

from pynbd.client import AsyncClient
from pynbd.client.blocking import BlockingConnection
from pynbd.client.pool import connect as pool_connect
from pynbd.client.tls import TLSError, TLSRefused
from pynbd.errors import OptionError
from tests.interop.tls_client_helpers import TLSLab, run_py313, tls_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[TLSLab]:
    yield from tls_lab()


def data(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


async def roundtrip(uri: str, size: int = 3 * 1024 * 1024, seed: int = 1) -> bool:
    c = await AsyncClient.connect(uri)
    try:
        assert c.tls_negotiated
        buf = data(size, seed)
        await c.pwrite(buf, 4096)
        got = await c.pread(size, 4096)
        return bytes(got) == buf
    finally:
        await c.close()


@pytest.mark.parametrize("which", ["unix", "tcp-name", "tcp-ip", "qemu"])
def test_engine_reads_and_writes_over_tls(lab: TLSLab, which: str) -> None:
    uri = {"unix": lab.x509(), "tcp-name": lab.tcp(), "tcp-ip": lab.tcp("127.0.0.1"),
           "qemu": lab.x509("qx509")}[which]
    assert run_async(roundtrip(uri, seed=len(which)))


def test_many_requests_in_flight_over_tls(lab: TLSLab) -> None:
    async def go() -> None:
        c = await AsyncClient.connect(lab.x509())
        try:
            import asyncio

            bufs = [data(65536, i) for i in range(48)]
            await asyncio.gather(*(c.pwrite(b, i * 65536) for i, b in enumerate(bufs)))
            got = await asyncio.gather(*(c.pread(65536, i * 65536) for i in range(48)))
            assert [bytes(g) for g in got] == bufs
            small = await asyncio.gather(*(c.pread(100, i * 997) for i in range(200)))
            assert all(len(s) == 100 for s in small)
        finally:
            await c.close()

    run_async(go())


def test_blocking_connection_over_tls(lab: TLSLab) -> None:
    from pynbd.client.blocking import READ

    b = BlockingConnection.connect(lab.tcp())
    try:
        assert b.tls_negotiated
        buf = data(1 << 20, 9)
        cookie = b.send(1, 0, len(buf), payload=buf)
        b.reply(cookie)
        out = bytearray(len(buf))
        cookie = b.send(READ, 0, len(buf), into=memoryview(out))
        b.reply(cookie)
        assert out == buf
    finally:
        b.close()


def test_handover_between_engine_and_blocking_keeps_tls(lab: TLSLab) -> None:
    async def go() -> None:
        c = await AsyncClient.connect(lab.x509())
        b = BlockingConnection.take_over(c)
        assert b.tls_negotiated
        out = bytearray(4096)
        b.reply(b.send(0, 0, 4096, into=memoryview(out)))
        a = AsyncClient.adopt(b)
        assert a.tls_negotiated
        assert len(await a.pread(4096, 0)) == 4096
        await a.close()

    run_async(go())


def test_multi_conn_pool_over_tls(lab: TLSLab) -> None:
    async def go() -> None:
        p = await pool_connect(lab.x509(), connections=3)
        try:
            assert len(p.clients) == 3  # type: ignore[union-attr]
            buf = data(1 << 20, 3)
            await p.pwrite(buf, 0)
            await p.flush()
            assert bytes(await p.pread(len(buf), 0)) == buf
        finally:
            await p.close()

    run_async(go())


def test_tls_on_server_serves_both(lab: TLSLab) -> None:
    async def go() -> tuple[bool, bool]:
        plain = await AsyncClient.connect(f"nbd+unix:///?socket={lab.sock('on')}")
        tls = await AsyncClient.connect(lab.x509("on"))
        r = plain.tls_negotiated, tls.tls_negotiated
        await plain.close()
        await tls.close()
        return r

    assert run_async(go()) == (False, True)


def test_verify_peer_false_accepts_an_unknown_ca(lab: TLSLab) -> None:
    uri = lab.tcp(certs=f"{lab.pki}/other-ca", extra="&tls-verify-peer=false")
    assert run_async(roundtrip(uri, 65536))


# ---- one clear error each ------------------------------------------------------------------
def errors(lab: TLSLab) -> dict[str, tuple[str, type[Exception], str]]:
    return {
        "wrong CA": (lab.tcp(certs=f"{lab.pki}/other-ca"), TLSError,
                     ("certificate verification failed: the server's certificate is not "
                     "signed by a trusted CA")),
        "wrong CA over unix": (lab.x509(extra="").replace(str(lab.pki), f"{lab.pki}/other-ca"),
                               TLSError, "not signed by a trusted CA"),
        "expired": (lab.tcp(port=lab.expired_port), TLSError,
                    "the server's certificate has expired"),
        "wrong hostname": (lab.tcp("127.0.0.1", extra="&tls-hostname=nbd.example.com"),
                           TLSError, "the server's certificate is not for nbd.example.com"),
        "server without TLS": (f"nbds+unix:///?socket={lab.sock('plain')}", TLSRefused,
                               ("handshake: server refused TLS, but handle TLS setting is "
                               "'require' (2)")),
        "oldstyle server": (f"nbds+unix:///?socket={lab.sock('oldstyle')}", TLSRefused,
                            ("handshake: server is oldstyle, but handle TLS setting is "
                            "'require' (2)")),
        "plain client": (f"nbd+unix:///?socket={lab.sock('x509')}", OptionError,
                         "server requires TLS encryption first"),
        "no such certificates dir": (lab.x509().replace(str(lab.pki), f"{lab.pki}/nonesuch"),
                                     TLSError, "nonesuch: No such file or directory"),
        "no CA in the dir": (lab.x509().replace(str(lab.pki), str(lab.d)), TLSError,
                             "no ca-cert.pem in this directory"),
        "x509 client to a PSK server": (lab.x509("psk"), TLSError,
                                        "the server closed the connection"),
    }


ERROR_CASES = ["wrong CA", "wrong CA over unix", "expired", "wrong hostname",
               "server without TLS", "oldstyle server", "plain client",
               "no such certificates dir", "no CA in the dir", "x509 client to a PSK server"]


@pytest.mark.parametrize("case", ERROR_CASES)
@pytest.mark.parametrize("kind", ["engine", "blocking"])
def test_one_clear_error(lab: TLSLab, case: str, kind: str) -> None:
    uri, exc, words = errors(lab)[case]
    with pytest.raises(exc) as ei:
        if kind == "engine":
            run_async(AsyncClient.connect(uri, timeout=20))
        else:
            BlockingConnection.connect(uri)
    msg = str(ei.value)
    assert words in msg and "\n" not in msg


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="this Python has PSK callbacks")
def test_psk_before_python_3_13_says_which_python(lab: TLSLab) -> None:
    with pytest.raises(TLSError, match=r"needs Python 3\.13 or later; this is Python 3\.1"):
        run_async(AsyncClient.connect(lab.psk_uri()))
    r = run_pynbd("info", lab.psk_uri(), check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "needs Python 3.13" in err and err.count("\n") == 1


# ---- PSK (Python 3.13) ------------------------------------------------------------------------
PSK_SCRIPT = r"""
import asyncio, sys
from pynbd.client import AsyncClient
from pynbd.client.blocking import BlockingConnection
async def main(uri):
    c = await AsyncClient.connect(uri)
    buf = bytes(range(256)) * 4096
    await c.pwrite(buf, 0)
    ok = bytes(await c.pread(len(buf), 0)) == buf
    await c.close()
    return ok
for uri in sys.argv[1:]:
    try:
        ok = asyncio.run(main(uri))
        b = BlockingConnection.connect(uri); b.close()
        print("OK", ok, b.tls_negotiated)
    except Exception as e:
        print("ERR", type(e).__name__, e)
"""


def test_psk_with_nbdkit_and_qemu_nbd(lab: TLSLab) -> None:
    uris = [lab.psk_uri(), lab.psk_uri("qpsk"), lab.psk_uri(user="bob"),
            lab.psk_uri(key=lab.bad_psk), lab.psk_uri("x509"),
            lab.psk_uri(key=lab.d / "nonesuch.psk")]
    r = run_py313(PSK_SCRIPT, *uris)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "OK True True"
    assert lines[1] == "OK True True"
    assert lines[2] == f"ERR TLSError {lab.psk}: username bob was not found in PSK file"
    assert lines[3] == ("ERR TLSError TLS handshake: the server refused the pre-shared key of "
                        "alice (it closed the connection)")
    assert lines[4] == ("ERR TLSError TLS handshake: the server did not use the pre-shared "
                        "key (it presented a certificate instead)")
    assert lines[5] == (f"ERR TLSError open: {lab.d}/nonesuch.psk: No such file or directory")


def test_pynbd_info_over_psk_as_nbdinfo(lab: TLSLab) -> None:
    r = run_py313("import runpy, sys; sys.argv[0] = 'pynbd'; runpy.run_module('pynbd', "
                  "run_name='__main__')", "info", "--json", lab.psk_uri())
    assert r.returncode == 0, r.stderr
    want = run_peer("nbdinfo", "--json", lab.psk_uri()).stdout
    assert json.loads(r.stdout) == json.loads(want)


# ---- the tools ------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [[], ["--json"], ["--list"], ["--map"]])
@pytest.mark.parametrize("which", ["x509", "qx509", "tcp"])
def test_pynbd_info_shows_tls_as_nbdinfo(lab: TLSLab, args: list[str], which: str) -> None:
    uri = lab.tcp() if which == "tcp" else lab.x509(which)
    got = run_pynbd("info", *args, uri).stdout.decode()
    want = run_peer("nbdinfo", *args, uri).stdout.decode()
    assert got == want
    if args in ([], ["--list"]):
        assert "with TLS" in got
    elif args == ["--json"]:
        assert '"TLS": true' in got


def test_pynbd_info_is_tls(lab: TLSLab) -> None:
    assert run_pynbd("info", "--is", "tls", lab.x509(), check=False).returncode == 0
    plain = f"nbd+unix:///?socket={lab.sock('on')}"
    assert run_pynbd("info", "--is", "tls", plain, check=False).returncode == 2


def test_pynbd_info_refused_is_one_line(lab: TLSLab) -> None:
    r = run_pynbd("info", f"nbds+unix:///?socket={lab.sock('plain')}", check=False)
    assert r.returncode == 1
    assert r.stderr.decode() == ("pynbd info: nbd_connect_uri: handshake: server refused TLS, "
                                 "but handle TLS setting is 'require' (2): Operation not "
                                 "supported\n")


@pytest.mark.parametrize("conns", ["1", "4"])
def test_pynbd_copy_over_tls(lab: TLSLab, conns: str) -> None:
    src, out = lab.d / f"src{conns}.bin", lab.d / f"out{conns}.bin"
    src.write_bytes(data(2 << 20, int(conns)))
    uri = lab.x509() if conns == "1" else lab.tcp()
    run_pynbd("copy", f"--connections={conns}", src, uri)
    run_pynbd("copy", f"--connections={conns}", uri, out)
    assert out.read_bytes()[:2 << 20] == src.read_bytes()


def test_pynbd_dump_over_tls_as_nbddump(lab: TLSLab) -> None:
    uri = lab.x509("qx509")
    assert run_pynbd("dump", "--length=4096", uri).stdout.decode() == \
        run_peer("nbddump", "--length=4096", uri).stdout.decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [[], ["--connections=3"]])
def test_pynbd_fuse_over_tls(lab: TLSLab, fuse_mount, extra: list[str]) -> None:  # noqa: F811
    """The FUSE file of an nbds URI, with one connection or worker connections."""
    m = fuse_mount(lab.x509("qx509"), options=extra)
    want = data(1 << 20, 5)
    with open(m.file, "r+b") as f:
        f.write(want)
        f.flush()
        os.fsync(f.fileno())
    with open(m.file, "rb") as f:
        assert f.read(1 << 20) == want
    assert m.unmount() == 0


def test_pynbd_sh_over_tls_as_nbdsh(lab: TLSLab) -> None:
    script = (f"h.set_tls(nbd.TLS_REQUIRE); h.set_tls_certificates({str(lab.pki)!r}); "
              f"h.connect_unix({lab.sock('x509')!r}); "
              "print(h.get_tls_negotiated(), h.get_size(), h.get_uri())")
    got = run_pynbd("sh", "-c", script).stdout.decode()
    assert got == run_peer("nbdsh", "-c", script).stdout.decode()
    assert got.startswith("True 4194304 nbds+unix://")


def test_tls_config_keyword_and_allow(lab: TLSLab) -> None:
    """``tls=TLSConfig(...)`` with host=/unix=: TLS_ALLOW falls back to plain text only
    when the server refuses STARTTLS; TLS_REQUIRE never does."""
    from pynbd.client.tls import TLS_ALLOW, TLSConfig

    async def go() -> list[object]:
        out: list[object] = []
        for kw in ({"host": "localhost", "port": lab.port},
                   {"unix": lab.sock("plain")}, {"unix": lab.sock("on")}):
            c = await AsyncClient.connect(tls=TLSConfig(TLS_ALLOW, str(lab.pki)), **kw)
            out.append(c.tls_negotiated)
            await c.close()
        try:
            await AsyncClient.connect(unix=lab.sock("plain"), tls=TLSConfig())
        except TLSRefused as e:
            out.append(e.errno)
        return out

    import errno

    assert run_async(go()) == [True, False, True, errno.ENOTSUP]
    b = BlockingConnection.connect(host="127.0.0.1", port=lab.port,
                                   tls=TLSConfig(certificates=str(lab.pki)))
    assert b.tls_negotiated
    b.close()
