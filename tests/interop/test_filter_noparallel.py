"""The noparallel filter side by side with nbdkit's: the thread model each mode gives, how
many requests a plugin sees at once (a script counts them), one client at a time."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import PYNBD, require, run_async

from pynbd.client import AsyncClient, Client
from tests.interop.behaviour_compare import assert_same_many, bad_params

#: A PARALLEL plugin whose preads wait 20 ms and count how many run at once; a read at
#: offset 1M returns the highest count seen.
COUNTING = '''
import threading, time
import nbdkit
API_VERSION = 2
lock = threading.Lock()
now = top = 0
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return 1
def get_size(h):
    return 2 * 1024 * 1024
def pread(h, buf, offset, flags):
    global now, top
    if offset >= 1024 * 1024:
        buf[:] = str(top).encode().ljust(len(buf))
        return
    with lock:
        now += 1
        top = max(top, now)
    time.sleep(0.02)
    with lock:
        now -= 1
    buf[:] = bytes(len(buf))
'''


@pytest.mark.parametrize("mode", ["", "requests", "all-requests", "all_requests",
                                  "connections", "serialise"])
def test_thread_model(mode: str) -> None:
    nbdkit = require("nbdkit")
    param = [] if not mode else ["serialise=connections" if mode == "serialise"
                                 else f"serialize={mode}"]
    args = ["--filter=noparallel", "memory", "1M", *param, "--dump-plugin"]
    mine = subprocess.run([*PYNBD, "serve", *args], capture_output=True, text=True,
                          check=True).stdout
    theirs = subprocess.run([nbdkit, *args], capture_output=True, text=True,
                            check=True).stdout
    pick = [ln for ln in theirs.splitlines() if ln.startswith("thread_model=")]
    assert pick and pick == [ln for ln in mine.splitlines() if ln.startswith("thread_model=")]


def _most_at_once(uri: str) -> int:
    """Two connections, eight reads in flight on each: the most the plugin saw at once."""
    async def run() -> int:
        clients = [await AsyncClient.connect(uri) for _ in range(2)]
        await asyncio.gather(*(c.pread(4096, i * 4096) for c in clients for i in range(8)))
        top = int(bytes(await clients[0].pread(64, 1 << 20)).strip())
        for c in clients:
            await c.close()
        return top
    return run_async(run())


@pytest.mark.parametrize(("mode", "most"), [("requests", 2), ("all-requests", 1)])
def test_requests_at_once(pynbd_server, nbdkit_server, tmp_path: Path, mode: str,
                          most: int) -> None:
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    args = ["--filter=noparallel", "python", script, f"serialize={mode}"]
    assert _most_at_once(pynbd_server(*args).uri) == most
    assert _most_at_once(nbdkit_server(*args).uri) == most
    # without the filter the plugin runs them in parallel
    assert _most_at_once(pynbd_server("python", script).uri) > 2


def _connect_into(uri: str, out: list[Client]) -> None:
    out.append(Client.connect(uri))


def test_one_client_at_a_time(pynbd_server, nbdkit_server):
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("--filter=noparallel", "memory", "1M", "serialize=connections")
        first = Client.connect(srv.uri)
        assert not first.can_multi_conn()
        second: list[Client] = []
        t = threading.Thread(target=_connect_into, args=(srv.uri, second))
        t.start()
        t.join(0.5)  # the point: the second client is still held while the first is on
        assert t.is_alive() and not second
        first.close()
        t.join(30)
        assert second and second[0].pread(512, 0) == bytes(512)
        second[0].close()


def test_multi_conn_flag(pynbd_server, nbdkit_server):
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=noparallel", "memory", "1M", f"serialize={m}"], [("pread", 512, 0)])
        for m in ("requests", "connections")])
    assert [v["flags"]["can_multi_conn"] for v in views] == [True, False]


def test_bad_parameters():
    bad_params([["--filter=noparallel", "memory", "1M", "serialize=x"],
                ["--filter=noparallel", "memory", "1M", "serialise=parallel"]])
