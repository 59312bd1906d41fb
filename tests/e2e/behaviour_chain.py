"""In-process chains for the behaviour filters' tests: a recording plugin under real filter
objects, driven through the server's own :class:`~pynbd.server.backend.Chain` and
:class:`~pynbd.server.backend.Context` (the ``next`` every filter gets).

    disk = Recorder(fua=FuaMode.EMULATE)
    chain, ctx = open_chain(disk, NozeroFilter(), params=["zeromode=emulate"])
    ctx.zero(4096, 0, Flag.FUA)
    disk.named("pwrite", "flush")  # [("pwrite", 4096, 0, 0), ("flush", 0)]
"""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Filter, FuaMode, Plugin
from pynbd.server.backend import Chain, Context

__all__ = ["Recorder", "open_chain"]


class Recorder(Plugin):
    """A memory disk that records every call: ``calls`` holds (name, *args) tuples, data
    calls with (count, offset, flags). Capabilities are constructor arguments; ``fail`` maps
    a call name to how many of its next calls fail with EIO."""

    name = "recorder"
    nonblocking = True

    def __init__(self, size: int = 1 << 20, *, zero: bool = True, fast_zero: bool = True,
                 fua: FuaMode = FuaMode.NATIVE, flush: bool = True,
                 cache: CacheMode = CacheMode.NATIVE, multi_conn: bool = False,
                 write: bool = True) -> None:
        self.data = bytearray(size)
        self.caps = {"can_zero": zero, "can_fast_zero": fast_zero, "can_fua": fua,
                     "can_flush": flush, "can_cache": cache, "can_multi_conn": multi_conn,
                     "can_write": write, "can_trim": write, "can_extents": True}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, int] = {}
        self.opens = 0

    def named(self, *names: str) -> list[tuple[Any, ...]]:
        """The recorded calls whose name is one of ``names``."""
        return [c for c in self.calls if c[0] in names]

    def _maybe_fail(self, what: str) -> None:
        left = self.fail.get(what, 0)
        if left:
            self.fail[what] = left - 1
            raise CommandError(errno.EIO, f"{what} fails on purpose")

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        self.calls.append(("open", readonly, export_name))
        self._maybe_fail("open")
        self.opens += 1
        return {"n": self.opens, "readonly": readonly}

    def close(self, h: Any) -> None:
        self.calls.append(("close", h["n"]))

    def get_size(self, h: Any) -> int:
        return len(self.data)

    def can_write(self, h: Any) -> bool:
        return bool(self.caps["can_write"])

    def can_flush(self, h: Any) -> bool:
        return bool(self.caps["can_flush"])

    def can_trim(self, h: Any) -> bool:
        return bool(self.caps["can_trim"])

    def can_zero(self, h: Any) -> bool:
        return bool(self.caps["can_zero"])

    def can_fast_zero(self, h: Any) -> bool:
        return bool(self.caps["can_fast_zero"])

    def can_extents(self, h: Any) -> bool:
        return True

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode(self.caps["can_fua"])

    def can_multi_conn(self, h: Any) -> bool:
        return bool(self.caps["can_multi_conn"])

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode(self.caps["can_cache"])

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        self.calls.append(("pread", count, offset, flags))
        self._maybe_fail("pread")
        return bytes(self.data[offset:offset + count])

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        self.calls.append(("pwrite", len(buf), offset, flags))
        self._maybe_fail("pwrite")
        self.data[offset:offset + len(buf)] = buf

    def flush(self, h: Any, flags: int) -> None:
        self.calls.append(("flush", h["n"]))
        self._maybe_fail("flush")

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("trim", count, offset, flags))
        self._maybe_fail("trim")
        self.data[offset:offset + count] = bytes(count)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("zero", count, offset, flags))
        self._maybe_fail("zero")
        self.data[offset:offset + count] = bytes(count)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> Any:
        self.calls.append(("extents", count, offset, flags))
        self._maybe_fail("extents")
        return [(offset, count, EXTENT_HOLE | EXTENT_ZERO)]

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.calls.append(("cache", count, offset, flags))
        self._maybe_fail("cache")


def open_chain(plugin: Plugin, *filters: Filter, params: list[str] | None = None,
               readonly: bool = False, export: str = "") -> tuple[Chain, Context]:
    """Configure ``filters`` (outermost first) over ``plugin`` with ``params`` (KEY=VALUE),
    get them ready, and open a connection's context (as the server does)."""
    chain = Chain(plugin, list(filters))
    for p in params or []:
        key, _, value = p.partition("=")
        chain.config(key, value)
    chain.config_complete()
    chain.get_ready()
    return chain, chain.open(readonly, export, False)
