"""The strict checks' shortcut for plain reads (``StrictRules.read_ok``, which the engine's
and pynbd.libnbd's hot paths inline): whenever it says a READ passes, the full check passes
under every mask; and it says so for the ordinary reads."""

from __future__ import annotations

import itertools

import pytest

from pynbd.client.strict import MAX_REQUEST_SIZE, STRICT_ALL, StrictRules
from pynbd.errors import CommandError
from pynbd.protocol.constants import Cmd, CmdFlag, TxFlag

SIZE = 1 << 20
OFFSETS = [-1, 0, 1, 511, 512, 4096, SIZE - 4096, SIZE - 512, SIZE - 1, SIZE, SIZE + 512]
COUNTS = [0, 1, 511, 512, 4096, SIZE, SIZE + 1, MAX_REQUEST_SIZE, MAX_REQUEST_SIZE + 512]


def _passes(rules: StrictRules, offset: int, count: int, mask: int) -> bool:
    try:
        rules.check(int(Cmd.READ), offset, count, 0, int(CmdFlag.DF), mask)
    except CommandError:
        return False
    return True


@pytest.mark.parametrize("block_size", [None, (1, 4096, 1 << 25), (512, 4096, 1 << 25)])
def test_read_ok_never_lets_through_what_a_check_refuses(
        block_size: tuple[int, int, int] | None) -> None:
    rules = StrictRules(int(TxFlag.HAS_FLAGS), SIZE, block_size, True, False)
    said_ok = 0
    for offset, count in itertools.product(OFFSETS, COUNTS):
        if rules.read_ok(offset, count):
            said_ok += 1
            for mask in range(STRICT_ALL + 1):
                assert _passes(rules, offset, count, mask), (offset, count, mask)
        elif offset >= 0:
            # only what the full check (every bit) refuses is left to it
            assert not _passes(rules, offset, count, STRICT_ALL), (offset, count)
    assert said_ok >= 5


def test_read_ok_on_a_large_export_with_big_blocks() -> None:
    rules = StrictRules(int(TxFlag.HAS_FLAGS), 1 << 40, (4096, 4096, 1 << 25), True, False)
    assert rules.read_ok(4096 * 1000, 4096)
    assert not rules.read_ok(4096 * 1000 + 512, 4096)  # unaligned
    assert not rules.read_ok(4096, 4096 + 512)
    assert not rules.read_ok((1 << 40) - 4096, 8192)  # past the end
    assert not rules.read_ok(0, MAX_REQUEST_SIZE + 4096)  # libnbd's hard limit
