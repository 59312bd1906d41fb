"""The nozero filter: turn off or change how zeroing is handled. Its manual page is
:class:`NozeroFilter`'s docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import Filter, Flag, FuaMode, ZeroMode

__all__ = ["NozeroFilter"]

#: The largest write the emulation makes at once (nbdkit's MAX_WRITE).
MAX_WRITE = 64 * 1024 * 1024

_ZEROMODES = ("none", "emulate", "notrim", "plugin")
_FASTZEROMODES = ("default", "none", "slow", "ignore")


class NozeroFilter(Filter):
    """NAME
        nozero - pynbd nozero filter: turn off or change the handling of zeroes

    SYNOPSIS
        pynbd serve --filter=nozero PLUGIN [zeromode=MODE] [fastzeromode=MODE]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        nozero deliberately takes away the efficient handling of runs of zero bytes
        (NBD_CMD_WRITE_ZEROES) between client and plugin. It is meant for measuring how
        much a client or a plugin gains from zeroing, and for testing the fallbacks of
        clients and servers that lack it.

        Whether a zero request may punch a hole (the MAY_TRIM flag) and whether a client
        may ask for a fast zero (one that fails at once rather than be slow) can be changed
        apart, with fastzeromode.

        This is nbdkit-nozero-filter(1) for pynbd, with nbdkit 1.32's parameters.
        One difference: with zeromode=none nbdkit stops advertising WRITE_ZEROES; the pynbd
        server always advertises it on a writable export, so here the requests a client
        still sends are written as zeroes by the filter (and fast zero is not advertised).

    PARAMETERS
        zeromode=none
            Zeroing is not offered: clients write blocks of zeroes like any other data.
            The default.

        zeromode=emulate
            Zeroing is offered, but the filter does it by writing zeroes through the
            plugin's pwrite, even when the plugin could zero more efficiently.

        zeromode=notrim
            Zero requests go to the plugin, but never with the MAY_TRIM flag: the plugin
            is never allowed to punch holes. A client connecting for writing fails if the
            plugin cannot zero.

        zeromode=plugin
            Zero requests go to the plugin unchanged (useful with fastzeromode). A client
            connecting for writing fails if the plugin cannot zero.

        fastzeromode=default
            The default. With zeromode=emulate fast zero is offered and every fast zero
            request fails at once (ENOTSUP); with notrim or plugin, fast zero is what the
            plugin makes of it.

        fastzeromode=none
            Fast zero is not offered to clients.

        fastzeromode=slow
            Fast zero is offered, and every fast zero request fails at once with ENOTSUP.

        fastzeromode=ignore
            Unsafe: fast zero is offered, and a fast zero request is handled as an
            ordinary zero request, however slow. Against the NBD specification, but a way
            to see whether fast zero makes a difference.

    EXAMPLES
        Make clients write zeroes as data:

            pynbd serve --filter=nozero file disk.img

        Offer WRITE_ZEROES, but fail fast zeroes up front and write all other zeroes as
        data instead of punching holes:

            pynbd serve --filter=nozero file disk.img zeromode=emulate

        Do not offer fast zero even if the plugin has it:

            pynbd serve --filter=nozero file disk.img zeromode=plugin fastzeromode=none
    """

    name = "nozero"
    nonblocking = True
    config_help = (
        "zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', 'plugin'.\n"
        "fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.")

    def __init__(self) -> None:
        self.zeromode = "none"
        self.fastzeromode = "default"

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "zeromode":
            if value not in _ZEROMODES:
                raise ConfigError(f"unknown zeromode '{value}'")
            self.zeromode = value
        elif key == "fastzeromode":
            if value not in _FASTZEROMODES:
                raise ConfigError(f"unknown fastzeromode '{value}'")
            self.fastzeromode = value
        else:
            next_config(key, value)

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        if readonly or self.zeromode not in ("notrim", "plugin"):
            return
        if not next.can_zero():
            raise CommandError(errno.EINVAL,
                               f"zeromode '{self.zeromode}' requires plugin zero support")

    def can_zero(self, next: Any, h: Any) -> bool | ZeroMode:
        # none withdraws WRITE_ZEROES; for emulate this filter answers the requests itself
        # (by writing), so its zero is called.
        if self.zeromode == "none":
            return ZeroMode.NONE
        if self.zeromode == "emulate":
            return True
        return bool(next.can_zero())

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        if self.zeromode == "none":
            return False
        if self.zeromode != "emulate" and self.fastzeromode == "default":
            return bool(next.can_fast_zero())
        return self.fastzeromode != "none"

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO:
            if self.fastzeromode == "slow" or (
                    self.fastzeromode == "default" and self.zeromode in ("none", "emulate")):
                raise CommandError(errno.ENOTSUP, "fast zero is not supported")
            if self.fastzeromode == "ignore":
                flags &= ~Flag.FAST_ZERO
        if self.zeromode == "notrim":
            flags &= ~Flag.MAY_TRIM
        if self.zeromode in ("notrim", "plugin"):
            next.zero(count, offset, flags)
            return
        _write_zeroes(next, count, offset, flags)


def _write_zeroes(next: Any, count: int, offset: int, flags: int) -> None:
    """Zero by writing, in pieces of at most MAX_WRITE bytes. FUA goes on every piece when
    the layer below has it natively, else on the last one only (one flush, at the end)."""
    writeflags = 0
    fua_last = False
    if flags & Flag.FUA:
        if next.can_fua() == FuaMode.EMULATE:
            fua_last = True
        else:
            writeflags = Flag.FUA
    zeroes = memoryview(bytes(min(count, MAX_WRITE)))
    while count:
        size = min(count, MAX_WRITE)
        if size == count and fua_last:
            writeflags = Flag.FUA
        next.pwrite(zeroes[:size], offset, writeflags)
        offset += size
        count -= size
