"""The server's bounds hold under abuse (docs/limits.md), measured from /proc.

Raw sockets against a real ``pynbd serve``: a client that pipelines READs and never reads
the replies, idle connections by the thousand, a WRITE header that declares 64 MiB and
sends nothing, endless option rounds. Each test resets the server's peak resident memory
(VmHWM), attacks, waits until the server is idle (it stopped reading: the attack is held
off, not served), checks the peak against the documented bound, then — where there is
something to read — reads every reply and checks it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import short_tmpdir
from memwatch import MiB, Sender, open_fds, peak, reset_peak, rss, wait_idle, wait_until
from rawclient import Hangup, RawClient

from pynbd.limits import (
    MAX_BYTES_IN_FLIGHT,
    MAX_OPTION_ROUNDS,
    MAX_OPTION_ROUNDS_PER_EXPORT,
)
from pynbd.protocol import options as O
from pynbd.protocol.constants import IHAVEOPT, OPT_HEADER, Cmd, Opt, Rep
from pynbd.protocol.transmission import build_request
from pynbd.server.backend import Chain
from pynbd.server.server import Server, ServerConfig, bind_unix
from pynbd.server.transmission import RECV_WINDOW

PLUGIN = str(Path(__file__).parent / "plugins" / "e2eplug.py")
_SIMPLE = struct.Struct(">IIQ")
#: What a server may hold beyond its counted bytes: the receive buffer's window, Python's
#: objects and the allocator's rounding (measured: 1-3 MiB).
SLACK = RECV_WINDOW + 16 * MiB


def reads(n: int, length: int, span: int, first_cookie: int = 1) -> bytes:
    """``n`` READ requests of ``length`` bytes, cookie i+first at offset (i*length) % span."""
    return b"".join(build_request(Cmd.READ, first_cookie + i, (i * length) % span, length)
                    for i in range(n))


def drain_simple(sock: socket.socket, n: int, length: int,
                 expect: Callable[[int], bytes]) -> None:
    """Read ``n`` simple replies with ``length`` bytes each; each must be ``expect(cookie)``."""
    f = sock.makefile("rb", buffering=1 << 20)
    assert isinstance(f, io.BufferedReader)
    buf = bytearray(length)
    seen = set()
    for _ in range(n):
        magic, err, cookie = _SIMPLE.unpack(f.read(16))
        assert magic == 0x67446698 and err == 0, f"cookie {cookie}: error {err}"
        assert f.readinto(buf) == length
        assert buf == expect(cookie), f"cookie {cookie}: wrong data"
        seen.add(cookie)
    assert len(seen) == n


def block(i: int) -> bytes:
    """The 1 MiB block ``i`` of the images these tests read: its number, over and over."""
    return struct.pack(">I", i) * (MiB // 4)


def assert_quiet_log(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "error" not in stderr.lower(), stderr


def test_unread_4k_reads_stay_under_the_connection_bound(serve):
    """100,000 pipelined 4 KiB READs whose replies are not read: the server stops reading
    at MAX_BYTES_IN_FLIGHT (it held 420 MB before), then answers every one correctly."""
    srv = serve(size="8M")
    c = RawClient(srv.sock, timeout=30)
    c.negotiate()
    for i in range(4):
        c.pwrite(i * MiB, block(i))
    wait_idle(srv.pid)
    reset_peak(srv.pid)
    base = rss(srv.pid)
    n = 100_000
    sender = Sender(c.sock, reads(n, 4096, 4 * MiB))
    wait_idle(srv.pid)
    held = peak(srv.pid) - base
    assert sender.is_alive(), "the server read every request: no back pressure"
    assert held <= MAX_BYTES_IN_FLIGHT + SLACK, f"server grew by {held / MiB:.0f} MiB"
    assert held >= MAX_BYTES_IN_FLIGHT // 2, f"only {held / MiB:.0f} MiB: was it stopped early?"

    def expect(cookie: int) -> bytes:
        off = ((cookie - 1) * 4096) % (4 * MiB)
        return block(off // MiB)[:4096]

    drain_simple(c.sock, n, 4096, expect)
    sender.finish()
    assert peak(srv.pid) - base <= MAX_BYTES_IN_FLIGHT + SLACK
    c.close()
    assert_quiet_log(srv.stderr)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 32 MiB file whose block i holds the number i."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.writelines(block(i) for i in range(32))
    return p


def test_unread_1m_reads_file_plugin_bounded_then_all_correct(pynbd_server, image):
    """2,500 x 1 MiB READs (70 KB of requests) against the file plugin, replies unread:
    bounded (it took 2.6 GB before); then the client drains and every reply is correct
    (none is EIO)."""
    srv = pynbd_server("file", image)
    c = RawClient(srv.sock, timeout=30)
    c.negotiate()
    wait_idle(srv.pid)
    reset_peak(srv.pid)
    base = rss(srv.pid)
    n = 2500
    sender = Sender(c.sock, reads(n, MiB, 32 * MiB))
    wait_idle(srv.pid)
    held = peak(srv.pid) - base
    assert held <= MAX_BYTES_IN_FLIGHT + MiB + SLACK, f"server grew by {held / MiB:.0f} MiB"
    drain_simple(c.sock, n, MiB, lambda cookie: block((cookie - 1) % 32))
    sender.finish()
    assert peak(srv.pid) - base <= MAX_BYTES_IN_FLIGHT + MiB + SLACK
    c.close()
    assert_quiet_log(srv.stderr)


def test_unread_reads_in_worker_threads_bounded(serve):
    """The same through worker threads (a blocking plugin): what the threads hold counts."""
    srv = serve("-t", "4", size="8M", blocking=True)
    c = RawClient(srv.sock, timeout=30)
    c.negotiate()
    for i in range(8):
        c.pwrite(i * MiB, block(i))
    wait_idle(srv.pid)
    reset_peak(srv.pid)
    base = rss(srv.pid)
    n = 600
    sender = Sender(c.sock, reads(n, MiB, 8 * MiB))
    wait_idle(srv.pid)
    held = peak(srv.pid) - base
    # + the plugin's own copies in its 4 threads (a slice, then bytes of it)
    assert held <= MAX_BYTES_IN_FLIGHT + 9 * MiB + SLACK, f"server grew by {held / MiB:.0f} MiB"
    drain_simple(c.sock, n, MiB, lambda cookie: block((cookie - 1) % 8))
    sender.finish()
    c.close()
    assert_quiet_log(srv.stderr)


@pytest.mark.parametrize("blocking", [False, True], ids=["loop", "threads"])
def test_mixed_pipeline_past_the_bound_loses_nothing(serve, blocking):
    """READs and WRITEs of every size (inline, large, split across reads), pipelined far
    past the bound before the client reads a byte: the server stops and goes on as the
    client reads, and every request is answered right and every write is there. READs
    read the last 8 MiB, WRITEs go one after another before it (worker threads may reorder
    requests, so none overlaps another)."""
    import random

    srv = serve(size="112M", blocking=blocking)
    c = RawClient(srv.sock, timeout=30)
    c.negotiate()
    for i in range(8):
        c.pwrite((104 + i) * MiB, block(104 + i))
    rng = random.Random(10)
    stream, expect, written, woff = [], {}, [], 0
    for cookie in range(1, 301):
        length = rng.choice([4096, 65536, 512 * 1024, MiB, 3 * MiB])
        if rng.random() < 0.7:
            off = rng.randrange(104 * MiB, 112 * MiB - length + 1, 4096)
            stream.append(build_request(Cmd.READ, cookie, off, length))
            expect[cookie] = (off, length)
        else:
            data = struct.pack(">I", cookie) * (length // 4)
            stream.append(build_request(Cmd.WRITE, cookie, woff, length) + data)
            expect[cookie] = None
            written.append((woff, data))
            woff += length
    assert woff <= 104 * MiB
    sender = Sender(c.sock, b"".join(stream))
    wait_idle(srv.pid)
    assert sender.is_alive(), "expected the server to stop reading"
    source = b"".join(block(104 + i) for i in range(8))
    f = c.sock.makefile("rb", buffering=1 << 20)
    for _ in range(len(expect)):
        magic, err, cookie = _SIMPLE.unpack(f.read(16))
        assert magic == 0x67446698 and err == 0, f"cookie {cookie}: error {err}"
        want = expect.pop(cookie)
        if want is not None:
            off, length = want
            assert f.read(length) == source[off - 104 * MiB:off - 104 * MiB + length], cookie
    sender.finish()
    for off, data in written:
        assert c.pread(off, len(data)) == data, f"the write at {off} is not there"
    c.close()
    assert_quiet_log(srv.stderr)


@pytest.mark.parametrize("blocking", [False, True], ids=["loop", "threads"])
def test_requests_received_before_the_bound_are_served_after_it(serve, blocking):
    """Everything is sent at once — a 512 KiB WRITE that arrives in two reads, then 100
    READs of 1 MiB — and nothing more comes: the server stops at its bound with READs
    still in its buffer, and must serve them from there when the client reads (no
    further bytes arrive to wake it)."""
    srv = serve(size="8M", blocking=blocking)
    c = RawClient(srv.sock, timeout=10)
    c.negotiate()
    for i in range(4):
        c.pwrite(i * MiB, block(i))
    payload = b"w" * (512 * 1024)
    c.send(build_request(Cmd.WRITE, 1000, 4 * MiB, len(payload)) + payload
           + reads(100, MiB, 4 * MiB))
    wait_idle(srv.pid)
    f = c.sock.makefile("rb", buffering=1 << 20)
    got = set()
    for _ in range(101):
        magic, err, cookie = _SIMPLE.unpack(f.read(16))
        assert magic == 0x67446698 and err == 0, cookie
        if cookie != 1000:
            assert f.read(MiB) == block((cookie - 1) % 4), cookie
        got.add(cookie)
    assert got == {1000, *range(1, 101)}
    assert c.pread(4 * MiB, 4096) == payload[:4096]
    c.close()


@pytest.mark.parametrize("blocking", [False, True], ids=["loop", "threads"])
def test_idle_connections_are_cheap_and_given_back(serve, blocking):
    """1,000 idle connections, half negotiating and half in transmission, cost megabytes
    (2 GB before: a receive buffer each), and the memory goes back when they close."""
    srv = serve(size="1M", blocking=blocking)
    with RawClient(srv.sock) as c:  # the first connection's one-off costs (imports...)
        c.negotiate()
        c.pread(0, 4096)
    wait_idle(srv.pid)
    fds0 = open_fds(srv.pid)
    base = rss(srv.pid)
    clients = []
    try:
        for i in range(1000):
            c = RawClient(srv.sock, timeout=30)
            clients.append(c)
            if i % 2:
                c.negotiate()
            else:
                c.greeting()
        wait_until(lambda: open_fds(srv.pid) >= fds0 + 1000, what="1000 connections")
        wait_idle(srv.pid)
        grown = rss(srv.pid) - base
        assert grown <= 64 * MiB, f"1000 idle connections cost {grown / MiB:.0f} MiB"
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: open_fds(srv.pid) <= fds0, what="the server to close them")
    wait_idle(srv.pid)
    left = rss(srv.pid) - base
    assert left <= 24 * MiB, f"{left / MiB:.0f} MiB kept after the connections closed"
    with RawClient(srv.sock) as c:  # and it still serves
        c.negotiate()
        assert c.pread(0, 4096) == bytes(4096)


def test_receive_buffers_are_given_back_on_close(serve):
    """Connections that used their receive buffers (a 1 MiB write each lands in it) hold
    that memory while open, and give all of it back to the system when they close."""
    srv = serve(size="1M")
    with RawClient(srv.sock) as c:
        c.negotiate()
        c.pwrite(0, block(0))
    wait_idle(srv.pid)
    fds0 = open_fds(srv.pid)
    base = rss(srv.pid)
    clients = []
    try:
        for _ in range(150):
            c = RawClient(srv.sock, timeout=30)
            clients.append(c)
            c.negotiate()
            c.pwrite(0, block(1))
        wait_idle(srv.pid)
        grown = rss(srv.pid) - base
        assert grown >= 100 * MiB, f"150 used buffers: only {grown / MiB:.0f} MiB?"
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: open_fds(srv.pid) <= fds0, what="the server to close them")
    wait_idle(srv.pid)
    left = rss(srv.pid) - base
    assert left <= 24 * MiB, f"{left / MiB:.0f} MiB of {grown / MiB:.0f} kept after close"


def test_write_header_declaring_64m_allocates_nothing_up_front(serve):
    """A WRITE header declaring 64 MiB, then a trickle: memory grows with the bytes that
    arrive, not with the declaration (8 such connections took 528 MiB before). The
    payload, once complete, is written."""
    srv = serve(size="64M")
    wait_idle(srv.pid)
    reset_peak(srv.pid)
    base = rss(srv.pid)
    clients = []
    for _ in range(8):
        c = RawClient(srv.sock, timeout=30)
        c.negotiate()
        c.send(build_request(Cmd.WRITE, 1, 0, 64 * MiB) + b"x" * 4096)
        clients.append(c)
    wait_idle(srv.pid)
    held = peak(srv.pid) - base
    assert held <= 8 * MiB, f"8 declared 64 MiB writes took {held / MiB:.0f} MiB"
    # One of them completes: its 64 MiB arrive and are written; the others give up.
    c = clients.pop()
    c.send(b"x" * (64 * MiB - 4096))
    r = c.read_reply()
    assert r.cookie == 1 and r.error == 0
    for off in (0, 32 * MiB, 64 * MiB - 4096):
        assert c.pread(off, 4096) == b"x" * 4096
    for other in clients:
        other.close()
    c.close()
    assert_quiet_log(srv.stderr)


@pytest.mark.parametrize(("exports", "listed"), [(None, 1), ("a,b,c", 3)])
def test_list_raises_the_option_cap_once(serve, exports, listed):
    """LIST raises the option-round cap once per connection, by 32 per export listed
    (as nbdkit: 10,000 LIST rounds are not all answered; nbdkit hangs up after 64)."""
    srv = serve(params=[f"exports={exports}"] if exports else None)
    cap = MAX_OPTION_ROUNDS + MAX_OPTION_ROUNDS_PER_EXPORT * listed
    with RawClient(srv.sock) as c:
        c.start()
        # Pipelined, as an attacker would: 10,000 LIST options in one write.
        sender = Sender(c.sock, OPT_HEADER.pack(IHAVEOPT, Opt.LIST, 0) * 10_000)
        answered = 0
        while True:
            try:
                r = c.read_option_reply()
            except Hangup:
                break
            if r.rep == Rep.ACK:
                answered += 1
        assert answered == cap
        sender.join(10)  # it may end with EPIPE: the server hung up on the rest
    assert "without selecting an export" in srv.stderr


def test_list_then_info_every_export(serve):
    """What the raised cap is for: INFO on every listed export, 32 times each."""
    srv = serve(params=["exports=a,b"])
    with RawClient(srv.sock) as c:
        c.start()
        names = [O.parse_rep_server(r.data)[0] for r in c.option(Opt.LIST)[:-1]]
        assert names == ["a", "b"]
        for _ in range(MAX_OPTION_ROUNDS + MAX_OPTION_ROUNDS_PER_EXPORT * 2 - 2):
            assert c.go(names[_ % 2], opt=Opt.INFO)[-1].rep == Rep.ACK
        assert c.go("a")[-1].rep == Rep.ACK
        assert c.pread(0, 512) == bytes(512)


# ---- the server-wide budget, in this process (it is a ServerConfig setting) ---------------

class _ServerThread:
    def __init__(self, config: ServerConfig, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        monkeypatch.setenv("E2E_NONBLOCKING", "1")
        monkeypatch.setenv("E2E_THREAD_MODEL", "PARALLEL")
        spec = importlib.util.spec_from_file_location("e2eplug_limits", PLUGIN)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        plugin = mod.E2EPlugin()
        plugin.config("size", "8M")
        plugin.get_ready()
        for i in range(8):
            plugin.data[i * MiB:(i + 1) * MiB] = block(i)
        self.server = Server(Chain(plugin), config)
        self.listener = bind_unix(path)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="limits-server")
        self.thread.start()
        wait_until(lambda: self.loop is not None, what="the server's loop")

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve([self.listener])

        asyncio.run(main())

    def call(self, fn: Callable[[], object]) -> object:
        assert self.loop is not None
        done = threading.Event()
        box: list[object] = []

        def run() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10)
        return box[0]

    def stop(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(30)
        self.listener.close()
        assert not self.thread.is_alive()


@pytest.fixture
def budget_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_ServerThread]:
    d = short_tmpdir("pynbd-limits-")
    st = _ServerThread(ServerConfig(max_bytes_in_flight=32 * MiB,
                                    max_server_bytes_in_flight=64 * MiB),
                       str(d / "s.sock"), monkeypatch)
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_server_budget_bounds_all_connections_together(budget_server):
    """Six greedy connections, each allowed 32 MiB, share a 64 MiB server budget: together
    they hold 64 MiB (plus one request), not 192. When their clients read, every reply
    arrives, and the budget is all given back."""
    st = budget_server
    me = os.getpid()
    n, conns = 150, []
    for _ in range(6):
        c = RawClient(st.path, timeout=30)
        c.negotiate()
        conns.append(c)
    wait_idle(me, quiet=0.3)
    reset_peak(me)
    base = rss(me)
    senders = [Sender(c.sock, reads(n, MiB, 8 * MiB)) for c in conns]
    for s in senders:
        s.finish()
    wait_idle(me, quiet=0.5)
    budget = st.server.budget
    used, waiting = st.call(lambda: (budget.used, budget.waiting))  # type: ignore[misc]
    assert used <= 64 * MiB + 2 * MiB, used
    assert waiting >= 1, "no connection waited for the server's budget"
    held = peak(me) - base
    assert held <= 64 * MiB + MiB + SLACK, f"the server grew by {held / MiB:.0f} MiB"
    errors: list[BaseException] = []

    def drain(c: RawClient) -> None:
        try:
            drain_simple(c.sock, n, MiB, lambda cookie: block((cookie - 1) % 8))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=drain, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    for c in conns:
        c.close()
    wait_until(lambda: st.call(lambda: budget.used) == 0, what="the budget to be given back")
