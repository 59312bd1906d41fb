"""info side by side with nbdkit's: every mode serves the same size, flags and (for the
deterministic modes) bytes; the time modes serve 12 plausible bytes; bad parameters and bad
base64 export names get nbdkit's answers."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYNBD, require, run_pynbd
from side_by_side import assert_same, probe, serve_both

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("export", ["hello", "", "ü and spaces", "x" * 4000])
def test_exportname_as_nbdkit(pynbd_server, nbdkit_server, export: str) -> None:
    got = assert_same(pynbd_server, nbdkit_server, ["info"], export=export,
                      ops=[("size",), ("pread", len(export.encode()), 0)] if export else [])
    assert got["size"] == len(export.encode())


@pytest.mark.parametrize("export", ["aGVsbG8=", "", "not base64!", "aGVsbG8", "AAEC/w=="])
def test_base64exportname_as_nbdkit(pynbd_server, nbdkit_server, export: str) -> None:
    got = assert_same(pynbd_server, nbdkit_server, ["info", "mode=base64exportname"],
                      export=export, ops=[("size",)])
    if export == "aGVsbG8=":
        assert got["size"] == 5


@pytest.mark.parametrize("mode", ["address", "time", "uptime", "conntime"])
def test_modes_flags_as_nbdkit(pynbd_server, nbdkit_server, mode: str) -> None:
    ops = [("size",), ("pread", 4, 0)] if mode == "address" else [("size",)]
    assert_same(pynbd_server, nbdkit_server, ["info", mode], ops=ops)


def test_time_modes(pynbd_server) -> None:
    now = time.time()
    for mode, low, high in (("time", now - 60, now + 60), ("uptime", 0, 60),
                            ("conntime", 0, 60)):
        srv = pynbd_server("info", mode)
        data = probe(srv.uri, [("pread", 12, 0)])["results"][0][1]
        secs, usecs = struct.unpack(">QI", data)
        assert low <= secs + usecs / 1e6 <= high and usecs < 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_address_over_tcp_as_nbdkit() -> None:
    run = 'nbdcopy "$uri" - | cat'
    outs = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        cp = subprocess.run([*cmd, "-i", "127.0.0.1", "-p", str(_free_port()), "info",
                             "address", "--run", run], capture_output=True, check=True,
                            timeout=60)
        outs.append(cp.stdout.decode())
    for out in outs:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", out), out


def test_unix_address(pynbd_server, nbdkit_server) -> None:
    p, n = serve_both(pynbd_server, nbdkit_server, ["info", "address"])
    assert probe(p.uri, [("pread", 4, 0)])["results"] == [["data", b"unix"]]
    assert probe(n.uri, [("pread", 4, 0)])["results"] == [["data", b"unix"]]


@pytest.mark.parametrize("args, message", [
    (["info", "foo"], "unknown mode: 'foo'"),
    (["info", "x=1"], "unknown parameter 'x'"),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, args: list[str], message: str) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert b"Traceback" not in mine.stderr
