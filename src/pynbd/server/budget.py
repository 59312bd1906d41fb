"""The server-wide memory budget: bytes every connection together holds for its clients.

Each connection counts what it holds beyond its fixed receive buffer: replies queued but not
yet sent (their bytes plus :data:`pynbd.stream.BUFFER_COST` per buffer, counted by the
connection's :class:`~pynbd.stream.FdStream`), requests handed to worker threads (a READ's
length, a WRITE's copied payload) and large WRITE payloads being received (their declared
length, counted before any buffer exists). A connection stops reading new requests while
its own count is at :data:`~pynbd.limits.MAX_BYTES_IN_FLIGHT` or the server's is at
:data:`~pynbd.limits.MAX_SERVER_BYTES_IN_FLIGHT`; it never fails a request for it. When the
server's count falls back to three quarters of the budget, connections that stopped for it
are woken (they retry on the event loop, in the order they stopped).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Budget"]


class Budget:
    """A count of bytes held, a limit, and the connections waiting for room under it."""

    __slots__ = ("_waiters", "limit", "resume_at", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Waiters are woken once ``used`` is at most this (hysteresis: no wake-up storms).
        self.resume_at = limit * 3 // 4
        self.used = 0
        self._waiters: dict[object, Callable[[], None]] = {}

    @property
    def room(self) -> int:
        return self.limit - self.used

    def charge(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiters and self.used <= self.resume_at:
            self._wake()

    def wait(self, key: object, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once the budget has room again (``wake`` must not re-enter)."""
        self._waiters[key] = wake
        if self.used <= self.resume_at:
            self._wake()

    def cancel(self, key: object) -> None:
        self._waiters.pop(key, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for wake in waiters.values():
            wake()
