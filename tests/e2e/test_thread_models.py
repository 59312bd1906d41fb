"""Thread models: how many plugin calls run at once (nbdkit's four models, DESIGN.md).

The e2e plugin (blocking, so it runs in worker threads) sleeps in every pread and records the
most preads it saw running at once, and the most connections open at once, in a stats file.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rawclient import RawClient

from pynbd.protocol import options as O
from pynbd.protocol.constants import Cmd, Opt, Rep, TxFlag

SLEEP = 0.1  # seconds each pread sleeps: long enough for requests to overlap if allowed


def stats(path: Path) -> tuple[int, int]:
    a, b = path.read_text().split()
    return int(a), int(b)


def start(serve, tmp_path: Path, model: str, *options: str) -> tuple[object, Path]:
    f = tmp_path / "stats"
    srv = serve(*options, blocking=True, thread_model=model,
                params=[f"stats={f}", f"sleep={SLEEP}"])
    return srv, f


def pipelined_reads(clients: list[RawClient], n: int) -> None:
    """Send n reads on each client at once, then wait for every reply."""
    sent = []
    for c in clients:
        batch = b""
        for i in range(n):
            _cookie, data = c.request(Cmd.READ, i * 4096, 4096, send=False)
            batch += data
        sent.append(batch)
    for c, batch in zip(clients, sent):
        c.send(batch)
    for c in clients:
        for _ in range(n):
            r = c.read_reply()
            assert r.error == 0 and r.data == bytes(4096)


def connect(srv) -> RawClient:
    c = RawClient(srv.sock)
    c.negotiate()
    return c


def test_parallel_runs_requests_concurrently(serve, tmp_path):
    srv, f = start(serve, tmp_path, "PARALLEL", "-t", "4")
    with connect(srv) as c:
        assert c.eflags & TxFlag.CAN_MULTI_CONN
        pipelined_reads([c], 6)
    most, _ = stats(f)
    assert 1 < most <= 4  # -t 4: at most 4 worker threads per connection


def test_serialize_requests_one_at_a_time_per_connection(serve, tmp_path):
    srv, f = start(serve, tmp_path, "SERIALIZE_REQUESTS", "-t", "4")
    with connect(srv) as c:
        pipelined_reads([c], 4)
    assert stats(f)[0] == 1
    # ... but two connections may run at the same time
    a, b = connect(srv), connect(srv)
    try:
        pipelined_reads([a, b], 3)
    finally:
        a.close()
        b.close()
    assert stats(f)[0] == 2


def test_serialize_all_requests_one_at_a_time_overall(serve, tmp_path):
    srv, f = start(serve, tmp_path, "SERIALIZE_ALL_REQUESTS", "-t", "4")
    a, b = connect(srv), connect(srv)
    try:
        pipelined_reads([a, b], 3)
    finally:
        a.close()
        b.close()
    most, conns = stats(f)
    assert most == 1 and conns == 2


@pytest.mark.parametrize("model", ["PARALLEL", "SERIALIZE_ALL_REQUESTS", "SERIALIZE_REQUESTS"])
def test_one_thread_serializes(serve, tmp_path, model):
    srv, f = start(serve, tmp_path, model, "-t", "1")
    with connect(srv) as c:
        pipelined_reads([c], 3)
    assert stats(f)[0] == 1


def test_serialize_connections_second_client_waits(serve, tmp_path):
    srv, f = start(serve, tmp_path, "SERIALIZE_CONNECTIONS")
    first = connect(srv)
    assert not first.eflags & TxFlag.CAN_MULTI_CONN
    second = RawClient(srv.sock)
    second.start()
    second.send_option(Opt.GO, O.build_info_request(""))
    second.expect_silence(0.5)  # waits for the first connection to end
    assert first.pread(0, 512) == bytes(512)
    t0 = time.monotonic()
    first.disconnect()
    first.close()
    reply = second.read_option_reply()
    while reply.rep != Rep.ACK:
        assert reply.rep == Rep.INFO
        reply = second.read_option_reply()
    assert time.monotonic() - t0 < 3
    second.enter_transmission()
    assert second.pread(0, 512) == bytes(512)
    second.close()
    assert stats(f)[1] == 1  # never two connections open in the plugin
