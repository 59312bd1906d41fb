"""`pynbd serve -U PATH` next to whatever is already at PATH.

A socket another server listens on is refused with nbdkit's words ("PATH: Address already
in use", exit status 1) and that server keeps serving; a stale socket file nobody listens on
(a crashed server's leftover) is replaced; anything else at PATH is left alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    PYNBD,
    peer_env,
    require,
    start_daemon_server,
    start_server,
    unix_uri,
    wait_listening,
)

from pynbd.client import Client

TIMEOUT = 30.0


def _serve(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYNBD, "serve", *(os.fspath(a) for a in args)], check=False,
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, env=peer_env())


def _refused(cp: subprocess.CompletedProcess[str], path: Path) -> None:
    """Exit 1, nothing on stdout, and exactly one line: nbdkit's, after our prefix."""
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stdout == ""
    assert "Traceback" not in cp.stderr
    assert cp.stderr.splitlines() == [f"pynbd serve: error: {path}: Address already in use"]


def _serves(path: Path, size: int, marker: bytes | None = None) -> None:
    with Client.connect(unix_uri(path)) as c:
        assert c.size == size
        if marker is not None:
            assert bytes(c.pread(len(marker), 0)) == marker


def test_live_socket_is_refused_and_its_server_keeps_serving(pynbd_server) -> None:
    first = pynbd_server("memory", "1M")
    sock = Path(first.sock)
    with Client.connect(first.uri) as c:
        c.pwrite(b"first server", 0)
    for extra in (["-f"], []):  # in the foreground, and when it would go to the background
        _refused(_serve(*extra, "-U", sock, "memory", "2M"), sock)
    assert first.proc.poll() is None
    _serves(sock, 1 << 20, b"first server")


def test_live_daemon_socket_is_refused(sockdir: Path) -> None:
    """README step 1 run twice: the second server must not take the first one's socket."""
    sock, pidfile = sockdir / "pynbd.sock", sockdir / "first.pid"
    first = start_daemon_server(
        [*PYNBD, "serve", "-P", pidfile, "-U", sock, "memory", "1M"],
        pidfile=pidfile, logdir=sockdir / "first.log", sock=sock)
    try:
        second_pid = sockdir / "second.pid"
        _refused(_serve("--print-uri", "-P", second_pid, "-U", sock, "memory", "1G"), sock)
        assert not second_pid.exists()
        _serves(sock, 1 << 20)
    finally:
        first.stop()


def test_listener_that_never_accepts_is_refused_without_hanging(sockdir: Path) -> None:
    """A live listener whose backlog is full: the check must not block on it."""
    sock = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(os.fspath(sock))
        busy.listen(0)
        pending = []
        for _ in range(4):  # fill the backlog; later connects would block or fail EAGAIN
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(os.fspath(sock))
            except BlockingIOError:
                s.close()
                break
            pending.append(s)
        start = time.monotonic()
        cp = _serve("-f", "-U", sock, "memory", "1M")
        took = time.monotonic() - start
        for s in pending:
            s.close()
    _refused(cp, sock)
    assert took < TIMEOUT / 2


def test_stale_socket_file_is_replaced(sockdir: Path) -> None:
    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(stale))  # bound, never listened on, closed: nobody is there
    assert stale.is_socket()
    srv = start_server([*PYNBD, "serve", "-f", "-U", stale, "memory", "1M"],
                       logdir=sockdir / "stale.log", sock=stale)
    try:
        _serves(stale, 1 << 20)
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_non_socket_at_path_is_left_alone(sockdir: Path, kind: str) -> None:
    path = sockdir / "not-a-socket"
    if kind == "file":
        path.write_bytes(b"precious")
    else:
        path.mkdir()
    _refused(_serve("-f", "-U", path, "memory", "1M"), path)
    if kind == "file":
        assert path.read_bytes() == b"precious"
    else:
        assert path.is_dir()


def test_message_is_nbdkits(sockdir: Path) -> None:
    """nbdkit 1.32 refuses a socket in use with perror(PATH): the same words end our line."""
    nbdkit = require("nbdkit")
    sock = sockdir / "nbdkit.sock"
    first = subprocess.Popen([nbdkit, "-f", "-U", sock, "memory", "1M"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(sock=sock, proc=first, describe="nbdkit")
        theirs = subprocess.run([nbdkit, "-f", "-U", sock, "memory", "1M"], check=False,
                                capture_output=True, text=True, timeout=TIMEOUT)
        ours = _serve("-f", "-U", sock, "memory", "1M")
    finally:
        first.terminate()
        first.wait(TIMEOUT)
    assert theirs.returncode == ours.returncode == 1
    assert theirs.stderr.splitlines() == [f"{sock}: Address already in use"]
    _refused(ours, sock)
    assert ours.stderr.strip().endswith(theirs.stderr.strip())
