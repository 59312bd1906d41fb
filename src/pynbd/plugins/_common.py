"""Helpers shared by the built-in plugins (private)."""

from __future__ import annotations

from pynbd.limits import MAX_PAYLOAD_ACCEPTED

__all__ = ["ZEROES", "zeroes"]

#: Shared zeroes, as large as the largest read the server accepts. ``bytes(n)`` is calloc'ed,
#: so this costs no memory until written (never) and reading it maps the kernel's zero page.
ZEROES = memoryview(bytes(MAX_PAYLOAD_ACCEPTED))


def zeroes(count: int) -> memoryview | bytes:
    """``count`` zero bytes without allocating (a read-only view of :data:`ZEROES`)."""
    if count <= len(ZEROES):
        return ZEROES[:count]
    return bytes(count)
