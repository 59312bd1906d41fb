"""The delay filter in pynbd: requests wait in worker threads, never on the event loop, so a
delay on one connection leaves the others (and the same connection's other requests) fast;
a waiting request gives up when the server shuts down or its client hangs up.

State is observed through the log filter in front of delay: its ENTER line is written when
the request reaches the delay, its LEAVE line when the delay is over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.client.blocking import READ, BlockingConnection, ServerGone
from pynbd.errors import CommandError
from tests.helpers import Server

FAST_ZERO = 16  # NBD_CMD_FLAG_FAST_ZERO (on the wire)


def wait_for_line(path: Path, text: str, timeout: float = 10) -> str:
    """Wait until a line of ``path`` contains ``text``; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if text in line:
                    return line
        time.sleep(0.01)
    raise AssertionError(f"no line with {text!r} in {path} after {timeout}s:\n"
                         f"{path.read_text() if path.exists() else '(no file)'}")


def connect(srv: Server) -> BlockingConnection:
    assert srv.sock is not None
    return BlockingConnection.connect(unix=srv.sock)


def read(c: BlockingConnection, count: int = 512, offset: int = 0) -> bytes:
    buf = bytearray(count)
    c.pread_into(memoryview(buf), offset)
    return bytes(buf)


def test_a_read_waits_rdelay(pynbd_server: Callable[..., Server]) -> None:
    srv = pynbd_server("--filter=delay", "memory", "1M", "rdelay=300ms")
    c = connect(srv)
    try:
        t = time.monotonic()
        read(c)
        took = time.monotonic() - t
        c.pwrite(b"x" * 512, 0)  # writes are not delayed
        assert took >= 0.29
    finally:
        c.close()


def test_delay_on_one_connection_leaves_another_fast(
        pynbd_server: Callable[..., Server]) -> None:
    """A write waits 2 s on connection A; meanwhile connection B reads 50 times, quickly."""
    srv = pynbd_server("--filter=delay", "memory", "1M", "wdelay=2")
    a, b = connect(srv), connect(srv)
    done = threading.Event()
    took: list[float] = []

    def slow_write() -> None:
        t = time.monotonic()
        a.pwrite(b"a" * 4096, 0)
        took.append(time.monotonic() - t)
        done.set()

    writer = threading.Thread(target=slow_write)
    try:
        writer.start()
        t = time.monotonic()
        for i in range(50):
            read(b, 4096, 4096 * i)
        b_took = time.monotonic() - t
        assert not done.is_set(), "the delayed write finished before the other reads"
        assert b_took < 1.0, f"50 reads on another connection took {b_took:.2f} s"
        writer.join(10)
        assert took and took[0] >= 1.95
        assert read(b, 4096, 0) == b"a" * 4096
    finally:
        writer.join(10)
        a.close()
        b.close()


def test_delayed_requests_of_one_connection_wait_together(
        pynbd_server: Callable[..., Server]) -> None:
    """Four pipelined reads each wait 500 ms, side by side in worker threads: ~0.5 s."""
    srv = pynbd_server("--filter=delay", "memory", "1M", "rdelay=500ms")
    c = connect(srv)
    try:
        t = time.monotonic()
        bufs = [memoryview(bytearray(512)) for _ in range(4)]
        cookies = [c.send(READ, 512 * i, 512, into=bufs[i]) for i in range(4)]
        for i, (cookie, buf) in enumerate(zip(cookies, bufs, strict=True)):
            c.reply(cookie, buf, 512 * i)
        took = time.monotonic() - t
        assert 0.49 <= took < 1.5, took
    finally:
        c.close()


def test_fast_zero_fails_at_once_without_delay_fast_zero(
        pynbd_server: Callable[..., Server]) -> None:
    srv = pynbd_server("--filter=delay", "memory", "1M", "delay-zero=2",
                       "delay-fast-zero=false")
    c = connect(srv)
    try:
        t = time.monotonic()
        with pytest.raises(CommandError) as e:
            c.zero(4096, 0, FAST_ZERO)
        assert time.monotonic() - t < 1.0
        assert e.value.errno == 95  # ENOTSUP
    finally:
        c.close()


def test_shutdown_ends_a_delay(pynbd_server: Callable[..., Server], tmp_path: Path) -> None:
    """SIGTERM while a read waits 60 s: the wait ends, the server exits at once."""
    log = tmp_path / "log"
    srv = pynbd_server("--filter=log", "--filter=delay", "memory", "1M", f"logfile={log}",
                       "rdelay=60")
    c = connect(srv)
    try:
        c.send(READ, 0, 512, into=memoryview(bytearray(512)))
        wait_for_line(log, "Read id=1 offset=0x0 count=0x200 ...")
        t = time.monotonic()
        assert srv.stop(timeout=5) in (0, -15)
        assert time.monotonic() - t < 3
        leave = wait_for_line(log, "...Read id=1")
        assert leave.endswith("return=-1 error=ESHUTDOWN")
        assert "aborting sleep because of server shut down" in srv.stderr
        assert "Traceback" not in srv.stderr
    finally:
        c.abort()


def test_client_hangup_ends_a_delay(pynbd_server: Callable[..., Server],
                                    tmp_path: Path) -> None:
    """A client that drops its connection while its read waits: the wait ends at once,
    and the server serves the next client."""
    log = tmp_path / "log"
    srv = pynbd_server("--filter=log", "--filter=delay", "memory", "1M", f"logfile={log}",
                       "rdelay=60")
    c = connect(srv)
    c.send(READ, 0, 512, into=memoryview(bytearray(512)))
    wait_for_line(log, "Read id=1 offset=0x0 count=0x200 ...")
    t = time.monotonic()
    c.abort()
    c.sock.close()
    leave = wait_for_line(log, "...Read id=1", timeout=5)
    assert time.monotonic() - t < 3
    assert leave.endswith("return=-1 error=ESHUTDOWN")
    wait_for_line(log, "connection=1 Disconnect transactions=1")
    c2 = connect(srv)
    try:
        c2.pwrite(b"b" * 512, 0)
    finally:
        c2.close()
    assert "aborting sleep because of connection close or error" in srv.stderr
    assert "Traceback" not in srv.stderr


def test_delay_open(pynbd_server: Callable[..., Server]) -> None:
    srv = pynbd_server("--filter=delay", "memory", "1M", "delay-open=400ms")
    t = time.monotonic()
    c = connect(srv)
    try:
        assert time.monotonic() - t >= 0.39
        read(c)
    finally:
        c.close()


def test_a_broken_connection_is_not_left_waiting(pynbd_server: Callable[..., Server]) -> None:
    """delay-close holds only polite clients; a client gone before its reply arrives
    simply finds the connection closed."""
    srv = pynbd_server("--filter=delay", "memory", "1M", "rdelay=200ms", "delay-close=1")
    c = connect(srv)
    c.abort()
    with pytest.raises(ServerGone):
        read(c)
    c2 = connect(srv)
    try:
        assert read(c2) == bytes(512)
    finally:
        c2.close()
