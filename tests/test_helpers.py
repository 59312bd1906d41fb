"""Tests of the test harness itself (tests/helpers.py, tests/conftest.py)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import helpers
import pytest
from helpers import UNIX_PATH_MAX, free_tcp_port, short_tmpdir, start_server, unix_uri


def test_missing_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpers, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="gone"):
        helpers.missing("gone")


def test_missing_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpers, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="gone.*CI=true"):
        helpers.missing("gone")


def test_require_unknown_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpers, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no-such-peer-xyz not found"):
        helpers.require("no-such-peer-xyz")


def test_short_tmpdir_fits_unix_socket() -> None:
    d = short_tmpdir()
    try:
        assert len(str(d / "nbdkit99.sock")) < UNIX_PATH_MAX
    finally:
        d.rmdir()


def test_unix_uri() -> None:
    assert unix_uri("/tmp/s") == "nbd+unix:///?socket=/tmp/s"
    assert unix_uri("/tmp/s", "disk") == "nbd+unix:///disk?socket=/tmp/s"


def _listener_script(kind: str) -> str:
    # A stand-in server: listens, then sleeps until SIGTERM.
    return (
        "import socket, sys, time\n"
        f"s = socket.socket(socket.AF_{kind})\n"
        "s.bind(eval(sys.argv[1]))\n"
        "time.sleep(0.2)\n"  # readiness must wait for listen(), not bind()
        "s.listen()\n"
        "time.sleep(600)\n"
    )


def test_start_server_unix_and_stop(sockdir: Path) -> None:
    sock = str(sockdir / "x.sock")
    srv = start_server(
        [sys.executable, "-c", _listener_script("UNIX"), repr(sock)],
        logdir=sockdir / "l",
        sock=sock,
    )
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(sock)  # listening already: no retry needed
    assert srv.uri == f"nbd+unix:///?socket={sock}"
    assert srv.stop() < 0  # died by SIGTERM: accepted
    assert srv.proc.poll() is not None


def test_start_server_tcp(sockdir: Path) -> None:
    port = free_tcp_port()
    srv = start_server(
        [sys.executable, "-c", _listener_script("INET"), repr(("127.0.0.1", port))],
        logdir=sockdir / "l",
        port=port,
    )
    assert srv.uri == f"nbd://127.0.0.1:{port}/"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    srv.stop()


def test_start_server_reports_early_exit(sockdir: Path) -> None:
    script = "import sys; print('boom: bad plugin', file=sys.stderr); sys.exit(3)"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited with 3.*boom: bad plugin"):
        start_server([sys.executable, "-c", script], logdir=sockdir / "l", sock=sockdir / "s")


def test_start_server_times_out(sockdir: Path) -> None:
    script = "import time; time.sleep(600)"
    with pytest.raises(pytest.fail.Exception, match="not listening"):
        start_server(
            [sys.executable, "-c", script], logdir=sockdir / "l", sock=sockdir / "s", timeout=0.5
        )


def test_stop_fails_on_hung_server(sockdir: Path) -> None:
    sock = str(sockdir / "x.sock")
    script = (
        "import signal, socket, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "time.sleep(600)\n"
    )
    srv = start_server([sys.executable, "-c", script, sock], logdir=sockdir / "l", sock=sock)
    with pytest.raises(pytest.fail.Exception, match="did not exit"):
        srv.stop(timeout=0.5)
    assert srv.proc.poll() is not None  # killed


def test_stop_fails_on_bad_exit_code(sockdir: Path) -> None:
    sock = str(sockdir / "x.sock")
    script = (
        "import signal, socket, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "time.sleep(600)\n"
    )
    srv = start_server([sys.executable, "-c", script, sock], logdir=sockdir / "l", sock=sock)
    with pytest.raises(pytest.fail.Exception, match="exited with 7"):
        srv.stop()
