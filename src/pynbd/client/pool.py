"""Multi-conn: several connections to one export, used as one.

``await connect(uri, connections=N)`` opens one connection, and N-1 more only when the server
advertises CAN_MULTI_CONN (otherwise the spec says a client should not open more). Commands go
to the connection with the fewest requests in flight; FLUSH goes to every connection (the
spec's multi-conn rule: a flush on one connection covers writes completed on any, but only if
each connection's cache is flushed when the server does not share one — sending it to all is
always correct).
"""

from __future__ import annotations

import asyncio
from typing import Any, Self

from pynbd.client.engine import AsyncClient

__all__ = ["AsyncPool", "connect"]


class AsyncPool:
    def __init__(self, clients: list[AsyncClient]) -> None:
        if not clients:
            raise ValueError("a pool needs at least one connection")
        self.clients = clients

    @property
    def primary(self) -> AsyncClient:
        return self.clients[0]

    def __len__(self) -> int:
        return len(self.clients)

    def _pick(self) -> AsyncClient:
        return min(self.clients, key=lambda c: c.in_flight)

    # properties and flags come from the first connection (they are the same export)
    def __getattr__(self, name: str) -> Any:
        return getattr(self.clients[0], name)

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        return await self._pick().pread(count, offset, flags)

    async def pread_into(self, buf: Any, offset: int, flags: int = 0, chunk_cb: Any = None) -> None:
        await self._pick().pread_into(buf, offset, flags, chunk_cb)

    async def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        await self._pick().pwrite(buf, offset, flags)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        await self._pick().trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        await self._pick().zero(count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        await self._pick().cache(count, offset, flags)

    async def block_status(self, count: int, offset: int,
                           flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        return await self._pick().block_status(count, offset, flags)

    async def flush(self, flags: int = 0) -> None:
        await asyncio.gather(*(c.flush(flags) for c in self.clients))

    async def close(self) -> None:
        results = await asyncio.gather(*(c.close() for c in self.clients),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(uri: str | None = None, *, connections: int = 1,
                  **kw: Any) -> AsyncClient | AsyncPool:
    """Connect; with ``connections=N`` > 1, return an :class:`AsyncPool` of up to N
    connections (just one unless the server advertises CAN_MULTI_CONN)."""
    if connections < 1:
        raise ValueError("connections must be at least 1")
    first = await AsyncClient.connect(uri, **kw)
    if connections == 1:
        return first
    clients = [first]
    single = any(kw.get(k) is not None for k in ("sock", "command", "socket_activation"))
    if first.can_multi_conn() and not single:
        try:
            more = await asyncio.gather(
                *(AsyncClient.connect(uri, **kw) for _ in range(connections - 1)))
        except BaseException:
            await first.close()
            raise
        clients += more
    return AsyncPool(clients)
