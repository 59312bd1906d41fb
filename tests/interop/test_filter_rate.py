"""The rate filter side by side with nbdkit's: the same export and data, and bandwidth held
to the rate by both (measured with libnbd, with a margin), per server or per connection,
for reads and writes apart, and changed at run time through a rate file.

Numbers are small to keep the tests short: rate=1M is 1 Mbit/s = 128 KiB/s; with
burstiness=0.5 a bucket holds 64 KiB, so 256 KiB take (256 - 64) / 128 = 1.5 s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from helpers import Server, run_libnbd
from side_by_side import assert_same

_TRANSFER = r'''
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
kind, n, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.monotonic()
for i in range(n):
    if kind == "r":
        h.pread(size, size * i)
    else:
        h.pwrite(b"w" * size, size * i)
print(time.monotonic() - t)
h.shutdown()
'''


def transfer(srv: Server, kind: str, n: int, size: int) -> float:
    """Seconds ``n`` reads (``kind`` "r") or writes ("w") of ``size`` bytes take."""
    return float(run_libnbd(_TRANSFER, srv.uri, kind, str(n), str(size)).stdout)


def both(pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server],
         *args: str) -> list[Server]:
    return [pynbd_server(*args), nbdkit_server(*args)]


def test_same_data_as_nbdkit(pynbd_server: Callable[..., Server],
                             nbdkit_server: Callable[..., Server]) -> None:
    assert_same(pynbd_server, nbdkit_server,
                ["--filter=rate", "memory", "1M", "rate=100M", "connection-rate=50M"],
                [("pwrite", b"r" * 32768, 4096), ("pread", 131072, 0), ("zero", 4096, 0),
                 ("trim", 4096, 8192), ("flush",), ("extents", 1 << 20, 0),
                 ("pread", 4096, 0)])


def test_rate_holds(pynbd_server: Callable[..., Server],
                    nbdkit_server: Callable[..., Server]) -> None:
    """256 KiB of reads at 128 KiB/s after a 64 KiB burst: 1.5 s under both servers; the
    writes have a bucket of their own, so a 64 KiB write right after goes at once."""
    for srv in both(pynbd_server, nbdkit_server, "--filter=rate", "memory", "1M", "rate=1M",
                    "burstiness=0.5"):
        took = transfer(srv, "r", 8, 32768)
        assert 1.4 <= took < 3.0, (srv.argv[0], took)
        assert transfer(srv, "w", 2, 32768) < 0.4, srv.argv[0]


def test_server_rate_is_shared_connection_rate_is_not(
        pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server]) -> None:
    """Two clients reading 128 KiB each at once: 1.5 s with a server-wide rate=1M, 0.5 s
    with connection-rate=1M (each has its own bucket)."""
    for param, low, high in (("rate=1M", 1.4, 3.0), ("connection-rate=1M", 0.45, 1.2)):
        for srv in both(pynbd_server, nbdkit_server, "--filter=rate", "memory", "1M", param,
                        "burstiness=0.5"):
            times: list[float] = []

            def client(srv: Server = srv, times: list[float] = times) -> None:
                times.append(transfer(srv, "r", 4, 32768))

            clients = [threading.Thread(target=client) for _ in range(2)]
            for c in clients:
                c.start()
            for c in clients:
                c.join(30)
            assert len(times) == 2
            assert low <= max(times) < high, (srv.argv[0], param, times)


def test_rate_file_is_read_at_run_time(pynbd_server: Callable[..., Server],
                                       nbdkit_server: Callable[..., Server],
                                       tmp_path: Path) -> None:
    """The file overrides rate=100M as soon as it exists, and a new file (renamed over the
    old one) changes the rate again."""
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        rate_file = tmp_path / f"rate{i}"
        srv = factory("--filter=rate", "memory", "4M", "rate=100M", "burstiness=0.5",
                      f"rate-file={rate_file}")
        assert transfer(srv, "r", 8, 32768) < 0.5, srv.argv[0]  # 100M: no wait
        rate_file.write_text("1M\n")
        took = transfer(srv, "r", 8, 32768)
        assert 1.4 <= took < 3.0, (srv.argv[0], took)
        new = tmp_path / f"rate{i}.new"
        new.write_text("200M\n")
        os.replace(new, rate_file)
        assert transfer(srv, "r", 32, 32768) < 0.5, srv.argv[0]
        rate_file.unlink()  # the last rate read stays
        assert transfer(srv, "r", 32, 32768) < 0.5, srv.argv[0]
