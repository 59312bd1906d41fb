"""The xz file format for the xz filter (private): the block index and one block's decoding.

An xz file is one or more streams, each ``header, blocks..., index, footer``, with optional
stream padding (multiples of 4 zero bytes) between and after them. The index of each stream
lists its blocks' sizes, so the uncompressed offset of every block is known without
decompressing anything: random access costs one block's decompression. The layout is
read backwards from the end, as ``xz --list`` and nbdkit's xz filter read it, and problems
are reported with nbdkit 1.32's messages (liblzma's error numbers included: 7 is a format
error, 8 unsupported options, 9 corrupt data).

A block is decoded by liblzma, called through :mod:`ctypes` (:mod:`._xz_decoder`) or
through the standard library's :mod:`lzma` where that cannot be done; either way without
the GIL, so blocks decode in parallel in several threads: the stream's own 12-byte header
followed by the block's bytes is a valid start of an xz stream, and the decoder checks the
block's integrity check (CRC32, CRC64 or SHA-256) as it ends.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import lzma
import zlib
from dataclasses import dataclass, field
from typing import Any

from pynbd.errors import CommandError
from pynbd.filters._xz_decoder import DecoderPool

__all__ = ["HEADER_SIZE", "XzIndex", "decode_block", "read_index"]

#: Stream header and footer size (LZMA_STREAM_HEADER_SIZE).
HEADER_SIZE = 12
_HEADER_MAGIC = b"\xfd7zXZ\x00"
_FOOTER_MAGIC = b"YZ"
# liblzma's lzma_ret values that nbdkit prints as "(error N)".
_FORMAT_ERROR, _OPTIONS_ERROR, _DATA_ERROR, _BUF_ERROR = 7, 8, 9, 10
#: Compressed bytes handed to the decoder at once (bounds the memory a huge block takes).
_CHUNK = 8 << 20


def _fail(message: str) -> CommandError:
    return CommandError(errno.EIO, message)


@dataclass
class XzIndex:
    """Where every non-empty block of an xz file is: parallel lists in uncompressed order."""

    size: int = 0
    nr_streams: int = 0
    starts: list[int] = field(default_factory=list)   # uncompressed offset
    sizes: list[int] = field(default_factory=list)    # uncompressed size
    offsets: list[int] = field(default_factory=list)  # compressed file offset
    totals: list[int] = field(default_factory=list)   # header+data+padding+check, bytes
    headers: list[bytes] = field(default_factory=list)  # the block's stream header
    max_block: int = 0
    #: A digest of every stream's header, index and footer (same file, same digest).
    fingerprint: bytes = b""

    def locate(self, offset: int) -> int:
        """The number of the block holding uncompressed byte ``offset``."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0 or offset >= self.starts[i] + self.sizes[i]:
            raise _fail(f"cannot find offset {offset} in the xz file")
        return i


def _vli(buf: bytes, pos: int) -> tuple[int, int]:
    """An xz variable-length integer at ``pos``: (value, position after it)."""
    value = 0
    for i in range(9):
        if pos >= len(buf):
            raise ValueError("truncated")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i:
                raise ValueError("non-minimal integer")
            return value, pos
    raise ValueError("integer too long")


def _flags_error(flags: bytes) -> bool:
    return flags[0] != 0 or flags[1] & 0xF0 != 0


def _decode_footer(footer: bytes) -> tuple[bytes, int]:
    """(stream flags, index size) of a stream footer, or nbdkit's error."""
    if footer[10:12] != _FOOTER_MAGIC:
        raise _fail(f"xz: invalid stream footer (error {_FORMAT_ERROR})")
    if zlib.crc32(footer[4:10]) != int.from_bytes(footer[0:4], "little"):
        raise _fail(f"xz: invalid stream footer (error {_DATA_ERROR})")
    if _flags_error(footer[8:10]):
        raise _fail(f"xz: invalid stream footer (error {_OPTIONS_ERROR})")
    return footer[8:10], (int.from_bytes(footer[4:8], "little") + 1) * 4


def _decode_header(header: bytes, footer_flags: bytes) -> None:
    if header[:6] != _HEADER_MAGIC:
        raise _fail(f"xz: invalid stream header (error {_FORMAT_ERROR})")
    if zlib.crc32(header[6:8]) != int.from_bytes(header[8:12], "little"):
        raise _fail(f"xz: invalid stream header (error {_DATA_ERROR})")
    if _flags_error(header[6:8]):
        raise _fail(f"xz: invalid stream header (error {_OPTIONS_ERROR})")
    if header[6:8] != footer_flags:
        raise _fail(f"xz: header and footer of stream are not equal (error {_DATA_ERROR})")


def _decode_index(raw: bytes) -> list[tuple[int, int]]:
    """The (unpadded size, uncompressed size) records of one stream's index."""
    try:
        if len(raw) < 8 or raw[0] != 0:
            raise ValueError("not an index")
        if zlib.crc32(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ValueError("index CRC")
        count, pos = _vli(raw, 1)
        records = []
        for _ in range(count):
            unpadded, pos = _vli(raw, pos)
            usize, pos = _vli(raw, pos)
            if unpadded < 5 or unpadded > (1 << 63) - 4:
                raise ValueError("bad unpadded size")
            records.append((unpadded, usize))
        if (pos + 3) & ~3 != len(raw) - 4 or any(raw[pos:-4]):
            raise ValueError("index padding")
    except ValueError:
        raise _fail(f"xz: could not parse index (error {_DATA_ERROR})") from None
    return records


def _pread(next: Any, count: int, offset: int, what: str) -> bytes:
    return bytes(_pread_any(next, count, offset, what))


def _pread_any(next: Any, count: int, offset: int, what: str) -> Any:
    """The buffer the layer below returns, as it is (no copy)."""
    try:
        return next.pread(count, offset, 0)
    except (CommandError, OSError) as e:
        raise _fail(f"xz: {what}: error {e.errno or errno.EIO}") from e


def read_index(next: Any) -> XzIndex:
    """Check the magic, then walk the streams backwards from the end of the file."""
    size = next.get_size()
    if size < len(_HEADER_MAGIC):
        raise _fail("xz: file too short")
    if _pread(next, len(_HEADER_MAGIC), 0, "could not read header magic") != _HEADER_MAGIC:
        raise _fail("xz: not an xz file")
    if size & 3:
        raise _fail("xz: not an xz file: size is not a multiple of 4 bytes")
    streams: list[tuple[int, bytes, list[tuple[int, int]]]] = []
    digest = hashlib.sha256()
    pos = size
    while pos > 0:
        if pos < HEADER_SIZE:
            raise _fail(f"xz: corrupted file at {pos}")
        footer = _pread(next, HEADER_SIZE, pos - HEADER_SIZE, "read stream footer")
        if footer[8:12] == b"\0\0\0\0":  # stream padding
            pos -= 4
            continue
        pos -= HEADER_SIZE
        flags, index_size = _decode_footer(footer)
        if pos < index_size + HEADER_SIZE:
            raise _fail("xz: invalid stream footer")
        pos -= index_size
        raw = _pread(next, index_size, pos, "read index")
        records = _decode_index(raw)
        blocks_size = sum((unpadded + 3) & ~3 for unpadded, _ in records)
        pos -= blocks_size + HEADER_SIZE
        if pos < 0:
            raise _fail(f"xz: corrupted file at {pos + blocks_size + HEADER_SIZE}")
        header = _pread(next, HEADER_SIZE, pos, "read stream header")
        _decode_header(header, flags)
        digest.update(header + raw + footer)
        streams.append((pos, header, records))
    return _build(reversed(streams), digest.digest())


def _build(streams: Any, fingerprint: bytes) -> XzIndex:
    idx = XzIndex(fingerprint=fingerprint)
    ustart = 0
    for start, header, records in streams:
        idx.nr_streams += 1
        coffset = start + HEADER_SIZE
        for unpadded, usize in records:
            total = (unpadded + 3) & ~3
            if usize:
                idx.starts.append(ustart)
                idx.sizes.append(usize)
                idx.offsets.append(coffset)
                idx.totals.append(total)
                idx.headers.append(header)
                idx.max_block = max(idx.max_block, usize)
            ustart += usize
            coffset += total
    idx.size = ustart
    return idx


#: liblzma's return values as the lzma module's messages make them (memory limit: memory).
_RET_ERRNO = {5: 5, 6: 5, _FORMAT_ERROR: _FORMAT_ERROR, _OPTIONS_ERROR: _OPTIONS_ERROR}
_LZMA_ERRORS = (("format", _FORMAT_ERROR), ("options", _OPTIONS_ERROR),
                ("memory", 5), ("corrupt", _DATA_ERROR))


def _lzma_errno(e: lzma.LZMAError) -> int:
    text = str(e).lower()
    for word, number in _LZMA_ERRORS:
        if word in text:
            return number
    return _DATA_ERROR


def decode_block(next: Any, idx: XzIndex, i: int, pool: DecoderPool | None = None) -> Any:
    """Decompress block ``i`` (its integrity check verified): exactly its uncompressed
    size in bytes, or nbdkit's error. With a ``pool`` (see :class:`DecoderPool`), the
    block comes back as a ``bytearray`` that nobody may write to."""
    if pool is None or pool.decoders is None:
        return _decode_lzma(next, idx, i, pool.cpu if pool else contextlib.nullcontext())
    offset, total, want = idx.offsets[i], idx.totals[i], idx.sizes[i]
    n = min(_CHUNK, total)
    raw = _pread_any(next, n, offset, "read")  # the decoder reads any buffer: no copy
    out = pool.buffer(want)
    dec: Any = None
    ret = 0
    with pool.cpu:  # the decoder too is taken and given back within: at most n exist
        dec = pool.decoder()
        try:
            ret = dec.begin(idx.headers[i], out) or dec.feed(raw)
        finally:
            if n == total:
                last = dec.end()
                ret = ret or last
                pool.done(dec)
                dec = None
    if dec is not None:  # a block of several chunks: the decoder is kept across reads
        try:
            done = n
            while not ret and done < total:
                n = min(_CHUNK, total - done)
                raw = _pread_any(next, n, offset + done, "read")
                with pool.cpu:
                    ret = dec.feed(raw)
                done += n
        finally:
            last = dec.end()
            ret = ret or last
            pool.done(dec)
    if ret:
        raise _fail(f"could not parse block data (error {_RET_ERRNO.get(ret, _DATA_ERROR)})")
    return out


def _decode_lzma(next: Any, idx: XzIndex, i: int, cpu: Any) -> bytes:
    offset, total, want = idx.offsets[i], idx.totals[i], idx.sizes[i]
    dec = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        dec.decompress(idx.headers[i])
        parts = []
        done = 0
        while done < total:
            n = min(_CHUNK, total - done)
            raw = _pread(next, n, offset + done, "read")
            with cpu:
                parts.append(dec.decompress(raw))
            done += n
    except lzma.LZMAError as e:
        raise _fail(f"could not parse block data (error {_lzma_errno(e)})") from None
    out = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(out) != want:
        raise _fail(f"could not parse block data (error {_DATA_ERROR})")
    return out
