"""pread_nowait: a blocking plugin's reads are tried on the event loop first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import PYNBD, short_tmpdir, start_server
from rawclient import RawClient

PLUGIN = str(Path(__file__).parent / "plugins" / "nowaitplug.py")


@pytest.fixture
def nowait_server():
    d = short_tmpdir("pynbd-nowait-")
    servers = []

    def start(thread_model: str = "PARALLEL", *options: str):
        sock = str(d / f"s{len(servers)}.sock")
        srv = start_server([*PYNBD, "serve", "-f", "-U", sock, *options, PLUGIN, "64K"],
                           logdir=d / f"s{len(servers)}.log", sock=sock,
                           env={"NOWAIT_THREAD_MODEL": thread_model})
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()
        assert "Traceback" not in s.stderr


@pytest.mark.parametrize("structured", [False, True])
def test_cached_reads_come_from_pread_nowait_others_from_pread(nowait_server, structured):
    srv = nowait_server()
    with RawClient(srv.sock) as c:
        c.negotiate(structured=structured)
        assert c.pread(0, 4096) == b"N" * 4096
        assert c.pread(4096, 4096) == b"T" * 4096
        assert c.pread(8192, 100) == b"N" * 100


@pytest.mark.parametrize("model", ["SERIALIZE_REQUESTS", "SERIALIZE_ALL_REQUESTS"])
def test_no_loop_fast_path_under_serialized_models(nowait_server, model):
    srv = nowait_server(model)
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.pread(0, 4096) == b"T" * 4096


def test_no_loop_fast_path_with_one_thread(nowait_server):
    srv = nowait_server("PARALLEL", "-t", "1")
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.pread(0, 4096) == b"T" * 4096


def test_file_plugin_reads_cached_pages_without_a_thread(tmp_path):
    from pynbd.plugins.file import FilePlugin

    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))
    plugin = FilePlugin()
    plugin.config("file", str(p))
    plugin.config_complete()
    h = plugin.open(True, "", False)
    try:
        os.pread(h.fd, 1 << 20, 0)  # make sure it is in the page cache
        assert bytes(plugin.pread_nowait(h, 4096, 8192, 0)) == p.read_bytes()[8192:12288]
    finally:
        plugin.close(h)
