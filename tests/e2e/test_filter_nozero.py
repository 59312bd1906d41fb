"""The nozero filter in one process: what reaches the plugin, why a client is refused."""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import CommandError
from pynbd.filters.nozero import MAX_WRITE, NozeroFilter
from pynbd.plugin import Flag, FuaMode, ZeroMode
from pynbd.server.loading import load_filter, manual
from tests.e2e.behaviour_chain import Recorder, open_chain


@pytest.mark.parametrize("mode", ["notrim", "plugin"])
def test_mode_needs_plugin_zero(mode: str) -> None:
    with pytest.raises(CommandError) as e:
        open_chain(Recorder(zero=False), NozeroFilter(), params=[f"zeromode={mode}"])
    assert e.value.message == f"zeromode '{mode}' requires plugin zero support"
    # read-only, the filter cannot matter: no check
    _, ctx = open_chain(Recorder(zero=False), NozeroFilter(), params=[f"zeromode={mode}"],
                        readonly=True)
    assert not ctx.can_zero()


def test_emulated_fua_is_one_flush_after_the_last_piece() -> None:
    disk = Recorder(size=MAX_WRITE + 8192, fua=FuaMode.EMULATE)
    _, ctx = open_chain(disk, NozeroFilter(), params=["zeromode=emulate"])
    ctx.zero(MAX_WRITE + 4096, 0, Flag.FUA | Flag.MAY_TRIM)
    assert disk.named("pwrite", "flush", "zero") == [
        ("pwrite", MAX_WRITE, 0, 0), ("pwrite", 4096, MAX_WRITE, 0), ("flush", 1)]


def test_native_fua_goes_on_every_piece() -> None:
    disk = Recorder(size=MAX_WRITE + 8192, fua=FuaMode.NATIVE)
    _, ctx = open_chain(disk, NozeroFilter(), params=["zeromode=emulate"])
    ctx.zero(MAX_WRITE + 4096, 0, Flag.FUA)
    assert disk.named("pwrite", "flush", "zero") == [
        ("pwrite", MAX_WRITE, 0, Flag.FUA), ("pwrite", 4096, MAX_WRITE, Flag.FUA)]


def test_default_mode_withdraws_zeroes() -> None:
    disk = Recorder()
    _, ctx = open_chain(disk, NozeroFilter())
    assert ctx.zero_mode() == ZeroMode.NONE and not ctx.can_fast_zero()
    with pytest.raises(CommandError) as e:
        ctx.zero(4096, 4096, Flag.MAY_TRIM)
    assert e.value.errno == errno.EOPNOTSUPP
    assert disk.named("pwrite", "zero") == []


def test_fast_zero_modes() -> None:
    for params, fails in ((["zeromode=plugin", "fastzeromode=slow"], True),
                          (["zeromode=plugin"], False),
                          (["zeromode=emulate"], True),
                          (["zeromode=notrim", "fastzeromode=ignore"], False)):
        disk = Recorder()
        _, ctx = open_chain(disk, NozeroFilter(), params=params)
        if fails:
            with pytest.raises(CommandError) as e:
                ctx.zero(512, 0, Flag.FAST_ZERO)
            assert e.value.errno == errno.ENOTSUP
            assert disk.named("zero", "pwrite") == []
        else:
            ctx.zero(512, 0, Flag.FAST_ZERO | Flag.MAY_TRIM)
            want = Flag.MAY_TRIM if "zeromode=plugin" in params else 0
            if "fastzeromode=ignore" not in params:
                want |= Flag.FAST_ZERO
            assert disk.named("zero") == [("zero", 512, 0, want)], params


def test_manual() -> None:
    cls = load_filter("nozero")
    assert cls is NozeroFilter
    text = manual(cls)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in text
    assert "zeromode=notrim" in text and "fastzeromode=ignore" in text
