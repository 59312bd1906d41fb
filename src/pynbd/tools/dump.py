"""``pynbd dump``: hexdump the content of an NBD export, as libnbd's nbddump 1.14 does.

::

    pynbd dump [--color|--no-color] [-n N|--length=N] NBD-URI
    pynbd dump [...] -- [ CMD ARGS ... ]

The output is nbddump's, byte for byte: ``%010x:`` offsets, sixteen ``%02x`` bytes per line
with an extra space after the eighth, the printable ASCII between ``|`` bars, a single ``*``
for a run of lines equal to the line before (the first and the last line of the disk are
never squashed), and with ``--color`` (the default on a terminal) nbddump's ANSI colours and
the glyphs ``│``, ``·`` and ``☆``. ``-n``/``--length`` is parsed as nbddump parses it (C
``sscanf("%lu")``: leading digits, no size suffixes). The command line is parsed as GNU
``getopt_long`` parses nbddump's (options may follow the URI, unique prefixes of long
options are accepted), and errors carry getopt's wording on one line. Messages name
``pynbd dump`` where nbddump names itself, and ``-V`` prints pynbd's version, then libnbd's.

How it is fast: block status is asked for large ranges and runs of zero lines are
accounted for arithmetically, without being read; data is read in large requests and each
block of lines is built with a handful of strided slice assignments over the whole block
(one per output column) instead of a loop over bytes, and only the lines that are printed
are built.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from math import gcd as _gcd
from typing import Any, BinaryIO, NoReturn

from pynbd import __version__
from pynbd import libnbd as nbd
from pynbd.tools import _getopt, _lifetime

__all__ = ["main", "parse_length"]

#: The program name that starts every message (nbddump's messages, named for this command).
PROG = "pynbd dump"

USAGE = """\

Hexdump the content of a disk over NBD:

    pynbd dump NBD-URI | [ CMD ARGS ... ]

Other options:

    pynbd dump --help
    pynbd dump --version

Examples:

    pynbd dump nbd://localhost
    pynbd dump -- [ qemu-nbd -r -f qcow2 file.qcow2 ]

pynbd dump follows libnbd's nbddump: its options and output.
Please read docs/dump.md (or nbddump(1)) for full usage.

"""

#: Largest read request: nbddump reads 16 MiB at a time; 4 MiB keeps the formatted block
#: (five times the data) small while still amortising the per-request cost.
READ_SIZE = 4 * 1024 * 1024
#: Block status is asked for this much at once (under the protocol's 32-bit length).
STATUS_RANGE = 1 << 30
#: Zero extents shorter than this are read like data: a request costs more than its bytes.
MIN_SKIP = 256 * 1024
#: What ``--length`` means when it is not given (C's UINT64_MAX).
UNLIMITED = (1 << 64) - 1

# ----------------------------------------------------------------------------- command line

_SHORT_OPTS = "n:V"
# (name, takes an argument, value) in nbddump's table order (getopt reports ambiguity so).
_LONG_OPTS: list[tuple[str, bool, str]] = [
    ("help", False, "help"),
    ("long-options", False, "long-options"),
    ("short-options", False, "short-options"),
    ("version", False, "V"),
    ("color", False, "colour"),
    ("colors", False, "colour"),
    ("colour", False, "colour"),
    ("colours", False, "colour"),
    ("no-color", False, "no-colour"),
    ("no-colors", False, "no-colour"),
    ("no-colour", False, "no-colour"),
    ("no-colours", False, "no-colour"),
    ("length", True, "n"),
    ("limit", True, "n"),
]

_LENGTH_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


class _Usage(Exception):
    """A bad command line: the message is one line, nbddump exits 1."""


def parse_length(text: str) -> int | None:
    """Parse ``--length`` as C's ``sscanf(text, "%" SCNu64)``; None when that fails.

    Leading white space and a sign are allowed, the leading decimal digits are used and the
    rest is ignored (``"1M"`` is 1), a negative number wraps modulo 2**64 and an overflow
    saturates, as glibc's ``strtoull``.
    """
    m = _LENGTH_RE.match(text)
    if m is None:
        return None
    value = int(m.group(2))
    if value > UNLIMITED:
        return UNLIMITED
    if m.group(1) == "-":
        value = (-value) & UNLIMITED
    return value


_LONGOPTS = [_getopt.LongOption(name, int(takes), key) for name, takes, key in _LONG_OPTS]


def _parse_args(argv: list[str], handle: Callable[[str, str | None], None]) -> list[str]:
    """GNU getopt_long over nbddump's options, with argument permutation.

    Each option is passed to `handle(value, optarg)` as it is met (so ``-V --bad`` prints the
    version and ``--bad -V`` fails, as nbddump); returns the non-option arguments in order.
    """
    try:
        return _getopt.getopt_long(argv, _SHORT_OPTS, _LONGOPTS, on_option=handle)[1]
    except _getopt.GetoptError as e:
        raise _Usage(str(e)) from None


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


# ----------------------------------------------------------------------------- formatting

_HEXDIGITS = b"0123456789abcdef"
_HI = bytes(_HEXDIGITS[b >> 4] for b in range(256))
_LO = bytes(_HEXDIGITS[b & 15] for b in range(256))
# isprint() in the C locale: 0x20..0x7e; nbddump shows anything else as a dot.
_ASCII = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))
_ZERO_LINE = bytes(16)

#: Lines formatted at a time (bounds the memory of a block: coloured lines are ~25x the data).
_BLOCK_LINES = 4096
LINE_LEN = 80  # "%010x: " + 49 columns of hex + "|" + 16 + "|\n"
_TEMPLATE = b"0000000000: " + b" " * 49 + b"|" + b"." * 16 + b"|\n"
assert len(_TEMPLATE) == LINE_LEN
#: Offsets below this print in exactly 10 hex digits ("%010x"); the bulk builder relies on it.
_MAX_FIXED_OFFSET = 1 << 40
# Digit d of "%03x" % i, for i in 0..4095: the low three digits of line numbers.
_LOW_DIGITS = [bytes(ord(f"{i:03x}"[d]) for i in range(4096)) for d in range(3)]
# Where byte j of a line puts its two hex digits and its character.
_HEX_POS = [12 + 3 * j + (1 if j >= 8 else 0) for j in range(16)]
_ASCII_POS = 62

# nbddump's colours (common/include/ansi-colours.h in libnbd 1.14).
_GREEN = b"\033[22;32m"
_GREY = b"\033[22;90m"
_BLUE = b"\033[1;34m"
_RED = b"\033[1;31m"
_MAGENTA = b"\033[1;35m"
_RESTORE = b"\033[0m"


def _colour_tables() -> tuple[list[bytes], list[bytes]]:
    hexc = [(_BLUE if b else _GREY) + b"%02x " % b for b in range(256)]
    ascc = []
    for b in range(256):
        if 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A:  # isalnum, C locale
            ascc.append(_RED + bytes([b]))
        elif 0x20 <= b < 0x7F:  # isprint
            ascc.append(_MAGENTA + bytes([b]))
        else:
            ascc.append(_GREY + "·".encode())
    return hexc, ascc


_HEXC, _ASCC = _colour_tables()


def format_lines_plain(data: bytes | bytearray | memoryview, offset: int) -> bytes:
    """nbddump's lines (no colour) for `data`, a whole number of 16-byte lines at `offset`."""
    m = len(data) // 16
    if m == 0:
        return b""
    if m < 8 or offset + 16 * m > _MAX_FIXED_OFFSET or offset % 16:
        # Few lines, or offsets of more than 10 digits (past 1 TiB): line by line.
        return b"".join(_plain_line(data[16 * k : 16 * k + 16], offset + 16 * k)
                        for k in range(m))
    out = bytearray(_TEMPLATE * m)
    b = bytes(data)
    hi = b.translate(_HI)
    lo = b.translate(_LO)
    asc = b.translate(_ASCII)
    for j, pos in enumerate(_HEX_POS):
        out[pos::LINE_LEN] = hi[j::16]
        out[pos + 1 :: LINE_LEN] = lo[j::16]
        out[_ASCII_POS + j :: LINE_LEN] = asc[j::16]
    # The offset is the line number in 9 hex digits and a '0' (already in the template).
    # Within a run of 4096 lines the top 6 digits stay the same and the next 3 count up,
    # so the digits come from a table instead of formatting every line.
    k = 0
    line = offset // 16
    while k < m:
        low = line & 0xFFF
        seg = min(m - k, 4096 - low)
        a, z = LINE_LEN * k, LINE_LEN * (k + seg)
        for d, ch in enumerate(b"%06x" % (line >> 12)):
            if ch != 0x30:  # '0' is in the template
                out[a + d : z : LINE_LEN] = bytes((ch,)) * seg
        for d in range(3):
            out[a + 6 + d : z : LINE_LEN] = _LOW_DIGITS[d][low : low + seg]
        k += seg
        line += seg
    return bytes(out)


def _plain_line(line: bytes | bytearray | memoryview, offset: int) -> bytes:
    """One line, which may hold fewer than 16 bytes (the end of the dump)."""
    b = bytes(line)
    n = len(b)
    hexpart = "".join(f"{x:02x} " + (" " if j == 7 else "") for j, x in enumerate(b))
    hexpart += "".join("   " + (" " if j == 7 else "") for j in range(n, 16))
    asc = b.translate(_ASCII).decode("ascii") + " " * (16 - n)
    return f"{offset:010x}: {hexpart}|{asc}|\n".encode("ascii")


def _colour_line(line: bytes | bytearray | memoryview, offset: int) -> bytes:
    b = bytes(line)
    n = len(b)
    parts = [_GREEN, b"%010x" % offset, _GREY, b": "]
    for j, x in enumerate(b):
        parts.append(_HEXC[x])
        if j == 7:
            parts.append(b" ")
    parts.append(_GREY)
    for j in range(n, 16):
        parts.append(b"   ")
        if j == 7:
            parts.append(b" ")
    parts.append("│".encode())
    parts.extend(map(_ASCC.__getitem__, b))
    parts += [_GREY, b" " * (16 - n), "│\n".encode(), _RESTORE]
    return b"".join(parts)


_HEXC7 = [h + b" " for h in _HEXC]  # the eighth byte of a line is followed by a gap
_COLOUR_PREFIX = _GREEN + b"%010x" + _GREY + b": "
_COLOUR_MID = _GREY + "│".encode()
_COLOUR_END = _GREY + "│\n".encode() + _RESTORE
_PARTS = 35  # pieces per coloured line: prefix, 16 hex, middle, 16 characters, end


def format_lines_colour(data: bytes | bytearray | memoryview, offset: int) -> bytes:
    """nbddump's coloured lines for `data` (whole 16-byte lines, then perhaps one shorter
    line) at `offset`.

    Every piece of every line comes from a table; the pieces of all lines are laid out in one
    list with strided slice assignments and joined once.
    """
    b = bytes(data)
    m = len(b) // 16
    parts: list[bytes] = [b""] * (_PARTS * m)
    if m:
        full = b[: 16 * m]
        hexes = list(map(_HEXC.__getitem__, full))
        hexes[7::16] = map(_HEXC7.__getitem__, full[7::16])
        chars = list(map(_ASCC.__getitem__, full))
        parts[0::_PARTS] = map(_COLOUR_PREFIX.__mod__, range(offset, offset + 16 * m, 16))
        for j in range(16):
            parts[1 + j :: _PARTS] = hexes[j::16]
            parts[18 + j :: _PARTS] = chars[j::16]
        parts[17::_PARTS] = [_COLOUR_MID] * m
        parts[34::_PARTS] = [_COLOUR_END] * m
    if len(b) > 16 * m:
        parts.append(_colour_line(b[16 * m :], offset + 16 * m))
    return b"".join(parts)


# ----------------------------------------------------------------------------- the dumper


class Dumper:
    """Turns the content of a disk, in order, into nbddump's output.

    Feed it consecutive pieces with :meth:`data` (bytes read) or :meth:`zeroes` (a run
    known to be zero); it writes finished output to `out`. The squashing rule is nbddump's:
    a line is replaced by ``*`` when it equals the line before it, unless it is the first
    line of the disk or the line that reaches the end of the disk (`size`); one ``*``
    stands for a whole run.
    """

    def __init__(self, out: BinaryIO, size: int, colour: bool) -> None:
        self.out = out
        self.size = size
        self.colour = colour
        self.splat = "☆\n".encode() if colour else b"*\n"
        self.offset = 0  # where the next piece starts (always a multiple of 16 but the last)
        self.prev: bytes | None = None  # the previous line (zero-padded), None at the start
        self.in_splat = False
        self._pending: list[bytes] = []
        self._pending_len = 0

    # -- output buffering
    def _emit(self, b: bytes) -> None:
        self._pending.append(b)
        self._pending_len += len(b)
        if self._pending_len >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.out.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_len = 0
        self.out.flush()

    def _lines(self, data: bytes | memoryview, offset: int) -> bytes:
        if self.colour:
            return format_lines_colour(data, offset)
        full = len(data) & ~15
        out = format_lines_plain(data[:full], offset)
        if full < len(data):
            out += _plain_line(data[full:], offset + full)
        return out

    def _last_line_index(self, offset: int, nlines: int) -> int:
        """Index, in a block of `nlines` lines at `offset`, of the line that reaches the end of
        the disk (it is never squashed), or -1 when the block does not hold it."""
        k = max(0, -(-(self.size - 16 - offset) // 16))  # first k: offset + 16k + 16 >= size
        return k if k < nlines else -1

    def _runs(self, flags: bytearray, data: bytes, offset: int) -> None:
        """Emit a block of lines; flags[k] is 's' for a squashed line, 'p' for a printed one."""
        for m in re.finditer(rb"p+|s+", flags):
            a, b = m.span()
            if flags[a] == 0x73:  # 's'
                if not self.in_splat:
                    self._emit(self.splat)
                    self.in_splat = True
                continue
            self.in_splat = False
            for c in range(a, b, _BLOCK_LINES):
                d = min(b, c + _BLOCK_LINES)
                self._emit(self._lines(data[16 * c : 16 * d], offset + 16 * c))

    def _fix_ends(self, flags: bytearray, offset: int) -> None:
        if offset == 0 and flags:
            flags[0] = 0x70  # 'p': the first line is never squashed
        last = self._last_line_index(offset, len(flags))
        if last >= 0:
            flags[last] = 0x70

    def zeroes(self, length: int) -> None:
        """A run of `length` zero bytes (`length` a multiple of 16 unless it ends the dump)."""
        if length <= 0:
            return
        offset = self.offset
        nlines = (length + 15) // 16
        # Only the first line, the line at the end of the disk and one splat between them
        # can be printed, so the run is handled as (at most) three representative lines.
        last = self._last_line_index(offset, nlines)
        first_printed = offset == 0 or self.prev != _ZERO_LINE or last == 0
        reps = [(first_printed, offset)]
        if nlines - 1 - (1 if last > 0 else 0) > 0:
            reps.append((False, offset + 16))  # stands for every squashed middle line
        if last > 0:
            reps.append((True, offset + 16 * last))
        for printed, at in reps:
            if not printed:
                if not self.in_splat:
                    self._emit(self.splat)
                    self.in_splat = True
                continue
            self.in_splat = False
            tail = min(16, self.offset + length - at)
            self._emit(self._lines(_ZERO_LINE[:tail], at))
        self.prev = _ZERO_LINE
        self.offset += length

    def data(self, buf: bytes | bytearray | memoryview) -> None:
        """The next `len(buf)` bytes of the disk (a multiple of 16 unless it ends the dump)."""
        n = len(buf)
        if n == 0:
            return
        data = bytes(buf)
        if data.count(0) == n:
            self.zeroes(n)
            return
        offset = self.offset
        nlines = (n + 15) // 16
        padded = data + bytes(nlines * 16 - n)
        # eq[k]: line k equals line k-1 (line -1 is the previous piece's last line). One XOR
        # of the block against itself shifted by a line, then an OR of the 16 columns.
        prev = self.prev
        shifted = (prev if prev is not None else _ZERO_LINE) + padded[:-16]
        x = int.from_bytes(padded, "big") ^ int.from_bytes(shifted, "big")
        diff = x.to_bytes(len(padded), "big")
        acc = 0
        for j in range(16):
            acc |= int.from_bytes(diff[j::16], "big")
        per_line = acc.to_bytes(nlines, "big")
        flags = bytearray(per_line.translate(_FLAG_TABLE))
        if prev is None:
            flags[0] = 0x70
        self._fix_ends(flags, offset)
        self._runs(flags, data, offset)
        self.prev = padded[-16:]
        self.offset += n


_FLAG_TABLE = bytes([0x73] + [0x70] * 255)  # 0 (same as the line before) -> 's', else 'p'


# ----------------------------------------------------------------------------- main


def _die(msg: str) -> NoReturn:
    print(f"{PROG}: {msg}", file=sys.stderr)
    raise _Exit(1)


class _Reader:
    """Reads [0, count) of the export for a Dumper: zero areas found by block status are
    skipped, data is read in large requests.

    Every request respects what the server advertised: lengths at most its maximum block
    size, offsets and lengths multiples of its minimum block size (a request may reach past
    `count`, never past the end of the export; the extra bytes are not shown).
    """

    def __init__(self, h: nbd.NBD, size: int, count: int, can_meta: bool) -> None:
        self.h = h
        self.size = size
        self.count = count
        self.can_meta = can_meta
        minimum = h.get_block_size(nbd.SIZE_MINIMUM)
        maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
        # Piece boundaries fall on lines and on the server's minimum block size.
        self.align = 16 * minimum // _gcd(16, minimum) if minimum > 0 else 16
        self.read_size = READ_SIZE
        if maximum > 0:
            self.read_size = max(self.align, min(READ_SIZE, maximum // self.align * self.align))
        self.read_size = max(self.align, self.read_size // self.align * self.align)

    def _request_length(self, offset: int, length: int) -> int:
        """`length` rounded up to the alignment, but not past the end of the export."""
        return min(-(-length // self.align) * self.align, self.size - offset)

    def plan(self, offset: int) -> list[tuple[bool, int, int]]:
        """Split [offset, count) - or a first part of it - into (is_zero, start, stop) pieces
        on aligned boundaries, with one block status request of up to STATUS_RANGE bytes."""
        end = self.count
        if not self.can_meta:
            return [(False, offset, end)]
        want = min(end - offset, STATUS_RANGE)
        entries: list[int] = []

        def extent(metacontext: str, off: int, e: list[int], err: Any) -> int:
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                entries.extend(e)
            return 0

        try:
            self.h.block_status(self._request_length(offset, want), offset, extent)
        except nbd.Error as e:
            _die(e.string)
        align = self.align
        pieces: list[tuple[bool, int, int]] = []
        pos = offset
        stop = offset + want
        for i in range(0, len(entries) - 1, 2):
            length, flags = entries[i], entries[i + 1]
            if length <= 0 or pos >= stop:
                break
            a, b = pos, min(pos + length, stop)
            pos = b
            if flags & nbd.STATE_ZERO:
                # Only whole aligned blocks inside the extent count as zero (the end of the
                # dump counts as aligned: a last partial line is padded with zeroes anyway).
                za = -(-a // align) * align
                zb = b if b == end else b // align * align
                if zb - za >= MIN_SKIP:
                    if za > a:
                        pieces.append((False, a, za))
                    pieces.append((True, za, zb))
                    if b > zb:
                        pieces.append((False, zb, b))
                    continue
            pieces.append((False, a, b))
        if pos < stop:
            # The server described less than was asked (it may): plan up to the last aligned
            # boundary it described and ask again from there - unless that is too little to
            # be worth a request of its own: then read one request's worth as data.
            cut = pos if pos == end else pos // align * align
            if cut - offset < self.read_size:
                return [(False, offset, min(end, offset + self.read_size))]
            pieces = [(z, a, min(b, cut)) for z, a, b in pieces if a < cut]
        # Merge neighbouring data pieces (each piece starts on an aligned boundary).
        merged: list[tuple[bool, int, int]] = []
        for p in pieces:
            if merged and not p[0] and not merged[-1][0]:
                merged[-1] = (False, merged[-1][1], p[2])
            else:
                merged.append(p)
        return merged

    def run(self, dumper: Dumper) -> None:
        offset = 0
        while offset < self.count:
            pieces = self.plan(offset)
            for is_zero, a, b in pieces:
                if is_zero:
                    dumper.zeroes(b - a)
                    continue
                pos = a
                while pos < b:
                    n = min(self.read_size, b - pos)
                    try:
                        buf = self.h.pread(self._request_length(pos, n), pos)
                    except nbd.Error as e:
                        _die(e.string)
                    dumper.data(memoryview(buf)[:n] if len(buf) > n else buf)
                    pos += n
            offset = pieces[-1][2]


def _restore_on_signal(dumper_box: list[Dumper], colour: bool) -> None:
    def handler(signum: int, frame: Any) -> None:
        out = sys.stdout.buffer
        try:
            if dumper_box:
                d = dumper_box[0]
                out.write(b"".join(d._pending))
            out.write(b"\n" + (_RESTORE if colour else b""))
            out.flush()
        finally:
            os._exit(1)

    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _isatty(f: BinaryIO) -> bool:
    """nbddump's default for colours: is standard output a terminal?"""
    try:
        return os.isatty(f.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is both)
        return False


def _die_of_sigpipe() -> NoReturn:
    """The reader went away: end as the C tool does, killed by SIGPIPE (shells see 141)."""
    _lifetime.die_of(signal.SIGPIPE)


def main(argv: list[str]) -> int:
    with _lifetime.tool():  # a server started for [ CMD ] dies with this process
        return _main_ended(argv)


def _main_ended(argv: list[str]) -> int:
    try:
        return _main(argv)
    except _Exit as e:
        return e.status
    except KeyboardInterrupt:
        # Ctrl-C before the dump started (while connecting): end as nbddump does, killed by
        # SIGINT, not with a traceback.
        _lifetime.die_of(signal.SIGINT)


def _command_line(argv: list[str]) -> tuple[dict[str, Any], list[str] | None, str]:
    """The options ({"colour": ..., "limit": ...}), and the server: [ CMD ] or an NBD URI."""
    opts: dict[str, Any] = {"colour": None, "limit": UNLIMITED}

    def handle(opt: str, optarg: str | None) -> None:
        if _getopt.print_listing(opt, USAGE, _LONGOPTS, _SHORT_OPTS):
            raise _Exit(0)
        if opt == "V":
            print(f"{PROG} {__version__}\n{nbd.package_name} {nbd.__version__}")
            raise _Exit(0)
        if opt == "colour":
            opts["colour"] = True
        elif opt == "no-colour":
            opts["colour"] = False
        elif opt == "n":
            assert optarg is not None
            value = parse_length(optarg)
            if value is None:
                _die(f"could not parse --length option: {optarg}")
            opts["limit"] = value

    try:
        rest = _parse_args(argv, handle)
    except _Usage as e:
        _die(str(e))
    if len(rest) >= 3 and rest[0] == "[" and rest[-1] == "]":
        return opts, rest[1:-1], ""
    if len(rest) == 1:
        return opts, None, rest[0]
    if not rest:
        _die(f"no NBD-URI or [ CMD ARGS ... ] given (see {PROG} --help)")
    if rest[0] == "[":
        _die("expected [ CMD ARGS ... ]: a command between separate '[' and ']' arguments"
             f" (see {PROG} --help)")
    _die(f"expected one NBD-URI or [ CMD ARGS ... ], got {len(rest)} arguments"
         f" (see {PROG} --help)")


def _main(argv: list[str]) -> int:
    opts, command, uri = _command_line(argv)
    out = sys.stdout.buffer
    colour = opts["colour"]
    if colour is None:
        colour = _isatty(out)

    h = nbd.NBD()
    try:
        h.set_uri_allow_local_file(True)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_pread_initialize(False)
        try:
            if command is not None:
                h.connect_systemd_socket_activation(command)
            else:
                h.connect_uri(uri)
            can_meta = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            size = h.get_size()
        except nbd.Error as e:
            _die(e.string)
        dumper = Dumper(out, size, colour)
        _restore_on_signal([dumper], colour)
        try:
            _Reader(h, size, min(size, opts["limit"]), can_meta).run(dumper)
            dumper.flush()
        except BrokenPipeError:
            _die_of_sigpipe()
        try:
            h.shutdown()
        except nbd.Error as e:
            _die(e.string)
    finally:
        h.close()
    return 0
