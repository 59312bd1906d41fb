"""The pause filter in pynbd: requests held in worker threads, released by the control
socket, and given up when the server shuts down (where nbdkit 1.32 would wait for a resume
forever)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.client.blocking import READ, BlockingConnection, ServerGone
from pynbd.errors import CommandError
from tests.helpers import Server


def control(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        return s.recv(16)


def test_shutdown_while_paused(pynbd_server: Callable[..., Server], tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    srv = pynbd_server("--filter=pause", "memory", "1M", f"pause-control={ctl}")
    assert srv.sock is not None
    c = BlockingConnection.connect(unix=srv.sock)
    try:
        assert control(ctl, b"p") == b"P"
        buf = memoryview(bytearray(512))
        cookie = c.send(READ, 0, 512, into=buf)
        t = time.monotonic()
        assert srv.stop(timeout=5) in (0, -15)
        assert time.monotonic() - t < 3
        assert "Traceback" not in srv.stderr
        with pytest.raises((CommandError, ServerGone)):
            c.reply(cookie, buf)
        assert not ctl.exists()
    finally:
        c.abort()


def test_other_connections_held_too_and_released(pynbd_server: Callable[..., Server],
                                                 tmp_path: Path) -> None:
    """A pause holds every connection; r releases them all, with their data intact."""
    ctl = tmp_path / "ctl"
    srv = pynbd_server("--filter=pause", "memory", "1M", f"pause-control={ctl}")
    assert srv.sock is not None
    a = BlockingConnection.connect(unix=srv.sock)
    b = BlockingConnection.connect(unix=srv.sock)
    try:
        a.pwrite(b"A" * 512, 0)
        assert control(ctl, b"p") == b"P"
        bufs = [memoryview(bytearray(512)) for _ in range(2)]
        cookies = [a.send(READ, 0, 512, into=bufs[0]), b.send(READ, 0, 512, into=bufs[1])]
        b.flush()  # never held
        assert control(ctl, b"r") == b"R"
        a.reply(cookies[0], bufs[0])
        b.reply(cookies[1], bufs[1])
        assert bytes(bufs[0]) == bytes(bufs[1]) == b"A" * 512
    finally:
        a.close()
        b.close()
