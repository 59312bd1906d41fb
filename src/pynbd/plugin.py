"""The plugin and filter interface: what third parties write against.

A plugin is one class deriving from :class:`Plugin`; a filter one class deriving from
:class:`Filter`. The class docstring is the manual page (NAME, SYNOPSIS, DESCRIPTION,
PARAMETERS, EXAMPLES) printed by ``pynbd serve PLUGIN --help``.

The callbacks are nbdkit's, with Python names and types. ``h`` is the per-connection handle
returned by :meth:`Plugin.open`. A capability not overridden is derived the way nbdkit derives
it (``can_write`` is true iff ``pwrite`` is overridden, and so on), and the server emulates what
is missing (zero by writing zeroes, FUA by flush, extents as all data).

Methods are plain ``def`` or ``async def``. Plain methods run in worker threads unless the
class sets ``nonblocking = True`` (pure work on memory: they then run on the event loop, which
is much faster for small requests). ``async def`` methods run on the event loop.

Errors: raise :class:`~pynbd.errors.CommandError` (``errno``) or :class:`OSError`; the client
gets the matching NBD error (anything else becomes EIO). During configuration raise
:class:`~pynbd.errors.ConfigError` with a message for the user.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from pynbd.errors import ConfigError

__all__ = [
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "CacheMode",
    "Extent",
    "Filter",
    "Flag",
    "FuaMode",
    "Plugin",
    "ThreadModel",
    "parse_bool",
    "parse_size",
]


class ThreadModel(enum.IntEnum):
    """nbdkit's thread models, from strictest to loosest."""

    SERIALIZE_CONNECTIONS = 0
    SERIALIZE_ALL_REQUESTS = 1
    SERIALIZE_REQUESTS = 2
    PARALLEL = 3


class FuaMode(enum.IntEnum):
    NONE = 0
    EMULATE = 1
    NATIVE = 2


class CacheMode(enum.IntEnum):
    NONE = 0
    EMULATE = 1
    NATIVE = 2


class Flag(enum.IntFlag):
    """Flags passed to data callbacks (nbdkit's NBDKIT_FLAG_*)."""

    MAY_TRIM = 1
    FUA = 2
    REQ_ONE = 4
    FAST_ZERO = 8


EXTENT_HOLE = 1
EXTENT_ZERO = 2

#: An extent as returned by ``extents``: (offset, length, type) with type a mix of
#: EXTENT_HOLE and EXTENT_ZERO (0 = allocated data).
Extent = tuple[int, int, int]

_SIZE_SUFFIX = {
    "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "p": 1 << 50, "e": 1 << 60,
}


def parse_size(text: str, what: str = "size") -> int:
    """Parse nbdkit's size syntax: ``512``, ``64K``, ``1M``, ``10G``, ``8E``, ``2s``..."""
    s = text.strip()
    if not s:
        raise ConfigError(f"could not parse {what}: empty string")
    mult = 1
    if s[-1].isalpha():
        suffix = s[-1].lower()
        if suffix not in _SIZE_SUFFIX:
            raise ConfigError(f"could not parse {what}: {text!r}: unknown suffix")
        mult = _SIZE_SUFFIX[suffix]
        s = s[:-1]
    if not s.isdigit() or not s.isascii():
        raise ConfigError(f"could not parse {what}: {text!r}")
    value = int(s) * mult
    if value > (1 << 63) - 1:
        raise ConfigError(f"{what} {text!r} is too large (the maximum is 2^63-1)")
    return value


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_bool(text: str, what: str = "value") -> bool:
    """Parse nbdkit's booleans: 1/true/t/yes/y/on and 0/false/f/no/n/off."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ConfigError(f"could not decode boolean {what}: {text!r}")


class Plugin:
    """Base class of plugins. Override what the plugin does; the rest has nbdkit's defaults."""

    #: Short name used on the command line (``pynbd serve NAME``).
    name: ClassVar[str] = ""
    #: Plugin version string.
    version: ClassVar[str] = ""
    #: A bare command-line value ``V`` means ``KEY=V`` (nbdkit's magic_config_key).
    magic_config_key: ClassVar[str | None] = None
    #: The loosest thread model the plugin supports.
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    #: Plain methods never block: run them on the event loop instead of a worker thread.
    nonblocking: ClassVar[bool] = False
    #: Short parameter help shown by ``--help`` (nbdkit's config_help).
    config_help: ClassVar[str] = ""

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        raise ConfigError(f"{self.name}: unknown parameter '{key}'")

    def config_complete(self) -> None:
        pass

    def get_ready(self) -> None:
        pass

    def after_fork(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def dump_plugin(self) -> list[str]:
        """Extra ``key=value`` lines for ``--dump-plugin``."""
        return []

    # Connection ------------------------------------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        pass

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        """Exports as (name, description); None means just the default export."""
        return None

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        """The canonical name of the default export ``""``; None refuses ``""``."""
        return ""

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        """Return the per-connection handle (any object)."""
        return None

    def close(self, h: Any) -> None:
        pass

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: Any) -> int:
        raise NotImplementedError

    def export_description(self, h: Any) -> str | None:
        return None

    def block_size(self, h: Any) -> tuple[int, int, int] | None:
        """(minimum, preferred, maximum) or None for no constraints."""
        return None

    def can_write(self, h: Any) -> bool:
        return _overrides(self, "pwrite", Plugin)

    def can_flush(self, h: Any) -> bool:
        return _overrides(self, "flush", Plugin)

    def is_rotational(self, h: Any) -> bool:
        return False

    def can_trim(self, h: Any) -> bool:
        return _overrides(self, "trim", Plugin)

    def can_zero(self, h: Any) -> bool:
        """Whether to call ``zero``; WRITE_ZEROES is advertised either way (emulated)."""
        return _overrides(self, "zero", Plugin)

    def can_fast_zero(self, h: Any) -> bool:
        return not _overrides(self, "zero", Plugin)

    def can_extents(self, h: Any) -> bool:
        return _overrides(self, "extents", Plugin)

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.EMULATE if self.can_flush(h) else FuaMode.NONE

    def can_multi_conn(self, h: Any) -> bool:
        return False

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE if _overrides(self, "cache", Plugin) else CacheMode.NONE

    # Data ------------------------------------------------------------------------------
    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        """Return ``count`` bytes (any buffer: bytes, bytearray, memoryview).

        Override this to hand out a buffer you already have (no copy), or override
        :meth:`pread_into` to fill a buffer the server owns.
        """
        buf = bytearray(count)
        self.pread_into(h, memoryview(buf), offset, flags)
        return buf

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        raise NotImplementedError(f"{self.name}: pread is not implemented")

    def pread_nowait(self, h: Any, count: int, offset: int, flags: int) -> Any:
        """Optional fast path for blocking plugins, called on the event loop.

        Return the data if it can be had without blocking (a file's page cache, say), or
        raise :class:`BlockingIOError`: the server then calls :meth:`pread` in a worker
        thread. Used only under the PARALLEL thread model with no filters.
        """
        raise BlockingIOError

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        raise NotImplementedError

    def flush(self, h: Any, flags: int) -> None:
        raise NotImplementedError

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NotImplementedError

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        """Write zeroes. Raise OSError(ENOTSUP) to make the server fall back to pwrite."""
        raise NotImplementedError

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        """Ascending, contiguous extents starting at or before ``offset``."""
        raise NotImplementedError

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        raise NotImplementedError


class Filter:
    """Base class of filters: middleware over ``next``, the layer below.

    Every data method receives ``next`` first, an object with the plugin's methods minus the
    handle (``next.pread(count, offset, flags)``, ``next.get_size()``...). A method not
    overridden passes straight through. The first ``--filter`` is the outermost.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    nonblocking: ClassVar[bool] = True
    config_help: ClassVar[str] = ""

    def config(self, next_config: Any, key: str, value: str) -> None:
        """Consume own keys; pass others down with ``next_config(key, value)``."""
        next_config(key, value)

    def config_complete(self) -> None:
        pass

    def get_ready(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        """Open the layer below with ``next_open(readonly, export_name)``; return a handle."""
        next_open(readonly, export_name)
        return None

    def close(self, h: Any) -> None:
        pass


def _overrides(obj: object, method: str, base: type) -> bool:
    return getattr(type(obj), method, None) is not getattr(base, method, None)
