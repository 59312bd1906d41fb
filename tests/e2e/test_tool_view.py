"""``pynbd view`` without a browser: ``--snapshot`` pixel by pixel against a known access
pattern (live from the view filter, and replayed from nbdkit's log filter and from a
recording), ``--apng``, the page's assets and WebSocket, and bad input."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from view_helpers import wait_until

from pynbd.client.blocking import BlockingConnection
from pynbd.tools._view_model import COLOURS, DATA, HOLE, decode_events
from pynbd.tools._view_render import cell_origin
from tests.helpers import PYNBD, Server

PImage = pytest.importorskip("PIL.Image")

COLUMNS, CELL = 16, 2
BLOCKS = 256  # a 1 MiB export in 4 KiB cells
#: Picture options every run here uses (no fading: each block keeps its last colour).
PICTURE = ["--fade", "0", "--columns", str(COLUMNS), "--cell", str(CELL)]


def access_pattern(c: BlockingConnection) -> None:
    """The known pattern: writes, a read, a trim over written blocks, a zero."""
    c.pwrite(b"w" * 65536, 0)  # blocks 0-15
    c.pread_into(memoryview(bytearray(8192)), 512 * 1024)  # blocks 128-129
    c.trim(8192, 32 * 1024)  # blocks 8-9, written before
    c.zero(16384, 800 * 1024)  # blocks 200-203
    c.pwrite(b"w" * 4096, (1 << 20) - 4096)  # block 255


def expected(block: int) -> tuple[int, int, int]:
    if block in (8, 9):
        return COLOURS["T"]
    if block < 16 or block == 255:
        return COLOURS["W"]
    if block in (128, 129):
        return COLOURS["R"]
    if 200 <= block <= 203:
        return COLOURS["Z"]
    return HOLE


def check_cells(path: Path) -> None:
    im = PImage.open(path).convert("RGB")
    wrong = []
    for b in range(BLOCKS):
        x, y = cell_origin(None, 0, b, COLUMNS, CELL)
        for dx, dy in ((0, 0), (CELL - 1, CELL - 1)):
            got = im.getpixel((x + dx, y + dy))
            if got != expected(b):
                wrong.append((b, got, expected(b)))
    assert not wrong, f"cells of the wrong colour (block, got, expected): {wrong[:10]}"


def grid_pixels(path: Path) -> bytes:
    """The grid's pixels (the label above it left out)."""
    im = PImage.open(path).convert("RGB")
    x, y = cell_origin(None, 0, 0, COLUMNS, CELL)
    return bytes(im.crop((x, y, x + COLUMNS * CELL, y + BLOCKS // COLUMNS * CELL)).tobytes())


def start_viewer(args: list[str], errlog: Path) -> subprocess.Popen[bytes]:
    with open(errlog, "wb") as err:
        return subprocess.Popen([*PYNBD, "view", *args], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL)


def live_run(pynbd_server: Callable[..., Server], sockdir: Path, *extra: str) -> Path:
    """Serve 1 MiB through the view filter, watch it with --snapshot, run the pattern."""
    vsock = str(sockdir / "view.sock")
    srv = pynbd_server("--filter=view", "memory", "1M", f"view-socket={vsock}")
    out = sockdir / "live.png"
    errlog = sockdir / "viewer.err"
    viewer = start_viewer([vsock, "--snapshot", str(out), *PICTURE, *extra], errlog)
    try:
        wait_until(lambda: "watching" in errlog.read_text(), "the viewer to connect")
        assert srv.sock is not None
        c = BlockingConnection.connect(unix=srv.sock)
        access_pattern(c)
        c.close()
        srv.stop()  # the stream ends: the viewer writes its picture and exits
        assert viewer.wait(60) == 0, errlog.read_text()
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
    assert f"wrote {out}" in errlog.read_text()
    return out


def test_snapshot_pixels(pynbd_server: Callable[..., Server], sockdir: Path) -> None:
    check_cells(live_run(pynbd_server, sockdir))


def test_replay_of_nbdkit_log_draws_the_same(pynbd_server: Callable[..., Server],
                                             nbdkit_server: Callable[..., Server],
                                             sockdir: Path) -> None:
    """The same pattern through nbdkit's log filter, replayed: the same picture."""
    live = live_run(pynbd_server, sockdir)
    log = sockdir / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "memory", "1M", f"logfile={log}")
    assert srv.sock is not None
    c = BlockingConnection.connect(unix=srv.sock)
    access_pattern(c)
    c.close()
    srv.stop()
    out = sockdir / "replayed.png"
    r = subprocess.run([*PYNBD, "view", "--replay", str(log), "--snapshot", str(out),
                        *PICTURE], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    check_cells(out)
    assert grid_pixels(out) == grid_pixels(live)


def test_record_replay_and_apng(pynbd_server: Callable[..., Server], sockdir: Path) -> None:
    rec = sockdir / "run.jsonl"
    live = live_run(pynbd_server, sockdir, "--record", str(rec))
    head = json.loads(rec.read_text().splitlines()[0])
    assert head["type"] == "record" and len(head["sources"]) == 1
    out = sockdir / "again.png"
    r = subprocess.run([*PYNBD, "view", "--replay", str(rec), "--snapshot", str(out),
                        *PICTURE], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert PImage.open(out).tobytes() == PImage.open(live).tobytes()
    anim = sockdir / "run.apng"
    r = subprocess.run([*PYNBD, "view", "--replay", str(rec), "--apng", str(anim), "--frames",
                        "5", "--fade", "1", "--columns", str(COLUMNS), "--cell", str(CELL)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    im = PImage.open(anim)
    assert im.format == "PNG" and getattr(im, "is_animated", False) and im.n_frames == 5
    im.seek(4)  # the last frame: a second after the last request, everything has faded
    last = im.convert("RGB")
    x, y = cell_origin(None, 0, 0, COLUMNS, CELL)
    assert last.getpixel((x, y)) == DATA  # written: data
    x, y = cell_origin(None, 0, 8, COLUMNS, CELL)
    assert last.getpixel((x, y)) == HOLE  # trimmed: a hole again


def test_page_assets_and_websocket(pynbd_server: Callable[..., Server],
                                   sockdir: Path) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    import asyncio

    vsock = str(sockdir / "view.sock")
    srv = pynbd_server("--filter=view", "memory", "1M", f"view-socket={vsock}")
    errlog = sockdir / "viewer.err"
    viewer = start_viewer([vsock], errlog)
    try:
        assert viewer.stdout is not None
        line = viewer.stdout.readline().decode()
        assert line.startswith("pynbd view: http://127.0.0.1:"), errlog.read_text()
        url = line.split()[-1]
        for name, ctype in (("", "text/html"), ("view.js", "text/javascript"),
                            ("view.css", "text/css")):
            with urllib.request.urlopen(url + name, timeout=10) as resp:
                assert resp.headers["Content-Type"].startswith(ctype)
                assert resp.read()
        wait_until(lambda: "watching" in errlog.read_text(), "the viewer to connect")
        assert srv.sock is not None
        c = BlockingConnection.connect(unix=srv.sock)
        c.pwrite(b"x" * 4096, 8192)

        async def first_messages() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            async with aiohttp.ClientSession() as s, s.ws_connect(url + "ws") as ws:
                got.append(_page_message(await ws.receive()))
                c.pwrite(b"y" * 4096, 16384)  # live, after the page connected
                while ["W", 16384, 4096] not in _writes(got):
                    got.append(_page_message(await asyncio.wait_for(ws.receive(), 20)))
            return got

        msgs = asyncio.run(first_messages())
        assert any(m.get("binary") for m in msgs)  # the live requests: records, as they came
        c.close()
        init = msgs[0]
        assert init["type"] == "init" and init["panels"][0]["name"] == vsock
        # the first write: in the history the page got, or just after (batches are 50 ms)
        assert _writes(msgs).count(["W", 8192, 4096]) == 1
    finally:
        viewer.terminate()
        assert viewer.wait(30) == 0
    assert "Traceback" not in errlog.read_text()


def _page_message(ws_msg: Any) -> dict[str, Any]:
    """A message of the page's WebSocket: JSON, or requests as a binary message (the
    source, u32 little-endian, then the filter's 40-byte records)."""
    if isinstance(ws_msg.data, bytes):
        src = struct.unpack_from("<I", ws_msg.data)[0]
        return {"type": "events", "src": src, "binary": True,
                "data": base64.b64encode(ws_msg.data[4:]).decode()}
    msg: dict[str, Any] = json.loads(ws_msg.data)
    return msg


def _writes(msgs: list[dict[str, Any]]) -> list[list[object]]:
    """(kind, offset, length) of the events in page messages, the init's history too."""
    out: list[list[object]] = []
    for m in msgs:
        for h in (m.get("history") or [m]):
            if h.get("type") == "events":
                out += [[chr(e[0]) if isinstance(e[0], int) else e[0], *e[1:3]]
                        for e in decode_events(h)]
    return out


@pytest.mark.parametrize(("args", "rc", "message"), [
    ([], 2, "give SOCKETs to watch, or --replay FILE"),
    (["--block", "0", "x.sock"], 2, "--block must be at least 1 byte"),
    (["--block", "lots", "x.sock"], 2, "could not parse --block"),
    (["--listen", "0.0.0.0", "x.sock"], 2, "the page is served on loopback only"),
    (["/nonexistent/v.sock", "--snapshot", "/tmp/never.png"], 1,
     "pynbd view: /nonexistent/v.sock: No such file or directory"),
    (["--replay", "/nonexistent/run.jsonl", "--snapshot", "/tmp/never.png"], 1,
     "pynbd view: --replay: /nonexistent/run.jsonl: No such file or directory"),
    (["x.sock", "--record", "/nonexistent/r.jsonl"], 1,
     "pynbd view: --record: /nonexistent/r.jsonl: No such file or directory"),
    (["--fade", "-1", "x.sock"], 2, "--fade and --speed must not be negative"),
])
def test_bad_input(args: list[str], rc: int, message: str) -> None:
    r = subprocess.run([*PYNBD, "view", *args], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == rc
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_replay_of_something_else(sockdir: Path) -> None:
    junk = sockdir / "junk.txt"
    junk.write_text("hello world\n")
    r = subprocess.run([*PYNBD, "view", "--replay", str(junk), "--snapshot",
                        str(sockdir / "x.png")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"pynbd view: --replay: {junk}: neither a pynbd view "
                                "recording nor an nbdkit log filter file")
    assert not (sockdir / "x.png").exists()


def test_unwritable_picture(sockdir: Path) -> None:
    rec = sockdir / "r.jsonl"
    rec.write_text('{"type":"record","version":1,"sources":["a"]}\n'
                   '{"type":"open","conn":1,"size":65536,"time":1,"src":0}\n')
    r = subprocess.run([*PYNBD, "view", "--replay", str(rec), "--snapshot",
                        "/nonexistent/x.png"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("pynbd view: /nonexistent/x.png: "
                                                 "No such file or directory")
    assert "Traceback" not in r.stderr


def test_bigger_cells(sockdir: Path) -> None:
    """--block 8K: two blocks of 4 KiB a cell."""
    rec = sockdir / "r.jsonl"
    ev = ["W", 12288, 4096, 0, 0, 1_000_000, 1, 1]
    rec.write_text('{"type":"record","version":1,"sources":["a"]}\n'
                   '{"type":"open","conn":1,"size":65536,"time":1,"src":0}\n'
                   + json.dumps({"type": "events", "events": [ev], "src": 0}) + "\n")
    out = sockdir / "x.png"
    r = subprocess.run([*PYNBD, "view", "--replay", str(rec), "--snapshot", str(out),
                        "--block", "8K", *PICTURE], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    im = PImage.open(out).convert("RGB")
    colours = [im.getpixel(cell_origin(None, 0, b, COLUMNS, CELL)) for b in range(8)]
    assert colours == [HOLE, COLOURS["W"], *[HOLE] * 6]


def test_an_nbd_socket_is_not_a_view_socket(pynbd_server: Callable[..., Server],
                                            sockdir: Path) -> None:
    srv = pynbd_server("memory", "1M")
    r = subprocess.run([*PYNBD, "view", str(srv.sock), "--snapshot", str(sockdir / "x.png")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "not a view socket" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("size", ['"x"', "-1", str(1 << 40)])
def test_a_bad_binary_events_message(sockdir: Path, size: str) -> None:
    """A stream whose binary events message gives a size that is not one: one line, no
    traceback (and the viewer asked for binary records after the hello)."""
    import socket
    import threading

    path = str(sockdir / "fake.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    asked: list[bytes] = []

    def serve() -> None:
        c, _ = ls.accept()
        c.sendall(b'{"type":"hello","protocol":1,"exports":{},"binary":true}\n')
        asked.append(c.makefile("rb").readline())
        c.sendall(b'{"type":"events","count":1,"size":%s}\n' % size.encode())
        c.recv(1)  # until the viewer goes away
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = subprocess.run([*PYNBD, "view", path, "--snapshot", str(sockdir / "x.png")],
                       capture_output=True, text=True, timeout=60, check=False)
    t.join(10)
    ls.close()
    assert asked == [b'{"type":"format","events":"binary"}\n']
    assert r.returncode == 1
    shown = "'x'" if size == '"x"' else size
    assert r.stderr.splitlines()[-1] == f"pynbd view: {path}: an events message of {shown} bytes"
    assert "Traceback" not in r.stderr
