"""The exitwhen filter side by side with nbdkit's: each kind of event, seen while idle
(polling), when a client connects (refused) or disconnects (the server then exits), or
before the server starts (it exits at once); and its parameters.

Every server here polls each second (exit-when-poll=1): a test waits for an exit, never
for a fixed time."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import PYNBD, peer_env, require
from side_by_side import probe

from pynbd.client import Client
from tests.interop.behaviour_compare import bad_params

POLL = "exit-when-poll=1"


def _both(pynbd_server: Any, nbdkit_server: Any, tmp_path: Path,
          run: Callable[[Any, Path], None]) -> None:
    """``run(factory, directory)`` for each server at once, each in its own directory."""
    dirs = [tmp_path / "pynbd", tmp_path / "nbdkit"]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(run, fac, d)
                  for fac, d in zip((pynbd_server, nbdkit_server), dirs, strict=True)]:
            f.result()


def _exits(srv: Any) -> None:
    assert srv.proc.wait(30) == 0, srv.stderr


def test_file_created_with_a_client(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    def run(factory: Any, d: Path) -> None:
        stop = d / "stop"
        srv = factory("--filter=exitwhen", "memory", "1M", f"exit-when-file-created={stop}",
                      POLL)
        client = Client.connect(srv.uri)
        stop.touch()
        # a new client is refused; the connected one is served until it leaves
        assert "connect_error" in probe(srv.uri)
        assert client.pread(512, 0) == bytes(512)
        assert srv.proc.poll() is None
        client.close()
        _exits(srv)
        assert "exitwhen: nbdkit is exiting: rejecting new connection" in srv.stderr
    _both(pynbd_server, nbdkit_server, tmp_path, run)


def test_file_deleted_while_idle(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    def run(factory: Any, d: Path) -> None:
        keep = d / "keep"
        keep.touch()
        srv = factory("--filter=exitwhen", "memory", "1M", f"exit-when-file-deleted={keep}",
                      POLL)
        assert probe(srv.uri)["size"] == 1 << 20
        keep.unlink()
        _exits(srv)
    _both(pynbd_server, nbdkit_server, tmp_path, run)


def test_relative_file(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    """A relative name is taken from the directory the server started in."""
    def run(factory: Any, d: Path) -> None:
        srv = factory("--filter=exitwhen", "memory", "1M", "exit-when-file-created=stop",
                      POLL, cwd=d)
        (d / "stop").touch()
        _exits(srv)
    _both(pynbd_server, nbdkit_server, tmp_path, run)


@pytest.mark.parametrize("key", ["exit-when-process-exits", "exit-when-pid-exits"])
def test_process_exits(pynbd_server, nbdkit_server, tmp_path: Path, key: str) -> None:
    def run(factory: Any, d: Path) -> None:
        sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                   stdin=subprocess.PIPE)
        try:
            srv = factory("--filter=exitwhen", "memory", "1M", f"{key}={sleeper.pid}", POLL)
            assert probe(srv.uri)["size"] == 1 << 20
        finally:
            assert sleeper.stdin is not None
            sleeper.stdin.close()
            sleeper.wait()
        _exits(srv)
    _both(pynbd_server, nbdkit_server, tmp_path, run)


@pytest.mark.parametrize("key", ["exit-when-pipe-closed", "exit-when-fd-closed"])
def test_pipe_closed(pynbd_server, nbdkit_server, tmp_path: Path, key: str) -> None:
    """The server gets the read end of a FIFO as its fd 3; closing our end (the only
    writer) is the event."""
    def run(factory: Any, d: Path) -> None:
        fifo = d / "fifo"
        os.mkfifo(fifo)
        ours = os.open(fifo, os.O_RDWR)  # a writer, so that the server's open does not wait
        try:
            command = [*PYNBD, "serve"] if factory is pynbd_server else [require("nbdkit")]
            factory.command = ["sh", "-c", 'exec "$@" 3<"$0"', str(fifo), *command]
            srv = factory("--filter=exitwhen", "memory", "1M", f"{key}=3", POLL)
            assert probe(srv.uri)["size"] == 1 << 20
        finally:
            os.close(ours)
        _exits(srv)
    _both(pynbd_server, nbdkit_server, tmp_path, run)


def test_script(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    def run(factory: Any, d: Path) -> None:
        flag = d / "flag"
        script = f"test -e {flag} && exit 88; exit 0"
        srv = factory("--filter=exitwhen", "memory", "1M", f"exit-when-script={script}", POLL)
        assert probe(srv.uri)["size"] == 1 << 20
        flag.touch()
        _exits(srv)
    _both(pynbd_server, nbdkit_server, tmp_path, run)


def test_failing_script_is_logged(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    def run(factory: Any, d: Path) -> None:
        srv = factory("--filter=exitwhen", "memory", "1M", "exit-when-script=exit 3", POLL)
        assert probe(srv.uri)["size"] == 1 << 20  # not an event: served as usual
        assert "exit-when-script: command failed with exit code 3" in srv.stderr
    _both(pynbd_server, nbdkit_server, tmp_path, run)


@pytest.mark.parametrize("event", ["exit-when-file-created=/", "exit-when-pipe-closed=99",
                                   "exit-when-script=exit 88"])
def test_event_before_start(tmp_path: Path, event: str) -> None:
    """The event happened already: the server exits at once with status 0, without running
    its --run command."""
    nbdkit = require("nbdkit")
    for command in (PYNBD + ["serve"], [nbdkit]):
        cp = subprocess.run([*command, "-U", "-", "--filter=exitwhen", "memory", "1M", event,
                             "--run", f"touch {tmp_path}/ran"], capture_output=True,
                            text=True, timeout=60, env=peer_env(), check=False)
        assert cp.returncode == 0, cp.stderr
        assert not (tmp_path / "ran").exists()


def test_bad_parameters():
    bad_params([["--filter=exitwhen", "memory", "1M", p] for p in (
        "exit-when-pipe-closed=x", "exit-when-pipe-closed= 9999999999",
        "exit-when-fd-closed=1.5", "exit-when-process-exits=-1",
        "exit-when-process-exits=999999999", "exit-when-pid-exits=x",
        "exit-when-poll=x", "exit-when-poll=-2", "exit-when-file-created=",
        "exit-when-file-deleted=")])
