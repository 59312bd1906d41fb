"""Three filters over a plugin: every callback is called in nbdkit's order (test-layers).

Each layer appends ``NAME: CALLBACK`` to a log file; one client connects, lists exports,
reads, writes, flushes and disconnects; then the server stops. The order is nbdkit's
(tests/test-layers.c): configuration and per-connection calls go from the outermost filter
(the first ``--filter``) inwards, ``get_ready`` / ``after_fork`` / ``prepare`` from the plugin
outwards, ``finalize`` and ``close`` outer first.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from pynbd.client.blocking import BlockingConnection
from tests.helpers import Server

_FILTER = '''
import os
from pynbd.plugin import Filter

def note(what):
    with open(os.environ["LAYERS_LOG"], "a") as f:
        f.write(what + "\\n")

class Layer(Filter):
    name = "NAME"

    def config(self, next_config, key, value):
        note(f"NAME: config {key}")
        if key != "NAME_key":
            next_config(key, value)

    def config_complete(self):
        note("NAME: config_complete")

    def get_ready(self):
        note("NAME: get_ready")

    def after_fork(self):
        note("NAME: after_fork")

    def cleanup(self):
        note("NAME: cleanup")

    def preconnect(self, next_preconnect, readonly):
        note("NAME: preconnect")
        next_preconnect(readonly)

    def list_exports(self, next_list_exports, readonly, is_tls):
        note("NAME: list_exports")
        return next_list_exports(readonly, is_tls)

    def default_export(self, next_default_export, readonly, is_tls):
        note("NAME: default_export")
        return next_default_export(readonly, is_tls)

    def open(self, next_open, readonly, export_name, is_tls):
        note("NAME: open")
        next_open(readonly, export_name)
        return "NAME-handle"

    def prepare(self, next, h, readonly):
        assert h == "NAME-handle"
        note("NAME: prepare")

    def finalize(self, next, h):
        note("NAME: finalize")

    def close(self, h):
        note("NAME: close")

    def get_size(self, next, h):
        note("NAME: get_size")
        return next.get_size()

    def pread(self, next, h, count, offset, flags):
        note("NAME: pread")
        return next.pread(count, offset, flags)

    def pwrite(self, next, h, buf, offset, flags):
        note("NAME: pwrite")
        next.pwrite(buf, offset, flags)

    def flush(self, next, h, flags):
        note("NAME: flush")
        next.flush(flags)
'''

_PLUGIN = '''
import os
from pynbd.plugin import Plugin

def note(what):
    with open(os.environ["LAYERS_LOG"], "a") as f:
        f.write(what + "\\n")

class P(Plugin):
    name = "plugin"

    def __init__(self):
        self.disk = bytearray(65536)

    def config(self, key, value):
        note(f"plugin: config {key}")

    def config_complete(self):
        note("plugin: config_complete")

    def get_ready(self):
        note("plugin: get_ready")

    def after_fork(self):
        note("plugin: after_fork")

    def cleanup(self):
        note("plugin: cleanup")

    def preconnect(self, readonly):
        note("plugin: preconnect")

    def list_exports(self, readonly, is_tls):
        note("plugin: list_exports")
        return [("", "the disk")]

    def default_export(self, readonly, is_tls):
        note("plugin: default_export")
        return ""

    def open(self, readonly, export_name, is_tls):
        note("plugin: open")
        return "plugin-handle"

    def close(self, h):
        note("plugin: close")

    def get_size(self, h):
        note("plugin: get_size")
        return len(self.disk)

    def pread(self, h, count, offset, flags):
        note("plugin: pread")
        return bytes(self.disk[offset:offset + count])

    def pwrite(self, h, buf, offset, flags):
        note("plugin: pwrite")
        self.disk[offset:offset + len(buf)] = buf

    def flush(self, h, flags):
        note("plugin: flush")
'''


def _lines(log: Path, prefix: str = "") -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.split(": ", 1)[1].startswith(prefix)]


def _order(lines: list[str], callback: str) -> list[str]:
    """The layer names, in order, of the lines for one callback."""
    return [ln.split(":", 1)[0] for ln in lines if ln.split(": ", 1)[1] == callback]


def test_call_order_through_three_filters(tmp_path: Path,
                                          pynbd_server: Callable[..., Server]) -> None:
    files = []
    for name in ("filter1", "filter2", "filter3"):
        f = tmp_path / f"{name}.py"
        f.write_text(textwrap.dedent(_FILTER).replace("NAME", name))
        files.append(f)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(_PLUGIN)
    log = tmp_path / "layers.log"
    env = {"LAYERS_LOG": str(log)}
    srv = pynbd_server(*(f"--filter={f}" for f in files), plugin, "filter1_key=1",
                       "filter2_key=2", "filter3_key=3", "plugin_key=4", env=env)
    c = BlockingConnection.connect(srv.uri)
    try:
        buf = bytearray(512)
        c.pread_into(memoryview(buf), 0)
        c.pwrite(b"x" * 512, 512)
        c.flush()
    finally:
        c.close()
    srv.stop()
    lines = _lines(log)
    outer_in = ["filter1", "filter2", "filter3", "plugin"]
    inner_out = ["plugin", "filter3", "filter2", "filter1"]
    # Configuration: each key goes down until its filter consumes it.
    assert _order(lines, "config filter1_key") == ["filter1"]
    assert _order(lines, "config filter3_key") == ["filter1", "filter2", "filter3"]
    assert _order(lines, "config plugin_key") == outer_in
    assert _order(lines, "config_complete") == outer_in
    assert _order(lines, "get_ready") == inner_out
    assert _order(lines, "after_fork") == inner_out
    # Per connection.
    assert _order(lines, "preconnect") == outer_in
    # "" is resolved from the top, then again by each layer that opens the one below (nbdkit)
    assert _order(lines, "default_export")[:4] == outer_in
    assert _order(lines, "open") == outer_in
    assert _order(lines, "prepare") == ["filter3", "filter2", "filter1"]
    assert _order(lines, "get_size") == outer_in
    for data_call in ("pread", "pwrite", "flush"):
        assert _order(lines, data_call) == outer_in, data_call
    assert _order(lines, "finalize") == ["filter1", "filter2", "filter3"]
    assert _order(lines, "close") == outer_in
    assert _order(lines, "cleanup") == outer_in
    # The phases follow one another: everything of one connection after get_ready, every
    # prepare after every open, every close after every finalize, cleanup last.
    idx = {ln: i for i, ln in enumerate(lines)}
    assert idx["plugin: open"] < idx["filter3: prepare"]
    assert idx["filter1: prepare"] < idx["filter1: pread"]
    assert idx["plugin: pread"] < idx["filter1: finalize"]
    assert idx["plugin: close"] < idx["filter1: cleanup"]
    assert os.path.basename(lines[-1]) == "plugin: cleanup"


def test_list_exports_goes_through_the_filters(tmp_path: Path,
                                               pynbd_server: Callable[..., Server]) -> None:
    f = tmp_path / "filter1.py"
    f.write_text(textwrap.dedent(_FILTER).replace("NAME", "filter1"))
    plugin = tmp_path / "plugin.py"
    plugin.write_text(_PLUGIN)
    log = tmp_path / "layers.log"
    srv = pynbd_server(f"--filter={f}", plugin, env={"LAYERS_LOG": str(log)})
    import pynbd.libnbd as nbd

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri)
    names: list[tuple[str, str]] = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    h.opt_abort()
    h.close()
    srv.stop()
    assert names == [("", "the disk")]
    assert _order(_lines(log), "list_exports") == ["filter1", "plugin"]
