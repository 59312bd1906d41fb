"""Multi-conn: N connections only when the server advertises CAN_MULTI_CONN."""

from __future__ import annotations

import asyncio
import os
import textwrap

from pynbd.client import AsyncClient, AsyncPool, connect


def _count_clients(srv) -> int:
    return sum(1 for line in open("/proc/net/unix") if srv.sock in line) - 1


def test_pool_opens_n_connections_when_advertised(nbdkit_server):
    srv = nbdkit_server("memory", "16M")

    async def main():
        pool = await connect(unix=srv.sock, connections=4)
        assert isinstance(pool, AsyncPool) and len(pool) == 4
        assert pool.can_multi_conn()
        n = _count_clients(srv)
        data = os.urandom(1 << 20)
        await asyncio.gather(*(pool.pwrite(data[i:i + 65536], i)
                               for i in range(0, len(data), 65536)))
        await pool.flush()
        # every connection sees every write
        for c in pool.clients:
            assert await c.pread(len(data), 0) == data
        # reads were spread: more than one connection carried requests
        used = [c._next_cookie > 2 for c in pool.clients]
        await pool.close()
        return n, used

    n, used = asyncio.run(main())
    assert n == 4
    assert sum(used) >= 2


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
