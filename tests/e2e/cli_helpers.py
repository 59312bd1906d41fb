"""What the `pynbd serve` command-line tests share: a raw NBD client, running the
command, and checking that an error is one clean line.

The raw client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) proves a server serves
without needing any peer.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time

import pytest
from helpers import (
    PYNBD,
    peer_env,
)

__all__ = [
    "NBD_CMD_DISC",
    "NBD_CMD_FLUSH",
    "NBD_CMD_READ",
    "NBD_CMD_WRITE",
    "NBD_EINVAL",
    "NBD_ENOSPC",
    "NBD_EPERM",
    "NBD_FLAG_READ_ONLY",
    "TIMEOUT",
    "RawClient",
    "assert_clean_error",
    "pid_alive",
    "popen_serve",
    "pynbd_cmd",
    "recv_exact",
    "run_serve",
    "stop_proc",
    "wait_gone",
]

# ---------------------------------------------------------------------------- a raw client

NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_EPERM, NBD_EINVAL, NBD_ENOSPC = 1, 22, 28
NBD_FLAG_READ_ONLY = 1 << 1
TIMEOUT = 30.0


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed the connection ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


class RawClient:
    """Fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies: enough to prove a server serves."""

    def __init__(self, sock: socket.socket, export: str = "") -> None:
        self.s = sock
        sock.settimeout(TIMEOUT)
        assert recv_exact(sock, 8) == b"NBDMAGIC"
        assert recv_exact(sock, 8) == b"IHAVEOPT"
        (hflags,) = struct.unpack(">H", recv_exact(sock, 2))
        assert hflags & 1, "server is not fixed newstyle"
        no_zeroes = bool(hflags & 2)
        sock.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        name = export.encode()
        sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
        self.size, self.eflags = struct.unpack(">QH", recv_exact(sock, 10))
        if not no_zeroes:
            recv_exact(sock, 124)
        self.cookie = 0

    @classmethod
    def unix(cls, path: str, export: str = "") -> RawClient:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(path)
        return cls(s, export)

    @classmethod
    def tcp(cls, host: str, port: int, export: str = "") -> RawClient:
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        return cls(s, export)

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> int:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, self.cookie, offset,
                                   length) + data)
        return self.cookie

    def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(self.s, 16))
        assert magic == 0x67446698
        data = recv_exact(self.s, read_len) if read_len and not err else b""
        return cookie, err, data

    def pread(self, count: int, offset: int) -> bytes:
        self.send(NBD_CMD_READ, offset, count)
        _, err, data = self.reply(count)
        if err:
            raise OSError(err, os.strerror(err))
        return data

    def pwrite(self, data: bytes, offset: int) -> int:
        """Returns the NBD error (0 on success)."""
        self.send(NBD_CMD_WRITE, offset, len(data), data)
        return self.reply()[1]

    def close(self) -> None:
        try:
            self.send(NBD_CMD_DISC, 0, 0)
        except OSError:
            pass
        self.s.close()


def pynbd_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [*PYNBD, "serve", *(os.fspath(a) for a in args)]


def run_serve(*args: str | os.PathLike[str], timeout: float = 60,
              cwd: str | os.PathLike[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pynbd_cmd(*args), check=False, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=peer_env(env))


def assert_clean_error(cp: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, one line on stderr, no traceback, nothing on stdout; return the line."""
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert cp.stdout == ""
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def popen_serve(*args: str | os.PathLike[str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(pynbd_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=peer_env(),
                            start_new_session=True, **kw)  # type: ignore[call-overload]


def stop_proc(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"server did not exit on SIGTERM\n{err}")
    assert proc.returncode in (0, -signal.SIGTERM), err
    return out, err
