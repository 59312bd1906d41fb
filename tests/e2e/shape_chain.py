"""In-process helpers for the shape filters' tests: a RAM disk plugin that records every
call it gets, and a chain of filters over it opened as the server opens one."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Filter, FuaMode, Plugin
from pynbd.server.backend import Chain, Context
from tests.helpers import PYNBD

__all__ = ["Disk", "manual_of", "open_chain"]


class Disk(Plugin):
    """A RAM disk that records its calls (``calls``: (name, count, offset, flags)).

    ``extents`` (a list of (offset, length, type)) is served if given; ``block_size``,
    ``description``, ``fua`` as given. Pages never written are holes."""

    name = "disk"

    def __init__(self, data: bytes | int = 65536, *, extents: list | None = None,
                 block_size: tuple[int, int, int] | None = None,
                 description: str | None = None, fua: FuaMode = FuaMode.NATIVE,
                 fast_zero: bool = True) -> None:
        self.data = bytearray(data)
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self._extents = extents
        self._block_size = block_size
        self._description = description
        self._fua = fua
        self._fast_zero = fast_zero

    def _note(self, *call: Any) -> None:
        with self.lock:
            self.calls.append(call)

    def get_size(self, h: Any) -> int:
        return len(self.data)

    def block_size(self, h: Any) -> tuple[int, int, int] | None:
        return self._block_size

    def export_description(self, h: Any) -> str | None:
        return self._description

    def can_fua(self, h: Any) -> FuaMode:
        return self._fua

    def can_fast_zero(self, h: Any) -> bool:
        return self._fast_zero

    def can_extents(self, h: Any) -> bool:
        return self._extents is not None

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        self._note("pread", count, offset, flags)
        return bytes(self.data[offset:offset + count])

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._note("pwrite", len(buf), offset, flags)
        self.data[offset:offset + len(buf)] = buf

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._note("zero", count, offset, flags)
        self.data[offset:offset + count] = bytes(count)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._note("trim", count, offset, flags)

    def flush(self, h: Any, flags: int) -> None:
        self._note("flush", 0, 0, flags)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._note("cache", count, offset, flags)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list:
        self._note("extents", count, offset, flags)
        return list(self._extents or [(0, len(self.data), EXTENT_HOLE | EXTENT_ZERO)])

    def named(self, *names: str) -> list[tuple]:
        """The calls of the given kinds, in order."""
        return [c for c in self.calls if c[0] in names]


def open_chain(plugin: Plugin, *filters: tuple[type[Filter], Sequence[str]],
               readonly: bool = False, export: str = "") -> tuple[Chain, Context]:
    """Filters (outermost first, each with its ``key=value`` parameters) over ``plugin``,
    configured and opened for one connection: (the chain, the outermost context)."""
    chain = Chain(plugin, [cls() for cls, _ in filters])
    for _, params in filters:
        for p in params:
            key, _, value = p.partition("=")
            chain.config(key, value)
    chain.config_complete()
    chain.get_ready()
    return chain, chain.open(readonly, export, False)


def manual_of(name: str) -> str:
    """What ``pynbd serve --filter=NAME null --help`` prints (checked to succeed)."""
    cp = subprocess.run([*PYNBD, "serve", f"--filter={name}", "null", "--help"],
                        capture_output=True, text=True, timeout=60, check=False,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert f"\n{section}\n" in "\n" + cp.stdout, f"{name}: no {section} section"
    assert f"{name} - " in cp.stdout
    return cp.stdout
