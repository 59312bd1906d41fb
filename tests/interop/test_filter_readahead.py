"""The readahead filter side by side with nbdkit's: the same plugin script (an nbdkit
Python plugin logging its calls) under both servers receives the same prefetches for the
same reads; the same warnings; and what a client sees through readahead over cache and
cow."""

from __future__ import annotations

import random
from pathlib import Path

from tests.e2e.caching_helpers import parallel, same_on_files, wait_for, write_script
from tests.e2e.test_filter_readahead import PREFETCHES, READS, _warnings, logged, read
from tests.interop.test_filter_cow import zero_advertised

KiB = 1024
MiB = 1 << 20


def test_same_prefetches_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    script = write_script(tmp_path)
    reads = READS + [(64 * KiB, 4 * MiB), (64 * KiB, 4 * MiB + 64 * KiB),
                     (4 * KiB, 6 * MiB), (4 * KiB, 5 * MiB)]
    got = {}
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        log = tmp_path / f"{name}.log"
        srv = factory("--filter=readahead", "python", script, "size=8M", f"log={log}")
        read(srv.uri, reads)
        # every read but the one at the end prefetches
        got[name] = wait_for(lambda log=log: len(logged(log, "cache")) == len(reads) - 1
                             and logged(log, "cache"))
        srv.stop()
    assert got["pynbd"] == got["nbdkit"]
    assert got["nbdkit"][:len(PREFETCHES)] == PREFETCHES


def test_same_warnings(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    script = write_script(tmp_path)

    def run(params: list[str], name: str) -> list[str]:
        srv = (pynbd_server if name == "pynbd" else nbdkit_server)(
            "--filter=readahead", "python", script, *params)
        read(srv.uri, [(512, 0)])
        if params:
            wait_for(lambda: _warnings(srv.stderr))
        srv.stop()
        return _warnings(srv.stderr)

    cases = [["prefetch=0"], ["parallel=0"], ["prefetch=0", "parallel=0"], []]
    got = parallel(run, [(params, name) for params in cases for name in ("pynbd", "nbdkit")])
    assert got[::2] == got[1::2]
    assert [len(w) for w in got[1::2]] == [2, 1, 1, 0]


def test_what_clients_see(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(random.Random(8).randbytes(MiB))
    ops = [("pread", 4096, 0), ("pread", 65536, 4096), ("pread", 100000, 69632),
           ("pwrite", b"\5" * 5000, 100000), ("pread", 20000, 95000), ("zero", 10000, 0),
           ("flush",), ("cache", 65536, 0), ("pread", MiB, 0)]
    # (no trim: a trim of cached blocks reads differently, see test_filter_cache.py)
    parallel(lambda i, filters: same_on_files(
        pynbd_server, nbdkit_server, [*filters, "file", "{disk}"], ops, image, tag=str(i)),
        [(0, ["--filter=readahead"]), (1, ["--filter=readahead", "--filter=cache"])])
    # The write comes before the reads: readahead's prefetch runs in the background, and a
    # prefetch copying a block into the overlay (cow-on-cache) while a later write of that
    # block is in flight is a race whose outcome neither server fixes.
    same_on_files(pynbd_server, nbdkit_server,
                  ["--filter=readahead", "--filter=cow", "pattern", "1M", "cow-on-cache=true"],
                  [("pwrite", b"x" * 10, 5000), ("pread", 4096, 0), ("pread", 4096, 4096),
                   ("pread", 65536, 0), ("pread", 65536, 131072), ("extents", MiB, 0)],
                  image, zero_advertised)
