"""pynbd.client.blocking against real servers: reads (data and hole chunks), writes, zeroes,
trims, flush, block status, error replies (simple and structured), a server that goes away."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from helpers import run_async

from pynbd.client import AsyncClient
from pynbd.client.blocking import BlockingConnection, ServerGone
from pynbd.errors import CommandError
from pynbd.protocol.constants import CONTEXT_BASE_ALLOCATION

MiB = 1 << 20


def blocking(uri: str, *, structured: bool = True, how: str = "connect") -> BlockingConnection:
    metas = (CONTEXT_BASE_ALLOCATION,) if structured else ()
    if how == "connect":
        return BlockingConnection.connect(uri, structured=structured, meta_contexts=metas)

    async def go() -> AsyncClient:
        return await AsyncClient.connect(uri, structured=structured, meta_contexts=metas)

    return BlockingConnection.take_over(run_async(go()))


@pytest.mark.parametrize("how", ["connect", "take_over"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_every_command_on_nbdkit(nbdkit_server, structured: bool, how: str) -> None:
    srv = nbdkit_server("memory", "4M")
    c = blocking(srv.uri, structured=structured, how=how)
    try:
        assert c.size == 4 * MiB and c.can_zero() and c.can_multi_conn() and c.connected
        assert c.structured == structured and c.protocol == "newstyle-fixed"
        data = bytes(range(256)) * 4096  # 1 MiB
        c.pwrite(data, MiB)
        buf = bytearray(MiB)
        c.pread_into(memoryview(buf), MiB)
        assert buf == data
        c.zero(4096, MiB)
        c.trim(4096, MiB + 8192)
        c.flush()
        c.pread_into(memoryview(buf)[:16384], MiB)
        assert buf[:4096] == bytes(4096) and buf[8192:12288] == bytes(4096)
        assert buf[4096:8192] == data[4096:8192]
        if structured:
            ext = c.block_status(4 * MiB, 0)[CONTEXT_BASE_ALLOCATION]
            assert sum(length for length, _ in ext) <= 4 * MiB
            assert ext[0] == (MiB, 3)  # nothing written there yet: a hole reading as zero
        else:
            head = bytearray(16 + 4096)
            c.pread_simple(memoryview(head), MiB + 4096, 4096)
            assert head[16:] == data[4096:8192]
    finally:
        c.close()


def test_hole_chunks_from_qemu_nbd(qemu_nbd_server, tmp_path: Path) -> None:
    """qemu-nbd answers a read of a sparse file's hole with an OFFSET_HOLE chunk: the
    buffer's old content must be zeroed there, and the data beside it read."""
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x77" * 65536)
    srv = qemu_nbd_server(img, "-f", "raw")
    c = blocking(srv.uri)
    try:
        buf = bytearray(b"\xee" * (2 * MiB))
        c.pread_into(memoryview(buf), 0)
        assert buf[:MiB] == bytes(MiB)
        assert buf[MiB:MiB + 65536] == b"\x77" * 65536
        assert buf[MiB + 65536:] == bytes(MiB - 65536)
    finally:
        c.close()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_error_replies(nbdkit_server, structured: bool) -> None:
    """The server's error becomes a CommandError with the errno; the connection stays
    usable for the next command."""
    srv = nbdkit_server("--filter=error", "memory", "1M", "error-pread=ENOSPC",
                        "error-pread-rate=1", "error-pwrite=EPERM", "error-pwrite-rate=1")
    c = blocking(srv.uri, structured=structured)
    try:
        with pytest.raises(CommandError) as e:
            c.pread_into(memoryview(bytearray(4096)), 0)
        assert e.value.errno == errno.ENOSPC
        if not structured:
            with pytest.raises(CommandError) as e:
                c.pread_simple(memoryview(bytearray(16 + 4096)), 0, 4096)
            assert e.value.errno == errno.ENOSPC
        with pytest.raises(CommandError) as e:
            c.pwrite(b"x" * 4096, 0)
        assert e.value.errno == errno.EPERM
        c.flush()  # still in step with the server
    finally:
        c.close()


def test_server_gone(nbdkit_server) -> None:
    srv = nbdkit_server("memory", "1M")
    c = blocking(srv.uri)
    try:
        c.pread_into(memoryview(bytearray(512)), 0)
        srv.proc.kill()
        srv.proc.wait()
        with pytest.raises(ServerGone):
            c.pread_into(memoryview(bytearray(512)), 0)
        with pytest.raises(ServerGone):  # and every command after it
            c.flush()
    finally:
        c.close()
        srv.stop(check=False)


def test_abort_unblocks_a_waiting_thread(nbdkit_server) -> None:
    """abort() from another thread ends a command blocked on a server that does not answer."""
    import threading
    import time

    srv = nbdkit_server("--filter=delay", "memory", "1M", "rdelay=30")
    c = blocking(srv.uri)
    got: list[BaseException] = []

    def read() -> None:
        try:
            c.pread_into(memoryview(bytearray(512)), 0)
        except BaseException as e:  # noqa: BLE001 - checked below
            got.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.3)
    c.abort()
    t.join(5)
    assert not t.is_alive()
    assert got and isinstance(got[0], ServerGone), got


def test_connect_without_asyncio(nbdkit_server) -> None:
    """Connecting and copying with blocking connections never loads asyncio (what keeps
    `pynbd copy`'s start-up short)."""
    import subprocess
    import sys

    srv = nbdkit_server("memory", "1M")
    code = ("import sys\n"
            "from pynbd.client.blocking import BlockingConnection\n"
            f"c = BlockingConnection.connect({srv.uri!r})\n"
            "c.pwrite(b'a' * 512, 0); b = bytearray(512); c.pread_into(memoryview(b), 0)\n"
            "assert b == b'a' * 512; c.close()\n"
            "print('asyncio' in sys.modules)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=30, check=True)
    assert cp.stdout == "False\n", cp.stderr


def test_connect_failures_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BlockingConnection.connect(f"nbd+unix:///?socket={tmp_path}/none.sock")
    with pytest.raises(FileNotFoundError):  # TLS: tests/interop/test_tls_client.py
        BlockingConnection.connect(f"nbds+unix:///?socket={tmp_path}/none.sock")



@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_requests_outstanding_answered_in_any_order(nbdkit_server, structured: bool) -> None:
    """Several requests at once: replies are taken in the order the server sends them (a
    slow read after a quick write), each read's data lands in its own buffer."""
    srv = nbdkit_server("--filter=delay", "memory", "4M", "rdelay=300ms")
    c = blocking(srv.uri, structured=structured)
    try:
        for off in (0, 4088, 1 << 20):  # what nbdkit's pattern plugin would hold
            c.pwrite(off.to_bytes(8, "big"), off)
        a, b = bytearray(4096), bytearray(8192)
        ra = c.send(0, 0, 4096, into=memoryview(a))  # READ
        rb = c.send(0, 1 << 20, 8192, into=memoryview(b))
        fl = c.send(3, 0, 0)  # FLUSH: not delayed, answered first
        assert c.next_reply() == fl
        c.outcome(fl)
        done = {c.next_reply()}
        c.outcome(next(iter(done)))
        c.reply(({ra, rb} - done).pop())
        assert a[:8] == (0).to_bytes(8, "big") and a[4088:] == (4088).to_bytes(8, "big")
        assert b[:8] == (1 << 20).to_bytes(8, "big")
        with pytest.raises(RuntimeError):
            c.next_reply()  # nothing outstanding
    finally:
        c.close()
