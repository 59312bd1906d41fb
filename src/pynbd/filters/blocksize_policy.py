"""The blocksize-policy filter: advertise block size constraints and choose what happens to
requests that break them. Its manual page is :class:`BlocksizePolicyFilter`'s docstring."""

from __future__ import annotations

import errno
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import UINT32_MAX, is_power_of_2, parse_size
from pynbd.plugin import Extent, Filter

__all__ = ["BlocksizePolicyFilter"]

_SIZE_KEYS = ("blocksize-minimum", "blocksize-preferred", "blocksize-maximum")


class BlocksizePolicyFilter(Filter):
    """NAME
        blocksize-policy - pynbd filter to set block size constraints and their policy

    SYNOPSIS
        pynbd serve --filter=blocksize-policy PLUGIN
                    [blocksize-error-policy=allow|error]
                    [blocksize-minimum=N] [blocksize-preferred=N] [blocksize-maximum=N]

    DESCRIPTION
        blocksize-policy adds block size constraints to a plugin that has none, or changes
        the plugin's: clients are told the minimum, preferred and maximum request sizes
        (nbdinfo shows them as block_size_minimum, block_size_preferred and
        block_size_maximum). It can also refuse the requests of clients that ignore them.

        Constraints not given are the plugin's; when the plugin has none, the defaults are a
        minimum of 1, a preferred size of 4096 and a maximum of 4294967295. A combination
        that makes no sense (minimum above preferred, preferred above maximum) makes every
        connection fail.

        With blocksize-error-policy=error a request smaller than the minimum, not a multiple
        of it or not aligned to it, or a read or write larger than the maximum, fails with
        EINVAL before the plugin sees it. With the default, allow, such requests are passed on
        and the plugin decides. (pynbd's server itself refuses requests not aligned to an
        advertised minimum, so with allow only the maximum is left to the plugin.)

        To make a plugin cope with requests it cannot take (splitting them, or turning small
        writes into read-modify-write cycles), put the blocksize filter after this one:

            pynbd serve --filter=blocksize-policy --filter=blocksize PLUGIN \\
                blocksize-error-policy=allow blocksize-minimum=64K minblock=64K

        This is nbdkit-blocksize-policy-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        blocksize-error-policy=allow
        blocksize-error-policy=error
            What to do with a request that breaks the constraints: pass it on (allow, the
            default) or fail it with EINVAL (error).

        blocksize-minimum=N
            The minimum block size advertised: a power of 2, at most 64K (a size: 512, 4K...).

        blocksize-preferred=N
            The preferred block size advertised: a power of 2 from 512 to 32M.

        blocksize-maximum=N
            The maximum request size advertised, at least the preferred size.

    EXAMPLES
        Tell clients of a RAM disk to prefer 32K requests:

            pynbd serve --filter=blocksize-policy memory 1G blocksize-preferred=32K

        Refuse reads and writes other than whole 4K blocks of at most 1M:

            pynbd serve --filter=blocksize-policy file disk.img blocksize-minimum=4K \\
                blocksize-maximum=1M blocksize-error-policy=error
    """

    name = "blocksize-policy"
    version = "1.32.5"
    nonblocking = True

    def __init__(self) -> None:
        self.minimum = 0
        self.preferred = 0
        self.maximum = 0
        self.error_policy = False

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "blocksize-error-policy":
            if value not in ("allow", "error"):
                raise ConfigError(f"unknown {key}: {value}")
            self.error_policy = value == "error"
        elif key in _SIZE_KEYS:
            try:
                size = parse_size(value)
            except ConfigError:
                size = -1
            if not 0 <= size <= UINT32_MAX:
                raise ConfigError(f"{key}: could not parse {value}")
            setattr(self, key.removeprefix("blocksize-"), size)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        mn, pref, mx = self.minimum, self.preferred, self.maximum
        if mn:
            if not is_power_of_2(mn):
                raise ConfigError("blocksize-minimum must be a power of 2")
            if mn > 65536:
                raise ConfigError("blocksize-minimum must be <= 64K")
        if pref:
            if not is_power_of_2(pref):
                raise ConfigError("blocksize-preferred must be a power of 2")
            if not 512 <= pref <= 32 * 1024 * 1024:
                raise ConfigError("blocksize-preferred must be between 512 and 32M")
        if mn and pref and mn > pref:
            raise ConfigError("blocksize-minimum must be <= blocksize-preferred")
        if pref and mx and pref > mx:
            raise ConfigError("blocksize-preferred must be <= blocksize-maximum")

    def block_size(self, next: Any, h: Any) -> tuple[int, int, int] | None:
        mn, pref, mx = self.minimum, self.preferred, self.maximum
        if mn and pref and mx:
            return (mn, pref, mx)
        below: tuple[int, int, int] | None = next.block_size()
        if not (mn or pref or mx):
            return below
        if below is None:  # the plugin has no constraints: defaults for the others
            bs = (mn or 1, pref or 4096, mx or UINT32_MAX)
        else:
            bs = (mn or below[0], pref or below[1], mx or below[2])
        if bs[0] > bs[1] or bs[1] > bs[2]:
            raise CommandError(errno.EINVAL, (
                f"computed block size values are invalid, minimum {bs[0]} > preferred "
                f"{bs[1]} or preferred > maximum {bs[2]}"))
        return bs

    def _check(self, next: Any, h: Any, what: str, data: bool, count: int,
               offset: int) -> None:
        """The error policy: EINVAL for a request that breaks the constraints."""
        if not self.error_policy:
            return
        bs = self.block_size(next, h)
        if bs is None:
            return
        minimum, _, maximum = bs
        if count < minimum:
            why = f"count {count} is smaller than minimum size {minimum}"
        elif data and count > maximum:  # the maximum is about data (reads and writes)
            why = f"count {count} is larger than maximum size {maximum}"
        elif count % minimum:
            why = f"count {count} is not a multiple of minimum size {minimum}"
        elif offset % minimum:
            why = f"offset {offset} is not aligned to a multiple of minimum size {minimum}"
        else:
            return
        raise CommandError(errno.EINVAL, f"client {what} request rejected: {why}")

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._check(next, h, "pread", True, count, offset)
        return next.pread(count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._check(next, h, "pwrite", True, len(buf), offset)
        next.pwrite(buf, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "zero", False, count, offset)
        next.zero(count, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "trim", False, count, offset)
        next.trim(count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "cache", False, count, offset)
        next.cache(count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int,
                flags: int) -> list[Extent]:
        self._check(next, h, "extents", False, count, offset)
        return list(next.extents(count, offset, flags))
