"""Each of the log, delay, error, stats, pause, checkwrite and rate filters: found by name,
and its manual page printed by ``pynbd serve --filter=NAME null --help``."""

from __future__ import annotations

import pytest

from pynbd.filters import find_filter
from tests.helpers import run_pynbd

FILTERS = ["log", "delay", "error", "stats", "pause", "checkwrite", "rate"]
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES")


@pytest.mark.parametrize("name", FILTERS)
def test_manual_page(name: str) -> None:
    cls = find_filter(name)
    assert cls.name == name
    assert not cls.nonblocking or name in ("error", "checkwrite")  # those never wait
    out = run_pynbd("serve", f"--filter={name}", "null", "--help").stdout.decode()
    manual = out.split("\nNAME\n")[0]
    assert manual.startswith(f"NAME\n    {name} - ")
    positions = [manual.find(f"\n{s}\n") for s in SECTIONS[1:]]
    assert all(p > 0 for p in positions) and positions == sorted(positions), manual
    assert f"pynbd serve --filter={name}" in manual  # an example
