"""The parameter parsers the filters share (filters/_params.py), on the cases where C's
conversions surprise: what nbdkit 1.32 accepts and the messages it gives (the same command
lines are compared with nbdkit itself in tests/interop/test_filter_params.py)."""

from __future__ import annotations

import math

import pytest

from pynbd.errors import ConfigError
from pynbd.filters import _params as p
from pynbd.filters.delay import parse_delay
from pynbd.filters.error import parse_error_rate


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("10", 10), ("0x10", 16), ("010", 8), (" 7", 7), ("+3", 3), ("4294967295", 2**32 - 1),
])
def test_parse_unsigned(text: str, value: int) -> None:
    assert p.parse_unsigned("k", text) == value


@pytest.mark.parametrize(("text", "message"), [
    ("", "k: empty string where we expected a number"),
    ("abc", "k: empty string where we expected a number"),
    ("-1", "k: negative numbers are not allowed"),
    (" -1", "k: negative numbers are not allowed"),
    ("08", 'k: could not parse number: "08": trailing garbage'),
    ("0x", 'k: could not parse number: "0x": trailing garbage'),
    ("3 ", 'k: could not parse number: "3 ": trailing garbage'),
    ("4294967296", 'k: could not parse number: "4294967296": Numerical result out of range'),
])
def test_parse_unsigned_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        p.parse_unsigned("k", text)
    assert str(e.value) == message


@pytest.mark.parametrize(("text", "ms"), [
    ("1", 1000), ("0", 0), ("10ms", 10), (" 5ms", 5), ("5xms", 5), ("-5ms", 2**32 - 5),
    ("99999999999ms", 99999999999 & 0xFFFFFFFF), ("4294967", 4294967000),
])
def test_parse_delay(text: str, ms: int) -> None:
    assert parse_delay("rdelay", text) == ms


@pytest.mark.parametrize(("text", "value"), [
    ("10%", 0.1), ("0.25", 0.25), ("1e-1", 0.1), (" 5%", 0.05), ("0x1p-1", 0.5), ("1", 1.0),
    ("100%", 1.0), ("0", 0.0),
])
def test_parse_error_rate(text: str, value: float) -> None:
    assert parse_error_rate("error-rate", text) == pytest.approx(value)


def test_scan_double_special_values() -> None:
    assert math.isnan(p.scan_double("nan")[0])  # type: ignore[index]
    assert p.scan_double("-inf%") == (-math.inf, "%")
    assert p.scan_double("1.5x") == (1.5, "x")
    assert p.scan_double("x") is None
    assert p.scan_double("") is None


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1", 1), ("1k", 1024), ("2M", 2 << 20), ("1b", 1), ("2s", 1024),
    ("7E", 7 << 60), (" 3K", 3072), ("-0", 0),
])
def test_parse_size(text: str, value: int) -> None:
    assert p.parse_size(text) == value


@pytest.mark.parametrize(("text", "message"), [
    ("x", "could not parse size string (x)"),
    ("", "could not parse size string ()"),
    ("-1", "size cannot be negative (-1)"),
    ("1.5M", "could not parse size: unknown suffix '.5M'"),
    ("1KB", "could not parse size: unknown suffix 'KB'"),
    ("8E1", "could not parse size: unknown suffix 'E1'"),
    ("8E", "overflow computing size (8E)"),
    ("99999999999999999999", "size (99999999999999999999) exceeds maximum value"),
])
def test_parse_size_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        p.parse_size(text)
    assert str(e.value) == message


def test_parse_bool_and_paths() -> None:
    assert p.parse_bool("ON") is True and p.parse_bool("n") is False
    with pytest.raises(ConfigError, match=r"^could not decipher boolean \(maybe\)$"):
        p.parse_bool("maybe")
    assert p.absolute_path("/a/b") == "/a/b"
    assert p.absolute_path("x").endswith("/x") and p.absolute_path("x").startswith("/")
    with pytest.raises(ConfigError, match="cannot convert null or empty path"):
        p.absolute_path("")
