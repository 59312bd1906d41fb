"""A slow RAM disk for benchmarks: pynbd's memory plugin, each read 1 ms late (rdelay=MS).

What ``nbdkit --filter=delay rdelay=1ms memory SIZE`` serves, as one pynbd plugin file, for
measuring the caching filters before pynbd's delay filter exists:

    pynbd serve --filter=cache ./benchmarks/slow_memory.py 1G cache-on-read=true
"""

from __future__ import annotations

import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugins.memory import MemoryPlugin


class SlowMemoryPlugin(MemoryPlugin):
    """NAME
        slow_memory - a RAM disk whose reads wait (benchmarks only)

    SYNOPSIS
        pynbd serve ./benchmarks/slow_memory.py SIZE [rdelay=MS]

    DESCRIPTION
        The memory plugin, with every read waiting rdelay milliseconds (default 1) before
        it is answered, in a worker thread: nbdkit's memory plugin under its delay filter.

    PARAMETERS
        rdelay=MS
            Milliseconds each read waits (a number, optionally followed by "ms").

    EXAMPLES
        pynbd serve --filter=readahead --filter=cache ./benchmarks/slow_memory.py 1G
    """

    name = "slow_memory"
    nonblocking = False

    def __init__(self) -> None:
        super().__init__()
        self.rdelay = 0.001

    def config(self, key: str, value: str) -> None:
        if key == "rdelay":
            text = value.removesuffix("ms")
            try:
                self.rdelay = float(text) / 1000
            except ValueError:
                raise ConfigError(f"slow_memory: rdelay: not a number: {value}") from None
        else:
            super().config(key, value)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        time.sleep(self.rdelay)
        return super().pread(h, count, offset, flags)
