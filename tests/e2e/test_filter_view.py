"""The view filter's event stream, from a real server process: every request once, in order
per connection, under load; a viewer that stops reading never holds the disk up (it misses
events, counted); a viewer that connects late learns the exports and their allocation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from view_helpers import Subscriber, pipelined, wait_until

from pynbd.client.blocking import BlockingConnection
from pynbd.filters._view_publish import RECORD
from tests.helpers import PYNBD, Server

WRITE, TRIM, ZERO, READ = 1, 4, 6, 0
KIND = {READ: "R", WRITE: "W", TRIM: "T", ZERO: "Z"}


def _serve(pynbd_server: Callable[..., Server], sockdir: Path, *params: str,
           size: str = "4M", plugin: str = "memory") -> tuple[Server, str]:
    """A server with the view filter over a memory disk, or over a file (``plugin="file"``:
    requests then run in worker threads, several at once)."""
    vsock = str(sockdir / "view.sock")
    if plugin == "file":
        disk = sockdir / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(4 << 20)
        args = ["file", str(disk)]
    else:
        args = ["memory", size]
    srv = pynbd_server("--filter=view", *args, f"view-socket={vsock}", *params)
    return srv, vsock


def _connect(srv: Server) -> BlockingConnection:
    assert srv.sock is not None
    return BlockingConnection.connect(unix=srv.sock)


def _requests(conn_no: int, n: int) -> list[tuple[int, int, int, bytes | None]]:
    """A connection's own mix of requests, each at a distinct place."""
    out: list[tuple[int, int, int, bytes | None]] = []
    for i in range(n):
        cmd = (WRITE, READ, TRIM, ZERO)[i % 4]
        offset = ((conn_no * n + i) % 1000) * 4096
        count = 4096 * (1 + i % 3)
        out.append((cmd, offset, count, b"x" * count if cmd == WRITE else None))
    return out


@pytest.mark.parametrize(("plugin", "binary"), [("memory", False), ("file", False),
                                               ("memory", True), ("file", True),
                                               ("memory", "ns"), ("file", "ns")])
def test_every_request_once_in_order_under_load(pynbd_server: Callable[..., Server],
                                                sockdir: Path, plugin: str,
                                                binary: bool | str) -> None:
    """Every request once, in order per connection, in each format of the records
    (base64 lines; binary; binary in nanoseconds, as ``pynbd view`` asks for them)."""
    srv, vsock = _serve(pynbd_server, sockdir, plugin=plugin)
    sub = Subscriber(vsock, binary=binary)
    sub.wait_hello()
    n, conns = 400, 4
    sent: dict[int, list[tuple[str, int, int]]] = {}
    conn_ids: list[int] = []

    def client(k: int) -> None:
        c = _connect(srv)
        reqs = _requests(k, n)
        # one at a time: completion order is then the order they were sent
        for cmd, offset, count, payload in reqs:
            pipelined(c, [(cmd, offset, count, payload)], depth=1)
        sent[k] = [(KIND[cmd], off, cnt) for cmd, off, cnt, _ in reqs]
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_until(lambda: len(sub.of_type("close")) == conns, "every connection's close")
    assert not sub.of_type("dropped")
    opens = sub.of_type("open")
    assert len(opens) == conns and all(o["size"] == 4 << 20 for o in opens)
    conn_ids = [o["conn"] for o in opens]
    by_conn: dict[int, list[tuple[str, int, int]]] = {c: [] for c in conn_ids}
    if binary:  # (the first batch may go before the request was read)
        assert any("raw" in m for m in sub.of_type("events"))
    for ev in sub.events():
        kind, offset, length, _flags, err, t_us, dur_us, conn = ev
        assert err == 0 and t_us > 0 and dur_us >= 0
        if kind != "F":  # the client's flush at close, if any
            by_conn[conn].append((kind, offset, length))
    # Each connection's requests, each once, in the order sent (which client is which
    # connection number is the server's business: match them up by content).
    assert sorted(map(tuple, by_conn.values())) == sorted(map(tuple, sent.values()))
    sub.close()


def test_every_request_once_with_many_in_flight(pynbd_server: Callable[..., Server],
                                                sockdir: Path) -> None:
    """Requests in flight at once, in worker threads: each appears exactly once (their
    order is the order they completed, which the client does not fix)."""
    srv, vsock = _serve(pynbd_server, sockdir, plugin="file")
    sub = Subscriber(vsock)
    sub.wait_hello()
    reqs = _requests(0, 2000)
    c = _connect(srv)
    pipelined(c, reqs, depth=32)
    c.close()
    wait_until(lambda: bool(sub.of_type("close")), "the close message")
    got = sorted((k, o, n) for k, o, n, *_ in sub.events() if k != "F")
    assert got == sorted((KIND[cmd], off, cnt) for cmd, off, cnt, _ in reqs)
    sub.close()


def test_stalled_viewer_never_holds_the_disk(pynbd_server: Callable[..., Server],
                                             sockdir: Path) -> None:
    srv, vsock = _serve(pynbd_server, sockdir, "view-backlog=16K")
    stalled = Subscriber(vsock, read=False, rcvbuf=4096)
    stalled.wait_hello()
    live = Subscriber(vsock)
    live.wait_hello()
    total = 12000
    c = _connect(srv)
    # Far more events than the stalled viewer's socket buffers and backlog can hold:
    # the requests all complete although it reads nothing. In rounds, with pauses longer
    # than a batch interval: several batches, even if a busy machine delays the publisher
    # (a batch is always taken when nothing waits: one batch of everything drops nothing).
    rounds = 4
    for r in range(rounds):
        pipelined(c, [(TRIM, (i % 1024) * 4096, 4096, None)
                      for i in range(r * total // rounds, (r + 1) * total // rounds)], depth=64)
        time.sleep(0.2)
    c.close()
    wait_until(lambda: bool(live.of_type("close")), "the live viewer's close message")
    assert len([e for e in live.events() if e[0] == "T"]) == total
    assert not live.of_type("dropped")
    stalled.reading.set()  # now it reads: what it missed is counted, never silently lost
    srv.stop()
    wait_until(stalled.ended.is_set, "the stalled viewer's end of stream")
    dropped = sum(m["count"] for m in stalled.of_type("dropped"))
    seen = len([e for e in stalled.events() if e[0] == "T"])
    assert dropped > 0
    assert seen + dropped >= total  # dropped counts every missed event (opens, flushes too)
    assert seen < total


def test_late_viewer_gets_the_state(pynbd_server: Callable[..., Server],
                                    sockdir: Path) -> None:
    srv, vsock = _serve(pynbd_server, sockdir, size="1M")
    c = _connect(srv)
    c.pwrite(b"\1" * 65536, 0)
    c.pwrite(b"\2" * 4096, 512 * 1024)
    sub = Subscriber(vsock)  # connects after the writes, the client still connected
    hello = sub.wait_hello()
    assert hello["exports"] == {"": 1 << 20} and hello["protocol"] == 1
    c.pread_into(memoryview(bytearray(512)), 0)  # the next request publishes the state
    wait_until(lambda: bool(sub.of_type("state")), "the state message")
    state = sub.of_type("state")[0]
    assert state["size"] == 1 << 20
    exts = state["extents"]
    assert exts[0][0] == 0 and sum(e[1] for e in exts) == 1 << 20

    def typ(offset: int) -> int:
        return next(t for o, n, t in exts if o <= offset < o + n)

    assert typ(0) == 0 and typ(65535) == 0 and typ(512 * 1024) == 0
    assert typ(256 * 1024) & 1 and typ((1 << 20) - 1) & 1
    wait_until(lambda: bool(sub.events()), "the read's event")
    assert sub.events()[0][:3] == ["R", 0, 512]
    c.close()
    sub.close()


def test_a_viewer_that_leaves_changes_nothing(pynbd_server: Callable[..., Server],
                                              sockdir: Path) -> None:
    srv, vsock = _serve(pynbd_server, sockdir, size="1M")
    for _ in range(3):
        sub = Subscriber(vsock)
        sub.wait_hello()
        sub.close()
    c = _connect(srv)
    c.pwrite(b"z" * 4096, 4096)
    buf = bytearray(4096)
    c.pread_into(memoryview(buf), 4096)
    assert buf == b"z" * 4096
    c.close()


def test_tcp_loopback_address(pynbd_server: Callable[..., Server], sockdir: Path) -> None:
    from tests.helpers import free_tcp_port

    port = free_tcp_port()
    srv = pynbd_server("--filter=view", "memory", "1M", f"view-address=127.0.0.1:{port}")
    import json
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        hello = json.loads(s.makefile("rb").readline())
    assert hello["type"] == "hello"
    srv.stop()


@pytest.mark.parametrize(("params", "message"), [
    ([], "view: view-socket=PATH or view-address=HOST:PORT is required"),
    (["view-address=8.8.8.8:1234"], "view-address: 8.8.8.8 is not a loopback address"),
    (["view-address=localhost"], "view-address: expected HOST:PORT, got 'localhost'"),
    (["view-address=127.0.0.1:99999"], "view-address: expected HOST:PORT"),
    (["view-socket="], "view-socket: the path must not be empty"),
    (["view-socket=/nonexistent-dir/v.sock"], "view-socket: /nonexistent-dir/v.sock:"),
    (["view-socket=/tmp/x.sock", "view-backlog=1K"], "view-backlog: 1K is too small"),
])
def test_bad_parameters(params: list[str], message: str) -> None:
    r = subprocess.run([*PYNBD, "serve", "-f", "-U", "/nonexistent-dir/n.sock",
                        "--filter=view", "memory", "1M", *params],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_records_carry_flags_and_connection(pynbd_server: Callable[..., Server],
                                            sockdir: Path) -> None:
    """Writes and reads with and without flags: each record's fields as sent (the hot path
    packs a header made once per connection when a request has no flags)."""
    srv, vsock = _serve(pynbd_server, sockdir, size="1M")
    sub = Subscriber(vsock)
    sub.wait_hello()
    c = _connect(srv)
    c.pwrite(b"a" * 4096, 0)
    c.pwrite(b"b" * 8192, 8192, flags=1)  # NBD_CMD_FLAG_FUA: the filter sees FUA (2)
    buf = bytearray(4096)
    c.pread_into(memoryview(buf), 8192)
    c.pread_into(memoryview(buf), 0, flags=4)  # NBD_CMD_FLAG_DF: no flag for a read
    c.close()
    wait_until(lambda: bool(sub.of_type("close")), "the connection's close")
    conn = sub.of_type("open")[0]["conn"]
    evs = [e for e in sub.events() if e[0] != "F"]
    assert [(k, o, n, f, err, cn) for k, o, n, f, err, _t, _d, cn in evs] == [
        ("W", 0, 4096, 0, 0, conn), ("W", 8192, 8192, 2, 0, conn),
        ("R", 8192, 4096, 0, 0, conn), ("R", 0, 4096, 0, 0, conn)]
    sub.close()


def test_times_in_each_format(pynbd_server: Callable[..., Server], sockdir: Path) -> None:
    """Three viewers at once (base64, binary, binary in nanoseconds): the same records,
    the nanosecond viewer's times and durations those of the others times 1000 (floor),
    and the time is the time of day."""
    srv, vsock = _serve(pynbd_server, sockdir, size="1M")
    subs = [Subscriber(vsock), Subscriber(vsock, binary=True), Subscriber(vsock, binary="ns")]
    for s in subs:
        s.wait_hello()
    time.sleep(0.3)  # each request read before the first batch
    before = time.time_ns()
    c = _connect(srv)
    for i in range(50):
        c.pwrite(b"x" * 4096, i * 4096)
    c.close()
    after = time.time_ns()
    for s in subs:
        wait_until(lambda s=s: bool(s.of_type("close")), "the connection's close")
    us = [[e for e in s.events() if e[0] == "W"] for s in subs]
    assert len(us[0]) == 50 and us[0] == us[1] == us[2]
    ns = [r for m in subs[2].of_type("events")
          for r in RECORD.iter_unpack(m["raw"]) if r[0] == ord("W")]
    assert all(m.get("time") == "ns" for m in subs[2].of_type("events"))
    assert [(t // 1000, d // 1000) for *_, t, d in ns] == [(e[5], e[6]) for e in us[0]]
    assert all(before <= t <= after and 0 <= d <= after - before for *_, t, d in ns)
    for s in subs:
        s.close()
