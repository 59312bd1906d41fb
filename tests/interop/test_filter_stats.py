"""The stats filter side by side with nbdkit's: for the same requests the reports have the
same lines and counts; only the times (and rates) differ, and the bytes of "other sizes",
which nbdkit 1.32 gets wrong (it prints the operation's total there)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server, run_libnbd

_CLIENT = r'''
import json, nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
for kind, *a in json.loads(sys.argv[2]):
    try:
        if kind == "r": h.pread(a[0], a[1])
        elif kind == "w": h.pwrite(b"a" * a[0], a[1])
        elif kind == "z": h.zero(a[0], a[1])
        elif kind == "t": h.trim(a[0], a[1])
        elif kind == "f": h.flush()
        elif kind == "c": h.cache(a[0], a[1])
        elif kind == "e": h.block_status(a[0], a[1], lambda *x: 0)
    except nbd.Error:
        pass
h.shutdown()
'''

# Request sizes and offsets chosen so that no two size groups have the same count: nbdkit
# 1.32 then shows only one of them (see docs/filters.md).
OPS = ('[["r",512,3],["r",512,512],["r",512,1024],["r",512,4096],["r",512,8192],'
       '["r",512,8192],["r",512,65536],["r",512,0],["r",512,0],["r",512,1048576],'
       '["r",4096,0],["r",4096,4096],["r",4096,1],["r",100,0],["w",512,0],["e",4096,0],'
       '["c",512,0],["c",512,1],["e",65536,3],["e",65536,0],["t",1024,4096],'
       '["z",1048576,0],["z",100000,4096],["z",100000,4096],["f"],["f"]]')


def _normal(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"[0-9.]+ s,", "T s,", line)
        line = re.sub(r", [^,]*/s op, [^,]*/s total$", ", R/s op, R/s total", line)
        line = re.sub(r"^(total: .*), [^,]*/s$", r"\1, R/s", line)
        line = re.sub(r"^(    other sizes: .* reqs), .* total\)$", r"\1, B total)", line)
        out.append(line)
    return out


def _report(factory: Callable[..., Server], path: Path, *params: str,
            ops: str = OPS) -> str:
    srv = factory("--filter=stats", "memory", "4M", f"statsfile={path}", *params)
    run_libnbd(_CLIENT, srv.uri, ops)
    srv.stop()
    return path.read_text()


@pytest.mark.parametrize("threshold", ["95", "50", "100", "0", "80"])
def test_report_same_as_nbdkits(threshold: str, pynbd_server: Callable[..., Server],
                                nbdkit_server: Callable[..., Server], tmp_path: Path) -> None:
    got = _report(pynbd_server, tmp_path / "p", f"statsthreshold={threshold}")
    want = _report(nbdkit_server, tmp_path / "n", f"statsthreshold={threshold}")
    assert _normal(got) == _normal(want)
    lines = got.splitlines()
    assert lines[0].startswith("total: 24 ops, ")  # not cache (nbdkit's sum)
    assert any(line.startswith("flush: 2 ops, ") for line in lines)
    if threshold == "95":
        # 1 read of 100 bytes is what the report leaves out
        assert "    other sizes:  7.1% (1 reqs, 100 bytes total)" in lines
        assert "         20 bit aligned:  30.0% (3)" in lines
    if threshold == "50":
        assert "         16+ bit-aligned: 40.0% (4)" in lines
    if threshold == "0":
        assert "Request size and alignment breakdown:" not in got


def test_failed_requests_are_in_the_breakdown_only(pynbd_server: Callable[..., Server],
                                                   nbdkit_server: Callable[..., Server],
                                                   tmp_path: Path) -> None:
    ops = '[["r",512,0],["r",4096,512],["r",4096,4096],["w",512,512]]'
    reports = []
    for name, factory in (("p", pynbd_server), ("n", nbdkit_server)):
        srv = factory("--filter=stats", "--filter=error", "memory", "4M",
                      f"statsfile={tmp_path / name}", "error-pread-rate=1",
                      "statsthreshold=100")
        run_libnbd(_CLIENT, srv.uri, ops)
        srv.stop()
        reports.append((tmp_path / name).read_text())
    assert _normal(reports[0]) == _normal(reports[1])
    assert "read:" not in reports[0]  # no read succeeded
    assert reports[0].startswith("total: 1 ops, ")


def test_statsappend(pynbd_server: Callable[..., Server], tmp_path: Path) -> None:
    path = tmp_path / "stats"
    path.write_text("before\n")
    _report(pynbd_server, path, "statsappend=true", ops='[["f"]]')
    _report(pynbd_server, path, "statsappend=yes", ops='[["w",512,0]]')
    lines = path.read_text().splitlines()
    assert lines[0] == "before"
    assert [line.split(":")[0] for line in lines] == [
        "before", "total", "flush", "total", "write", "  Request size and alignment breakdown",
        "    other sizes", ""]
    _report(pynbd_server, path, ops='[["f"]]')
    assert path.read_text().splitlines()[0].startswith("total: 1 ops,")
