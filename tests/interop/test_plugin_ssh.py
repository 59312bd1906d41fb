"""The ssh plugin against OpenSSH's sshd (Debian's openssh-server) started on a loopback
port with a generated host key and user key, side by side with nbdkit's ssh plugin: the same
bytes and flags, writes and flush (fsync@openssh.com), create=, and nbdkit's errors for a
changed or unknown host key and for refused authentication."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import PYNBD, free_tcp_port, peer_env, require, wait_listening
from side_by_side import assert_views_equal, probe, serve_both

from pynbd.client import Client
from pynbd.errors import CommandError

SIZE = 2 * 1000 * 1000 + 4096


@dataclass
class Sshd:
    port: int
    dir: Path
    key: Path
    known: Path

    def args(self, path: Path | str, *extra: str, known: Path | None = None) -> list[str]:
        return ["ssh", "host=127.0.0.1", f"port={self.port}", "config=",
                f"identity={self.key}", f"known-hosts={known or self.known}", str(path),
                *extra]


def _keygen(path: Path) -> None:
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    exe = "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else require("sshd")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "user", "other"):
        _keygen(d / name)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = free_tcp_port()
    host_pub = " ".join((d / "host.pub").read_text().split()[:2])
    other_pub = " ".join((d / "other.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (d / "bad_known_hosts").write_text(f"[127.0.0.1]:{port} {other_pub}\n")
    (d / "empty_known_hosts").write_text("")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin yes\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([exe, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port=port, proc=proc, describe="sshd")  # type: ignore[arg-type]
        yield Sshd(port, d, d / "user", d / "known_hosts")
    finally:
        proc.terminate()
        proc.wait(10)


def disk(d: Path, name: str = "disk.img") -> Path:
    p = d / name
    p.write_bytes(bytes((i * 31 + i // 65536) & 0xFF for i in range(SIZE)))
    return p


OPS = [("size",), ("pread", 4096, 0), ("pread", 300000, 12345), ("pread", 4096, SIZE - 4096)]


def test_read_side_by_side(pynbd_server, nbdkit_server, sshd, tmp_path):
    img = disk(tmp_path)
    p, n = serve_both(pynbd_server, nbdkit_server, ["-r", *sshd.args(img)])
    got = probe(p.uri, OPS)
    assert_views_equal(got, probe(n.uri, OPS), "ssh -r")
    assert got["results"][2][1] == img.read_bytes()[12345:12345 + 300000]


def test_reads_in_parts_and_past_a_shrunk_end(pynbd_server, sshd, tmp_path):
    """Reads bigger than one SFTP request (255 KiB) come back whole and in order, many at
    once on several connections; once the remote file shrinks under an open connection,
    a read past its new end fails with EIO (the server's EOF), and the connection still
    serves reads before the end."""
    img = tmp_path / "big.img"
    data = os.urandom(3 << 20)
    img.write_bytes(data)
    srv = pynbd_server(*sshd.args(img))
    spans = [(1 << 20, 0), (600000, 1234567), (2 << 20, 1 << 20), (4096, (3 << 20) - 4096)]
    with Client.connect(srv.uri) as a, Client.connect(srv.uri) as b:
        for i, (count, offset) in enumerate(spans * 2):
            assert (a if i % 2 else b).pread(count, offset) == data[offset:offset + count]
        os.truncate(img, 1 << 20)
        with pytest.raises(CommandError) as e:
            a.pread(600000, 700000)
        assert e.value.errno == errno.EIO
        assert a.pread(4096, 8192) == data[8192:12288]
    assert "Traceback" not in srv.stderr


def test_write_and_flush(pynbd_server, nbdkit_server, sshd, tmp_path):
    """Writes land in the remote file; flush is fsync@openssh.com (advertised, as nbdkit)."""
    a, b = disk(tmp_path, "a.img"), disk(tmp_path, "b.img")
    ops = [("pwrite", b"\xaa" * 30000, 5000), ("pwrite", b"\x55" * 512, 0, 1), ("flush",),
           ("pread", 80000, 0)]
    got = probe(pynbd_server(*sshd.args(a)).uri, ops)
    want = probe(nbdkit_server(*sshd.args(b)).uri, ops)
    assert_views_equal(got, want, "ssh writes")
    assert got["flags"]["can_flush"] is True and got["flags"]["can_multi_conn"] is True
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[5000:35000] == b"\xaa" * 30000


def test_create(pynbd_server, sshd, tmp_path):
    new = tmp_path / "new.img"
    p = pynbd_server(*sshd.args(new, "create=true", "create-size=1M", "create-mode=0640"))
    r = probe(p.uri, [("pwrite", b"z" * 512, 4096), ("pread", 8192, 0)])
    assert r["size"] == 1 << 20
    assert r["results"][1][1] == bytes(4096) + b"z" * 512 + bytes(3584)
    assert new.stat().st_size == 1 << 20 and (new.stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("case,message", [
    ("bad_known_hosts", "host key for server changed"),
    ("empty_known_hosts", "either the host key is unknown, you must use ssh first"),
    ("other_key", "all possible authentication methods failed"),
    ("wrong_password", "all possible authentication methods failed"),
    ("missing_file", "cannot open file for writing: SFTP server: No such file"),
])
def test_refused(pynbd_server, nbdkit_server, sshd, tmp_path, case, message):
    """Each failure refuses the client (as nbdkit does) and logs nbdkit's message."""
    img = disk(tmp_path)
    if case.endswith("known_hosts"):
        args = sshd.args(img, known=sshd.dir / case)
    elif case == "other_key":
        args = [a if not a.startswith("identity=") else f"identity={sshd.dir}/other"
                for a in sshd.args(img)]
    elif case == "wrong_password":
        args = [a for a in sshd.args(img) if not a.startswith("identity=")]
        args.append("password=wrong")
    else:
        args = sshd.args(tmp_path / "missing.img")
    env = {"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""}
    p = pynbd_server(*args, env=env)
    n = nbdkit_server(*args, env=env)
    got, want = probe(p.uri), probe(n.uri)
    assert "connect_error" in got and got["connect_error"] == want["connect_error"]
    assert message in p.stderr and message in n.stderr
    assert "Traceback" not in p.stderr


BAD = [
    [],
    ["host=x"],
    ["path=/x"],
    ["host=x", "/p", "create=true"],
    ["host=x", "/p", "create-mode=abc"],
    ["host=x", "/p", "create-size=1X"],
    ["host=x", "/p", "verify-remote-host=maybe"],
    ["host=x", "/p", "timeout=-1"],
    ["host=x", "/p", "password=+/nonexistent"],
    ["host=x", "/p", "foo=1"],
]


@pytest.mark.parametrize("params", BAD, ids=[" ".join(p) or "none" for p in BAD])
def test_bad_parameters(params, sockdir):
    """One line, nbdkit's message, exit 1."""
    run = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        cp = subprocess.run([*cmd, "-U", str(sockdir / "x.sock"), "ssh", *params, "--run",
                             "true"], capture_output=True, text=True, env=peer_env(),
                            stdin=subprocess.DEVNULL, timeout=60, check=False)
        run.append(cp)
    p, n = run
    assert n.returncode == 1 and p.returncode == 1, (p.stderr, n.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.split("error: ", 1)[1] == n.stderr.split("error: ", 1)[1]
