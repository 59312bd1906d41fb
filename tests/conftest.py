"""Fixtures for the whole suite (unit, e2e, interop).

Servers (each a factory: call it as many times as the test needs; every server
it started is stopped at teardown, and one that does not exit on SIGTERM fails
the test):

    def test_size(pynbd_server):
        srv = pynbd_server("memory", "1G")          # pynbd serve -f -U SOCK memory 1G
        srv.uri, srv.sock, srv.proc, srv.stderr

    srv = pynbd_server("-r", "memory", "1G", tcp=True)  # -f -p PORT -i 127.0.0.1 -r ...
    srv = nbdkit_server("memory", "1G")              # same shape; skips without nbdkit

Arguments after the listener options are nbdkit's: options, PLUGIN, params.
Helpers (`require`, `run_libnbd`, `run_peer`, `run_pynbd`, ...) are in
tests/helpers.py: ``from helpers import require``. Under ``CI`` a skip is a failure
(tests/ci_mode.py, whose hooks are imported here).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # make `import helpers` work from any test dir

from ci_mode import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)
from helpers import (
    IN_CI,
    PYNBD,
    SERVER_START_TIMEOUT,
    Server,
    free_tcp_port,
    require,
    short_tmpdir,
    start_server,
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        "pynbd tests: " + ("CI (missing peers and any skip fail)" if IN_CI
                           else "not CI (missing peers skip)"),
        f"pynbd command: {' '.join(PYNBD)}",
    ]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh short directory under /tmp for Unix sockets (sun_path <= 107 bytes)."""
    d = short_tmpdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class ServerFactory:
    """Starts `command -f -U SOCK ARGS...` (or ``-p PORT -i 127.0.0.1`` with tcp=True).

    `command` is a server that takes nbdkit's command line: pynbd serve or nbdkit.
    """

    def __init__(self, command: Sequence[str], name: str, sockdir: Path) -> None:
        self.command = list(command)
        self.name = name
        self.sockdir = sockdir
        self.servers: list[Server] = []
        self._n = itertools.count()

    def __call__(
        self,
        *args: str | os.PathLike[str],
        tcp: bool = False,
        export: str = "",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = SERVER_START_TIMEOUT,
        probe: str = "listen",
        foreground: bool = True,
    ) -> Server:
        n = next(self._n)
        logdir = self.sockdir / f"{self.name}{n}.log"
        fg = ["-f"] if foreground else []
        attempts = 3 if tcp else 1
        for attempt in range(attempts):
            if tcp:
                port: int | None = free_tcp_port()
                sock = None
                listen = ["-p", str(port), "-i", "127.0.0.1"]
            else:
                port = None
                sock = str(self.sockdir / f"{self.name}{n}.sock")
                listen = ["-U", sock]
            try:
                server = start_server(
                    [*self.command, *fg, *listen, *(os.fspath(a) for a in args)],
                    logdir=logdir,
                    sock=sock,
                    port=port,
                    export=export,
                    env=env,
                    cwd=cwd,
                    timeout=timeout,
                    probe=probe,
                )
            except pytest.fail.Exception as e:
                # Another process took the free port between our probe and its bind.
                if attempt + 1 < attempts and "in use" in str(e).lower():
                    continue
                raise
            self.servers.append(server)
            return server
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except BaseException as e:  # noqa: BLE001 - stop every server, then report the first
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def pynbd_server(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start this checkout's ``pynbd serve -f -U SOCK ARGS...``; see module doc."""
    factory = ServerFactory([*PYNBD, "serve"], "pynbd", sockdir)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def nbdkit_server(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start ``nbdkit -f -U SOCK ARGS...`` (skips, or fails in CI, without nbdkit)."""
    factory = ServerFactory([require("nbdkit")], "nbdkit", sockdir)
    try:
        yield factory
    finally:
        factory.stop_all()
