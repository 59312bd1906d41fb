"""pynbd serve with TLS against the real clients (nbdinfo, nbdcopy, libnbd, qemu-img,
qemu-io), side by side with nbdkit on the same command lines; a plain-text client against
--tls=require at the byte level."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Server, missing, require, run_pynbd
from helpers import run_peer as _run_peer
from tls_certs import make_psk, make_x509

from pynbd.protocol.constants import Opt, Rep

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_x509(tmp_path_factory.mktemp("tls") / "x509")


@pytest.fixture(scope="module")
def client_no_cert(certs: Path) -> Path:
    """A client directory with the CA only: the client sends no certificate."""
    d = certs.parent / "cacert-only"
    d.mkdir(exist_ok=True)
    (d / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    return d


def _text(cp: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(cp.args, cp.returncode, cp.stdout.decode(errors="replace"),
                                       cp.stderr.decode(errors="replace"))


def run_peer(tool: str, *args: Any, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _text(_run_peer(tool, *args, **kw))


def pynbd(*args: Any, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _text(run_pynbd(*args, **kw))


def tls_uri(srv: Server, certs: Path, export: str = "") -> str:
    return f"nbds+unix:///{export}?socket={srv.sock}&tls-certificates={certs}"


# ---- real clients -----------------------------------------------------------------------

def test_nbdinfo_same_as_nbdkit(pynbd_server: Callable[..., Server],
                                nbdkit_server: Callable[..., Server], certs: Path) -> None:
    args = ["--tls=require", f"--tls-certificates={certs}", "pattern", "1M"]
    outs = []
    for start in (pynbd_server, nbdkit_server):
        srv = start(*args)
        out = run_peer("nbdinfo", "--json", tls_uri(srv, certs)).stdout
        # pynbd always advertises block sizes (a difference of its own, not TLS's)
        outs.append("\n".join(x for x in out.replace(srv.sock or "", "SOCK").splitlines()
                              if "block_size" not in x))
    assert '"TLS": true' in outs[0]
    assert outs[0] == outs[1]


_LIBNBD_READ = r"""
import hashlib, sys, nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print(h.get_tls_negotiated(), h.get_size(), h.can_multi_conn(), h.is_read_only())
print(hashlib.sha256(h.pread(1 << 20, 0)).hexdigest())
for n in (1, 4096, 300000):
    print(hashlib.sha256(h.pread(n, 12345)).hexdigest())
h.shutdown()
"""


def test_libnbd_reads_same_as_nbdkit(pynbd_server: Callable[..., Server],
                                     nbdkit_server: Callable[..., Server],
                                     certs: Path, libnbd: Callable[..., Any]) -> None:
    args = ["--tls=require", f"--tls-certificates={certs}", "pattern", "1M"]
    views = [libnbd(_LIBNBD_READ, tls_uri(start(*args), certs)).stdout
             for start in (pynbd_server, nbdkit_server)]
    assert views[0].startswith("True 1048576")
    assert views[0] == views[1]


def test_nbdcopy_round_trip(pynbd_server: Callable[..., Server], certs: Path,
                            tmp_path: Path) -> None:
    require("nbdcopy")
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "memory", "32M")
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * (32 * 4096))
    uri = tls_uri(srv, certs)
    run_peer("nbdcopy", str(src), uri)
    run_peer("nbdcopy", uri, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def _qemu_image(srv: Server, creds: str) -> str:
    return f"driver=nbd,path={srv.sock},tls-creds={creds},tls-hostname=localhost"


def test_qemu_img_and_qemu_io_x509(pynbd_server: Callable[..., Server], certs: Path,
                                   tmp_path: Path) -> None:
    require("qemu-img")
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "memory", "4M")
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
    run_peer("qemu-io", "--object", obj, "--image-opts", _qemu_image(srv, "tls0"),
             "-c", "write -P 0x5a 1M 64k")
    out = run_peer("qemu-io", "--object", obj, "--image-opts", _qemu_image(srv, "tls0"),
                   "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 64k").stdout
    assert "Pattern verification failed" not in out
    run_peer("qemu-img", "convert", "--object", obj, "--image-opts", _qemu_image(srv, "tls0"),
             "-O", "raw", str(tmp_path / "out.raw"))
    data = (tmp_path / "out.raw").read_bytes()
    assert data[1 << 20:(1 << 20) + 65536] == b"\x5a" * 65536 and data[:4096] == bytes(4096)


def test_qemu_refused_with_wrong_ca(pynbd_server: Callable[..., Server], certs: Path) -> None:
    require("qemu-io")
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs / 'other-ca'}",
                       "memory", "1M")
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
    cp = run_peer("qemu-io", "--object", obj, "--image-opts", _qemu_image(srv, "tls0"),
                  "-c", "read 0 512", check=False)
    assert cp.returncode != 0
    assert srv.proc.poll() is None  # the server lives on


def test_verify_peer(pynbd_server: Callable[..., Server], certs: Path,
                     client_no_cert: Path) -> None:
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "--tls-verify-peer",
                       "memory", "1M")
    ok = run_peer("nbdinfo", "--size", tls_uri(srv, certs))
    assert ok.stdout.strip() == "1048576"
    bad = run_peer("nbdinfo", "--size", tls_uri(srv, client_no_cert), check=False)
    assert bad.returncode != 0 and not bad.stdout
    # without --tls-verify-peer the same client is served
    srv2 = pynbd_server("--tls=require", f"--tls-certificates={certs}", "memory", "1M")
    assert run_peer("nbdinfo", "--size", tls_uri(srv2, client_no_cert)).stdout.strip() == \
        "1048576"


def test_tls_on_serves_both(pynbd_server: Callable[..., Server], certs: Path) -> None:
    srv = pynbd_server("--tls=on", f"--tls-certificates={certs}", "memory", "1M")
    plain = run_peer("nbdinfo", srv.uri).stdout
    assert "without TLS" in plain
    tls = run_peer("nbdinfo", tls_uri(srv, certs)).stdout
    assert "with TLS" in tls


def test_plain_nbdinfo_refused_as_by_nbdkit(pynbd_server: Callable[..., Server],
                                            nbdkit_server: Callable[..., Server],
                                            certs: Path) -> None:
    args = ["--tls=require", f"--tls-certificates={certs}", "memory", "1M"]
    outs = []
    for start in (pynbd_server, nbdkit_server):
        srv = start(*args)
        cp = run_peer("nbdinfo", srv.uri, check=False)
        assert cp.returncode != 0
        outs.append(cp.stderr)
    assert outs[0] == outs[1]


# ---- bytes on the wire ----------------------------------------------------------------

class RawClient:
    """Fixed-newstyle negotiation by hand (optionally over TLS after STARTTLS)."""

    def __init__(self, path: str) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(path)
        greeting = self.recv(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                return out
            out += got
        return out

    def send_opt(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        head = self.recv(20)
        assert len(head) == 20, f"connection closed: {head!r}"
        magic, opt, rep, n = struct.unpack(">QIII", head)
        assert magic == REPLY_MAGIC
        return opt, rep, self.recv(n)

    def replies(self) -> list[tuple[int, int, bytes]]:
        """Every reply to one option, up to the final one."""
        out = [self.reply()]
        while out[-1][1] not in (Rep.ACK,) and not out[-1][1] & 0x80000000:
            out.append(self.reply())
        return out

    def starttls(self, certs: Path) -> None:
        self.send_opt(Opt.STARTTLS)
        assert self.reply()[1] == Rep.ACK
        ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()


def _info_request(name: bytes = b"") -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


#: What a client may try before TLS: every one must be refused alike, with nothing about
#: the exports in the answer.
_PROBES = [(Opt.LIST, b""), (Opt.INFO, _info_request()), (Opt.GO, _info_request(b"x")),
           (Opt.STRUCTURED_REPLY, b""), (Opt.LIST_META_CONTEXT, b"\0" * 8), (12345, b"xyz")]


def _refusals(srv: Server) -> list[tuple[int, int, bytes]]:
    c = RawClient(srv.sock or "")
    try:
        out = []
        for opt, data in _PROBES:
            c.send_opt(opt, data)
            got = c.replies()
            assert len(got) == 1, got
            out.append((got[0][0], got[0][1], got[0][2]))
        c.send_opt(Opt.EXPORT_NAME, b"")
        assert c.recv(1) == b""  # hung up on: EXPORT_NAME cannot be refused
        return out
    finally:
        c.close()


def test_plaintext_client_learns_nothing(pynbd_server: Callable[..., Server],
                                         nbdkit_server: Callable[..., Server],
                                         certs: Path) -> None:
    args = ["--tls=require", f"--tls-certificates={certs}", "memory", "1M"]
    got = _refusals(pynbd_server(*args))
    assert [g[:2] for g in got] == [(opt, Rep.ERR_TLS_REQD) for opt, _ in _PROBES]
    assert got == _refusals(nbdkit_server(*args))  # the messages too


def test_state_before_starttls_forgotten(pynbd_server: Callable[..., Server],
                                         certs: Path) -> None:
    srv = pynbd_server("--tls=on", f"--tls-certificates={certs}", "memory", "1M")
    c = RawClient(srv.sock or "")
    try:
        c.send_opt(Opt.STRUCTURED_REPLY)
        assert c.reply()[1] == Rep.ACK
        c.starttls(certs)
        c.send_opt(Opt.STARTTLS)  # a second STARTTLS
        assert c.reply()[1] == Rep.ERR_INVALID
        # structured replies were forgotten: meta contexts need them again
        c.send_opt(Opt.LIST_META_CONTEXT, b"\0" * 8)
        assert c.reply()[1] == Rep.ERR_INVALID
        c.send_opt(Opt.LIST)
        reps = c.replies()
        assert [r[1] for r in reps] == [Rep.SERVER, Rep.ACK]
        c.send_opt(Opt.ABORT)
        assert c.reply()[1] == Rep.ACK
    finally:
        c.close()


def test_starttls_refused_without_tls(pynbd_server: Callable[..., Server],
                                      nbdkit_server: Callable[..., Server]) -> None:
    answers = []
    for start in (pynbd_server, nbdkit_server):
        c = RawClient(start("memory", "1M").sock or "")
        c.send_opt(Opt.STARTTLS)
        answers.append(c.reply())
        c.close()
    assert answers[0] == answers[1]


# ---- the command line -----------------------------------------------------------------

def _first_line(cp: subprocess.CompletedProcess[str]) -> str:
    err = cp.stderr
    return err.strip().splitlines()[0] if err.strip() else ""


@pytest.mark.parametrize("args, pynbd_says", [
    (["--tls=require", "--tls-certificates=/nonexistent"],
     "--tls=require but could not load TLS certificates"),
    (["--tls=bogus"], "could not decipher boolean (bogus)"),
    (["--tls=require", "--tls-psk=/nonexistent"], "/nonexistent: No such file or directory"),
    (["--tls=require", "-o"], "cannot use oldstyle protocol (-o) and require TLS"),
])
def test_bad_command_lines_as_nbdkit(args: list[str], pynbd_says: str, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    mine = pynbd("serve", "-U", str(tmp_path / "s"), *args, "memory", "1M", check=False,
                     env=env, timeout=30)
    assert mine.returncode == 1
    assert pynbd_says in _first_line(mine)
    assert "Traceback" not in mine.stderr
    if "psk" in " ".join(args) and not _has_psk():
        return
    theirs = run_peer("nbdkit", "-U", str(tmp_path / "n"), *args, "memory", "1M",
                      check=False, env=env, timeout=30)
    assert theirs.returncode == 1
    assert pynbd_says.replace("'", "") in _first_line(theirs).replace("\u2018", "").replace(
        "\u2019", "")


def _has_psk() -> bool:
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def test_default_certificate_directory(pynbd_server: Callable[..., Server], certs: Path,
                                       tmp_path: Path) -> None:
    """$HOME/.pki/nbdkit is used when no directory is given, except by root (which only
    looks in /etc/pki/nbdkit, as nbdkit does)."""
    home = tmp_path / "home"
    (home / ".pki").mkdir(parents=True)
    (home / ".pki" / "nbdkit").symlink_to(certs)
    env = {"HOME": str(home)}
    if os.geteuid() == 0:
        if Path("/etc/pki/nbdkit/server-cert.pem").exists():
            pytest.skip("/etc/pki/nbdkit has certificates")
        for cmd in (pynbd, lambda *a, **kw: run_peer("nbdkit", *a, **kw)):
            cp = cmd(*(["serve"] if cmd is pynbd else []), "-U", str(tmp_path / "s"), "--tls=require", "memory", "1M",
                     check=False, env=env, timeout=30)
            assert cp.returncode == 1 and "could not load TLS certificates" in cp.stderr
        return
    srv = pynbd_server("--tls=require", "memory", "1M", env=env)
    assert run_peer("nbdinfo", "--size", tls_uri(srv, certs)).stdout.strip() == "1048576"


def test_run_gives_nbds_uri(certs: Path) -> None:
    cp = pynbd("serve", "-U", "-", "--tls=require", f"--tls-certificates={certs}",
                   "--run", 'echo "$uri"', "memory", "1M", timeout=30)
    assert cp.stdout.startswith("nbds+unix:///?socket=")
    cp = pynbd("serve", "--dump-config", timeout=30)
    assert "tls=yes" in cp.stdout.splitlines()


# ---- PSK (Python 3.13) ----------------------------------------------------------------

def test_psk_refused_before_python_313(tmp_path: Path) -> None:
    if _has_psk():
        pytest.skip("this Python has PSK callbacks")
    psk = tmp_path / "keys.psk"
    make_psk(psk)
    cp = pynbd("serve", "-U", str(tmp_path / "s"), "--tls=require", f"--tls-psk={psk}",
                   "memory", "1M", check=False, timeout=30)
    assert cp.returncode == 1
    assert cp.stderr.strip().count("\n") == 0
    assert "Python 3.13" in cp.stderr


def python313() -> str:
    """A Python 3.13 interpreter (for the PSK callbacks), from PATH or pyenv."""
    import glob
    import shutil

    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[3-9]*/bin/python3")))
    for cand in [*found, shutil.which("python3.13")]:
        if cand and subprocess.run([cand, "-c", "import ssl; ssl.SSLContext.set_psk_server_callback"],
                                   capture_output=True, check=False).returncode == 0:
            return cand
    missing("no Python 3.13 interpreter (python3.13 or ~/.pyenv/versions/3.13*) for PSK")


@pytest.fixture
def psk_server(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """``pynbd serve`` under Python 3.13 (the core is stdlib-only: PYTHONPATH=src)."""
    from tests.conftest import ServerFactory

    factory = ServerFactory([python313(), "-m", "pynbd", "serve"], "pynbd313", sockdir)
    src = str(ROOT / "src")

    def start(*args: Any, **kw: Any) -> Server:
        return factory(*args, env={"PYTHONPATH": src}, **kw)

    try:
        yield start
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def psk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("psk")
    make_psk(d / "keys.psk")  # qemu reads DIR/keys.psk
    return d / "keys.psk"


def test_psk_nbdinfo_and_nbdcopy(psk_server: Callable[..., Server],
                                 nbdkit_server: Callable[..., Server], psk: Path,
                                 tmp_path: Path) -> None:
    args = ["--tls=require", f"--tls-psk={psk}", "pattern", "2M"]
    outs = []
    for start in (psk_server, nbdkit_server):
        srv = start(*args)
        uri = f"nbds+unix://alice@/?socket={srv.sock}&tls-psk-file={psk}"
        outs.append(run_peer("nbdinfo", "--size", uri).stdout)
        run_peer("nbdcopy", uri, str(tmp_path / f"{len(outs)}.img"))
    assert outs == ["2097152\n", "2097152\n"]
    assert (tmp_path / "1.img").read_bytes() == (tmp_path / "2.img").read_bytes()


def test_psk_qemu_io(psk_server: Callable[..., Server], psk: Path) -> None:
    require("qemu-io")
    srv = psk_server("--tls=require", f"--tls-psk={psk}", "memory", "1M")
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={psk.parent},username=alice"
    img = f"driver=nbd,path={srv.sock},tls-creds=tls0"
    run_peer("qemu-io", "--object", obj, "--image-opts", img, "-c", "write -P 0x33 4k 4k")
    out = run_peer("qemu-io", "--object", obj, "--image-opts", img,
                   "-c", "read -P 0x33 4k 4k").stdout
    assert "Pattern verification failed" not in out


def test_psk_wrong_user_or_key(psk_server: Callable[..., Server], psk: Path,
                               tmp_path: Path) -> None:
    srv = psk_server("--tls=require", f"--tls-psk={psk}", "memory", "1M")
    wrong_key = tmp_path / "wrong.psk"
    make_psk(wrong_key)
    unknown = tmp_path / "bob.psk"
    make_psk(unknown, user="bob")
    for user, f in (("alice", wrong_key), ("bob", unknown)):
        cp = run_peer("nbdinfo", "--size",
                      f"nbds+unix://{user}@/?socket={srv.sock}&tls-psk-file={f}", check=False)
        assert cp.returncode != 0 and not cp.stdout
    assert "unknown PSK username 'bob'" in srv.stderr
    assert run_peer("nbdinfo", "--size", f"nbds+unix://alice@/?socket={srv.sock}"
                    f"&tls-psk-file={psk}").stdout == "1048576\n"


def test_tls_on_without_certificates_warns(pynbd_server: Callable[..., Server],
                                           certs: Path) -> None:
    """As nbdkit: a warning, then plain clients served and TLS refused (ERR_POLICY)."""
    srv = pynbd_server("--tls=on", f"--tls-certificates={certs}/nonexistent", "memory", "1M")
    assert run_peer("nbdinfo", "--size", srv.uri).stdout == "1048576\n"
    assert run_peer("nbdinfo", "--size", tls_uri(srv, certs), check=False).returncode != 0
    warning = [x for x in srv.stderr.splitlines() if "could not load" in x]
    assert len(warning) == 1 and "TLS is disabled" in warning[0]


def _bad_dir(certs: Path, d: Path, key: bytes) -> Path:
    d.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem"):
        (d / f).write_bytes((certs / f).read_bytes())
    (d / "server-key.pem").write_bytes(key)
    return d


def test_bad_key_files_one_line(certs: Path, tmp_path: Path) -> None:
    """A key that does not match, is not PEM, or is encrypted: one line, no prompt
    (stdin is closed: a passphrase prompt would fail, not hang)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((certs / "server-key.pem").read_bytes(), None)
    cases = {
        "mismatch": ((certs / "other-ca" / "server-key.pem").read_bytes(),
                     "the certificate and the given key do not match"),
        "garbage": (b"not a key\n", "not a PEM file"),
        "encrypted": (key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")), "is encrypted"),
    }
    for name, (data, says) in cases.items():
        d = _bad_dir(certs, tmp_path / name, data)
        cp = pynbd("serve", "-U", str(tmp_path / "s"), "--tls=require",
                   f"--tls-certificates={d}", "memory", "1M", check=False, timeout=30)
        assert cp.returncode == 1, name
        assert cp.stderr.count("\n") == 1 and says in cp.stderr, (name, cp.stderr)


_OVER_COMMAND = r"""
import sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[1])
h.connect_command(sys.argv[2:])
h.pwrite(b"over pipes" * 100, 4096)
print(h.get_tls_negotiated(), h.get_size(), h.pread(1000, 4096) == b"over pipes" * 100)
h.shutdown()
"""


def test_single_connection_over_stdio(certs: Path, libnbd: Callable[..., Any]) -> None:
    """-s: TLS over the socket pair libnbd hands the server as stdin/stdout."""
    import sys

    cmd = ["env", f"PYTHONPATH={ROOT / 'src'}", sys.executable, "-m", "pynbd", "serve", "-s",
           "--tls=require", f"--tls-certificates={certs}", "memory", "1M"]
    assert libnbd(_OVER_COMMAND, str(certs), *cmd).stdout == "True 1048576 True\n"


def test_transmission_pipelined_over_tls(pynbd_server: Callable[..., Server],
                                         certs: Path) -> None:
    """Requests packed many to a record and payloads spread over many records (a WRITE of
    3 MiB, larger than the receive buffer) come out right: bytes waiting inside the TLS
    engine are served without the socket becoming readable again."""
    from pynbd.protocol.constants import REQUEST, REQUEST_MAGIC, Cmd

    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "memory", "8M")
    c = RawClient(srv.sock or "")
    try:
        c.starttls(certs)
        c.send_opt(Opt.GO, _info_request())
        assert c.replies()[-1][1] == Rep.ACK
        big = bytes(range(256)) * (3 * 4096)
        c.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 4096, len(big)) + big)
        assert struct.unpack(">IIQ", c.recv(16)) == (0x67446698, 0, 1)
        reqs = b"".join(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 100 + i, 4096 + i * 7, 512)
                        for i in range(300))
        c.sock.sendall(reqs)  # one write: ~16 KiB of requests, a record or two
        for i in range(300):
            magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err, cookie) == (0x67446698, 0, 100 + i)
            assert c.recv(512) == big[i * 7:i * 7 + 512]
        c.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 7, 4096, len(big)))
        assert struct.unpack(">IIQ", c.recv(16)) == (0x67446698, 0, 7)
        assert c.recv(len(big)) == big
        c.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 8, 0, 0))
        assert c.recv(1) == b""
    finally:
        c.close()


def test_garbage_instead_of_tls_handshake(pynbd_server: Callable[..., Server],
                                          certs: Path) -> None:
    """Plain bytes after the STARTTLS reply: one log line, the connection closed, the
    server serving the next client."""
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "memory", "1M")
    c = RawClient(srv.sock or "")
    try:
        c.send_opt(Opt.STARTTLS)
        assert c.reply()[1] == Rep.ACK
        c.sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.LIST, 0))
        rest = c.recv(4096)
        assert not rest.startswith(b"\x00\x03\xe8\x89")  # no option reply, at most an alert
    finally:
        c.close()
    assert run_peer("nbdinfo", "--size", tls_uri(srv, certs)).stdout == "1048576\n"
    assert "TLS handshake failed" in srv.stderr and "Traceback" not in srv.stderr


def test_silent_client_after_starttls_times_out(pynbd_server: Callable[..., Server],
                                                certs: Path) -> None:
    """A client that stops in the middle of the TLS handshake is dropped at --timeout."""
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "--timeout=1",
                       "memory", "1M")
    c = RawClient(srv.sock or "")
    try:
        c.send_opt(Opt.STARTTLS)
        assert c.reply()[1] == Rep.ACK
        assert c.recv(1) == b""  # closed by the server (the socket's own timeout is 20 s)
    finally:
        c.close()
    assert "handshake timed out" in srv.stderr


def _export_name_only(path: str) -> bytes:
    """A client of non-fixed newstyle (only EXPORT_NAME possible): what it receives."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    try:
        s.connect(path)
        greeting = b""
        while len(greeting) < 18:
            greeting += s.recv(18 - len(greeting))
        s.sendall(struct.pack(">I", 0) + struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 0))
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out
    finally:
        s.close()


def test_export_name_only_client_refused(pynbd_server: Callable[..., Server],
                                         nbdkit_server: Callable[..., Server],
                                         certs: Path) -> None:
    """--mask-handshake=0 --tls=require: an old client can only send EXPORT_NAME, which
    cannot be refused: hung up on without a byte, by both servers."""
    args = ["--tls=require", f"--tls-certificates={certs}", "--mask-handshake=0",
            "memory", "1M"]
    got = [_export_name_only(start(*args).sock or "") for start in (pynbd_server,
                                                                      nbdkit_server)]
    assert got == [b"", b""]


def test_pynbd_client_against_pynbd_server(pynbd_server: Callable[..., Server],
                                           certs: Path) -> None:
    """pynbd's own client and tools over TLS to pynbd serve (the same bytes as nbdcopy)."""
    srv = pynbd_server("--tls=require", f"--tls-certificates={certs}", "pattern", "1M")
    uri = tls_uri(srv, certs)
    assert "with TLS" in pynbd("info", uri).stdout
    mine = run_pynbd("copy", uri, "-", timeout=60).stdout
    theirs = _run_peer("nbdcopy", uri, "-").stdout
    assert mine == theirs and len(mine) == 1 << 20
