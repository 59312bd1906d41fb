"""What the client TLS tests share: test certificates and keys, and TLS servers (nbdkit
``--tls=require`` with X.509 and with PSK, over Unix and TCP; an expired certificate; plain
and oldstyle servers; ``--tls=on``; qemu-nbd ``--tls-creds`` X.509 and PSK), started once
per module, and a Python 3.13 interpreter for the PSK tests (``SSLContext.
set_psk_client_callback`` came with 3.13)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT, Server, free_tcp_port, missing, require, short_tmpdir, start_server
from tls_certs import make_psk, make_x509

__all__ = ["TLSLab", "py313", "run_py313", "tls_lab"]

DISK = 4 * 1024 * 1024


def py313() -> str:
    """A Python >= 3.13 interpreter (skip, or fail in CI, if there is none)."""
    if sys.version_info >= (3, 13):
        return sys.executable
    for cand in (os.environ.get("PYNBD_PYTHON313", ""),
                 os.path.expanduser("~/.pyenv/versions/3.13.0/bin/python3"),
                 shutil.which("python3.13") or ""):
        if cand and os.access(cand, os.X_OK):
            return cand
    missing("Python 3.13 (for TLS-PSK: ssl's PSK callbacks) not found")


def run_py313(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under Python 3.13 with this checkout's pynbd (the client core is
    standard library only) and, as ``nbd``, pynbd.libnbd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")
    env.pop("LIBNBD_DEBUG", None)
    prelude = "import sys, pynbd.libnbd; sys.modules['nbd'] = pynbd.libnbd\n"
    return subprocess.run([py313(), "-c", prelude + script, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                          check=False)


class TLSLab:
    """The certificates, keys and servers (see the module's documentation)."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.pki = make_x509(d / "pki")
        self.psk = d / "keys.psk"
        make_psk(self.psk)
        self.bad_psk = d / "bad.psk"
        make_psk(self.bad_psk)  # alice with another key
        (d / "qpsk").mkdir()
        shutil.copy(self.psk, d / "qpsk" / "keys.psk")
        self.servers: list[Server] = []
        self.port = 0
        self.expired_port = 0

    def sock(self, name: str) -> str:
        return str(self.d / f"{name}.sock")

    def _nbdkit(self, name: str, *args: str, port: int | None = None) -> None:
        where = ["-i", "127.0.0.1", "-p", str(port)] if port else ["-U", self.sock(name)]
        self.servers.append(start_server(
            [require("nbdkit"), "-f", *where, *args, "memory", str(DISK)],
            logdir=self.d / f"log-{name}", sock=None if port else self.sock(name), port=port))

    def _qemu(self, name: str, obj: str) -> None:
        img = self.d / f"{name}.img"
        img.write_bytes(b"")
        os.truncate(img, DISK)
        self.servers.append(start_server(
            [require("qemu-nbd"), "--object", obj, "--tls-creds", "tls0", "-k",
             self.sock(name), "-f", "raw", "-t", "-e", "8", str(img)],
            logdir=self.d / f"log-{name}", sock=self.sock(name)))

    def start(self) -> None:
        x509 = ["--tls=require", f"--tls-certificates={self.pki}"]
        self._nbdkit("x509", *x509)
        self.port = free_tcp_port()
        self._nbdkit("x509tcp", *x509, port=self.port)
        self.expired_port = free_tcp_port()
        self._nbdkit("expired", "--tls=require", f"--tls-certificates={self.pki}/expired",
                     port=self.expired_port)
        self._nbdkit("psk", "--tls=require", f"--tls-psk={self.psk}")
        self._nbdkit("plain")
        self._nbdkit("on", "--tls=on", f"--tls-certificates={self.pki}")
        self._nbdkit("oldstyle", "-o")
        self._qemu("qx509", f"tls-creds-x509,id=tls0,endpoint=server,dir={self.pki}")
        self._qemu("qpsk", f"tls-creds-psk,id=tls0,endpoint=server,dir={self.d / 'qpsk'}")

    def stop(self) -> None:
        for s in self.servers:
            s.stop(check=False)

    # ---- URIs
    def x509(self, name: str = "x509", extra: str = "") -> str:
        return f"nbds+unix:///?socket={self.sock(name)}&tls-certificates={self.pki}{extra}"

    def tcp(self, host: str = "localhost", extra: str = "", certs: str | None = None,
            port: int | None = None) -> str:
        return (f"nbds://{host}:{port or self.port}/?tls-certificates="
                f"{certs or self.pki}{extra}")

    def psk_uri(self, name: str = "psk", user: str = "alice", key: Path | None = None) -> str:
        return (f"nbds+unix://{user}@/?socket={self.sock(name)}"
                f"&tls-psk-file={key or self.psk}")


def tls_lab() -> Iterator[TLSLab]:
    """The body of a module-scoped fixture."""
    d = short_tmpdir("pynbd-tlsc-")
    lab = TLSLab(d)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(d, ignore_errors=True)
