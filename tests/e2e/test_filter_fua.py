"""The fua filter in one process: its messages and what reaches the plugin."""

from __future__ import annotations

import pytest

from pynbd.errors import CommandError
from pynbd.filters.fua import FuaFilter
from pynbd.plugin import Flag, FuaMode
from pynbd.server.loading import load_filter, manual
from tests.e2e.behaviour_chain import Recorder, open_chain


@pytest.mark.parametrize(("mode", "disk", "message"), [
    ("emulate", Recorder(flush=False), "fuamode 'emulate' requires plugin flush support"),
    # nbdkit 1.32 says 'force' for native too
    ("native", Recorder(fua=FuaMode.NONE, flush=False), "fuamode 'native' requires plugin fua support"),
    ("force", Recorder(fua=FuaMode.NONE, flush=False), "fuamode 'force' requires plugin fua support"),
])
def test_refused(mode: str, disk: Recorder, message: str) -> None:
    with pytest.raises(CommandError) as e:
        open_chain(disk, FuaFilter(), params=[f"fuamode={mode}"])
    assert e.value.message == message
    open_chain(disk, FuaFilter(), params=[f"fuamode={mode}"], readonly=True)


def test_emulate_over_emulated_fua() -> None:
    disk = Recorder(fua=FuaMode.EMULATE)
    _, ctx = open_chain(disk, FuaFilter(), params=["fuamode=emulate"])
    assert ctx.can_fua() == FuaMode.EMULATE
    ctx.pwrite(b"x" * 512, 0, Flag.FUA)
    ctx.trim(512, 512, Flag.FUA)
    assert disk.named("pwrite", "trim", "flush") == [
        ("pwrite", 512, 0, 0), ("flush", 1), ("trim", 512, 512, 0), ("flush", 1)]


def test_manual() -> None:
    text = manual(load_filter("fua"))
    assert "fuamode=discard" in text and "EXAMPLES" in text
