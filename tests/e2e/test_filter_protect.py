"""The protect filter in one process: ranges parsed and merged, refused writes never
reach the plugin, the read-back compares only protected bytes."""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._shape_common import INT64_MAX
from pynbd.filters.protect import ProtectFilter, merge, parse_range
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def test_parse_range() -> None:
    assert parse_range("0-0x1bd") == [(0, 0x1BD, "0-0x1bd")]
    assert parse_range("010-") == [(8, INT64_MAX, "010-")]
    assert parse_range("-") == [(0, INT64_MAX, "-")]
    assert parse_range("~100-199") == [(0, 99, "~100-199"), (200, INT64_MAX, "~100-199")]
    assert parse_range("~-") == []
    assert parse_range("~0-5") == [(6, INT64_MAX, "~0-5")]
    for bad, message in (("5", "cannot parse range, missing '-': 5"),
                         ("~9-1", "invalid range, end < start: ~9-1"),
                         ("1-2-3", 'range: could not parse number: "2-3": trailing garbage')):
        with pytest.raises(ConfigError) as e:
            parse_range(bad)
        assert str(e.value) == message


def test_merge() -> None:
    assert merge([(10, 20, "b"), (0, 100, "a"), (101, 110, "c"), (200, 300, "d")]) == [
        (0, 110, "a"), (200, 300, "d")]


def test_refused_writes_do_not_reach_the_plugin() -> None:
    disk = Disk(b"P" * 100 + bytes(100) + b"Q" * 56)
    _, ctx = open_chain(disk, (ProtectFilter, ["protect=90-109", "protect=250-"]))
    ctx.pwrite(b"xxxx" + b"P" * 10, 80)  # protected bytes unchanged: allowed
    ctx.zero(10, 100)  # already zero: allowed
    for call in (lambda: ctx.pwrite(b"y", 95), lambda: ctx.zero(20, 85),
                 lambda: ctx.trim(10, 250), lambda: ctx.pwrite(b"z" * 101, 150)):
        with pytest.raises(CommandError) as e:
            call()
        assert e.value.errno == errno.EPERM
    assert disk.named("pwrite", "zero", "trim") == [("pwrite", 14, 80, 0),
                                                    ("zero", 10, 100, 0)]
    # only the protected part of a request is read back for the comparison
    assert disk.named("pread")[:2] == [("pread", 4, 90, 0), ("pread", 10, 100, 0)]


def test_manual() -> None:
    text = manual_of("protect")
    assert "protect=START-END" in text and "protect=~START-END" in text
