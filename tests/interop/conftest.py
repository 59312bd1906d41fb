"""Fixtures for interop tests: pynbd against the real peers.

Every test under tests/interop/ is marked ``interop`` (``pytest -m 'not interop'``
runs the rest). A missing peer skips here and fails in CI (helpers.require).

    def test_info(pynbd_server):
        srv = pynbd_server("memory", "1M")
        out = run_peer("nbdinfo", "--size", srv.uri).stdout          # Debian's nbdinfo

    def test_api(pynbd_server, libnbd):
        srv = pynbd_server("memory", "1M")
        out = libnbd("import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
                     " print(h.get_size())", srv.uri).stdout         # python3-libnbd

    srv = qemu_nbd_server(image, "-f", "raw")        # qemu-nbd -k SOCK -f raw IMAGE
    srv = nbd_server(image, export="disk")           # Debian's nbd-server, URI .../disk
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from helpers import (
    SERVER_START_TIMEOUT,
    DaemonServer,
    Server,
    require,
    require_libnbd_python,
    run_libnbd,
    start_daemon_server,
    start_server,
)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def libnbd() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`helpers.run_libnbd`, after checking that /usr/bin/python3 can ``import nbd``.

    Call ``libnbd(script, *argv, timeout=60, check=True)``; read ``.stdout``.
    """
    require_libnbd_python()
    return run_libnbd


@pytest.fixture(name="libnbd_python")
def _libnbd_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Same as `libnbd`."""
    require_libnbd_python()
    return run_libnbd


@pytest.fixture
def qemu_nbd_server(sockdir: Path) -> Iterator[Callable[..., Server]]:
    """Factory: ``qemu-nbd -k SOCK ARGS... IMAGE``; every server stopped at teardown.

    qemu-nbd without ``-t``/``--persistent`` exits after its first client
    disconnects: that counts as a clean stop. Pass ``-f raw`` (or qcow2) to
    avoid format probing, and ``-e N`` for N simultaneous clients.
    """
    exe = require("qemu-nbd")
    servers: list[Server] = []
    counter = itertools.count()

    def start(
        image: str | os.PathLike[str],
        *args: str,
        export: str = "",
        env: Mapping[str, str] | None = None,
        timeout: float = SERVER_START_TIMEOUT,
    ) -> Server:
        n = next(counter)
        sock = str(sockdir / f"qemu{n}.sock")
        argv = [exe, "-k", sock, *args]
        if export:
            argv += ["-x", export]
        server = start_server(
            [*argv, os.fspath(image)],
            logdir=sockdir / f"qemu{n}.log",
            sock=sock,
            export=export,
            env=env,
            timeout=timeout,
        )
        servers.append(server)
        return server

    try:
        yield start
    finally:
        _stop_all(servers)


@pytest.fixture
def nbd_server(sockdir: Path) -> Iterator[Callable[..., DaemonServer]]:
    """Factory: Debian's nbd-server serving `path` as export `export` on a Unix socket.

    nbd-server only runs as a daemon for more than one client, so it is
    started with a generated config file and a pid file, and stopped by pid.
    Extra ``key = value`` lines go in `generic` and `export_options`.
    """
    exe = require("nbd-server")
    servers: list[DaemonServer] = []
    counter = itertools.count()

    def start(
        path: str | os.PathLike[str],
        *,
        export: str = "disk",
        readonly: bool = False,
        generic: Mapping[str, str] | None = None,
        export_options: Mapping[str, str] | None = None,
        timeout: float = SERVER_START_TIMEOUT,
    ) -> DaemonServer:
        n = next(counter)
        sock = sockdir / f"nbd-server{n}.sock"
        conf = sockdir / f"nbd-server{n}.conf"
        pidfile = sockdir / f"nbd-server{n}.pid"
        lines = ["[generic]", f"unixsock = {sock}"]
        lines += [f"{k} = {v}" for k, v in (generic or {}).items()]
        lines += [f"[{export}]", f"exportname = {os.fspath(path)}"]
        if readonly:
            lines.append("readonly = true")
        lines += [f"{k} = {v}" for k, v in (export_options or {}).items()]
        conf.write_text("\n".join(lines) + "\n")
        server = start_daemon_server(
            [exe, "-C", str(conf), "-p", str(pidfile)],
            pidfile=pidfile,
            logdir=sockdir / f"nbd-server{n}.log",
            sock=sock,
            export=export,
            timeout=timeout,
        )
        servers.append(server)
        return server

    try:
        yield start
    finally:
        _stop_all(servers)


def _stop_all(servers: Sequence[Server | DaemonServer]) -> None:
    errors: list[BaseException] = []
    for server in reversed(servers):
        try:
            server.stop()
        except BaseException as e:  # noqa: BLE001 - pytest.fail is a BaseException
            errors.append(e)
    if errors:
        raise errors[0]
