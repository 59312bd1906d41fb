"""The log filter side by side with nbdkit's: for the same client actions the two log files
are the same but for the timestamps, and log scripts see the same variables."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from helpers import (
    PYNBD,
    Server,
    require,
    run_libnbd,
    run_peer,
    short_tmpdir,
    start_daemon_server,
)
from side_by_side import assert_same, probe

_CLIENT = r'''
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_export_name(sys.argv[2])
h.connect_unix(sys.argv[1])
h.pwrite(b"x" * 512, 0)
h.pwrite(b"y" * 4096, 65536, nbd.CMD_FLAG_FUA)
h.pread(512, 0)
h.pread(131072, 0)
h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(512, 0, nbd.CMD_FLAG_FUA)
h.trim(512, 0, nbd.CMD_FLAG_FUA)
h.trim(65536, 131072)
h.flush()
h.cache(512, 0)
h.block_status(65536, 0, lambda *a: 0)
h.block_status(262144, 0, lambda *a: 0)
for f in (lambda: h.pread(512, 1 << 20), lambda: h.pwrite(b"1" * 512, 1 << 20)):
    try:
        f()
    except nbd.Error:
        pass
h.shutdown()
'''

_STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} ")


def _wait_for(path: Path, text: str, count: int = 1, timeout: float = 10) -> list[str]:
    """The lines of ``path`` once ``text`` is in ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if sum(text in line for line in lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def _log_of(factory: Callable[..., Server], log: Path, *args: str,
            export: str | None = None) -> list[str]:
    """Serve, run the client and nbdinfo --list, return the log without timestamps."""
    srv = factory("--filter=log", "memory", "1M", f"logfile={log}", *args)
    assert srv.sock is not None
    run_libnbd(_CLIENT, srv.sock, export or "")
    run_peer("nbdinfo", "--list", srv.uri)
    lines = _wait_for(log, "connection=2 Disconnect")
    srv.stop()
    for line in lines:
        assert _STAMP.match(line), line
    return [_STAMP.sub("", line, count=1) for line in lines]


def test_log_file_same_as_nbdkits(pynbd_server: Callable[..., Server],
                                  nbdkit_server: Callable[..., Server], tmp_path: Path) -> None:
    got = _log_of(pynbd_server, tmp_path / "p.log")
    want = _log_of(nbdkit_server, tmp_path / "n.log")
    assert got == want
    assert got[0] == "Ready thread_model=3"
    assert "connection=1 Write id=2 offset=0x10000 count=0x1000 fua=1 ..." in got
    assert "connection=1 Zero id=5 offset=0x0 count=0x200 trim=1 fua=0 fast=1 ..." in got
    # the two requests out of bounds never reach a filter
    assert "connection=1 Disconnect transactions=13" in got


def test_export_names_are_shell_quoted_as_nbdkit(pynbd_server: Callable[..., Server],
                                                 nbdkit_server: Callable[..., Server],
                                                 tmp_path: Path) -> None:
    name = 'a b$c"d\\e`f'
    got = _log_of(pynbd_server, tmp_path / "p.log", export=name)
    want = _log_of(nbdkit_server, tmp_path / "n.log", export=name)
    assert got == want
    assert any(line.startswith('connection=1 Connect export="a b\\$c\\"d\\\\e\\`f" tls=0 ')
               for line in got), got
    assert any(line.startswith("connection=2 Connect export=\"\" ") for line in got)


def test_read_only_export_as_nbdkit(pynbd_server: Callable[..., Server],
                                    nbdkit_server: Callable[..., Server],
                                    tmp_path: Path) -> None:
    """The Connect line of a read-only export (-r), and the data through the filter."""
    lines = []
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        log = tmp_path / f"{i}.log"
        srv = factory("-r", "--filter=log", "memory", "1M", f"logfile={log}")
        got = probe(srv.uri, [("pread", 16, 4096), ("extents", 65536, 0)])
        assert got["results"][0][1] == bytes(16)
        lines.append([_STAMP.sub("", line, count=1) for line in
                      _wait_for(log, "Disconnect")])
        srv.stop()
    assert lines[0] == lines[1]
    assert lines[0][3].startswith('connection=1 Connect export="" tls=0 size=0x100000 ')
    assert " write=0 flush=1 rotational=0 trim=0 zero=0 fua=0 extents=1 " in lines[0][3]


_SCRIPT = ('echo "$act|$type|${connection:-}|${id:-}|${offset:-}|${count:-}|${fua:-}|'
           '${return:-}|${error:-}|${extents[*]:-}|${readonly:-}|${size:-}|${write:-}|'
           '${transactions:-}|${thread_model:-}" >> "$OUT"')


def _wait_for_script(path: Path, timeout: float = 10) -> list[str]:
    """The script's lines once all are written. Each runs in the background, so the
    Disconnect line may come before others: it names the transactions (an ENTER and a
    LEAVE each), and Preconnect (two), Ready, Connect and Disconnect make five more."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        ends = [line.split("|") for line in lines if line.startswith("Disconnect|PRINT|")]
        if ends and len(lines) >= 2 * int(ends[0][13]) + 5 or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_log_script_sees_what_nbdkits_sees(pynbd_server: Callable[..., Server],
                                           nbdkit_server: Callable[..., Server],
                                           tmp_path: Path) -> None:
    """Each entry runs the script (bash, in the background: compared in sorted order)."""
    outs = []
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        out = tmp_path / f"{i}.out"
        srv = factory("--filter=log", "memory", "1M", f"logscript={_SCRIPT}",
                      env={"OUT": str(out)})
        assert srv.sock is not None
        run_libnbd(_CLIENT, srv.sock, "")
        lines = _wait_for_script(out)
        srv.stop()
        outs.append(sorted(lines))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 2 * 13 + 5  # the client's 13 requests that reach the filter
    assert ("Extents|LEAVE|1|13||||0||0x0 0x10000 hole,zero 0x10000 0x8000  0x18000 0x28000 "
            "hole,zero|||||") in outs[0]
    assert "Ready|PRINT|||||||||||||3" in outs[0]


def test_logappend(pynbd_server: Callable[..., Server], tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("earlier\n")
    srv = pynbd_server("--filter=log", "null", f"logfile={log}", "logappend=true")
    srv.stop()
    srv = pynbd_server("--filter=log", "null", f"logfile={log}", "logappend=false")
    srv.stop()
    assert len(log.read_text().splitlines()) == 1  # truncated, then Ready
    srv = pynbd_server("--filter=log", "null", f"logfile={log}", "logappend=1")
    srv.stop()
    lines = log.read_text().splitlines()
    assert [_STAMP.sub("", line) for line in lines] == ["Ready thread_model=3"] * 2


def test_without_logfile_nor_logscript_it_logs_nothing(
        pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server]) -> None:
    got = assert_same(pynbd_server, nbdkit_server, ["--filter=log", "memory", "1M"],
                      [("pwrite", b"z" * 512, 512), ("pread", 1024, 0)])
    assert got["results"][1] == ["data", bytes(512) + b"z" * 512]


def test_fork_when_the_server_goes_to_the_background_as_nbdkit(tmp_path: Path) -> None:
    """Without -f the server forks after get_ready: the log says so (Fork), as nbdkit's."""
    logs = []
    for name, command in (("pynbd", [*PYNBD, "serve"]), ("nbdkit", [require("nbdkit")])):
        d = short_tmpdir()
        try:
            log = tmp_path / f"{name}.log"
            srv = start_daemon_server(
                [*command, "-P", d / "pid", "-U", d / "sock", "--filter=log", "null",
                 f"logfile={log}"], pidfile=d / "pid", logdir=tmp_path / name,
                sock=d / "sock")
            srv.stop()
            logs.append([_STAMP.sub("", line) for line in log.read_text().splitlines()])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    assert logs[0] == logs[1] == ["Ready thread_model=3", "Fork"]
