"""The noextents filter in one process: the plugin's extents are never asked for."""

from __future__ import annotations

from pynbd.filters.noextents import NoextentsFilter
from pynbd.plugin import EXTENT_HOLE
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def test_all_data() -> None:
    disk = Disk(65536, extents=[(0, 65536, EXTENT_HOLE)])
    chain, ctx = open_chain(disk, (NoextentsFilter, []))
    assert not ctx.can_extents()
    assert ctx.extents(1000, 24) == [(24, 1000, 0)]
    assert disk.named("extents") == []
    assert chain.on_loop is False  # Disk is a blocking plugin: worker threads


def test_manual() -> None:
    assert "noextents" in manual_of("noextents")
