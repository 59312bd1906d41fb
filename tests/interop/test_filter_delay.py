"""The delay filter side by side with nbdkit's: the same export, data and errors, and the
same waits as libnbd measures them (open, read, close)."""

from __future__ import annotations

from collections.abc import Callable

from helpers import Server, run_libnbd
from side_by_side import assert_same

FAST_ZERO = 16  # libnbd's CMD_FLAG_FAST_ZERO
OPS = [("pwrite", b"\x17" * 4096, 0), ("pread", 8192, 0), ("zero", 4096, 4096),
       ("zero", 4096, 4096, FAST_ZERO), ("trim", 4096, 0), ("flush",), ("cache", 4096, 0),
       ("extents", 65536, 0), ("pread", 512, 1 << 20)]


def test_same_as_nbdkit(pynbd_server: Callable[..., Server],
                        nbdkit_server: Callable[..., Server]) -> None:
    got = assert_same(pynbd_server, nbdkit_server,
                      ["--filter=delay", "memory", "1M", "rdelay=5ms", "wdelay=5ms",
                       "delay-extents=5ms", "delay-cache=5ms", "delay-open=5ms"], OPS)
    assert got["results"][1] == ["data", b"\x17" * 4096 + bytes(4096)]


def test_fast_zero_without_delay_same_as_nbdkit(pynbd_server: Callable[..., Server],
                                                nbdkit_server: Callable[..., Server]) -> None:
    """delay-fast-zero=false advertises fast zero on a writable export, and fails it; a
    read-only plugin stays read-only."""
    for plugin, writable in ((["memory", "1M"], True), (["pattern", "1M"], False)):
        got = assert_same(pynbd_server, nbdkit_server,
                          ["--filter=delay", *plugin, "delay-zero=5ms",
                           "delay-fast-zero=false"], OPS)
        assert got["flags"]["can_fast_zero"] is writable
        # ENOTSUP from the filter; libnbd refuses a zero to a read-only export (EINVAL)
        assert got["results"][3] == ["error", 95 if writable else 22]


def test_flags_of_a_read_only_plugin_same_as_nbdkit(
        pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server]) -> None:
    assert_same(pynbd_server, nbdkit_server,
                ["-r", "--filter=delay", "pattern", "1M", "wdelay=1", "rdelay=1ms"], OPS)


_TIMES = r'''
import nbd, sys, time
t = time.monotonic(); h = nbd.NBD(); h.connect_uri(sys.argv[1]); t1 = time.monotonic()
h.pread(512, 0); t2 = time.monotonic(); h.trim(512, 0); t3 = time.monotonic()
h.shutdown(); t4 = time.monotonic()
print(t1 - t, t2 - t1, t3 - t2, t4 - t3)
'''


def test_open_read_trim_close_waits_as_nbdkit(pynbd_server: Callable[..., Server],
                                              nbdkit_server: Callable[..., Server]) -> None:
    """Each delay holds what it delays, under both servers, and nothing else."""
    args = ["--filter=delay", "memory", "1M", "delay-open=300ms", "rdelay=200ms",
            "delay-trim=100ms", "delay-close=400ms"]
    for srv in (pynbd_server(*args), nbdkit_server(*args)):
        connect, read, trim, close = map(float, run_libnbd(_TIMES, srv.uri).stdout.split())
        assert connect >= 0.29 and read >= 0.19 and trim >= 0.09 and close >= 0.39, (
            srv.argv[0], connect, read, trim, close)
        assert connect < 2 and read < 2 and trim < 2 and close < 2
