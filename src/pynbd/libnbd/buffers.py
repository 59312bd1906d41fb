"""``nbd.Buffer``, and how a command holds on to the buffer it reads into or writes from."""

from __future__ import annotations

import ctypes
import operator
from typing import Any

__all__ = ["Buffer", "is_buffer", "pin", "zero"]


class Buffer:
    """Asynchronous I/O persistent buffer."""

    def __init__(self, len: int) -> None:
        """Allocate an uninitialized AIO buffer used for nbd.aio_pread."""
        self._o: Any = bytearray(len)

    @classmethod
    def from_buffer(cls, buf: Any) -> Buffer:
        """Create an AIO buffer that shares an existing buffer-like object."""
        self = cls(0)
        with memoryview(buf):
            self._o = buf
        self._init = True
        return self

    @classmethod
    def from_bytearray(cls, ba: Any) -> Buffer:
        """Create an AIO buffer from a bytearray or other buffer-like object (a copy), or from
        anything ``bytearray()`` accepts."""
        return cls.from_buffer(bytearray(ba))

    def to_buffer(self) -> Any:
        """Return a shared view of the AIO buffer contents."""
        if not hasattr(self, "_init"):
            self._o = bytearray(len(self._o))
            self._init = True
        return self._o

    def to_bytearray(self) -> bytearray:
        """Copy an AIO buffer into a new bytearray."""
        if not hasattr(self, "_init"):
            return bytearray(len(self._o))
        return bytearray(self._o)

    def size(self) -> int:
        """Return the size of an AIO buffer."""
        return len(self)

    def __len__(self) -> int:
        return len(self._o)

    def is_zero(self, offset: int = 0, size: int = -1) -> bool:
        """True if every byte in ``[offset, offset+size)`` (``size=-1``: to the end) is zero."""
        with memoryview(self._o) as m:
            n = m.nbytes
            offset = operator.index(offset)
            size = operator.index(size)
            if offset < 0 or offset > n:
                raise IndexError("offset out of range")
            if size == -1:
                size = n - offset
            elif size < 0:
                raise IndexError("size cannot be negative, except -1 to mean to the end of "
                                 "the buffer")
            if size > n - offset:
                raise IndexError("size out of range")
            if size == 0 or not hasattr(self, "_init"):
                return True
            view = m.cast("B")[offset:offset + size]
            return not any(view) if size < 64 else view == bytes(size)


def pin(buf: Any, writable: bool) -> tuple[memoryview, Buffer | None]:
    """The contiguous byte view an aio call holds until the command is retired."""
    nbuf = buf if isinstance(buf, Buffer) else None
    obj = buf._o if nbuf is not None else buf
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError("aio_buffer: expecting buffer or nbd.Buffer instance") from None
    if writable and mv.readonly:
        mv.release()
        raise BufferError("underlying buffer is not writable")
    if not mv.contiguous:
        mv.release()
        raise BufferError("underlying buffer is not C-contiguous")
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format != "B":
        flat = mv.cast("B")
        mv.release()
        mv = flat
    if nbuf is not None:
        nbuf._init = True
    return mv, nbuf


def zero(mv: memoryview) -> None:
    """memset the (writable, contiguous) buffer to zeroes without a temporary copy."""
    c = ctypes.c_char.from_buffer(mv)
    ctypes.memset(ctypes.addressof(c), 0, mv.nbytes)
    del c


def is_buffer(obj: Any) -> bool:
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True
