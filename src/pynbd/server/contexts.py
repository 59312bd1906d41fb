"""The registry of metadata contexts a server offers (``base:allocation`` and more).

A provider is ``provider(ctx, length, offset, req_one) -> [(length, flags), ...]``: status
descriptors starting at ``offset``, in order, each of nonzero length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pynbd.protocol.constants import CONTEXT_BASE_ALLOCATION

if TYPE_CHECKING:
    from pynbd.server.backend import Context

__all__ = ["ContextRegistry", "Provider", "base_allocation"]

Provider = Callable[["Context", int, int, bool], list[tuple[int, int]]]


def base_allocation(ctx: Context, length: int, offset: int, req_one: bool) -> list[tuple[int, int]]:
    """base:allocation from the chain's extents (EXTENT_HOLE/ZERO are NBD_STATE_HOLE/ZERO)."""
    flags = 4 if req_one else 0  # Flag.REQ_ONE
    return [(n, t & 3) for _, n, t in ctx.extents(length, offset, flags)]


class ContextRegistry:
    def __init__(self) -> None:
        self._providers: dict[str, Provider] = {CONTEXT_BASE_ALLOCATION: base_allocation}

    def register(self, name: str, provider: Provider) -> None:
        ns, sep, _ = name.partition(":")
        if not sep or not ns:
            raise ValueError(f"meta context name {name!r} must be namespace:leaf")
        self._providers[name] = provider

    def get(self, name: str) -> Provider:
        return self._providers[name]

    def names(self) -> list[str]:
        return list(self._providers)

    def match(self, queries: list[str], listing: bool) -> list[str]:
        """Contexts selected by queries. Unknown names are ignored. In LIST, no query lists
        all, and ``ns:`` lists the namespace; in SET, ``ns:`` selects nothing."""
        if not queries:
            return self.names() if listing else []
        out: list[str] = []
        for q in queries:
            if q in self._providers:
                if q not in out:
                    out.append(q)
            elif listing and q.endswith(":") and q.count(":") == 1:
                out += [n for n in self._providers if n.startswith(q) and n not in out]
        return out
