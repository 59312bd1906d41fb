"""The retry filters in one server: a long wait between retries ends when the server shuts
down (the request fails, the server exits promptly)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from side_by_side import probe

#: Every read fails.
FAILING = '''
import nbdkit
API_VERSION = 2
def open(readonly):
    return 1
def get_size(h):
    return 65536
def pread(h, buf, offset, flags):
    raise RuntimeError("pread fails on purpose")
'''


@pytest.mark.parametrize("params", [["--filter=retry", "retry-delay=60"],
                                    ["--filter=retry-request", "retry-request-delay=60"]])
def test_shutdown_ends_the_wait(pynbd_server, tmp_path: Path, params: list[str]) -> None:
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    srv = pynbd_server(params[0], "-v", "python", script, params[1])
    views: list[dict] = []
    reader = threading.Thread(target=lambda: views.append(probe(srv.uri, [("pread", 512, 0)])))
    reader.start()
    deadline = time.monotonic() + 30
    while "waiting 60 seconds before retrying" not in srv.stderr:
        assert time.monotonic() < deadline, srv.stderr
        time.sleep(0.02)
    start = time.monotonic()
    assert srv.stop() in (0, -15)  # SIGTERM: the wait ends, the server exits
    assert time.monotonic() - start < 10  # the point: not the 60 seconds of the delay
    reader.join(30)
    assert views and views[0].get("results", [["error"]])[0][0] == "error"
