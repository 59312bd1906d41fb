"""The gzip filter: serve the uncompressed contents of a gzip file. Its manual page is
:class:`GzipFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import zlib
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import CacheMode, Filter

__all__ = ["GzipFilter"]

log = logging.getLogger("pynbd.server")

#: Bytes read from the plugin (and written to the temporary file) at a time.
_BLOCK = 4 << 20
#: Where the temporary file goes without TMPDIR (as nbdkit: room for a whole disk).
_LARGE_TMPDIR = "/var/tmp"


def _zlib_message(e: zlib.error) -> str:
    """zlib's own message ("incorrect header check") from Python's wrapping of it."""
    text = str(e)
    return text.split(": ", 1)[1] if ": " in text else text


class GzipFilter(Filter):
    """NAME
        gzip - pynbd gzip filter: serve the uncompressed contents of a .gz file

    SYNOPSIS
        pynbd serve --filter=gzip PLUGIN [PLUGIN-ARGS...]

        pynbd serve --filter=gzip file FILENAME.gz
        pynbd serve --filter=gzip curl https://example.com/disk.gz

    DESCRIPTION
        gzip decompresses the gzip file that the plugin below serves and serves the
        uncompressed disk, read-only. With the tar filter above it, it serves a file from
        a compressed tar file:

            pynbd serve --filter=tar --filter=gzip file disk.tar.gz tar-entry=disk.img

        The gzip format cannot be read from the middle: to serve any byte the filter needs
        every byte before it. So when the first client connects the filter decompresses
        the whole file, once, into a temporary file (deleted as soon as it is made: it
        disappears with the server), and every client reads from there. Until that is done
        the first client waits; a file that does not decompress (not gzip, truncated,
        corrupt) fails the connection with zlib's message, and the next connection tries
        again. If the plugin's size changes later, connections fail until the server is
        restarted. Only the first member of a multi-member gzip file is served, and data
        after it is ignored (as nbdkit does).

        For large disks prefer xz with small blocks (the xz filter): it reads only what is
        asked for.

        This is nbdkit-gzip-filter(1) for pynbd, with nbdkit 1.32's behaviour and messages.

    PARAMETERS
        None.

    ENVIRONMENT
        TMPDIR
            Where the temporary file with the uncompressed disk is made (default /var/tmp).
            It needs room for the whole uncompressed disk.

    EXAMPLES
        Serve a compressed disk image:

            pynbd serve --filter=gzip file disk.img.gz

        Keep the temporary copy on a large file system:

            TMPDIR=/srv/scratch pynbd serve --filter=gzip curl https://example.com/disk.gz
    """

    name = "gzip"
    version = "1.32.5"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._size = -1
        self._compressed_size = -1

    def unload(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(True, export_name)  # the plugin is only ever read
        return None

    def prepare(self, next: Any, h: Any, readonly: bool) -> None:
        with self._lock:
            if self._size < 0:
                self._uncompress(next)

    def _tempfile(self) -> int:
        tmpdir = os.environ.get("TMPDIR") or _LARGE_TMPDIR
        try:
            fd, path = tempfile.mkstemp(dir=tmpdir)
        except OSError as e:
            raise CommandError(e.errno or errno.EIO,
                               f"mkostemp: {tmpdir}: {e.strerror}") from None
        os.unlink(path)
        return fd

    def _uncompress(self, next: Any) -> None:
        """Decompress the whole plugin into a fresh (unlinked) temporary file."""
        compressed = next.get_size()
        if self._fd >= 0:  # an earlier attempt failed part way
            os.close(self._fd)
            self._fd = -1
        fd = self._tempfile()
        try:
            size = self._inflate(next, compressed, fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._compressed_size = fd, size, compressed
        log.debug("gzip: uncompressed size: %d", size)

    @staticmethod
    def _inflate(next: Any, compressed: int, fd: int) -> int:
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pos = total = 0
        pending = b""
        while not dec.eof:
            if not pending:
                if pos >= compressed:  # zlib would say Z_BUF_ERROR: no progress possible
                    raise CommandError(errno.EIO, "gzip: inflate: unknown error: -5")
                n = min(_BLOCK, compressed - pos)
                pending = bytes(next.pread(n, pos, 0))
                pos += n
            try:
                out = dec.decompress(pending, _BLOCK)
            except zlib.error as e:
                raise CommandError(errno.EIO, f"gzip: inflate: {_zlib_message(e)}") from None
            pending = dec.unconsumed_tail
            view = memoryview(out)
            while view:
                try:
                    written = os.pwrite(fd, view, total)
                except OSError as e:
                    raise CommandError(e.errno or errno.EIO,
                                       f"write: {e.strerror}") from None
                view = view[written:]
                total += written
        return total

    def get_size(self, next: Any, h: Any) -> int:
        if next.get_size() != self._compressed_size:
            raise CommandError(errno.EIO, (
                "plugin size changed unexpectedly: you must restart nbdkit so the gzip "
                "filter can uncompress the data again"))
        return self._size

    def export_description(self, next: Any, h: Any) -> str | None:
        base = next.export_description()
        return None if base is None else f"expansion of gzip-compressed image: {base}"

    def can_write(self, next: Any, h: Any) -> bool:
        return False

    def can_extents(self, next: Any, h: Any) -> bool:
        return False

    def can_multi_conn(self, next: Any, h: Any) -> bool:
        return True  # the data never changes

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        return CacheMode.EMULATE

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        out = bytearray(count)
        view = memoryview(out)
        done = 0
        while done < count:
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise CommandError(e.errno or errno.EIO, f"pread: {e.strerror}") from None
            if n == 0:
                raise CommandError(errno.EIO, "pread: unexpected end of file")
            done += n
        return out
