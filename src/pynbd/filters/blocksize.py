"""The blocksize filter: meet the plugin's block size limits whatever the client sends. Its
manual page is :class:`BlocksizeFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import (
    UINT32_MAX,
    RWLock,
    extents_aligned,
    is_power_of_2,
    parse_size,
    round_down,
    round_up,
)
from pynbd.plugin import Extent, Filter, Flag, FuaMode

__all__ = ["BlocksizeFilter"]

log = logging.getLogger("pynbd.server")

#: The largest minblock (nbdkit's BLOCKSIZE_MIN_LIMIT).
MINBLOCK_LIMIT = 64 * 1024
#: The default maxdata: nbdkit's largest request.
DEFAULT_MAXDATA = 64 * 1024 * 1024


class _Limits:
    """Per connection: the limits in force once the plugin's own are known."""

    __slots__ = ("maxdata", "maxlen", "minblock")

    def __init__(self, minblock: int, maxdata: int, maxlen: int) -> None:
        self.minblock = minblock
        self.maxdata = maxdata
        self.maxlen = maxlen


def _parse(key: str, value: str) -> int:
    size = parse_size(value)
    if not size:
        raise ConfigError(f"parameter '{key}' must be non-zero if specified")
    if size > UINT32_MAX:
        raise ConfigError(f"parameter '{key}' too large")
    return size


class BlocksizeFilter(Filter):
    """NAME
        blocksize - pynbd blocksize filter: split, align and bound requests for the plugin

    SYNOPSIS
        pynbd serve --filter=blocksize PLUGIN [minblock=SIZE] [maxdata=SIZE] [maxlen=SIZE]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        blocksize makes every request the plugin sees meet block size limits, whatever the
        client sends. NBD lets a client ask for 1 byte or almost 4 GiB at any offset; some
        plugins need requests aligned to 512 bytes, or no larger than some size.

        Requests are cut into pieces no larger than the maximum. An unaligned read is widened
        to whole blocks; the unaligned head and tail of a write or zero request become
        read-modify-write cycles of whole blocks (serialised with the other writes, so they
        cannot interleave); the unaligned head and tail of a trim are ignored (trim is
        advisory). The size served is the plugin's rounded down to the block size: combine
        with the truncate filter (round-up=) to reach the last bytes of an unaligned plugin.

        A fast zero request that would take more than one plugin call fails with ENOTSUP at
        once. The block size advertised to clients is the widest possible (minimum 1, maximum
        4294967295; preferred the plugin's, at least 4096 and minblock): the point of the
        filter is that clients need not care. To advertise other limits add the
        blocksize-policy filter in front of this one.

        This is nbdkit-blocksize-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        minblock=SIZE
            The block size and alignment of requests passed to the plugin: a power of 2, at
            most 64k. Default: the plugin's minimum block size, or 1.

        maxdata=SIZE
            The largest read or write passed to the plugin: a multiple of minblock. Default:
            64M, or the plugin's maximum if smaller.

        maxlen=SIZE
            The largest trim, zero, cache or extents request passed to the plugin: a multiple
            of minblock, best at least maxdata. Default: 4G minus minblock (the most one NBD
            request can ask for).

    EXAMPLES
        A plugin limited to 512-byte blocks, served to any client:

            pynbd serve --filter=blocksize file disk.img minblock=512

        Requests of at most 32M to a server that refuses more, through the nbd plugin:

            pynbd serve --filter=blocksize nbd socket=/path/to/socket maxdata=32M

        A 4K-sector view of a file that keeps its unaligned tail reachable:

            pynbd serve --filter=blocksize --filter=truncate file /path/to/file \\
                minblock=4k round-up=4k
    """

    name = "blocksize"
    version = "1.32.5"
    # The lock below is never contended when the chain runs on the event loop (one request
    # at a time); in worker threads it orders read-modify-write cycles against other writes.
    nonblocking = True
    config_help = (
        "minblock=<SIZE>      Minimum block size, power of 2 <= 64k (default 1).\n"
        "maxdata=<SIZE>       Maximum size for read/write (default 64M).\n"
        "maxlen=<SIZE>        Maximum size for trim/zero (default 4G-minblock).")

    def __init__(self) -> None:
        self.minblock = 0
        self.maxdata = 0
        self.maxlen = 0
        # Shared by aligned writes, exclusive for read-modify-write cycles (nbdkit's rwlock).
        self.lock = RWLock()

    # Configuration -----------------------------------------------------------------------
    def config(self, next_config: Any, key: str, value: str) -> None:
        if key in ("minblock", "maxdata", "maxlen"):
            setattr(self, key, _parse(key, value))
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        mb = self.minblock
        if mb:
            if not is_power_of_2(mb):
                raise ConfigError("minblock must be a power of 2")
            if mb > MINBLOCK_LIMIT:
                raise ConfigError(f"minblock must not exceed {MINBLOCK_LIMIT}")
            if self.maxdata % mb:
                raise ConfigError(f"maxdata must be a multiple of {mb}")
            if self.maxlen % mb:
                raise ConfigError(f"maxlen must be a multiple of {mb}")
        log.debug("configured values minblock=%d maxdata=%d maxlen=%d",
                  self.minblock, self.maxdata, self.maxlen)

    # Connection --------------------------------------------------------------------------
    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> _Limits:
        next_open(readonly, export_name)
        return _Limits(self.minblock, self.maxdata, self.maxlen)

    def prepare(self, next: Any, h: _Limits, readonly: bool) -> None:
        bs = next.block_size()
        minimum, maximum = (bs[0], bs[2]) if bs else (0, 0)
        h.minblock = max(h.minblock, 1, minimum)
        if h.maxdata == 0:
            h.maxdata = min(h.maxlen, DEFAULT_MAXDATA) if h.maxlen else DEFAULT_MAXDATA
        if maximum:
            h.maxdata = min(h.maxdata, maximum)
        # When maxdata or maxlen rounds down to 0 (a plugin whose minimum exceeds them),
        # nbdkit 1.32 passes requests of length 0 down and dies on an assertion: one block
        # at a time works instead.
        h.maxdata = max(round_down(h.maxdata, h.minblock), h.minblock)
        if h.maxlen == 0:
            h.maxlen = (1 << 32) - h.minblock
        else:
            h.maxlen = max(round_down(h.maxlen, h.minblock), h.minblock)
        log.debug("handle values minblock=%d maxdata=%d maxlen=%d",
                  h.minblock, h.maxdata, h.maxlen)

    def get_size(self, next: Any, h: _Limits) -> int:
        return round_down(next.get_size(), h.minblock)

    def block_size(self, next: Any, h: _Limits) -> tuple[int, int, int]:
        bs = next.block_size()
        preferred = max(bs[1] if bs else 0, 4096, h.minblock)
        log.debug("advertising min=%d pref=%d max=%d", 1, preferred, UINT32_MAX)
        return (1, preferred, UINT32_MAX)

    # Data ------------------------------------------------------------------------------------
    def pread(self, next: Any, h: _Limits, count: int, offset: int, flags: int) -> Any:
        mb = h.minblock
        if not (offset | count) & (mb - 1) and count <= h.maxdata:
            return next.pread(count, offset, flags)
        # Reads take no lock: each has its own bounce buffer, and a read racing a write of
        # the same block may see either content anyway.
        buf = bytearray(count)
        mv = memoryview(buf)
        pos = 0
        drop = offset & (mb - 1)
        if drop:
            pos = min(mb - drop, count)
            mv[:pos] = memoryview(next.pread(mb, offset - drop, flags))[drop:drop + pos]
        while count - pos >= mb:
            n = min(h.maxdata, round_down(count - pos, mb))
            mv[pos:pos + n] = next.pread(n, offset + pos, flags)
            pos += n
        if pos < count:
            mv[pos:] = memoryview(next.pread(mb, offset + pos, flags))[:count - pos]
        return buf

    def pwrite(self, next: Any, h: _Limits, buf: Any, offset: int, flags: int) -> None:
        self._write(next, h, memoryview(buf).cast("B"), len(buf), offset, flags)

    def zero(self, next: Any, h: _Limits, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO and ((offset | count) & (h.minblock - 1) or count > h.maxlen):
            # Split, a fast failure in a later piece would come late: not fast.
            raise CommandError(errno.ENOTSUP, "fast zero is not supported")
        self._write(next, h, None, count, offset, flags)

    def _write(self, next: Any, h: _Limits, data: memoryview | None, count: int, offset: int,
               flags: int) -> None:
        """pwrite (``data``) or zero (``data`` None): head and tail by read-modify-write,
        the aligned body in pieces of maxdata (writes) or maxlen (zeroes)."""
        mb = h.minblock
        need_flush = bool(flags & Flag.FUA) and next.can_fua() == FuaMode.EMULATE
        if need_flush:
            flags &= ~Flag.FUA
        wflags = flags & Flag.FUA  # for the read-modify-write pwrites
        pos = 0
        drop = offset & (mb - 1)
        if drop:
            pos = min(mb - drop, count)
            self._rmw_block(next, mb, offset - drop, drop,
                            pos if data is None else data[:pos], wflags)
        limit = h.maxlen if data is None else h.maxdata
        while count - pos >= mb:
            n = min(limit, round_down(count - pos, mb))
            with self.lock.shared():
                if data is None:
                    next.zero(n, offset + pos, flags)
                else:
                    next.pwrite(data[pos:pos + n], offset + pos, flags)
            pos += n
        if pos < count:
            self._rmw_block(next, mb, offset + pos, 0,
                            count - pos if data is None else data[pos:], wflags)
        if need_flush:
            next.flush(0)

    def _rmw_block(self, next: Any, mb: int, block_offset: int, skip: int,
                   data: memoryview | int, flags: int) -> None:
        """Read the block at ``block_offset``, put ``data`` (bytes, or an int: that many
        zeroes) at ``skip`` in it and write it back, under the exclusive lock."""
        with self.lock.exclusive():
            block = bytearray(next.pread(mb, block_offset, 0))
            if isinstance(data, int):
                block[skip:skip + data] = bytes(data)
            else:
                block[skip:skip + len(data)] = data
            next.pwrite(block, block_offset, flags)

    def trim(self, next: Any, h: _Limits, count: int, offset: int, flags: int) -> None:
        mb = h.minblock
        need_flush = bool(flags & Flag.FUA) and next.can_fua() == FuaMode.EMULATE
        if need_flush:
            flags &= ~Flag.FUA
        drop = offset & (mb - 1)
        if drop:  # the unaligned head and tail are not trimmed
            keep = min(mb - drop, count)
            offset += keep
            count -= keep
        count = round_down(count, mb)
        while count:
            n = min(h.maxlen, count)
            with self.lock.shared():
                next.trim(n, offset, flags)
            offset += n
            count -= n
        if need_flush:
            next.flush(0)

    def extents(self, next: Any, h: _Limits, count: int, offset: int,
                flags: int) -> list[Extent]:
        # Whole blocks from the block holding offset; less than asked is fine as long as
        # it covers offset (the client asks again).
        mb = h.minblock
        return extents_aligned(next, min(round_up(count, mb), h.maxlen),
                               round_down(offset, mb), flags, mb)

    def cache(self, next: Any, h: _Limits, count: int, offset: int, flags: int) -> None:
        mb = h.minblock
        head = offset & (mb - 1)
        offset -= head
        remaining = round_up(count + head, mb)
        while remaining:
            n = min(h.maxdata, remaining)
            next.cache(n, offset, flags)
            offset += n
            remaining -= n
