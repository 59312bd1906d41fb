"""Closing a server leaves no thread, task or socket behind (DESIGN.md convention 5).

The server runs in this process, in a thread with its own event loop, so the test can count
threads and file descriptors before and after.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from pathlib import Path

import pytest
from rawclient import RawClient

from pynbd.server.backend import Chain
from pynbd.server.server import Server, ServerConfig, bind_unix

PLUGIN = str(Path(__file__).parent / "plugins" / "e2eplug.py")


def load_plugin_class(nonblocking: bool, monkeypatch: pytest.MonkeyPatch) -> type:
    monkeypatch.setenv("E2E_NONBLOCKING", "1" if nonblocking else "0")
    monkeypatch.setenv("E2E_THREAD_MODEL", "PARALLEL")
    spec = importlib.util.spec_from_file_location(f"e2eplug_{nonblocking}", PLUGIN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.E2EPlugin


def open_fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory listing's own descriptor, already closed
    return out


class ServerThread:
    """A Server serving one Unix socket from a thread's own event loop."""

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.listener = bind_unix(path)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="e2e-server")
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self.ready.set)
            await self.server.serve([self.listener])
            # every task the server started has finished
            others = asyncio.all_tasks() - {asyncio.current_task()}
            assert not others, others

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e
            self.ready.set()

    def stop(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(10)
        assert not self.thread.is_alive(), "server thread did not end"
        self.listener.close()
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("nonblocking", [True, False], ids=["on-loop", "threads"])
@pytest.mark.parametrize("client_left_connected", [False, True], ids=["closed", "connected"])
def test_close_leaves_no_thread_or_socket(sockdir: Path, monkeypatch, nonblocking,
                                          client_left_connected):
    cls = load_plugin_class(nonblocking, monkeypatch)
    threads_before = threading.active_count()
    fds_before = open_fds()

    plugin = cls()
    chain = Chain(plugin)
    chain.config("size", "1M")
    chain.config_complete()
    chain.get_ready()
    server = Server(chain, ServerConfig(threads=4))
    st = ServerThread(server, str(sockdir / "inproc.sock"))
    assert threading.active_count() == threads_before + 1

    clients = []
    for i in range(3):
        c = RawClient(str(sockdir / "inproc.sock"))
        c.negotiate(structured=bool(i % 2))
        c.pwrite(i * 4096, bytes([i + 1]) * 4096)
        assert c.pread(i * 4096, 4096) == bytes([i + 1]) * 4096
        clients.append(c)
    negotiating = RawClient(str(sockdir / "inproc.sock"))
    negotiating.start()
    clients[0].disconnect()
    assert clients[0].expect_hangup() == b""
    clients[0].close()
    clients[1].close()
    if not client_left_connected:
        for c in clients[2:] + [negotiating]:
            c.close()
        time.sleep(0.1)

    t0 = time.monotonic()
    st.stop()
    assert time.monotonic() - t0 < 5
    for c in clients[2:] + [negotiating]:
        if client_left_connected:
            assert c.expect_hangup() == b""  # the server closed its end
        c.close()
    chain.cleanup()

    assert threading.active_count() == threads_before, threading.enumerate()
    leaked = {fd: t for fd, t in open_fds().items() if fds_before.get(fd) != t}
    assert not leaked, f"descriptors left open: {leaked}"
