"""The scan filter side by side with nbdkit's: the prefetches a connection makes in the
background (a copy of calls.py, made PARALLEL, records them), and when and why it does not
scan (nbdkit logs a warning; so does pynbd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import unix_uri
from side_by_side import probe

from pynbd.client import Client
from tests.interop.behaviour_compare import CALLS, bad_params, wait_until

SIZE = (1 << 20) + 4096  # calls.py's disk, record included


@pytest.fixture
def parallel_calls(tmp_path: Path) -> Path:
    path = tmp_path / "calls_parallel.py"
    path.write_text(Path(CALLS).read_text() + "\n\ndef thread_model():\n"
                    "    return nbdkit.THREAD_MODEL_PARALLEL\n")
    return path


def _prefetches(srv: Any, n: int) -> list[str]:
    """The cache calls recorded, once there are ``n`` of them, seen from one connection
    (each connection scans: with scan-clock=false, each from the start)."""
    client = Client.connect(srv.uri)

    def got() -> list[str]:
        text = bytes(client.pread(4096, 1 << 20)).rstrip(b"\0").decode()
        caches = [c for c in text.splitlines() if c.startswith("cache")]
        return caches if len(caches) >= n else []
    try:
        return wait_until(f"{n} prefetches", got)  # type: ignore[no-any-return]
    finally:
        client.close()


@pytest.mark.parametrize(("params", "want"), [
    (["scan-size=512K"], ["cache 524288 0 0", "cache 524288 524288 0", "cache 4096 1048576 0"]),
    (["scan-size=1M", "scan-clock=false"], ["cache 1048576 0 0", "cache 4096 1048576 0"]),
])
def test_prefetches(pynbd_server, nbdkit_server, parallel_calls: Path, params: list[str],
                    want: list[str]) -> None:
    """The whole disk is prefetched once, in scan-size pieces (scan-ahead=false: reading
    the record does not move the scan)."""
    args = ["--filter=scan", "python", parallel_calls, "scan-ahead=false", *params]
    mine = _prefetches(pynbd_server(*args), len(want))
    theirs = _prefetches(nbdkit_server(*args), len(want))
    assert mine == theirs == want


#: A PARALLEL plugin without cache.
NO_CACHE = """
import nbdkit
API_VERSION = 2
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return 1
def get_size(h):
    return 65536
def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
"""


@pytest.mark.parametrize(("args", "export", "warning"), [
    (["python", "NO_CACHE"], "", ("underlying plugin does not support NBD_CMD_CACHE, not "
                                  "scanning; try adding --filter=cache after this filter")),
    (["memory", "1M"], "other", "not the default export, not scanning"),
    (["--filter=noparallel", "memory", "1M"], "", ("underlying plugin does not support the "
                                                   "PARALLEL thread model, not scanning")),
])
def test_not_scanning(pynbd_server, nbdkit_server, tmp_path: Path, args: list[str],
                      export: str, warning: str) -> None:
    if "NO_CACHE" in args:
        script = tmp_path / "nocache.py"
        script.write_text(NO_CACHE)
        args = [str(script) if a == "NO_CACHE" else a for a in args]
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("--filter=scan", *args)
        view = probe(unix_uri(srv.sock, export), [("pread", 512, 0)])
        assert "connect_error" not in view
        assert f"scan: warning: {warning}" in srv.stderr


def test_bad_parameters():
    bad_params([["--filter=scan", "memory", "1M", p] for p in (
        "scan-size=1000", "scan-size=256", "scan-size=64M", "scan-size=x", "scan-size=-1",
        "scan-ahead=x", "scan-clock=2", "scan-forever=maybe")])
