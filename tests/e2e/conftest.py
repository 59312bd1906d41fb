"""Fixtures for the end-to-end tests: a real ``pynbd serve`` process, raw bytes over Unix sockets.

    def test_x(serve):
        srv = serve()                       # e2e memory plugin, 1 MiB, on the event loop
        srv = serve("-r", size="64K")       # server options go first
        srv = serve(blocking=True, params=["slow=4096"], thread_model="SERIALIZE_REQUESTS")
        with RawClient(srv.sock) as c: ...

``serve`` starts a fresh server for the test. ``shared`` takes the same arguments but reuses
one server per distinct argument list for the whole session (starting a Python server costs
~0.3 s): use it when the test does not care what other tests wrote, and only writes where
no other test reads. A shared server that died fails the next test that asks for it.

Every server's stderr is checked at the end: a traceback is a failure (bad input must never
crash a connection, let alone print a traceback), unless the test passed ``tracebacks_ok=True``
(a server run with -v logs the traceback of a plugin that raises on purpose; without -v a
plugin's failure is one line).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import PYNBD, Server, short_tmpdir, start_server

#: The e2e plugin file (a memory plugin with knobs; see its docstring).
PLUGIN = str(Path(__file__).parent / "plugins" / "e2eplug.py")


def _check_stderr(srv: Server) -> None:
    if getattr(srv, "tracebacks_ok", False):
        return
    err = srv.stderr
    assert "Traceback" not in err, f"server printed a traceback:\n{err}"


class _Factory:
    def __init__(self, d: Path, cache: bool) -> None:
        self.dir = d
        self.cache = cache
        self.servers: dict[Any, Server] = {}
        self.n = 0

    def __call__(self, *options: str, size: str = "1M", params: list[str] | None = None,
                 blocking: bool = False, thread_model: str = "PARALLEL",
                 tracebacks_ok: bool = False) -> Server:
        key: Any = (options, size, tuple(params or ()), blocking, thread_model)
        if not self.cache:
            key = self.n
        srv = self.servers.get(key)
        if srv is not None:
            if srv.proc.poll() is not None:
                pytest.fail(f"shared server {srv.argv} died (rc {srv.proc.returncode}):\n"
                            f"{srv.stderr}")
            return srv
        self.n += 1
        sock = str(self.dir / f"s{self.n}.sock")
        env = {"E2E_NONBLOCKING": "0" if blocking else "1", "E2E_THREAD_MODEL": thread_model}
        srv = start_server([*PYNBD, "serve", "-f", "-U", sock, *options, PLUGIN, size,
                            *(params or [])], logdir=self.dir / f"s{self.n}.log", sock=sock,
                           env=env)
        srv.tracebacks_ok = tracebacks_ok  # type: ignore[attr-defined]
        self.servers[key] = srv
        return srv

    def stop_all(self) -> None:
        errors = []
        for srv in self.servers.values():
            try:
                srv.stop()
                _check_stderr(srv)
            except BaseException as e:  # noqa: BLE001 - stop all, report the first
                errors.append(e)
        self.servers.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Factory: a fresh ``pynbd serve -f -U SOCK [OPTIONS] e2eplug.py SIZE [PARAMS]``."""
    d = short_tmpdir("pynbd-e2e-")
    f = _Factory(d, cache=False)
    try:
        yield f
        f.stop_all()
    finally:
        for s in f.servers.values():
            s.kill()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def _shared_factory() -> Iterator[_Factory]:
    d = short_tmpdir("pynbd-e2e-")
    f = _Factory(d, cache=True)
    try:
        yield f
        f.stop_all()
    finally:
        for s in f.servers.values():
            s.kill()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared(_shared_factory: _Factory) -> Iterator[Callable[..., Server]]:
    """Factory: like ``serve``, but one server per argument list for the whole session."""
    used: list[Server] = []

    def get(*args: Any, **kw: Any) -> Server:
        srv = _shared_factory(*args, **kw)
        used.append(srv)
        return srv

    yield get
    for srv in used:
        assert srv.proc.poll() is None, f"the shared server died during the test:\n{srv.stderr}"
        _check_stderr(srv)
