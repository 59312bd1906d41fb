"""The data plugin: a disk written on the command line. Its manual page is
:class:`DataPlugin`'s docstring."""

from __future__ import annotations

import binascii
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._params import parse_size
from pynbd.plugins._data_eval import Blob, evaluate
from pynbd.plugins.memory import MemoryPlugin

__all__ = ["DataPlugin"]

_CHUNK = 1 << 15  # written in memory pages; all-zero pages stay holes


class DataPlugin(MemoryPlugin):
    """NAME
        data - pynbd plugin for serving data from the command line

    SYNOPSIS
        pynbd serve data [data=]'0 1 2 3 @0x1fe 0x55 0xaa' [size=SIZE]
                         [allocator=sparse|malloc|zstd] [VAR=VALUE ...]
        pynbd serve data base64='aGVsbG8gbmJka2l0IHVzZXI=' [size=SIZE]
        pynbd serve data raw='binary_data' [size=SIZE]

    DESCRIPTION
        data is a plugin for pynbd which serves a small amount of data given on the command
        line, possibly followed by zeroes (size= pads or truncates the disk), in memory, as
        the memory plugin does: the disk may be written, and writes are lost at exit. Parts
        never written are holes. It is nbdkit-data-plugin(1) for pynbd, with the same
        language; a data string serves the same bytes and extents under both.

    DATA FORMAT
        A list of expressions separated by blanks, written one after another from offset 0:

        BYTE             a byte, decimal, 0 octal or 0x hexadecimal (0..255)
        le16:W be16:W le32:W be32:W le64:W be64:W
                         a word, little or big endian
        @OFFSET          move to OFFSET;  @+N / @-N  move forward / back N bytes
        @^ALIGNMENT      move forward to the next multiple of ALIGNMENT (a power of 2)
        <FILE            the contents of FILE (no blanks in the name)
        <(SCRIPT)        the output of /bin/sh -c SCRIPT (matching parentheses allowed)
        "STRING"         a string with C's escapes (\\n, \\t, \\\\, \\", \\xHH, \\OOO...)
        ( ... )          a group: a nested list, offsets relative to its start
        EXPR * N         EXPR repeated N times
        EXPR [N:M]       bytes N to M-1 of EXPR (either may be omitted)
        EXPR -> \\NAME   name EXPR (nothing is written); \\NAME writes it later, in this
                         scope or a nested one
        $VAR             a parameter VAR=... of the command line (or else an environment
                         variable) written in this language, as a group
        # COMMENT        to the end of the line

        The disk's size is the furthest offset reached, unless size= says otherwise.

        Difference from nbdkit 1.32: numeric escapes in strings (\\xHH, \\OOO) are
        implemented (nbdkit 1.32 refuses them as "not yet implemented").

    PARAMETERS
        [data=]DATA
            The disk, in the data format above. "data=" may be omitted.

        base64=BASE64
            The disk as base64.

        raw=BINARY
            The disk's bytes as given.

            Exactly one of data, base64 and raw must be given.

        size=SIZE
            Truncate or extend (with zeroes) the disk to SIZE.

        allocator=sparse|malloc[,mlock=true]|zstd
            How memory is allocated, as for the memory plugin (default sparse).

        VAR=VALUE
            Any other parameter is a variable for $VAR.

    EXAMPLES
        A 4 KiB disk of 0x55 0xAA:

            pynbd serve data ' ( 0x55 0xAA )*2048 '

        A 1 MiB disk with an MBR boot signature:

            pynbd serve data '@0x1fe 0x55 0xaa' size=1M

        Files aligned to sectors:

            pynbd serve data ' <file1 @^512 <file2 @^512 '

        Hello, world:

            pynbd serve -U - data raw='Hello, world!' --run 'nbdcopy "$uri" - | cat'
    """

    name = "data"
    version = "1.0"
    magic_config_key = "data"
    config_help = (
        "data|raw|base64=...     Specify disk data on the command line\n"
        "size=<SIZE>             Size of the backing disk\n"
        "allocator=sparse|malloc|zstd  Backend allocation strategy")

    def __init__(self) -> None:
        super().__init__()
        self._sources: list[tuple[str, str]] = []
        self._vars: dict[str, str] = {}
        self._size_param: int | None = None

    def config(self, key: str, value: str) -> None:
        if key in ("data", "base64", "raw"):
            self._sources.append((key, value))
        elif key == "size":
            self._size_param = parse_size(value)
        elif key == "allocator":
            super().config(key, value)
        else:
            self._vars[key] = value

    def config_complete(self) -> None:
        if not self._sources:
            raise ConfigError("raw|base64|data parameter was not specified")
        if len(self._sources) != 1:
            raise ConfigError("raw|base64|data parameter must be specified exactly once")
        kind, value = self._sources[0]
        if kind == "raw":
            raw = value.encode("utf-8", "surrogateescape")
            blob = Blob(len(raw), [(0, raw)])
        elif kind == "base64":
            try:
                raw = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
            except (binascii.Error, UnicodeEncodeError) as e:
                raise ConfigError(f"base64: could not decode: {e}") from None
            blob = Blob(len(raw), [(0, raw)])
        else:
            blob = evaluate(value, self._vars)
        size = blob.size if self._size_param is None else self._size_param
        self._size = size
        super().config_complete()
        for off, data in blob.pieces:
            self._write_initial(data[:max(0, size - off)], off)

    def _write_initial(self, data: bytes, offset: int) -> None:
        pos = 0
        while pos < len(data):
            n = min(_CHUNK - (offset + pos) % _CHUNK, len(data) - pos)
            part = data[pos:pos + n]
            if part.count(0) == n:  # zeroes: a hole (or zero what an earlier piece wrote)
                self.zero(None, n, offset + pos, 0)
            else:
                self.pwrite(None, memoryview(part), offset + pos, 0)
            pos += n

    def dump_plugin(self) -> list[str]:
        return ["data_base64=yes", *super().dump_plugin()]

    def get_size(self, h: Any) -> int:
        return self._size or 0
