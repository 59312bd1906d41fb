"""The error filter side by side with nbdkit's: the client sees the same errors (errno by
errno, method by method), the trigger file works the same, and a rate is a rate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server, run_libnbd
from side_by_side import assert_same, probe, serve_both

ALL_OPS = [("pread", 512, 0), ("pwrite", b"w" * 512, 0), ("trim", 512, 0), ("zero", 512, 0),
           ("extents", 65536, 0), ("cache", 512, 0), ("flush",)]


@pytest.mark.parametrize("name", ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN"])
def test_each_error_as_nbdkit(name: str, pynbd_server: Callable[..., Server],
                              nbdkit_server: Callable[..., Server]) -> None:
    got = assert_same(pynbd_server, nbdkit_server,
                      ["--filter=error", "memory", "1M", f"error={name}", "error-rate=100%"],
                      ALL_OPS)
    errs = [r for r in got["results"] if r[0] == "error"]
    assert len(errs) == 6  # every request but flush
    assert got["results"][-1] == ["ok"]


def test_per_method_settings_as_nbdkit(pynbd_server: Callable[..., Server],
                                       nbdkit_server: Callable[..., Server]) -> None:
    got = assert_same(pynbd_server, nbdkit_server,
                      ["--filter=error", "memory", "1M", "error=ENOSPC",
                       "error-pwrite-rate=1", "error-zero-rate=100%", "error-trim=EPERM",
                       "error-trim-rate=1", "error-pread-rate=0", "error-extents-rate=1",
                       "error-extents=ENOMEM", "error-cache=EINVAL", "error-cache-rate=1"],
                      ALL_OPS)
    assert [r[1] if r[0] == "error" else r[0] for r in got["results"]] == [
        "data", 28, 1, 28, 12, 22, "ok"]


def test_error_file_as_nbdkit(pynbd_server: Callable[..., Server],
                              nbdkit_server: Callable[..., Server], tmp_path: Path) -> None:
    """Errors only while the trigger file exists: off, on, off again."""
    trigger = tmp_path / "inject"
    p, n = serve_both(pynbd_server, nbdkit_server,
                      ["--filter=error", "memory", "1M", "error-rate=1",
                       "error-file=/nonexistent/never", f"error-pread-file={trigger}"])
    ops = [("pread", 512, 0), ("pwrite", b"x" * 512, 0)]
    for present, want in ((False, "data"), (True, "error"), (False, "data")):
        if present:
            trigger.touch()
        else:
            trigger.unlink(missing_ok=True)
        got, expect = probe(p.uri, ops), probe(n.uri, ops)
        assert got["results"] == expect["results"]
        assert got["results"][0][0] == want
        assert got["results"][1] == ["ok"]  # error-file=/nonexistent/never (pwrite) is off


_RATE = r'''
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
failed = 0
for i in range(400):
    try:
        h.pread(512, 512 * i)
    except nbd.Error as e:
        assert e.errnum == 5, e.errnum
        failed += 1
print(failed)
'''


def test_a_rate_is_a_rate(pynbd_server: Callable[..., Server],
                          nbdkit_server: Callable[..., Server]) -> None:
    """error-rate=50%: about half of 400 reads fail under both (mean 200, sd 10)."""
    p, n = serve_both(pynbd_server, nbdkit_server,
                      ["--filter=error", "memory", "1M", "error-rate=50%"])
    for srv in (p, n):
        failed = int(run_libnbd(_RATE, srv.uri).stdout)
        assert 130 <= failed <= 270, (srv.argv[0], failed)
    assert p.stderr.count("error: injecting EIO error into pread") >= 130


def test_no_rate_means_no_errors(pynbd_server: Callable[..., Server],
                                 nbdkit_server: Callable[..., Server]) -> None:
    got = assert_same(pynbd_server, nbdkit_server,
                      ["--filter=error", "memory", "1M", "error=EPERM", "error-file=/"],
                      ALL_OPS)
    assert all(r[0] != "error" for r in got["results"])


def test_under_log_as_nbdkit(pynbd_server: Callable[..., Server],
                             nbdkit_server: Callable[..., Server], tmp_path: Path) -> None:
    """The log filter in front sees the injected errors as nbdkit's does."""
    logs = []
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        log = tmp_path / f"log{i}"
        srv = factory("--filter=log", "--filter=error", "memory", "1M", f"logfile={log}",
                      "error=ESHUTDOWN", "error-zero-rate=1", "error-pread=ENOMEM",
                      "error-pread-rate=1")
        probe(srv.uri, [("pread", 512, 0), ("zero", 512, 0), ("pwrite", b"x" * 512, 0)])
        srv.stop()
        logs.append([line[27:] for line in log.read_text().splitlines()
                     if "Read" in line or "Zero" in line or "Write" in line])
    assert logs[0] == logs[1]
    assert "connection=1 ...Read id=1 return=-1 error=ENOMEM" in logs[0]
    assert "connection=1 ...Zero id=2 return=-1 error=ESHUTDOWN" in logs[0]
