"""The scan filter's background thread in one process: skipping ahead of reads, the shared
clock, scanning forever, and stopping when the connection closes."""

from __future__ import annotations

import threading
import time
from typing import Any

from pynbd.filters.scan import ScanFilter
from pynbd.plugin import CacheMode
from tests.e2e.behaviour_chain import Recorder, open_chain

MIB = 1 << 20


class Gated(Recorder):
    """A recorder whose first cache call waits until ``gate`` is set."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        super().cache(h, count, offset, flags)
        if len(self.named("cache")) == 1:
            assert self.gate.wait(30)


def _caches(disk: Recorder, n: int) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 30
    while len(disk.named("cache")) < n:
        assert time.monotonic() < deadline, disk.named("cache")
        time.sleep(0.005)
    return disk.named("cache")


def test_skips_ahead_of_a_read() -> None:
    disk = Gated(8 * MIB)
    _, ctx = open_chain(disk, ScanFilter(), params=["scan-size=1M"])
    _caches(disk, 1)  # the scan is waiting in its first prefetch
    ctx.pread(512, 5 * MIB, 0)
    disk.gate.set()
    assert _caches(disk, 4) == [
        ("cache", MIB, 0, 0), ("cache", MIB, 5 * MIB + 512, 0),
        ("cache", MIB, 6 * MIB + 512, 0), ("cache", MIB - 512, 7 * MIB + 512, 0)]
    ctx.close()
    assert len(disk.named("cache")) == 4


def test_clock_is_shared_by_connections() -> None:
    """The next connection resumes where the scan was: at its last prefetch (as nbdkit's
    clock, which is moved before each prefetch); with scan-clock=false at the start."""
    for clock, second in (("true", [("cache", MIB, MIB, 0)]),
                          ("false", [("cache", MIB, 0, 0), ("cache", MIB, MIB, 0)])):
        disk = Recorder(2 * MIB)
        chain, ctx = open_chain(disk, ScanFilter(), params=["scan-size=1M",
                                                            f"scan-clock={clock}"])
        _caches(disk, 2)
        ctx.close()
        disk.calls.clear()
        ctx = chain.open(False, "", False)
        assert _caches(disk, len(second)) == second
        ctx.close()  # waits for the scanning thread to end
        assert disk.named("cache") == second


def test_forever_until_the_connection_closes() -> None:
    disk = Recorder(2 * MIB)
    _, ctx = open_chain(disk, ScanFilter(), params=["scan-size=1M", "scan-forever=true"])
    caches = _caches(disk, 6)
    assert [c[2] for c in caches[:6]] == [0, MIB] * 3
    ctx.close()  # the thread stops: no prefetch after the close
    n = len(disk.named("cache"))
    time.sleep(0.05)
    assert len(disk.named("cache")) == n


def test_no_native_cache_no_thread() -> None:
    disk = Recorder(MIB, cache=CacheMode.EMULATE)
    _, ctx = open_chain(disk, ScanFilter())
    ctx.pread(512, 0, 0)
    ctx.close()
    assert disk.named("cache") == []
    assert not [t for t in threading.enumerate() if t.name == "pynbd-scan"]
