"""The rate filter in pynbd: a request waiting for tokens waits in a worker thread (another
client with a bucket of its own goes on at once) and gives up when the server shuts down or
its client hangs up. The log filter in front says when a read has reached the rate filter."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.client.blocking import READ, BlockingConnection, ServerGone
from pynbd.errors import CommandError
from tests.helpers import Server

MiB = 1 << 20


def wait_for_line(path: Path, text: str, timeout: float = 10) -> str:
    """Wait until a line of ``path`` contains ``text``; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines() if path.exists() else ():
            if text in line:
                return line
        time.sleep(0.01)
    raise AssertionError(f"no line with {text!r} in {path} after {timeout}s")


def test_shutdown_ends_a_wait_for_tokens(pynbd_server: Callable[..., Server],
                                         tmp_path: Path) -> None:
    """1 MiB at 8 Kbit/s would take over 17 minutes; SIGTERM ends the wait at once."""
    log = tmp_path / "log"
    srv = pynbd_server("--filter=log", "--filter=rate", "memory", "2M", f"logfile={log}",
                       "connection-rate=8K", "burstiness=1")
    assert srv.sock is not None
    c = BlockingConnection.connect(unix=srv.sock)
    try:
        buf = memoryview(bytearray(MiB))
        cookie = c.send(READ, 0, MiB, into=buf)
        wait_for_line(log, "Read id=1 offset=0x0 count=0x100000 ...")
        t = time.monotonic()
        assert srv.stop(timeout=5) in (0, -15)
        assert time.monotonic() - t < 3
        assert "Traceback" not in srv.stderr
        with pytest.raises((CommandError, ServerGone)):
            c.reply(cookie, buf)
        assert wait_for_line(log, "...Read id=1").endswith("return=-1 error=ESHUTDOWN")
    finally:
        c.abort()


def test_a_starved_connection_leaves_another_fast(pynbd_server: Callable[..., Server],
                                                  tmp_path: Path) -> None:
    """connection-rate=1M, burstiness=1: each client's bucket holds 128 KiB. A 1 MiB read
    waits some 7 s for tokens; another client's 64 KiB reads go at once meanwhile; the
    waiting read ends when its client hangs up."""
    log = tmp_path / "log"
    srv = pynbd_server("--filter=log", "--filter=rate", "memory", "2M", f"logfile={log}",
                       "connection-rate=1M", "burstiness=1")
    assert srv.sock is not None
    slow = BlockingConnection.connect(unix=srv.sock)
    fast = BlockingConnection.connect(unix=srv.sock)
    try:
        slow.send(READ, 0, MiB, into=memoryview(bytearray(MiB)))
        wait_for_line(log, "connection=1 Read id=1 offset=0x0 count=0x100000 ...")
        t = time.monotonic()
        buf = memoryview(bytearray(65536))
        fast.pread_into(buf, 0)
        assert time.monotonic() - t < 0.5
        slow.abort()
        leave = wait_for_line(log, "connection=1 ...Read id=1", timeout=5)
        assert leave.endswith("return=-1 error=ESHUTDOWN")
        fast.pread_into(buf, 65536)  # its bucket still had 64 KiB
        assert time.monotonic() - t < 3
    finally:
        slow.abort()
        fast.close()
