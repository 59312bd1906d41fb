"""The checkwrite filter: writes become checks. Its manual page is :class:`CheckwriteFilter`'s
docstring."""

from __future__ import annotations

import errno
import logging
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import EXTENT_ZERO, Filter, Flag, FuaMode

__all__ = ["CheckwriteFilter"]

log = logging.getLogger("pynbd.server")

#: Bytes read from the plugin at once when checking that a trimmed or zeroed range reads as
#: zeroes (nbdkit's MAX_REQUEST_SIZE for this filter).
CHECK_CHUNK = 64 * 1024 * 1024
_ZERO_CMP = bytearray(1 << 20)  # never written: memcmp against it finds non-zero bytes


def _mismatch() -> CommandError:
    msg = "data written does not match expected"
    log.error("%s", msg)
    return CommandError(errno.EIO, msg)


def _is_zero(buf: Any) -> bool:
    view = memoryview(buf).cast("B")
    step = len(_ZERO_CMP)
    for pos in range(0, len(view), step):
        part = view[pos:pos + step]
        # bytearray == buffer is one memcmp (a memoryview on the left compares bytewise)
        zero = _ZERO_CMP if len(part) == step else bytearray(len(part))
        if zero != part:
            return False
    return True


class CheckwriteFilter(Filter):
    """NAME
        checkwrite - check that writes match the contents of the plugin

    SYNOPSIS
        pynbd serve --filter=checkwrite PLUGIN [PLUGIN-ARGS...]

    DESCRIPTION
        checkwrite is a filter that turns every write into a check that what is written is
        already there. A write of the same data succeeds (and does nothing); a write of
        different data fails with EIO ("data written does not match expected"). Trim and
        zero requests check that the range reads as zeroes. Flush succeeds.

        The plugin is opened read-only and never written to. The export is offered writable
        whatever the plugin can do, with FUA, trim, zero, fast zero and multi-conn. Sparseness
        is not compared: zeroes may be written as data or as holes. A fast zero request over
        a range that does not already read as zeroes fails at once with ENOTSUP.

        Its use is testing copying tools: serve test data through this filter and copy the
        export onto itself. A correct copy succeeds; a tool that writes anything wrong gets
        EIO (and, if it handles errors, fails). For the random and sparse-random plugins this
        is built in; the filter does it for any plugin.

        This is nbdkit-checkwrite-filter(1) for pynbd.

    PARAMETERS
        There are none of its own: every parameter goes to the plugin.

    EXAMPLES
        Check that nbdcopy copies a disk image correctly:

            pynbd serve -U - --filter=checkwrite file disk.img \\
                --run 'nbdcopy "$uri" "$uri"'

        The same for qemu-img, with sparse test data:

            pynbd serve -U - --filter=checkwrite pattern 1G \\
                --run 'qemu-img convert -n "$uri" "$uri"'
    """

    name = "checkwrite"
    version = "1.0"
    #: Only compares memory with what the layer below returns: may run on the event loop.
    nonblocking = True

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(True, export_name)  # the plugin is only ever read
        return None

    def can_write(self, next: Any, h: Any) -> bool:
        return True

    def can_flush(self, next: Any, h: Any) -> bool:
        return True

    def can_fua(self, next: Any, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    def can_trim(self, next: Any, h: Any) -> bool:
        return True

    def can_zero(self, next: Any, h: Any) -> bool:
        return True

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        # Better advertised, even though fast zero fails over data when extents are missing.
        return True

    def can_multi_conn(self, next: Any, h: Any) -> bool:
        return True

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        view = memoryview(buf).cast("B")
        expected = next.pread(len(view), offset, 0)
        if view != memoryview(expected).cast("B"):
            raise _mismatch()

    def flush(self, next: Any, h: Any, flags: int) -> None:
        pass

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check_zero(next, count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._check_zero(next, count, offset, flags)

    def _check_zero(self, next: Any, count: int, offset: int, flags: int) -> None:
        """The range must read as zeroes; extents (when the plugin has them) spare the
        reading of what is known to be zero."""
        if not next.can_extents():
            if flags & Flag.FAST_ZERO:
                raise CommandError(errno.ENOTSUP, "fast zero is not supported")
            self._read_zero(next, count, offset)
            return
        end = offset + count
        while offset < end:
            for ext_off, ext_len, typ in next.extents(end - offset, offset, 0):
                ext_end = min(ext_off + ext_len, end)
                if not typ & EXTENT_ZERO:
                    if flags & Flag.FAST_ZERO:
                        raise CommandError(errno.ENOTSUP, "fast zero is not supported")
                    self._read_zero(next, ext_end - offset, offset)
                offset = ext_end
                if offset >= end:
                    break

    @staticmethod
    def _read_zero(next: Any, count: int, offset: int) -> None:
        end = offset + count
        while offset < end:
            n = min(CHECK_CHUNK, end - offset)
            if not _is_zero(next.pread(n, offset, 0)):
                raise _mismatch()
            offset += n
