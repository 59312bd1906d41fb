"""``pynbd view`` in a real browser: Debian's chromium, headless, driven by playwright
(pointed at /usr/bin/chromium; playwright downloads no browser). While qemu-io writes to
the export, the page's grid turns red where the writes went and nowhere else."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fuse_helpers import fuse_mount  # noqa: F401 (fixture)
from view_helpers import wait_until

from tests.helpers import PYNBD, Server, missing, require

ZOOM = 4
BLOCK = 4096
#: (offset, length) qemu-io writes: blocks 0-63, 512-527 and 1792.
WRITES = [(0, 256 << 10), (2 << 20, 64 << 10), (7 << 20, 4096)]


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        missing("chromium not found on PATH (Debian package chromium)")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    exe = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright; the test extra has it)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _is_red(px: Any) -> bool:
    return px[0] > 180 and px[1] < 60 and px[2] < 60


def test_page_shows_writes_in_red(browser: Any, pynbd_server: Callable[..., Server],
                                  sockdir: Path) -> None:
    from PIL import Image

    qemu_io = require("qemu-io")
    vsock = str(sockdir / "view.sock")
    srv = pynbd_server("--filter=view", "memory", "8M", f"view-socket={vsock}")
    errlog = sockdir / "viewer.err"
    with open(errlog, "wb") as err:
        viewer = subprocess.Popen([*PYNBD, "view", vsock, "--fade", "0", "--zoom", str(ZOOM)],
                                  stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
        assert viewer.stdout is not None
        url = viewer.stdout.readline().decode().split()[-1]
        wait_until(lambda: "watching" in errlog.read_text(), "the viewer to connect")
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.pynbdView && window.pynbdView.ready")
        cmds = [a for off, n in WRITES for a in ("-c", f"write -P 0x55 {off} {n}")]
        subprocess.run([qemu_io, "-f", "raw", *cmds, f"nbd+unix:///?socket={srv.sock}"],
                       check=True, capture_output=True, timeout=60)
        page.wait_for_function(f"window.pynbdView.eventsSeen >= {len(WRITES)}")
        # two animation frames: the last events are drawn
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        cols, nblocks = page.evaluate(
            "[window.pynbdView.panels[0].cols, window.pynbdView.panels[0].nblocks]")
        assert nblocks == (8 << 20) // BLOCK
        written = {b for off, n in WRITES for b in range(off // BLOCK, (off + n) // BLOCK)}
        deadline = time.monotonic() + 15  # a busy page may draw a frame late: wait for it
        while True:
            shot = Image.open(io.BytesIO(page.locator("canvas").first.screenshot()))
            shot = shot.convert("RGB")
            wrong = [(b, shot.getpixel((x, y))) for b in range(nblocks)
                     for x, y in [((b % cols) * ZOOM + ZOOM // 2, (b // cols) * ZOOM + ZOOM // 2)]
                     if _is_red(shot.getpixel((x, y))) != (b in written)]
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not errors, errors
    finally:
        viewer.terminate()
        viewer.wait(30)
    assert not wrong, f"{len(wrong)} cells wrong (block, pixel): {wrong[:10]}"
    assert "Traceback" not in errlog.read_text()


def _red_blocks(page: Any, blocks: range, zoom: int = ZOOM) -> set[int]:
    from PIL import Image

    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    cols = page.evaluate("window.pynbdView.panels[0].cols")
    shot = Image.open(io.BytesIO(page.locator("canvas").first.screenshot())).convert("RGB")
    return {b for b in blocks
            if _is_red(shot.getpixel(((b % cols) * zoom, (b // cols) * zoom)))}


def _settles_to(page: Any, want: set[int], timeout: float = 15.0) -> set[int]:
    """The red blocks once the page has drawn ``want`` (waiting for the state, not a time:
    on a busy machine the page may draw a frame or two late); what it shows at the deadline
    otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = _red_blocks(page, range(256))
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_timeline_scrubs_back(browser: Any, sockdir: Path) -> None:
    """A replayed run: moving the timeline before a write takes its red away; live brings
    it back."""
    t0 = 1_790_000_000_000_000  # µs
    msgs: list[dict[str, Any]] = [
            {"type": "hello", "protocol": 1, "exports": {}, "time": t0},
            {"type": "open", "conn": 1, "size": 1 << 20, "time": t0},
            {"type": "events", "events": [["W", 0, 65536, 0, 0, t0 + 10_000_000, 5, 1]]},
            {"type": "events", "events": [["W", 400 * 1024, 4096, 0, 0, t0 + 20_000_000, 5, 1]]}]
    rec = sockdir / "run.jsonl"
    rec.write_text("\n".join(json.dumps(m | {"src": 0}) for m in
                             [{"type": "record", "version": 1, "sources": ["a"]}, *msgs]))
    viewer = subprocess.Popen([*PYNBD, "view", "--replay", str(rec), "--speed", "0",
                               "--fade", "0", "--zoom", str(ZOOM)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert viewer.stdout is not None
        url = viewer.stdout.readline().decode().split()[-1]
        page = browser.new_page(viewport={"width": 800, "height": 600})
        page.goto(url)
        page.wait_for_function("window.pynbdView && window.pynbdView.eventsSeen >= 2")
        assert _settles_to(page, set(range(16)) | {100}) == set(range(16)) | {100}

        def scrub_to(t_us: int) -> None:
            page.evaluate(f"""() => {{ const s = document.getElementById('scrub');
                s.value = {t_us / 1e6}; s.dispatchEvent(new Event('input')); }}""")

        scrub_to(t0 + 15_000_000)
        assert _settles_to(page, set(range(16))) == set(range(16))
        scrub_to(t0 + 5_000_000)
        assert _settles_to(page, set()) == set()
        page.click("#live")
        assert _settles_to(page, set(range(16)) | {100}) == set(range(16)) | {100}
    finally:
        viewer.terminate()
        viewer.wait(30)


def test_mkfs_through_fuse_in_the_page(browser: Any, pynbd_server: Callable[..., Server],
                                       sockdir: Path, fuse_mount: Any) -> None:  # noqa: F811
    """mkfs.ext4 on the export through `pynbd fuse`, watched in the page (colours never
    fade): a cell is red exactly where a write was the last request to touch the block, as
    the recorded stream says."""
    from pynbd.tools._view_model import decode_events

    mkfs = require("mkfs.ext4")
    vsock = str(sockdir / "view.sock")
    srv = pynbd_server("--filter=view", "memory", "32M", f"view-socket={vsock}")
    rec = sockdir / "run.jsonl"
    errlog = sockdir / "viewer.err"
    with open(errlog, "wb") as err:
        viewer = subprocess.Popen([*PYNBD, "view", vsock, "--fade", "0", "--zoom", "2",
                                   "--record", str(rec)], stdout=subprocess.PIPE, stderr=err,
                                  stdin=subprocess.DEVNULL)
    try:
        assert viewer.stdout is not None
        url = viewer.stdout.readline().decode().split()[-1]
        wait_until(lambda: "watching" in errlog.read_text(), "the viewer to connect")
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        page.wait_for_function("window.pynbdView && window.pynbdView.ready")
        m = fuse_mount(srv.uri)
        subprocess.run([mkfs, "-q", "-F", str(m.file)], check=True, capture_output=True,
                       timeout=120)
        m.cleanup()
        srv.stop()  # the stream ends: the recording is complete
        wait_until(lambda: "went away" in errlog.read_text(), "the end of the stream")
        last: dict[int, str] = {}
        total = 0
        for line in rec.read_text().splitlines()[1:]:
            msg = json.loads(line)
            if msg.get("type") != "events":
                continue
            for k, off, n, _f, e, *_ in decode_events(msg):
                total += 1
                if not e and chr(k) in "RWTZC" and n:
                    for b in range(off // BLOCK, -(-(off + n) // BLOCK)):
                        last[b] = chr(k)
        page.wait_for_function(f"window.pynbdView.eventsSeen >= {total}")
        written = {b for b, k in last.items() if k == "W"}
        deadline = time.monotonic() + 15  # a busy page may draw a frame late: wait for it
        while (red := _red_blocks(page, range((32 << 20) // BLOCK), zoom=2)) != written:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        viewer.terminate()
        viewer.wait(30)
    assert len(written) > 10  # mkfs wrote its metadata
    assert red == written
