"""liblzma's stream decoder called through :mod:`ctypes`, for the xz filter (private).

The standard library's :class:`lzma.LZMADecompressor` allocates a new decoder (and its
dictionary) for every block and returns a new ``bytes`` grown in steps and joined at the
end: fresh memory, page faults and one more copy per block, and the GIL taken back after
every step. Here a few decoders are kept and reset between blocks (liblzma then reuses
their dictionaries), and a block decodes straight into the buffer that is served, in one
call that runs without the GIL. The same liblzma does the work, so the results (data,
integrity checks, error numbers) are those of :mod:`lzma`; without a loadable liblzma,
:func:`load` returns None and the filter uses :mod:`lzma`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any

__all__ = ["Decoder", "DecoderPool", "load"]

#: sys.getrefcount where there is one (CPython): how buffers are known to be unshared.
_refcount = getattr(sys, "getrefcount", None)
#: What it says inside DecoderPool.release when nothing but the caller's variable refers to
#: the buffer: that variable, release's argument, and getrefcount's own.
_UNSHARED = 3
#: Idle block buffers of one size are kept up to about this many bytes.
_KEEP_BYTES = 64 << 20

_OK, _BUF_ERROR = 0, 10
_MEMLIMIT = (1 << 64) - 1  # the standard library's decoder has no memory limit either


class _Stream(ctypes.Structure):
    """lzma_stream (liblzma 5.x's stable ABI); all zero is LZMA_STREAM_INIT."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_size_t),
        ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t),
        ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
        ("reserved", ctypes.c_void_p * 4), ("reserved_int", ctypes.c_uint64 * 2),
        ("reserved_size", ctypes.c_size_t * 2), ("reserved_enum", ctypes.c_int * 2),
    ]


_lib: Any = None


def load() -> type[Decoder] | None:
    """The :class:`Decoder` class when liblzma can be called, else None."""
    global _lib
    if _lib is None:
        lib = None
        for name in ("liblzma.so.5", "liblzma.5.dylib", None):
            try:  # the usual names first: find_library may run a compiler or ldconfig
                lib = ctypes.CDLL(name or ctypes.util.find_library("lzma") or "liblzma")
                for symbol in ("lzma_stream_decoder", "lzma_code", "lzma_end"):
                    getattr(lib, symbol)
                break
            except (OSError, AttributeError):
                lib = None
        if lib is None:
            _lib = False
            return None
        lib.lzma_stream_decoder.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32]
        lib.lzma_stream_decoder.restype = ctypes.c_int
        lib.lzma_code.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.lzma_code.restype = ctypes.c_int
        lib.lzma_end.argtypes = [ctypes.c_void_p]
        lib.lzma_end.restype = None
        _lib = lib
    return Decoder if _lib else None


class Decoder:
    """One reusable xz stream decoder (one thread at a time)."""

    def __init__(self) -> None:
        self._strm = _Stream()
        self._ref = ctypes.byref(self._strm)
        self._lib = _lib  # kept for __del__ at interpreter exit
        self._scratch = ctypes.create_string_buffer(16)
        self._dest: Any = None
        self._size = 0

    def __del__(self) -> None:
        self._lib.lzma_end(self._ref)

    def begin(self, header: bytes, out: bytearray) -> int:
        """Start a block: reset the decoder, give it the stream ``header``; its data will
        be decoded into ``out``, which must be exactly the block's size. Returns liblzma's
        error number, or 0, as :meth:`feed` and :meth:`end` do."""
        s = self._strm
        ret = self._lib.lzma_stream_decoder(self._ref, _MEMLIMIT, 0)
        if ret != _OK:
            return int(ret)
        self._size = len(out)
        self._dest = (ctypes.c_char * len(out)).from_buffer(out)
        s.next_out, s.avail_out = ctypes.addressof(self._dest), len(out)
        return self.feed(header)

    def feed(self, data: Any) -> int:
        """Decode the next bytes of the block (one call, without the GIL, when they fit):
        ``data`` is any buffer, read where it is when it is bytes or writable."""
        keep: Any
        if type(data) is bytes:
            keep = ctypes.c_char_p(data)  # its own buffer, no copy
            return self._code(ctypes.cast(keep, ctypes.c_void_p), len(data))
        view = memoryview(data)
        if view.readonly or not view.c_contiguous:
            return self.feed(bytes(view))
        if not view.nbytes:
            return 0
        keep = (ctypes.c_char * view.nbytes).from_buffer(view)
        return self._code(ctypes.addressof(keep), view.nbytes)

    def _code(self, address: Any, size: int) -> int:
        """Decode the ``size`` bytes at ``address`` (kept alive by the caller)."""
        s, code, ref = self._strm, self._lib.lzma_code, self._ref
        s.next_in, s.avail_in = address, size
        while s.avail_in:
            if not s.avail_out:  # full: what is left must bring no more data
                s.next_out, s.avail_out = ctypes.addressof(self._scratch), 16
            ret = code(ref, 0)
            if ret != _OK:
                return int(ret)
            if s.total_out > self._size:
                return 9
        s.next_in = None
        return 0

    def end(self) -> int:
        """Finish the block: 0 when it was exactly ``out``'s size and its check matched."""
        s = self._strm
        if s.total_out == self._size:
            s.next_out, s.avail_out = ctypes.addressof(self._scratch), 16
            ret = self._lib.lzma_code(self._ref, 0)  # nothing more may come out
            if ret not in (_OK, _BUF_ERROR):
                return int(ret)
        s.next_in = s.next_out = None
        self._dest = None
        return 0 if s.total_out == self._size else 9


class DecoderPool:
    """What the xz filter decodes blocks with: ``cpu``, a semaphore held while decoding
    (at most ``n`` blocks decode at a time: a few per CPU keep the CPUs busy, dozens only
    thrash their caches), the idle decoders (None when liblzma cannot be called:
    :mod:`lzma` is used instead), and block buffers to reuse."""

    def __init__(self, n: int) -> None:
        self.cpu = threading.BoundedSemaphore(n)
        self.decoders: list[Decoder] | None = [] if load() else None
        self._ncpu = n
        self._free: dict[int, list[bytearray]] = {}
        self._keep = n + 2

    def decoder(self) -> Decoder:
        """An idle decoder, to give back with :meth:`done`."""
        assert self.decoders is not None
        try:
            return self.decoders.pop()
        except IndexError:
            return Decoder()

    def done(self, decoder: Decoder) -> None:
        """Keep ``decoder`` for the next block, unless enough are kept (each holds its
        dictionary, up to 64 MiB for ``xz -9``)."""
        assert self.decoders is not None
        if len(self.decoders) < self._ncpu:
            self.decoders.append(decoder)

    def buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes to decode into: one given back if there is one."""
        free = self._free.get(size)
        if free:
            try:
                return free.pop()
            except IndexError:  # another thread took the last one
                pass
        return bytearray(size)

    def release(self, buf: Any) -> None:
        """``buf`` left the cache: reuse it if nothing else refers to it any more (no
        request holds it, no reply still being sent has a view of it)."""
        if type(buf) is not bytearray or _refcount is None or _refcount(buf) > _UNSHARED:
            return
        free = self._free.setdefault(len(buf), [])
        if len(free) < self._keep and len(buf) * len(free) <= _KEEP_BYTES:
            free.append(buf)
