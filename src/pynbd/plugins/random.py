"""The random plugin: a disk of repeatable pseudo-random bytes. Its manual page is
:class:`RandomPlugin`'s docstring."""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_size, parse_unsigned
from pynbd.plugin import CacheMode, Plugin, ThreadModel
from pynbd.plugins._random_prng import random_bytes

__all__ = ["RandomPlugin"]

log = logging.getLogger("pynbd.plugins.random")


class RandomPlugin(Plugin):
    """NAME
        random - pynbd plugin to serve random data

    SYNOPSIS
        pynbd serve random [size=]SIZE [seed=SEED]

    DESCRIPTION
        random is a plugin for pynbd which serves pseudo-random data, mainly for testing
        NBD clients. The disk is not sparse (for a sparse random disk see the
        sparse-random plugin). For the same seed the bytes are those nbdkit's random
        plugin serves: byte i is made by the xoshiro256** generator seeded (through
        splitmix64) with SEED + i, so any part of the disk can be read at once. The
        method is not cryptographically secure.

        Writing is possible: a write succeeds when it writes exactly what would be read at
        that offset, and fails with EIO otherwise, so a copying tool can be tested with
        the same disk as source and destination. Trim and zero always fail with EIO
        (the disk holds no zeroes to keep).

        Reads are computed with numpy when it is installed (pip install 'pynbd[random]');
        without it they work, byte by byte, much more slowly.

        This is nbdkit-random-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk (512, 64K, 1M, 10G...). The default is 0.
            "size=" may be omitted (it is the magic parameter).

        seed=SEED
            The seed, an unsigned 32-bit number (decimal, 0x hex or 0 octal), for the same
            data over several runs. Without it a seed is chosen from the clock.

    EXAMPLES
        Test a copying tool against itself:

            pynbd serve -U - random size=100M --run 'nbdcopy "$uri" "$uri"'

        The same 1 GiB of random data every time:

            pynbd serve random 1G seed=42
    """

    name = "random"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "size=<SIZE>  (required) Size of the backing disk\n"
        "seed=<SEED>             Random number generator seed")

    def __init__(self) -> None:
        self._size = 0
        self._seed = int(time.time()) & 0xFFFFFFFF

    def config(self, key: str, value: str) -> None:
        if key == "seed":
            self._seed = parse_unsigned("seed", value)
        elif key == "size":
            self._size = parse_size(value)
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def get_size(self, h: Any) -> int:
        return self._size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return random_bytes(self._seed, offset, count)

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        if random_bytes(self._seed, offset, len(buf)) != buf:
            _fail("data written does not match expected")

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        _fail("attempt to trim or zero non-sparse random disk")

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        _fail("attempt to trim or zero non-sparse random disk")

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass


def _fail(message: str) -> None:
    log.error("%s", message)
    raise CommandError(errno.EIO, message)
