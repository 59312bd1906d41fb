"""The fua filter: change how Forced Unit Access and flush are handled. Its manual page is
:class:`FuaFilter`'s docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import Filter, Flag, FuaMode

__all__ = ["FuaFilter"]

_MODES = ("none", "emulate", "native", "force", "pass", "discard")


class FuaFilter(Filter):
    """NAME
        fua - pynbd fua filter: change the handling of flush and Forced Unit Access

    SYNOPSIS
        pynbd serve --filter=fua PLUGIN [fuamode=MODE] [PLUGIN-ARGS...]

    DESCRIPTION
        fua deliberately changes how the FUA flag (Forced Unit Access: this write reaches
        stable storage before it is answered) and flush requests are handled. It can drop
        them for speed (unsafe), test the fallbacks of clients and servers, or compare the
        cost of FUA with that of a full flush.

        FUA on one connection is only guaranteed to be seen from another if the server
        advertises multi-conn: with several connections, combine it with the multi-conn
        filter.

        This is nbdkit-fua-filter(1) for pynbd, with nbdkit 1.32's parameters. Unlike
        nbdkit 1.32, fuamode=none can also be given explicitly (nbdkit refuses its own
        default), and the error of fuamode=native names native (nbdkit's says force).

    PARAMETERS
        fuamode=none
            FUA is not offered to clients: they cannot send FUA writes, but can still
            flush if the plugin can. The default.

        fuamode=emulate
            FUA is offered and done by the filter with a flush after the write, even when
            the plugin has a more efficient FUA. A client connecting for writing fails if
            the plugin cannot flush.

        fuamode=native
            FUA is offered as native to the client and to the filters above, which may
            then handle it differently (the blocksize filter, when it splits requests). A
            client connecting for writing fails if the plugin has no FUA.

        fuamode=force
            Every write, trim and zero is sent with FUA even when the client did not ask
            (write-through), and flush requests do nothing. A client connecting for writing
            fails if the plugin has no FUA.

        fuamode=pass
            FUA and flush go through unchanged: the filter does nothing.

        fuamode=discard
            FUA flags and flush requests are dropped. Unsafe: a crash may lose data. Only
            for data that is easy to make again (caches, builds, test data).

    EXAMPLES
        Serve disk.img dropping every FUA and flush (fast, but unsafe):

            pynbd serve --filter=fua file disk.img fuamode=discard

        Make clients send flush requests instead of FUA writes:

            pynbd serve --filter=fua file disk.img

        Write-through: every write reaches the disk before it is answered:

            pynbd serve --filter=fua file disk.img fuamode=force
    """

    name = "fua"
    nonblocking = True
    config_help = (
        "fuamode=<MODE>       One of 'none' (default), 'emulate', 'native',\n"
        "                       'force', 'pass'.")

    def __init__(self) -> None:
        self.mode = "none"

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key != "fuamode":
            next_config(key, value)
        elif value not in _MODES:
            raise ConfigError(f"unknown fuamode '{value}'")
        else:
            self.mode = value

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        if readonly:
            return  # nothing to write: the mode cannot matter
        if self.mode == "emulate" and not next.can_flush():
            raise CommandError(errno.EINVAL, "fuamode 'emulate' requires plugin flush support")
        if self.mode in ("native", "force") and next.can_fua() == FuaMode.NONE:
            raise CommandError(errno.EINVAL,
                               f"fuamode '{self.mode}' requires plugin fua support")

    def can_flush(self, next: Any, h: Any) -> bool:
        if self.mode in ("force", "discard"):
            return True  # our flush does nothing: offered even if the plugin cannot
        return bool(next.can_flush())

    def can_fua(self, next: Any, h: Any) -> FuaMode:
        if self.mode == "none":
            return FuaMode.NONE
        if self.mode == "emulate":
            return FuaMode.EMULATE
        if self.mode == "pass":
            return FuaMode(next.can_fua())
        return FuaMode.NATIVE

    def _flags(self, flags: int) -> tuple[int, bool]:
        """The flags for the layer below, and whether to flush after the call."""
        if self.mode == "emulate" and flags & Flag.FUA:
            return flags & ~Flag.FUA, True
        if self.mode == "force":
            return flags | Flag.FUA, False
        if self.mode == "discard":
            return flags & ~Flag.FUA, False
        return flags, False

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        flags, flush = self._flags(flags)
        next.pwrite(buf, offset, flags)
        if flush:
            next.flush(0)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        flags, flush = self._flags(flags)
        next.trim(count, offset, flags)
        if flush:
            next.flush(0)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        flags, flush = self._flags(flags)
        next.zero(count, offset, flags)
        if flush:
            next.flush(0)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        if self.mode in ("force", "discard"):
            return  # force: every write already had FUA; discard: dropped
        next.flush(flags)
