"""Helpers shared by the built-in plugins (private)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pynbd.errors import ConfigError
from pynbd.limits import MAX_PAYLOAD_ACCEPTED
from pynbd.plugin import parse_size

__all__ = ["ZEROES", "SizeParameter", "settle", "zeroes"]

#: Shared zeroes, as large as the largest read the server accepts. ``bytes(n)`` is calloc'ed,
#: so this costs no memory until written (never) and reading it maps the kernel's zero page.
ZEROES = memoryview(bytes(MAX_PAYLOAD_ACCEPTED))


def zeroes(count: int) -> memoryview | bytes:
    """``count`` zero bytes without allocating (a read-only view of :data:`ZEROES`)."""
    if count <= len(ZEROES):
        return ZEROES[:count]
    return bytes(count)


class SizeParameter:
    """Mixin for plugins whose only parameter is ``[size=]SIZE`` (default 0)."""

    name: ClassVar[str]
    _size: int = 0

    def config(self, key: str, value: str) -> None:
        if key != "size":
            raise ConfigError(f"{self.name}: unknown parameter '{key}'")
        self._size = parse_size(value, "size")

    def get_size(self, h: Any) -> int:
        return self._size


def settle(fut: asyncio.Future[Any], err: BaseException | None, value: Any) -> None:
    """A ``start_*`` request's ``done(error, value)`` for a caller awaiting ``fut``."""
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)
