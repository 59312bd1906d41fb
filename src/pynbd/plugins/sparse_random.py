"""The sparse-random plugin: sparse disks of random data runs. Its manual page is
:class:`SparseRandomPlugin`'s docstring."""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import (
    _number_tail,
    _strtol,
    parse_bool,
    parse_size,
    parse_unsigned,
    scan_double,
)
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Extent, Flag, Plugin, ThreadModel
from pynbd.plugins._common import zeroes
from pynbd.plugins._random_bitmap import BLOCKSIZE, BlockMap
from pynbd.plugins._random_prng import HAVE_NUMPY, block_bytes, block_contents

if HAVE_NUMPY:
    import numpy as np

__all__ = ["SparseRandomPlugin"]

log = logging.getLogger("pynbd.plugins.sparse-random")
_HOLE = EXTENT_HOLE | EXTENT_ZERO


class SparseRandomPlugin(Plugin):
    """NAME
        sparse-random - pynbd plugin to make sparse random disks

    SYNOPSIS
        pynbd serve sparse-random [size=]SIZE [seed=SEED] [percent=N] [runlength=N]
                                  [random-content=true]

    DESCRIPTION
        sparse-random is a plugin for pynbd which makes disks holding sparse runs of random
        data, shaped like virtual machine disks: runs of data blocks (4 KiB each) between
        runs of holes. It is meant for benchmarking and testing copying tools (nbdcopy,
        qemu-img convert). For a disk random all over see the random plugin.

        For the same seed and parameters the disk is the one nbdkit's sparse-random plugin
        serves, block for block: the same map of data and holes (a Markov chain drawn with
        xoshiro256**), and the same bytes in each data block. Block status reports the
        holes (as holes reading as zeroes) and the data.

        A data block normally repeats one random non-zero byte; with random-content=true
        every byte is random.

        Writes succeed only when they write what would be read (else EIO), and trim and
        zero only over holes (else EIO), so one instance can be both source and destination
        of a copy. Flush does nothing.

        Building the map walks every block of the disk once when the server starts; with
        numpy installed (pip install 'pynbd[random]') it is vectorised and a 1 TiB disk
        takes seconds; without numpy it is slow beyond a few GiB.

        Differences from nbdkit 1.32: a read that starts inside a data block returns that
        block's bytes (nbdkit 1.32 computes the first, partial block of such a read from the
        unaligned offset, so the same byte reads differently depending on where a read
        starts); runlength= takes the size suffixes its manual promises (nbdkit 1.32 wants
        a plain number).

        This is nbdkit-sparse-random-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        [size=]SIZE
            The virtual size of the disk. The default is 0. "size=" may be omitted.

        seed=SEED
            The seed (an unsigned 32-bit number) for the same disk over several runs;
            without it a seed is chosen from the clock.

        percent=N
            The approximate percentage of the disk holding data (a decimal number from 0 to
            100; default 10). 0 makes an empty disk, 100 a full one.

        runlength=N
            The average length of data runs, in bytes, with the usual suffixes (default
            16M).

        random-content=true
            Fill data blocks with random bytes instead of one repeated byte.

    EXAMPLES
        Test nbdcopy on a 1 TiB sparse disk, as source and destination at once:

            pynbd serve -U - sparse-random size=1T --run 'nbdcopy "$uri" "$uri"'

        Half data, in runs of 1 MiB on average:

            pynbd serve sparse-random 10G seed=1 percent=50 runlength=1M
    """

    name = "sparse-random"
    version = "1.0"
    magic_config_key = "size"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "size=<SIZE>  (required) Size of the backing disk\n"
        "seed=<SEED>             Random number generator seed\n"
        "percent=<PERCENT>       Percentage of data\n"
        "runlength=<BYTES>       Expected average run length of data\n"
        "random-content=true     Fully random content in each block")

    def __init__(self) -> None:
        self._size = 0
        self._seed = int(time.time()) & 0xFFFFFFFF
        self._percent = 10.0
        self._runlength = 16 << 20
        self._random_content = False
        self._map: BlockMap | None = None

    def config(self, key: str, value: str) -> None:
        if key == "seed":
            self._seed = parse_unsigned("seed", value)
        elif key == "size":
            self._size = parse_size(value)
        elif key == "percent":
            got = scan_double(value)
            if got is None or not 0 <= got[0] <= 100:
                raise ConfigError(f"cannot parse percent parameter: {value}")
            self._percent = got[0]
        elif key == "runlength":
            self._runlength = _parse_runlength(value)
        elif key == "random-content":
            self._random_content = parse_bool(value)
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def get_ready(self) -> None:
        self._map = BlockMap(self._seed, self._size, self._percent, self._runlength)

    def get_size(self, h: Any) -> int:
        return self._size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def _blocks(self, count: int, offset: int) -> tuple[int, int]:
        return offset // BLOCKSIZE, -(-(offset + count) // BLOCKSIZE)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        assert self._map is not None
        first, end = self._blocks(count, offset)
        data = self._map.data_blocks(first, end)
        if not data:
            return zeroes(count)
        buf = self._fill(first, end, data)
        skip = offset - first * BLOCKSIZE
        return memoryview(buf)[skip:skip + count]

    def _fill(self, first: int, end: int, data: list[int]) -> bytearray:
        """The bytes of blocks [first, end), given which of them hold data."""
        buf = bytearray((end - first) * BLOCKSIZE)
        offsets = [b * BLOCKSIZE for b in data]
        if self._random_content:
            content = block_contents(self._seed, offsets, BLOCKSIZE)
            for i, b in enumerate(data):
                at = (b - first) * BLOCKSIZE
                buf[at:at + BLOCKSIZE] = content[i * BLOCKSIZE:(i + 1) * BLOCKSIZE]
            return buf
        fill = block_bytes(self._seed, offsets)
        if HAVE_NUMPY:
            blocks = np.frombuffer(buf, dtype=np.uint8).reshape(end - first, BLOCKSIZE)
            blocks[np.asarray(data) - first] = fill[:, None]
            return buf
        for b, v in zip(data, fill, strict=True):
            at = (b - first) * BLOCKSIZE
            buf[at:at + BLOCKSIZE] = bytes((v,)) * BLOCKSIZE
        return buf

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        if bytes(self.pread(h, len(buf), offset, 0)) != buf:
            _fail("data written does not match expected")

    def flush(self, h: Any, flags: int) -> None:
        pass

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        assert self._map is not None
        if self._map.data_blocks(*self._blocks(count, offset)):
            _fail("trying to trim or zero non-hole in disk")

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.trim(h, count, offset, flags)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        assert self._map is not None
        first, end = self._blocks(count, offset)
        out: list[Extent] = []
        for blk, n, is_data in self._map.runs(first, end):
            lo = max(blk * BLOCKSIZE, offset)
            hi = min((blk + n) * BLOCKSIZE, offset + count)
            out.append((lo, hi - lo, 0 if is_data else _HOLE))
            if flags & Flag.REQ_ONE:
                break
        return out


def _parse_runlength(value: str) -> int:
    """A size with nbdkit's suffixes, or a plain number as nbdkit 1.32 parses it."""
    text = value.strip()
    if text[-1:].isalpha() and text[:-1].isdigit():
        n = parse_size(value)
    else:
        v, end = _strtol(value)
        if v < 0:
            raise ConfigError("runlength: negative numbers are not allowed")
        n = _number_tail("runlength", value, v, end, 0, v > (1 << 64) - 1)
    if n <= 0:
        raise ConfigError("runlength parameter must be > 0")
    return n


def _fail(message: str) -> None:
    log.error("%s", message)
    raise CommandError(errno.EIO, message)
