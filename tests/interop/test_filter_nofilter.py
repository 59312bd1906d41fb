"""The nofilter filter side by side with nbdkit's, and against no filter at all: nothing a
client sees may change."""

from __future__ import annotations

import subprocess

from helpers import PYNBD, require
from side_by_side import probe

from tests.interop.behaviour_compare import CALLS, MIB, assert_same_many

OPS = [("pwrite", b"\1" * 8192, 4096), ("pread", 16384, 0), ("zero", 4096, 8192),
       ("trim", 4096, 65536), ("cache", 4096, 0), ("flush",), ("extents", 1 << 20, 0),
       ("pread", 16384, 0)]


def test_passthrough(pynbd_server, nbdkit_server):
    cases = [(["--filter=nofilter", "memory", "1M"], OPS),
             (["--filter=nofilter", "--filter=nofilter", "-r", "pattern", "1M"],
              [("pread", 4096, 4000)]),
             (["--filter=nofilter", "python", CALLS], [*OPS, ("pread", 4096, MIB)])]
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    plain = probe(pynbd_server("memory", "1M").uri, OPS)
    assert plain == views[0]


def test_dump_plugin_and_thread_model():
    """--dump-plugin is the plugin's; nofilter keeps the thread model (and the pynbd chain
    stays on the event loop: it never blocks)."""
    nbdkit = require("nbdkit")
    args = ["--filter=nofilter", "memory", "1M", "--dump-plugin"]
    mine = subprocess.run([*PYNBD, "serve", *args], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    theirs = subprocess.run([nbdkit, *args], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    want = [ln for ln in theirs if ln.startswith(("name=", "thread_model=", "max_thread"))]
    assert [ln for ln in mine if ln.startswith(("name=", "thread_model=", "max_thread"))] \
        == want
