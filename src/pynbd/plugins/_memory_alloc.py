"""The memory plugin's other allocators: malloc (one flat block, optionally locked in RAM)
and zstd (compressed pages). The default, sparse, lives in memory.py (private)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._params import parse_bool
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Extent, Flag

__all__ = ["MallocStore", "ZstdStore", "make_store", "parse_allocator"]

_PAGE = 1 << 15  # zstd pages: 32 KiB, as the sparse allocator's
_HOLE = EXTENT_HOLE | EXTENT_ZERO


class MallocStore:
    """The whole disk as one anonymous mapping: fast, not sparse (extents: all data)."""

    def __init__(self, size: int, mlock: bool) -> None:
        try:
            self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        except (OSError, OverflowError, ValueError) as e:
            raise ConfigError(f"malloc: {getattr(e, 'strerror', None) or e}") from None
        self._view = memoryview(self._map)
        if mlock:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(max(size, 1))) != 0:
                raise ConfigError(f"mlock: {os.strerror(ctypes.get_errno())}")

    def pread(self, count: int, offset: int) -> Any:
        return self._view[offset:offset + count].tobytes()

    def pwrite(self, buf: Any, offset: int) -> None:
        self._view[offset:offset + len(buf)] = buf

    def zero(self, count: int, offset: int) -> None:
        self._view[offset:offset + count] = bytes(count)

    def extents(self, count: int, offset: int, flags: int, size: int) -> list[Extent]:
        return [(offset, min(count, size - offset), 0)]


class ZstdStore:
    """Pages of 32 KiB compressed with zstd; pages never written (or zeroed) are holes."""

    def __init__(self, size: int) -> None:
        try:
            import zstandard
        except ImportError:
            raise ConfigError("memory: allocator=zstd needs the zstandard package "
                              "(pip install 'pynbd[zstd]')") from None
        self._c = zstandard.ZstdCompressor()
        self._d = zstandard.ZstdDecompressor()
        self._pages: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _page(self, pn: int) -> bytearray:
        data = self._pages.get(pn)
        if data is None:
            return bytearray(_PAGE)
        return bytearray(self._d.decompress(data, max_output_size=_PAGE))

    def _store(self, pn: int, page: bytearray) -> None:
        if page.count(0) == _PAGE:
            self._pages.pop(pn, None)
        else:
            self._pages[pn] = self._c.compress(page)

    def pread(self, count: int, offset: int) -> Any:
        out = bytearray(count)
        pos = 0
        with self._lock:
            while pos < count:
                pn, a = divmod(offset + pos, _PAGE)
                n = min(_PAGE - a, count - pos)
                if pn in self._pages:
                    out[pos:pos + n] = self._page(pn)[a:a + n]
                pos += n
        return out

    def _modify(self, count: int, offset: int, buf: Any) -> None:
        pos = 0
        with self._lock:
            while pos < count:
                pn, a = divmod(offset + pos, _PAGE)
                n = min(_PAGE - a, count - pos)
                if buf is None and (n == _PAGE or pn not in self._pages):
                    self._pages.pop(pn, None)
                else:
                    page = self._page(pn)
                    page[a:a + n] = bytes(n) if buf is None else buf[pos:pos + n]
                    self._store(pn, page)
                pos += n

    def pwrite(self, buf: Any, offset: int) -> None:
        self._modify(len(buf), offset, memoryview(buf).cast("B"))

    def zero(self, count: int, offset: int) -> None:
        self._modify(count, offset, None)

    def extents(self, count: int, offset: int, flags: int, size: int) -> list[Extent]:
        # at most 65536 pages per call (the client asks again from where it ends)
        end = min(offset + count, size, offset + (_PAGE << 16))
        out: list[Extent] = []
        pos = offset
        with self._lock:
            while pos < end:
                pn = pos // _PAGE
                typ = 0 if pn in self._pages else _HOLE
                n = min((pn + 1) * _PAGE, end) - pos
                if out and out[-1][2] == typ:
                    lo, length, _ = out[-1]
                    out[-1] = (lo, length + n, typ)
                else:
                    if out and flags & Flag.REQ_ONE:
                        break
                    out.append((pos, n, typ))
                pos += n
        return out


def parse_allocator(value: str) -> tuple[str, bool]:
    """An ``allocator=`` value as (sparse|malloc|zstd, mlock), with nbdkit's messages."""
    kind, _, rest = value.partition(",")
    params = [p.partition("=") for p in rest.split(",")] if rest else []
    if kind == "sparse" and params:
        raise ConfigError("allocator=sparse does not take extra parameters")
    if kind in ("sparse", "zstd") and not params:
        return kind, False
    if kind == "malloc" and all(k == "mlock" for k, _, _ in params):
        mlock = False
        for _, _, v in params:
            mlock = parse_bool(v)
        return kind, mlock
    raise ConfigError(f'unknown allocator "{value}"')


def make_store(value: str, size: int) -> MallocStore | ZstdStore | None:
    """The store an ``allocator=`` value asks for (None: the built-in sparse one)."""
    kind, mlock = parse_allocator(value)
    if kind == "malloc":
        return MallocStore(size, mlock)
    if kind == "zstd":
        return ZstdStore(size)
    return None
