"""nbdkit's parameter parsers, with its rules and its messages (private to the behaviour
filters: nozero, fua, nocache, noparallel, multi-conn, exportname, retry, retry-request,
scan, limit, ip, exitlast, exitwhen).

nbdkit's filters parse numbers with ``nbdkit_parse_unsigned`` and friends (C's ``strtoul``
with base 0: decimal, ``0x`` hex, ``0`` octal, leading blanks), booleans with
``nbdkit_parse_bool`` and sizes with ``nbdkit_parse_size``. Users and scripts rely on what
these accept and on their messages, so they are reproduced here; each error is a
:class:`~pynbd.errors.ConfigError` carrying nbdkit 1.32's text.

Also here: running a shell command the way C's ``system()``/``popen()`` do, for the filters
that take scripts (exportname's ``exportdesc=script:``, exitwhen's ``exit-when-script``), and
the retry filters' sleep, which ends early when the server shuts down (``nbdkit_nanosleep``).
"""

from __future__ import annotations

import os
import subprocess
import time

from pynbd.errors import ConfigError
from pynbd.plugin import connection

__all__ = [
    "INT64_MAX",
    "UINT_MAX",
    "absolute_path",
    "parse_bool",
    "parse_int",
    "parse_int64",
    "parse_size",
    "parse_uint64",
    "parse_unsigned",
    "shell",
    "sleep",
]

UINT_MAX = (1 << 32) - 1
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_ERANGE = os.strerror(34)  # what %m prints for ERANGE: "Numerical result out of range"
_SPACE = " \t\n\v\f\r"  # C's isspace() in the "C" locale
_HEX = "0123456789abcdefABCDEF"


def _strtol(text: str, start: int) -> tuple[int, int]:
    """C's strtol/strtoul, base 0, from ``start``: (value, end); ``end == start`` when no
    digits were found. The value is the mathematical one: the caller checks the range."""
    i, n = start, len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    neg = False
    if i < n and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    if text.startswith(("0x", "0X"), i) and i + 2 < n and text[i + 2] in _HEX:
        base, digits, i = 16, _HEX, i + 2
    elif i < n and text[i] == "0":
        base, digits = 8, "01234567"
    else:
        base, digits = 10, "0123456789"
    j = i
    while j < n and text[j] in digits:
        j += 1
    if j == i:
        return 0, start
    value = int(text[i:j], base)
    return (-value if neg else value), j


def _number(what: str, text: str, lo: int, hi: int, unsigned: bool) -> int:
    """nbdkit's parse_* common tail: sign, range, "empty", then trailing garbage."""
    start = 0
    while start < len(text) and text[start] in _SPACE:
        start += 1
    if unsigned:
        # the unsigned parsers skip the blanks themselves (to refuse a sign): their
        # messages show the text without them
        if text.startswith("-", start):
            raise ConfigError(f"{what}: negative numbers are not allowed")
        text = text[start:]
    value, end = _strtol(text, 0)
    if end != 0 and not lo <= value <= hi:
        raise ConfigError(f'{what}: could not parse number: "{text}": {_ERANGE}')
    if end == 0:
        raise ConfigError(f"{what}: empty string where we expected a number")
    if end != len(text):
        raise ConfigError(f'{what}: could not parse number: "{text}": trailing garbage')
    return value


def parse_unsigned(what: str, text: str) -> int:
    """``nbdkit_parse_unsigned``: 0 to 2^32-1."""
    return _number(what, text, 0, UINT_MAX, True)


def parse_uint64(what: str, text: str) -> int:
    """``nbdkit_parse_uint64_t``: 0 to 2^64-1."""
    return _number(what, text, 0, UINT64_MAX, True)


def parse_int(what: str, text: str) -> int:
    """``nbdkit_parse_int``: a signed C int."""
    return _number(what, text, INT_MIN, INT_MAX, False)


def parse_int64(what: str, text: str) -> int:
    """``nbdkit_parse_int64_t``: a signed 64-bit number."""
    return _number(what, text, INT64_MIN, INT64_MAX, False)


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """``nbdkit_parse_bool``: 1/true/t/yes/y/on, 0/false/f/no/n/off, in any case."""
    low = text.lower() if text.isascii() else text
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"could not decipher boolean ({text})")


def parse_size(text: str) -> int:
    """``nbdkit_parse_size``: a number with an optional suffix (b; s = 512 bytes; k, m, g,
    t, p, e = powers of 1024, in either case), at most 2^63-1."""
    i = 0
    while i < len(text) and text[i] in _SPACE:
        i += 1
    neg = text.startswith("-", i)
    if text.startswith(("-", "+"), i):
        i += 1
    j = i
    while j < len(text) and text[j].isdigit() and text[j].isascii():
        j += 1
    if j == i:
        raise ConfigError(f"could not parse size string ({text})")
    size = int(text[i:j])
    if neg and size:
        raise ConfigError(f"size cannot be negative ({text})")
    if size > INT64_MAX:
        raise ConfigError(f"size ({text}) exceeds maximum value")
    rest = text[j:]
    scale = 1
    if rest:
        c = rest[0].lower()
        if len(rest) > 1 or c not in "bskmgtpe":
            raise ConfigError(f"could not parse size: unknown suffix '{rest}'")
        scale = 512 if c == "s" else 1 << (10 * "bkmgtpe".index(c))
    if INT64_MAX // scale < size:
        raise ConfigError(f"overflow computing size ({text})")
    return size * scale


def absolute_path(text: str) -> str:
    """``nbdkit_absolute_path``: ``text`` made absolute against the current directory
    (links not resolved: the file need not exist yet)."""
    if not text:
        raise ConfigError("cannot convert null or empty path to an absolute path")
    if text.startswith("/"):
        return text
    return f"{os.getcwd()}/{text}"


def shell(command: str, capture: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` with ``/bin/sh -c`` (as C's ``system``/``popen`` do): stdin from
    /dev/null, stdout captured with ``capture``, else (like stderr) the server's own."""
    return subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else None, check=False)


#: How often a sleep looks whether the server is shutting down.
_SLEEP_STEP = 0.1


def sleep(seconds: float) -> bool:
    """Sleep ``seconds`` in the calling (worker) thread, as ``nbdkit_nanosleep``: False if
    the sleep was cut short because the server began shutting down, else True."""
    info = connection()
    server = info.server if info is not None else None
    deadline = time.monotonic() + seconds
    while True:
        if server is not None and getattr(server, "closing", False):
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, _SLEEP_STEP))
