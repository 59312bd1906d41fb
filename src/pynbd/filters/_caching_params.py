"""nbdkit's parameter parsers, as the cache, cow and readahead filters use them.

nbdkit's filters parse sizes, booleans and numbers with the server's helpers
(``nbdkit_parse_size``, ``nbdkit_parse_bool``, ``nbdkit_parse_unsigned``). Users rely on what
those accept (``64k``, ``2s``, hex and octal numbers, ``on``/``off``...) and scripts on their
messages, so these do the same as nbdkit 1.32 and raise
:class:`~pynbd.errors.ConfigError` with nbdkit's text.
"""

from __future__ import annotations

import os
import re

from pynbd.errors import ConfigError

__all__ = ["parse_bool", "parse_size", "parse_unsigned"]

_INT64_MAX = (1 << 63) - 1
_UINT_MAX = (1 << 32) - 1
#: C's isspace() in the "C" locale.
_SPACE = " \t\n\v\f\r"
#: What strtoimax(str, &end, 10) takes: blanks, a sign, decimal digits.
_DECIMAL = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
#: strtoul(str, &end, 0) after the blanks: a sign, then hex, octal or decimal digits.
_C_NUMBER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_SCALE = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60, "s": 512}


def parse_size(text: str) -> int:
    """``nbdkit_parse_size``: a decimal number with an optional suffix (b, k, m, g, t, p, e
    are powers of 1024; s is 512 bytes), at most 2^63-1."""
    m = _DECIMAL.match(text)
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
        scale = _SCALE.get(rest[0].lower() if rest[0].isascii() else rest[0], 0)
        if not scale or len(rest) > 1:
            raise ConfigError(f"could not parse size: unknown suffix '{rest}'")
    if _INT64_MAX // scale < size:
        raise ConfigError(f"overflow computing size ({text})")
    return size * scale


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """``nbdkit_parse_bool``: 1/true/t/yes/y/on or 0/false/f/no/n/off, in any case."""
    low = text.lower() if text.isascii() else text
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"could not decipher boolean ({text})")


def parse_unsigned(what: str, text: str) -> int:
    """``nbdkit_parse_unsigned``: decimal, 0x hex or 0 octal, 0 to 2^32-1; leading blanks
    and a plus sign are allowed, a minus sign is not."""
    shown = text.lstrip(_SPACE)
    if shown.startswith("-"):
        raise ConfigError(f"{what}: negative numbers are not allowed")
    m = _C_NUMBER.match(shown)
    if m is None:
        raise ConfigError(f"{what}: empty string where we expected a number")
    digits = m.group(2)
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    value = int(digits[2:] if base == 16 else digits, base)
    if value > _UINT_MAX:
        raise ConfigError(f'{what}: could not parse number: "{shown}": {os.strerror(34)}')
    if m.end() != len(shown):
        raise ConfigError(f'{what}: could not parse number: "{shown}": trailing garbage')
    return value
