"""The multi-conn filter side by side with nbdkit's: what is advertised in each mode, and
which connection's flush reaches the plugin (a script records every call with the number of
the connection that made it), for each dirty-tracking level."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import unix_uri

from pynbd.client import Client
from tests.interop.behaviour_compare import assert_same_many, bad_params

FUA = 1
SIZE = 1 << 20
#: Each open gets the next number; every data call is recorded as "CALL N" (N the
#: connection's number, FUA as "CALL+fua N"); a read at SIZE returns the record.
#: mc=1 makes the plugin multi-conn, flush=0 takes its flush away.
RECORDING = '''
import nbdkit
API_VERSION = 2
SIZE = 1024 * 1024
disk = bytearray(SIZE)
calls = []
opened = 0
caps = {"mc": "0", "flush": "1"}
def config(key, value):
    caps[key] = value
def open(readonly):
    global opened
    opened += 1
    return opened
def get_size(h):
    return SIZE + 4096
def can_write(h):
    return True
def can_multi_conn(h):
    return caps["mc"] == "1"
def can_flush(h):
    return caps["flush"] == "1"
def can_fua(h):
    return nbdkit.FUA_NATIVE
def pread(h, buf, offset, flags):
    if offset >= SIZE:
        buf[:] = " ".join(calls).encode().ljust(len(buf))[:len(buf)]
        return
    calls.append("pread %d" % h)
    buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags):
    calls.append("pwrite%s %d" % ("+fua" if flags & nbdkit.FLAG_FUA else "", h))
    disk[offset:offset + len(buf)] = buf
def flush(h, flags):
    calls.append("flush %d" % h)
'''


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "recording.py"
    path.write_text(RECORDING)
    return path


def test_advertised(pynbd_server, nbdkit_server, script: Path) -> None:
    cases = [(["--filter=multi-conn", "python", script, f"multi-conn-mode={m}", f"mc={mc}"],
              [("pwrite", b"\1" * 512, 0, FUA), ("pread", 64, SIZE)])
             for m, mc in (("auto", 0), ("auto", 1), ("emulate", 1), ("plugin", 0),
                           ("plugin", 1), ("disable", 1), ("unsafe", 0))]
    cases += [(["--filter=multi-conn", "python", script, f"multi-conn-mode={m}", "flush=0"],
               [("pread", 512, 0)]) for m in ("auto", "emulate", "plugin")]
    cases += [(["--filter=multi-conn", "--filter=noparallel", "python", script,
                "serialize=connections"], [("pread", 512, 0)])]
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    assert [v["flags"]["can_multi_conn"] for v in views[:7]] == [
        True, True, True, False, True, False, True]
    # emulate (and auto over a plugin without multi-conn) turn FUA into write + flush
    assert views[0]["results"][1][1].split()[:3] == [b"pwrite", b"1", b"flush"]
    assert views[2]["results"][1][1].split()[:3] == [b"pwrite", b"1", b"flush"]
    assert views[1]["results"][1][1].split()[:2] == [b"pwrite+fua", b"1"]
    # no flush: emulate cannot work, and auto would emulate
    assert [v.get("connect_error") for v in views[7:10]] == [2, 2, None]
    assert views[10]["flags"]["can_multi_conn"] is False


def _scenario(sock: str, exports: tuple[str, str, str] = ("", "", "")) -> str:
    """Three clients (to ``exports``): 1 writes, 2 reads, 3 writes with FUA; 2 flushes,
    then 1, then 3. Returns what the plugin was asked."""
    c1, c2, c3 = (Client.connect(unix_uri(sock, e)) for e in exports)
    try:
        c1.pwrite(b"\1" * 512, 0)
        c2.pread(512, 0)
        c3.pwrite(b"\2" * 512, 512, FUA)
        c2.flush()
        c1.flush()
        c3.flush()
        return bytes(c1.pread(4096, SIZE)).decode().strip()
    finally:
        for c in (c1, c2, c3):
            c.close()


@pytest.mark.parametrize("params", [
    ["multi-conn-mode=emulate"],
    ["multi-conn-mode=emulate", "multi-conn-track-dirty=fast"],
    ["multi-conn-mode=emulate", "multi-conn-track-dirty=off"],
    ["multi-conn-mode=plugin", "mc=1"],
    ["multi-conn-mode=plugin", "mc=1", "multi-conn-track-dirty=fast"],
    ["multi-conn-mode=plugin"],
    ["multi-conn-mode=disable", "multi-conn-track-dirty=off"],
    ["multi-conn-mode=emulate", "multi-conn-exportname=true"],
])
def test_flushes(pynbd_server, nbdkit_server, script: Path, params: list[str]) -> None:
    args = ["--filter=multi-conn", "python", script, *params]
    exports = ("a", "b", "a") if "multi-conn-exportname=true" in params else ("", "", "")
    mine = _scenario(pynbd_server(*args).sock, exports)
    theirs = _scenario(nbdkit_server(*args).sock, exports)
    assert mine == theirs
    assert mine.count("flush") >= 1
    if "multi-conn-exportname=true" in params:  # 2 is on another export: never flushed
        assert "flush 1" in mine and "flush 2" not in mine


def test_emulate_flushes_every_dirty_connection(pynbd_server, script: Path) -> None:
    record = _scenario(pynbd_server("--filter=multi-conn", "python", script,
                                    "multi-conn-mode=emulate").sock)
    # 3's FUA write: flush of 1 (dirty), 2 (read while 1 was dirty), 3; then 2's and 1's
    # flushes find everyone clean
    assert record.split("pread")[0] + "pread" == "pwrite 1 pread"
    assert "pwrite 3 flush 1 flush 2 flush 3" in record


def test_bad_parameters():
    bad_params([["--filter=multi-conn", "memory", "1M", "multi-conn-mode=x"],
                ["--filter=multi-conn", "memory", "1M", "multi-conn-track-dirty=slow"],
                ["--filter=multi-conn", "memory", "1M", "multi-conn-exportname=maybe"],
                ["--filter=multi-conn", "memory", "1M", "multi-conn-export-name=2"]])
