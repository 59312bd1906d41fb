"""A base for small value classes that a tool needs at start-up.

:mod:`dataclasses` imports :mod:`inspect` (with ast, dis and tokenize): about 10 ms of a
command's start-up. The records a connection needs on its way (negotiation events, export
properties) are plain classes with ``__slots__``; this base gives them a dataclass's
equality and repr.
"""

from __future__ import annotations

__all__ = ["Record"]


class Record:
    """Equality (same class, equal fields) and ``Class(field=value, ...)`` repr, from
    ``__slots__`` (the fields, in repr order). Unhashable, like a dataclass with eq."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{a}={getattr(self, a)!r}" for a in self.__slots__)
        return f"{type(self).__name__}({fields})"
