"""The nocache filter: turn off or change how cache requests are handled. Its manual page is
:class:`NocacheFilter`'s docstring."""

from __future__ import annotations

from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import CacheMode, Filter

__all__ = ["NocacheFilter"]

_MODES = {"none": CacheMode.NONE, "emulate": CacheMode.EMULATE, "nop": CacheMode.NATIVE,
          "no-op": CacheMode.NATIVE}


class NocacheFilter(Filter):
    """NAME
        nocache - pynbd nocache filter: turn off or change the handling of cache requests

    SYNOPSIS
        pynbd serve --filter=nocache PLUGIN [cachemode=MODE] [PLUGIN-ARGS...]

    DESCRIPTION
        nocache deliberately takes away the efficient handling of the client's advisory
        cache (prefetch) requests, NBD_CMD_CACHE. It is meant for measuring what those
        requests gain.

        It is unrelated to the cache filter (which keeps a local copy of the data read and
        written); the two can be used together to compare timings.

        This is nbdkit-nocache-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        cachemode=none
            Cache requests are not offered to the client. The default.

        cachemode=emulate
            Cache requests are offered and done by reading the data through the plugin's
            pread, whether or not the plugin has a cache of its own.

        cachemode=nop
            Cache requests are offered, accepted and ignored. (no-op is the same.)

    EXAMPLES
        Serve disk.img without NBD_CMD_CACHE, for a baseline timing:

            pynbd serve --filter=nocache file disk.img

        Accept and ignore cache requests instead of passing them to the file plugin, to see
        whether its prefetching was worth it:

            pynbd serve --filter=nocache file disk.img cachemode=nop
    """

    name = "nocache"
    nonblocking = True
    config_help = "cachemode=<MODE>     Either 'none' (default), 'emulate', or 'nop'."

    def __init__(self) -> None:
        self.mode = CacheMode.NONE

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key != "cachemode":
            next_config(key, value)
        elif value not in _MODES:
            raise ConfigError(f"unknown cachemode '{value}'")
        else:
            self.mode = _MODES[value]

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        return self.mode

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        # Called only in nop mode (NATIVE): emulate reads through pread, none is refused.
        return
