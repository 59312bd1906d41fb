"""The example Python plugins (tests/data/python/ex_*.py) served by pynbd and by nbdkit in
the same test, driven by nbdinfo, nbdcopy and qemu-img: byte-for-byte the same results.

ex_url.py reads an HTTP object with Range requests: the test serves one on loopback (a small
Range-capable handler; ``python -m http.server`` ignores Range). It also shows that a script
blocked in I/O (a read the HTTP server holds back) does not stall another client.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import SYSTEM_PYTHON, peer_env, require_libnbd_python, run_peer
from side_by_side import probe

DATA = Path(__file__).resolve().parents[1] / "data" / "python"
MIB = 1 << 20


def script(name: str) -> str:
    return str(DATA / name)


def pattern(n: int, seed: int = 5) -> bytes:
    return bytes((i * 13 + seed + (i >> 12)) & 0xFF for i in range(n))


def nbdinfo_json(srv: object) -> dict:
    """``nbdinfo --json URI`` as a dict, without the URI and the block size lines: pynbd's
    server always answers a client's NBD_INFO_BLOCK_SIZE request (1/4096/32M when the
    plugin sets no limits), nbdkit only for plugins that define block_size."""
    info = json.loads(run_peer("nbdinfo", "--json", srv.uri).stdout)  # type: ignore[attr-defined]
    for export in info["exports"]:
        export.pop("uri")
        for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
            export.pop(key, None)
    return info  # type: ignore[no-any-return]


def test_ramdisk_with_nbdcopy_nbdinfo_and_qemu_img(pynbd_server, nbdkit_server, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(pattern(MIB))
    p = pynbd_server("python", script("ex_ramdisk.py"))
    n = nbdkit_server("python", script("ex_ramdisk.py"))
    for srv in (p, n):
        run_peer("nbdcopy", src, srv.uri)
        # qemu-io writes zeroes over the second 64K: ex_ramdisk.py's zero (with a fallback)
        run_peer("qemu-io", "-f", "raw", "-c", "write -z 65536 65536", srv.uri)
    outs = []
    for name, srv in (("pynbd", p), ("nbdkit", n)):
        out = tmp_path / f"{name}.out"
        run_peer("nbdcopy", srv.uri, out)
        outs.append(out.read_bytes())
    want = bytearray(pattern(MIB))
    want[65536:131072] = bytes(65536)
    assert outs[0] == outs[1] == want
    cmp = run_peer("qemu-img", "compare", "-f", "raw", "-F", "raw", p.uri, n.uri)
    assert b"Images are identical" in cmp.stdout
    infos = [nbdinfo_json(s) for s in (p, n)]
    assert infos[0] == infos[1]
    assert infos[0]["exports"][0]["export-size"] == MIB
    qinfo = [json.loads(run_peer("qemu-img", "info", "--output=json", "-f", "raw",
                                 s.uri).stdout) for s in (p, n)]
    for q in qinfo:
        q.pop("filename")
    assert qinfo[0] == qinfo[1] and qinfo[0]["virtual-size"] == MIB


def test_file_example_with_qemu_img_convert(pynbd_server, nbdkit_server, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(2 * MIB + 4096))
    p = pynbd_server("-r", "python", script("ex_file.py"), f"file={image}")
    n = nbdkit_server("-r", "python", script("ex_file.py"), f"file={image}")
    outs = []
    for name, srv in (("pynbd", p), ("nbdkit", n)):
        out = tmp_path / f"{name}.qcow2"
        run_peer("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, out)
        raw = tmp_path / f"{name}.raw"
        run_peer("qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, raw)
        outs.append(raw.read_bytes())
    assert outs[0] == outs[1] == image.read_bytes()
    infos = [nbdinfo_json(s) for s in (p, n)]
    assert infos[0] == infos[1]
    assert infos[0]["exports"][0]["is_read_only"] is True


# ---- ex_url.py and an HTTP server ----------------------------------------------------


class _RangeHandler(BaseHTTPRequestHandler):
    """HEAD and ranged GET of one object. ``accept_ranges=False``: HEAD leaves out
    Accept-Ranges; ``ranged=False``: GET ignores Range and sends the whole object (200)."""

    data: ClassVar[bytes] = b""
    accept_ranges: ClassVar[bool] = True
    ranged: ClassVar[bool] = True
    held: ClassVar[set[int]] = set()  # read offsets answered only once `release` is set
    release: ClassVar[threading.Event]
    holding: ClassVar[threading.Event]  # set while a held read waits

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        if self.accept_ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if m is None or not self.ranged:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data)
            return
        start, end = int(m.group(1)), int(m.group(2))
        if start in self.held:
            self.holding.set()
            self.release.wait(30)
        body = self.data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_object() -> Iterator[type[_RangeHandler]]:
    handler = type("Handler", (_RangeHandler,), {"data": pattern(MIB + 512, 11), "held": set(),
                                                 "release": threading.Event(),
                                                 "holding": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/disk.img"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
        t.join()


def test_url_example(pynbd_server, nbdkit_server, http_object, tmp_path):
    url = http_object.url  # type: ignore[attr-defined]
    p = pynbd_server("python", script("ex_url.py"), f"url={url}")
    n = nbdkit_server("python", script("ex_url.py"), f"url={url}")
    ops = [("pread", 4096, 0), ("pread", 512, MIB), ("pread", 100, 12345), ("cache", 4096, 0),
           ("extents", 65536, 0), ("pwrite", b"x", 0), ("pread", 1024, MIB)]
    got = probe(p.uri, ops)
    assert got == probe(n.uri, ops)
    data = http_object.data
    assert got["results"][:3] == [["data", data[:4096]], ["data", data[MIB:MIB + 512]],
                                  ["data", data[12345:12445]]]
    assert got["results"][5] == ["error", errno.EPERM]  # read-only: no pwrite
    assert got["results"][6] == ["error", errno.EINVAL]  # past the end
    assert got["flags"]["is_read_only"] and got["flags"]["can_multi_conn"]
    outs = []
    for name, srv in (("pynbd", p), ("nbdkit", n)):
        out = tmp_path / f"{name}.out"
        run_peer("nbdcopy", srv.uri, out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == http_object.data
    assert nbdinfo_json(p) == nbdinfo_json(n)
    cmp = run_peer("qemu-img", "compare", "-f", "raw", "-F", "raw", p.uri, n.uri)
    assert b"Images are identical" in cmp.stdout


@pytest.mark.parametrize("server", ["no Accept-Ranges", "Range ignored"])
def test_url_example_refuses_a_server_without_ranges(pynbd_server, nbdkit_server,
                                                     http_object, server):
    """A server that does not say it serves byte ranges fails get_size, so the client
    cannot connect; one that says so but answers 200 with the whole object fails every read
    (EIO, from set_error), also one of the whole object, and nothing else."""
    if server == "no Accept-Ranges":
        http_object.accept_ranges = False
    else:
        http_object.ranged = False
    url = http_object.url  # type: ignore[attr-defined]
    p = pynbd_server("python", script("ex_url.py"), f"url={url}")
    n = nbdkit_server("python", script("ex_url.py"), f"url={url}")
    size = len(http_object.data)
    ops = [("pread", 4096, 0), ("pread", size, 0), ("size",)]
    got = probe(p.uri, ops)
    assert got == probe(n.uri, ops)
    if server == "no Accept-Ranges":
        assert "connect_error" in got and "results" not in got
    else:
        assert got["size"] == size
        assert got["results"] == [["error", errno.EIO], ["error", errno.EIO], ["size", size]]


_SLOW_AND_FAST = r"""
import nbd, sys, threading
uri = sys.argv[1]
slow, fast = nbd.NBD(), nbd.NBD()
slow.connect_uri(uri); fast.connect_uri(uri)
buf = nbd.Buffer(4096)
cookie = slow.aio_pread(buf, 8192)          # the HTTP server holds this one back
print("fast", fast.pread(4096, 4096)[:4].hex(), slow.aio_command_completed(cookie),
      flush=True)
sys.stdin.readline()                        # the test releases the held read
while not slow.aio_command_completed(cookie):
    slow.poll(1)
print("slow", buf.to_bytearray()[:4].hex(), flush=True)
"""


def test_url_example_blocked_read_does_not_stall_other_clients(pynbd_server, http_object):
    """While ex_url.py waits for the HTTP server in one client's read, another client's read
    is answered (the script runs in worker threads, never on the event loop)."""
    http_object.held.add(8192)
    srv = pynbd_server("python", script("ex_url.py"), f"url={http_object.url}")  # type: ignore[attr-defined]
    require_libnbd_python()
    proc = subprocess.Popen([SYSTEM_PYTHON, "-c", _SLOW_AND_FAST, srv.uri], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=peer_env())
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().split()
        assert http_object.holding.is_set()
        data = http_object.data
        assert first == ["fast", data[4096:4100].hex(), "False"]
        http_object.release.set()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["slow", data[8192:8196].hex()]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
