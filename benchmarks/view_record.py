#!/usr/bin/env python3
"""The view filter's own cost per request, in process: ``ViewFilter.pwrite`` over a layer
that does nothing, with nobody watching and with a viewer (the record: clock read twice,
packed, queued), and the publisher thread's share per record (taking the queue, joining,
encoding, sending to one subscriber through a socket pair), for a subscriber taking the
records in base64, for one taking them binary, and for one taking them binary with times
in nanoseconds, as the filter packs them (as ``pynbd view`` does). No fio, no
server: what the end-to-end benchmark (benchmarks/view.py) cannot separate from a busy
machine's noise.
First, a write through the whole chain as the server makes it: no filter, a filter that
does nothing (``nofilter``), the view filter with nobody watching and with a viewer.

    python benchmarks/view_record.py
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pynbd.filters._view_publish import RECORD, _Subscriber
from pynbd.filters.nofilter import NofilterFilter
from pynbd.filters.view import ViewFilter, _Handle
from pynbd.plugins.memory import MemoryPlugin
from pynbd.server.backend import Chain, PluginLayer

N = 200_000
BATCH = 5000


class _Below:
    """The layer below: does nothing."""

    def pwrite(self, buf: object, offset: int, flags: int) -> None:
        pass


def request_ns(active: bool) -> float:
    f, h, below = ViewFilter(), _Handle(3, ""), _Below()
    f.pub.active = active
    buf = memoryview(bytearray(4096))
    # batches of BATCH records, each taken as the publisher thread takes them (not timed)
    best = min(timeit.repeat("f.pwrite(below, h, buf, 4096, 0)", setup="f.pub._take()",
                             number=BATCH, repeat=N // BATCH, globals=locals()))
    return best / BATCH * 1e9


def publisher_ns(fmt: str) -> float:
    f = ViewFilter()
    pub = f.pub
    pub._sel = selectors.DefaultSelector()
    a, b = socket.socketpair()
    a.setblocking(False)
    sub = pub._subs[a.fileno()] = _Subscriber(a, "bench")
    sub.format = fmt
    pub._sel.register(a, selectors.EVENT_READ, "sub")

    def drain() -> None:
        while b.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    recs = [RECORD.pack(87, 0, 0, 1, i * 4096, 4096, 1_765_000_000_000_000 + i, 3)
            for i in range(BATCH)]
    best = float("inf")
    for _ in range(30):
        for r in recs:
            pub.put(bytes(r))  # a new object each, as requests make them
        t = time.thread_time_ns()
        pub._batch()
        best = min(best, time.thread_time_ns() - t)
        time.sleep(0.01)
    a.close()
    b.close()
    return best / BATCH


def chain_ns(filters: list[object], active: bool = False) -> float:
    """A 4 KiB write as the server makes it (its connection's bound ``pwrite``) through a
    chain over a memory plugin: what a filter layer costs, the view filter's included."""
    chain = Chain(MemoryPlugin(), filters)  # type: ignore[arg-type]
    chain.config("size", "256M")
    if filters and isinstance(filters[0], ViewFilter):
        chain.config("view-address", "127.0.0.1:1")  # never listened on here
    chain.config_complete()
    ctx = chain.open(False, "", False)
    layer = ctx.layer
    pwrite = (layer.plugin if isinstance(layer, PluginLayer) else layer).pwrite  # type: ignore[attr-defined]
    h, buf = ctx.handle, memoryview(bytearray(4096))
    take = filters[0].pub._take if filters and active else (lambda: None)  # type: ignore[attr-defined]
    if active:
        filters[0].pub.active = True  # type: ignore[attr-defined]
    # batches of BATCH writes, the records taken between them as the publisher takes them
    best = min(timeit.repeat("pwrite(h, buf, 4096, 0)", setup="take()", number=BATCH,
                             repeat=N // BATCH,
                             globals={"pwrite": pwrite, "h": h, "buf": buf, "take": take}))
    ctx.close()
    return best / BATCH * 1e9


def main() -> None:
    plain, nofilter = chain_ns([]), chain_ns([NofilterFilter()])
    view, viewed = chain_ns([ViewFilter()]), chain_ns([ViewFilter()], active=True)
    print(f"pwrite through the chain: no filter {plain:.0f} ns, nofilter {nofilter:.0f} ns, "
          f"view {view:.0f} ns, view with a viewer {viewed:.0f} ns")
    idle, live = request_ns(False), request_ns(True)
    print(f"ViewFilter.pwrite: no viewer {idle:.0f} ns, viewer {live:.0f} ns "
          f"(the record: {live - idle:.0f} ns)")
    print(f"publisher thread: {publisher_ns('base64'):.0f} ns a record in base64, "
          f"{publisher_ns('binary'):.0f} ns binary, {publisher_ns('ns'):.0f} ns binary in ns "
          f"(batches of {BATCH})")


if __name__ == "__main__":
    main()
