"""Multi-conn: N connections only when the server advertises CAN_MULTI_CONN."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
import time
from collections import Counter
from pathlib import Path

from pynbd.client import AsyncClient, AsyncPool, connect

#: One request as nbdkit's log filter records it on arrival.
_REQUEST = re.compile(r"connection=(\d+) (Read|Write) id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+) ")


def _requests(log: Path, kind: str, count: int) -> Counter[int]:
    """How many `kind` requests of `count` bytes each connection carried (server's view)."""
    per_conn: Counter[int] = Counter()
    for m in _REQUEST.finditer(log.read_text()):
        if m[2] == kind and int(m[3], 16) == count:
            per_conn[int(m[1])] += 1
    return per_conn


def _wait_disconnects(log: Path, n: int) -> None:
    """Wait until nbdkit logged `n` disconnects: the log is complete."""
    deadline = time.monotonic() + 10
    while log.read_text().count(" Disconnect ") < n:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def test_pool_opens_n_connections_when_advertised(nbdkit_server, tmp_path: Path) -> None:
    """Four connections; concurrent requests through the pool go to all of them (counted
    by the server, from nbdkit's log filter); every connection sees every write."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "memory", "16M", f"logfile={log}")
    chunk, n = 65536, 16
    data = os.urandom(n * chunk)

    async def main() -> None:
        pool = await connect(unix=srv.sock, connections=4)
        assert isinstance(pool, AsyncPool) and len(pool) == 4
        assert pool.can_multi_conn()
        await asyncio.gather(*(pool.pwrite(data[i:i + chunk], i)
                               for i in range(0, len(data), chunk)))
        await pool.flush()
        # every connection sees every write (reads of the whole 1 MiB, one per connection)
        for c in pool.clients:
            assert await c.pread(len(data), 0) == data
        # and concurrent reads through the pool are answered right
        got = await asyncio.gather(*(pool.pread(chunk, i) for i in range(0, len(data), chunk)))
        assert b"".join(got) == data
        await pool.close()

    asyncio.run(main())
    _wait_disconnects(log, 4)
    assert log.read_text().count(" Connect ") == 4
    writes, reads = _requests(log, "Write", chunk), _requests(log, "Read", chunk)
    # 16 requests in flight at once over 4 connections, each to the least busy one: 4 each.
    assert sorted(writes.values()) == [4, 4, 4, 4], writes
    assert sorted(reads.values()) == [4, 4, 4, 4], reads
    assert sorted(_requests(log, "Read", len(data)).values()) == [1, 1, 1, 1]


def test_pool_is_one_connection_without_multi_conn(pynbd_server, tmp_path):
    plugin = tmp_path / "single.py"
    plugin.write_text(textwrap.dedent('''
        from pynbd.plugin import Plugin
        class Single(Plugin):
            name = "single"
            nonblocking = True
            def get_size(self, h): return 1 << 20
            def pread(self, h, count, offset, flags): return bytes(count)
    '''))
    srv = pynbd_server(str(plugin))

    async def main():
        pool = await connect(unix=srv.sock, connections=4)
        assert not pool.can_multi_conn()
        assert len(pool) == 1
        assert await pool.pread(16, 0) == bytes(16)
        await pool.close()

    asyncio.run(main())


def test_connections_1_is_a_plain_client(nbdkit_server):
    srv = nbdkit_server("memory", "1M")

    async def main():
        c = await connect(unix=srv.sock)
        assert isinstance(c, AsyncClient)
        await c.close()

    asyncio.run(main())
