"""The readahead filter as a server: the prefetches it sends for a pattern of reads (the
adaptive window of nbdkit >= 1.31.2), its warnings, and prefetching into the cache and
cow filters."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.caching_helpers import served_while_one_waits, wait_for, write_script
from tests.helpers import PYNBD, run_libnbd

KiB = 1024
MiB = 1 << 20

#: Reads (count, offset) of 4K: sequential, two jumps forward, back to the start, the end.
READS = [(4 * KiB, 0), (4 * KiB, 4 * KiB), (4 * KiB, MiB), (4 * KiB, 2 * MiB), (4 * KiB, 0),
         (4 * KiB, 8 * MiB - 4 * KiB)]
#: The prefetches those reads cause on a fresh 8M server: the window starts at 32K, stays
#: while reads move on, doubles on each jump past the last prefetch, falls back to 32K when
#: a read goes backwards; a read at the end prefetches nothing.
PREFETCHES = [(4 * KiB, 32 * KiB), (8 * KiB, 32 * KiB), (MiB + 4 * KiB, 32 * KiB),
              (2 * MiB + 4 * KiB, 64 * KiB), (4 * KiB, 128 * KiB)]

_READ = ("import nbd, sys, json\n"
         "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
         "for count, offset in json.loads(sys.argv[2]):\n"
         "    h.pread(count, offset)\n"
         "h.shutdown()\n")


def read(uri: str, reads: list[tuple[int, int]]) -> None:
    import json

    run_libnbd(_READ, uri, json.dumps(reads))


def logged(log: Path, name: str) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(int(o), int(n)) for w, o, n in (line.split() for line in log.read_text().split(
        "\n") if line) if w == name]


def test_prefetches_follow_the_reads(pynbd_server, tmp_path: Path) -> None:
    script, log = write_script(tmp_path), tmp_path / "log"
    srv = pynbd_server("--filter=readahead", "python", script, "size=8M", f"log={log}")
    read(srv.uri, READS)
    got = wait_for(lambda: len(logged(log, "cache")) >= len(PREFETCHES) and
                   logged(log, "cache"))
    assert got == PREFETCHES
    assert logged(log, "pread") == [(o, n) for n, o in READS]  # reads pass through whole


def _warnings(stderr: str) -> list[str]:
    return [line.split("error: ", 1)[1] for line in stderr.splitlines() if "readahead:" in line]


def test_warnings_when_it_cannot_work(pynbd_server, tmp_path: Path) -> None:
    script = write_script(tmp_path)
    no_cache = pynbd_server("--filter=readahead", "python", script, "prefetch=0")
    serial = pynbd_server("--filter=readahead", "python", script, "parallel=0")
    works = pynbd_server("--filter=readahead", "python", script)
    for srv in (no_cache, serial, works):
        read(srv.uri, [(512, 0)])
    warning = ("readahead: warning: underlying plugin does not support NBD_CMD_CACHE or "
               "PARALLEL thread model, so the filter won't do anything")
    assert wait_for(lambda: len(_warnings(no_cache.stderr)) == 2 and _warnings(
        no_cache.stderr)) == [warning, "readahead: try adding --filter=cache after this filter"]
    assert wait_for(lambda: _warnings(serial.stderr)) == [warning]
    assert _warnings(works.stderr) == []


def test_prefetch_into_the_cache_filter(pynbd_server, tmp_path: Path) -> None:
    _prefetch_into(pynbd_server, tmp_path, ["--filter=readahead", "--filter=cache"], [])


def test_prefetch_into_the_cow_filter(pynbd_server, tmp_path: Path) -> None:
    _prefetch_into(pynbd_server, tmp_path, ["--filter=readahead", "--filter=cow"],
                   ["cow-on-cache=true"])


def _prefetch_into(pynbd_server, tmp_path: Path, filters: list[str],
                   params: list[str]) -> None:
    """The plugin cannot prefetch (prefetch=0): the filter below keeps what readahead asks
    for, and a later read of it does not reach the plugin."""
    script, log = write_script(tmp_path), tmp_path / "log"
    srv = pynbd_server(*filters, "python", script, "size=4M", "prefetch=0", f"log={log}",
                       *params)
    block = 64 * KiB
    # The first read prefetches [64K, 96K): block 1 is read whole and kept. The second
    # read's prefetch, of block 17, runs after it (one thread per connection, in order).
    read(srv.uri, [(block, 0), (4 * KiB, MiB + 60 * KiB)])
    wait_for(lambda: (MiB + block, block) in logged(log, "pread"),
             message=f"no prefetch of block 17: {logged(log, 'pread')}")
    read(srv.uri, [(block, block)])  # served from the filter below
    assert logged(log, "pread").count((block, block)) == 1
    assert "readahead: warning" not in srv.stderr


def test_another_connection_is_served_while_one_waits(pynbd_server, tmp_path: Path) -> None:
    script, hold = write_script(tmp_path), tmp_path / "hold"
    hold.touch()
    srv = pynbd_server("--filter=readahead", "python", script, f"hold={hold}")
    seconds, waiting, answered = served_while_one_waits(srv.uri, hold)
    assert seconds < 10 and waiting and answered


def test_manual() -> None:
    cp = subprocess.run([*PYNBD, "serve", "--filter=readahead", "null", "--help"],
                        check=False, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0
    for word in ("--filter=cache", "cow-on-cache=true", "32K", "4M", "parallel"):
        assert word in cp.stdout
