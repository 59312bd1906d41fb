"""The retry and retry-request filters side by side with nbdkit's, over a script that fails
on purpose: what the plugin was asked (opens, closes, reads, writes, in order), what the
client got, and the parameters. Delays are the smallest allowed (1 second): cases run at
the same time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from side_by_side import probe

from tests.interop.behaviour_compare import bad_params

SIZE = 1 << 20
#: preadfail=N: the next N preads fail; writefail=N the same for pwrite; openfail=N: the
#: opens after the first fail N times. Every call is recorded with its handle's number;
#: a read at SIZE returns the record (and never fails).
FLAKY = '''
import nbdkit
API_VERSION = 2
SIZE = 1024 * 1024
disk = bytearray(SIZE)
calls = []
left = {"preadfail": 0, "writefail": 0, "openfail": 0}
opened = 0
def config(key, value):
    left[key] = int(value)
def open(readonly):
    global opened
    opened += 1
    if opened > 1 and left["openfail"]:
        left["openfail"] -= 1
        calls.append("open-fails")
        raise RuntimeError("open fails on purpose")
    calls.append("open %d%s" % (opened, " ro" if readonly else ""))
    return opened
def close(h):
    calls.append("close %d" % h)
def get_size(h):
    return SIZE + 4096
def can_write(h):
    return True
def pread(h, buf, offset, flags):
    if offset >= SIZE:
        buf[:] = " | ".join(calls).encode().ljust(len(buf))[:len(buf)]
        return
    calls.append("pread %d" % h)
    if left["preadfail"]:
        left["preadfail"] -= 1
        raise RuntimeError("pread fails on purpose")
    buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags):
    calls.append("pwrite %d" % h)
    if left["writefail"]:
        left["writefail"] -= 1
        raise RuntimeError("pwrite fails on purpose")
    disk[offset:offset + len(buf)] = buf
'''

OPS = [("pread", 512, 0), ("pwrite", b"\1" * 512, 0), ("pread", 512, 0),
       ("pread", 4096, SIZE)]


@pytest.fixture
def flaky(tmp_path: Path) -> Path:
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    return path


def _record(view: dict[str, Any]) -> list[str]:
    return bytes(view["results"][-1][1]).decode().strip().split(" | ")


def _compare(pynbd_server: Any, nbdkit_server: Any,
             cases: list[list[str]]) -> list[dict[str, Any]]:
    """Each case (filter and parameters, after ``python FLAKY``) under both servers at once:
    the same results and the same record. Returns pynbd's views."""
    def one(factory: Any, args: list[str]) -> dict[str, Any]:
        return probe(factory(*args).uri, OPS)
    with ThreadPoolExecutor(8) as pool:
        mine = [pool.submit(one, pynbd_server, c) for c in cases]
        theirs = [pool.submit(one, nbdkit_server, c) for c in cases]
        views = [(m.result(), t.result()) for m, t in zip(mine, theirs, strict=True)]
    for case, (got, want) in zip(cases, views, strict=True):
        assert got.get("connect_error") == want.get("connect_error"), case
        assert got.get("results") == want.get("results"), case
    return [got for got, _ in views]


def test_retry(pynbd_server, nbdkit_server, flaky: Path) -> None:
    base = ["--filter=retry", "python", flaky, "retry-delay=1"]
    cases = [
        [*base, "preadfail=1"],
        [*base, "preadfail=3", "retries=2", "retry-exponential=no"],
        [*base, "writefail=1", "retry-readonly=yes"],
        [*base, "preadfail=1", "retries=0"],
    ]
    views = _compare(pynbd_server, nbdkit_server, cases)
    assert _record(views[0]) == ["open 1", "pread 1", "close 1", "open 2", "pread 2",
                                 "pwrite 2", "pread 2"]
    assert [r[0] for r in views[1]["results"][:3]] == ["error", "ok", "data"]
    assert _record(views[1])[:8] == ["open 1", "pread 1", "close 1", "open 2", "pread 2",
                                     "close 2", "open 3", "pread 3"]
    # the write failed, the plugin was reopened read-only: writes fail with EROFS
    assert views[2]["results"][1] == ["error", 1]  # EROFS travels as NBD_EPERM
    assert _record(views[2]) == ["open 1", "pread 1", "pwrite 1", "close 1", "open 2 ro",
                                 "pread 2"]
    assert views[3]["results"][0] == ["error", 5]


def test_retry_reopen_fails(pynbd_server, nbdkit_server, flaky: Path) -> None:
    """The first reopen fails too: the filter waits again and reopens again."""
    _compare(pynbd_server, nbdkit_server, [[
        "--filter=retry", "python", flaky, "retry-delay=1", "retry-exponential=no",
        "preadfail=1", "openfail=1"]])


def test_retry_thread_model(pynbd_server):
    import subprocess

    from helpers import PYNBD
    out = subprocess.run([*PYNBD, "serve", "--filter=retry", "memory", "1M", "--dump-plugin"],
                         capture_output=True, text=True, check=True).stdout
    assert "thread_model=serialize_requests" in out.splitlines()


def test_retry_request(pynbd_server, nbdkit_server, flaky: Path) -> None:
    base = ["--filter=retry-request", "python", flaky, "retry-request-delay=1"]
    cases = [
        [*base, "preadfail=1"],
        [*base, "preadfail=3"],
        [*base, "writefail=2", "retry-request-retries=1"],
        [*base, "preadfail=1", "retry-request-retries=0"],
    ]
    views = _compare(pynbd_server, nbdkit_server, cases)
    assert _record(views[0]) == ["open 1", "pread 1", "pread 1", "pwrite 1", "pread 1"]
    assert views[1]["results"][0] == ["error", 5]
    assert _record(views[1])[:4] == ["open 1", "pread 1", "pread 1", "pread 1"]
    assert views[2]["results"][1] == ["error", 5]
    assert views[3]["results"][0] == ["error", 5]


def test_retry_request_open(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    """An open that fails is retried, unless retry-request-open=false."""
    script = tmp_path / "openfails.py"
    script.write_text(FLAKY.replace("if opened > 1 and", "if"))
    base = ["--filter=retry-request", "python", script, "retry-request-delay=1",
            "openfail=1"]
    views = _compare(pynbd_server, nbdkit_server,
                     [base, [*base, "retry-request-open=false"]])
    assert _record(views[0])[:2] == ["open-fails", "open 2"]
    assert views[1]["connect_error"] == 2


def test_bad_parameters():
    bad_params([["--filter=retry", "memory", "1M", p] for p in (
        "retries=x", "retries=-1", "retries=4294967296", "retries= 5x", "retry-delay=0",
        "retry-delay=x", "retry-exponential=x", "retry-readonly=2")] +
        [["--filter=retry-request", "memory", "1M", p] for p in (
            "retry-request-retries=1001", "retry-request-retries=x",
            "retry-request-delay=0", "retry-request-delay=-1", "retry-request-open=x")])
