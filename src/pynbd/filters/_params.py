"""Parameter parsing with nbdkit's rules and messages (private to the built-in filters and
plugins: every one of them parses with these).

nbdkit's filters parse their parameters with the server's helpers (``nbdkit_parse_unsigned``,
``nbdkit_parse_size``, ``nbdkit_parse_bool``, ``nbdkit_absolute_path``) or with C's
``sscanf``. Scripts and users rely on what those accept (hex and octal numbers, leading
blanks...) and on their messages, so these functions reproduce both, as nbdkit 1.32 does.
Every error is a :class:`~pynbd.errors.ConfigError` whose text is nbdkit's message.
"""

from __future__ import annotations

import math
import os
import re

from pynbd.errors import ConfigError

__all__ = [
    "INT64_MAX",
    "UINT32_MAX",
    "UINT_MAX",
    "absolute_path",
    "parse_bool",
    "parse_int",
    "parse_int64",
    "parse_size",
    "parse_uint64",
    "parse_unsigned",
    "scan_double",
    "scan_unsigned",
    "strtol",
]

UINT_MAX = UINT32_MAX = _UINT_MAX = (1 << 32) - 1
_ULONG_MAX = (1 << 64) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT64_MAX = INT64_MAX
_ERANGE_TEXT = os.strerror(34)  # "Numerical result out of range", as %m prints ERANGE
#: C's isspace() in the "C" locale.
_SPACE = " \t\n\v\f\r"
_HEX = "0123456789abcdefABCDEF"


def _strtol(text: str, start: int = 0) -> tuple[int, int]:
    """C's strtol/strtoul with base 0 from ``start``: (value, end index); end is ``start``
    when no digits were found. The value is the mathematical one (no overflow handling)."""
    i = start
    n = len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    neg = False
    if i < n and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    if text.startswith(("0x", "0X"), i) and i + 2 < n and text[i + 2] in _HEX:
        base, i = 16, i + 2
        digits = _HEX
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


def strtol(text: str) -> tuple[int, int]:
    """C's strtol with base 0: (value, index after the number), 0 when there is none."""
    return _strtol(text)


def _number_tail(what: str, shown: str, value: int, end: int, start: int,
                 out_of_range: bool) -> int:
    """nbdkit's PARSE_COMMON_TAIL: range, then "empty", then trailing garbage."""
    if out_of_range:
        raise ConfigError(f'{what}: could not parse number: "{shown}": {_ERANGE_TEXT}')
    if end == start:
        raise ConfigError(f"{what}: empty string where we expected a number")
    if end != len(shown) + start:
        raise ConfigError(f'{what}: could not parse number: "{shown}": trailing garbage')
    return value


def parse_unsigned(what: str, text: str, bits: int = 32) -> int:
    """``nbdkit_parse_unsigned`` (bits=32) or ``nbdkit_parse_uint64_t`` (bits=64): decimal,
    0x hex or 0 octal; leading blanks and a plus sign are allowed, a minus sign is not."""
    start = 0
    while start < len(text) and text[start] in _SPACE:
        start += 1
    shown = text[start:]
    if shown.startswith("-"):
        raise ConfigError(f"{what}: negative numbers are not allowed")
    value, end = _strtol(text, start)
    return _number_tail(what, shown, value, end, start, value >> bits != 0)


def parse_uint64(what: str, text: str) -> int:
    """``nbdkit_parse_uint64_t``: 0 to 2^64-1."""
    return parse_unsigned(what, text, 64)


def parse_int(what: str, text: str) -> int:
    """``nbdkit_parse_int``: a signed C int, decimal, 0x hex or 0 octal."""
    value, end = _strtol(text)
    return _number_tail(what, text, value, end, 0, not _INT_MIN <= value <= _INT_MAX)


def parse_int64(what: str, text: str) -> int:
    """``nbdkit_parse_int64_t``: a signed 64-bit number."""
    value, end = _strtol(text)
    return _number_tail(what, text, value, end, 0, not INT64_MIN <= value <= INT64_MAX)


def scan_unsigned(text: str) -> int | None:
    """``sscanf(text, "%u")``: a decimal prefix (blanks and a sign allowed), converted as
    glibc does (a negative number wraps, an overflow saturates); None if no digits."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)", text)
    if m is None:
        return None
    value = min(int(m.group(2)), _ULONG_MAX)
    if m.group(1) == "-":
        value = -value & _ULONG_MAX
    return value & _UINT_MAX


_DOUBLE = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:"
    r"0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|(?i:infinity|inf|nan(?:\([0-9A-Za-z_]*\))?))")


def scan_double(text: str) -> tuple[float, str] | None:
    """``sscanf(text, "%lg%n")``: the C floating-point prefix of ``text`` (decimal, hex,
    inf, nan) and what follows it; None when no number starts the text."""
    m = _DOUBLE.match(text)
    if m is None:
        return None
    body = m.group(0).strip(_SPACE)
    rest = text[m.end():]
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    low = body.lower()
    if low.startswith("nan"):
        return math.copysign(math.nan, sign), rest
    if low.startswith("inf"):
        return sign * math.inf, rest
    if low.startswith("0x"):
        mant = body[2:]
        if "p" not in mant.lower():
            mant += "p0"
        return sign * float.fromhex("0x" + mant), rest
    return sign * float(body), rest


def parse_size(text: str) -> int:
    """``nbdkit_parse_size``: a decimal number with an optional suffix (b, s = 512 bytes,
    k/K, m/M, g/G, t/T, p/P, e/E = powers of 1024), at most 2^63-1."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)", text)
    if m is None:
        raise ConfigError(f"could not parse size string ({text})")
    size = int(m.group(2))
    if m.group(1) == "-" and size:
        raise ConfigError(f"size cannot be negative ({text})")
    if size > _INT64_MAX:
        raise ConfigError(f"size ({text}) exceeds maximum value")
    rest = text[m.end():]
    scale = 1
    if rest:
        c = rest[0]
        if c in "sS":
            scale = 512
        elif c.lower() in "bkmgtpe":
            scale = 1 << (10 * "bkmgtpe".index(c.lower()))
        else:
            raise ConfigError(f"could not parse size: unknown suffix '{rest}'")
        if len(rest) > 1:
            raise ConfigError(f"could not parse size: unknown suffix '{rest}'")
    if _INT64_MAX // scale < size:
        raise ConfigError(f"overflow computing size ({text})")
    return size * scale


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """``nbdkit_parse_bool``: 1/true/t/yes/y/on or 0/false/f/no/n/off (any case)."""
    low = text.lower() if text.isascii() else text
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"could not decipher boolean ({text})")


def absolute_path(text: str) -> str:
    """``nbdkit_absolute_path``: ``text`` made absolute against the current directory
    (without resolving links: the file need not exist yet)."""
    if not text:
        raise ConfigError("cannot convert null or empty path to an absolute path")
    if text.startswith("/"):
        return text
    return f"{os.getcwd()}/{text}"
