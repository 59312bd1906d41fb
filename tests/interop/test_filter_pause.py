"""The pause filter side by side with nbdkit's: the control socket protocol (p, r, answers in
upper case, X for the unknown, blanks ignored), requests held while paused and released by
r, requests in flight finished before P, flush never held."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server, run_libnbd

_READ_THEN_FLUSH = r'''
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.monotonic(); h.flush(); t1 = time.monotonic(); h.pread(512, 0); t2 = time.monotonic()
print(t1 - t, t2 - t1)
h.shutdown()
'''


class Control:
    """A client of the control socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def command(self, data: bytes, answers: int) -> bytes:
        self.sock.sendall(data)
        out = b""
        while len(out) < answers:
            chunk = self.sock.recv(16)
            assert chunk, "the control socket closed"
            out += chunk
        return out

    def silent_for(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(16) == b""
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["pynbd", "nbdkit"])
def serve(request: pytest.FixtureRequest, pynbd_server: Callable[..., Server],
          nbdkit_server: Callable[..., Server]) -> Callable[..., Server]:
    """Each test runs under pynbd and under nbdkit."""
    return pynbd_server if request.param == "pynbd" else nbdkit_server


def test_control_protocol(serve: Callable[..., Server], tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    serve("--filter=pause", "memory", "1M", f"pause-control={ctl}")
    c = Control(ctl)
    try:
        assert c.command(b"p", 1) == b"P"
        assert c.command(b"p", 1) == b"P"  # already paused: answered at once
        assert c.command(b"r", 1) == b"R"
        assert c.command(b"r", 1) == b"R"
        assert c.command(b"x", 1) == b"X"
        assert c.command(b"P", 1) == b"X"  # commands are lower case
        c.sock.sendall(b" \n\t")
        assert c.silent_for(0.2)
        assert c.command(b"pr?", 3) == b"PRX"
    finally:
        c.close()
    c = Control(ctl)  # a second client, once the first is gone
    try:
        assert c.command(b"r", 1) == b"R"
    finally:
        c.close()


def test_requests_wait_while_paused(serve: Callable[..., Server], tmp_path: Path) -> None:
    """A read sent while paused completes only after r; a flush is never held."""
    ctl = tmp_path / "ctl"
    srv = serve("--filter=pause", "memory", "1M", f"pause-control={ctl}")
    c = Control(ctl)
    try:
        assert c.command(b"p", 1) == b"P"
        result: list[str] = []
        client = threading.Thread(
            target=lambda: result.append(run_libnbd(_READ_THEN_FLUSH, srv.uri).stdout))
        client.start()
        client.join(1.0)
        assert client.is_alive(), "a read went through while paused"
        t = time.monotonic()
        assert c.command(b"r", 1) == b"R"
        client.join(10)
        assert not client.is_alive() and time.monotonic() - t < 2  # released at once
        flush, _ = map(float, result[0].split())
        assert flush < 0.5  # not held
    finally:
        c.close()


def test_pause_waits_for_requests_in_flight(serve: Callable[..., Server],
                                            tmp_path: Path) -> None:
    """P is answered only once a read already past the pause filter is done (the delay
    filter below it holds the read 1 s; the log filter between them says when it passed)."""
    ctl, log = tmp_path / "ctl", tmp_path / "log"
    srv = serve("--filter=pause", "--filter=log", "--filter=delay", "memory", "1M",
                f"pause-control={ctl}", f"logfile={log}", "rdelay=1")
    client = threading.Thread(target=run_libnbd, args=(_READ_THEN_FLUSH, srv.uri))
    client.start()
    c = Control(ctl)
    try:
        deadline = time.monotonic() + 10
        while "Read id=2" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the read never started"
            time.sleep(0.01)
        assert c.command(b"p", 1) == b"P"
        assert "...Read id=2 return=0" in log.read_text()
        assert c.command(b"r", 1) == b"R"
    finally:
        c.close()
        client.join(10)


def test_socket_replaced_at_start_removed_at_exit(serve: Callable[..., Server],
                                                  tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.write_text("stale")
    srv = serve("--filter=pause", "null", f"pause-control={ctl}")
    assert ctl.is_socket()
    srv.stop()
    assert not ctl.exists()
