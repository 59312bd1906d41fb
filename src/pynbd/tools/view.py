"""``pynbd view``: watch exports being used, live in the browser.

usage: pynbd view [OPTIONS] SOCKET [SOCKET...]
       pynbd view [OPTIONS] --replay FILE

Each SOCKET is a view filter's socket (``--filter=view view-socket=PATH``, or
``view-address=HOST:PORT``): one export, drawn as a grid with one cell per block, the
exports side by side. Writes flash red, reads black, trims light purple, zeroes white,
each fading back to the block's state (data or hole). The page shows counters and a
timeline to scrub back through the last minutes. See docs/view.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import webbrowser
from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import parse_size
from pynbd.tools._view_model import Model, first_time, records
from pynbd.tools._view_sources import RecordWriter, ViewError, follow, read_replay

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pynbd view", description="Watch NBD exports being used, one cell per block.",
        epilog="The page is served on loopback; its URL is printed. With --snapshot or "
               "--apng no page is served: the picture is written when the sources end "
               "(the servers exit, the replay is over) or on Ctrl-C.")
    p.add_argument("sockets", nargs="*", metavar="SOCKET",
                   help="a view filter's socket path, or HOST:PORT")
    p.add_argument("--block", default="4K",
                   metavar="SIZE", help="bytes a cell stands for (default 4K)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument("--listen", default="127.0.0.1",
                   metavar="ADDR", help="address of the page (loopback)")
    p.add_argument("--port", type=int, default=0,
                   metavar="N", help="port of the page (default: any)")
    p.add_argument("--fade", type=float, default=1.0, metavar="SECS",
                   help="seconds a request's colour takes to fade (0: never; default 1)")
    p.add_argument("--zoom", type=int, default=4,
                   metavar="PX", help="pixels a cell starts at on the page")
    p.add_argument("--record", metavar="FILE", help="record every message to FILE")
    p.add_argument("--replay", metavar="FILE",
                   help="replay a recording, or an nbdkit log filter file")
    p.add_argument("--speed", type=float, default=1.0, metavar="X",
                   help="replay speed (default 1: real time; 0: at once)")
    p.add_argument("--snapshot", metavar="PNG", help="write the picture to PNG at the end")
    p.add_argument("--apng", metavar="PNG", help="write an animated PNG of the whole run")
    p.add_argument("--frames", type=int, default=100,
                   metavar="N", help="frames of --apng (default 100)")
    p.add_argument("--frame-ms", type=int, default=100, metavar="MS",
                   help="milliseconds each --apng frame shows (default 100)")
    p.add_argument("--columns", type=int, default=128, metavar="N",
                   help="cells a row in pictures (default 128)")
    p.add_argument("--cell", type=int, default=4, metavar="PX",
                   help="pixels a cell in pictures (default 4)")
    return p


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    if bool(a.sockets) == bool(a.replay):
        p.error("give SOCKETs to watch, or --replay FILE")
    try:
        block = parse_size(a.block, "--block")
    except ConfigError as e:
        p.error(str(e))
    if block < 1:
        p.error("--block must be at least 1 byte")
    for name in ("columns", "cell", "frames", "frame_ms", "zoom"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.fade < 0 or a.speed < 0:
        p.error("--fade and --speed must not be negative")
    if a.listen not in ("127.0.0.1", "::1", "localhost") and not a.listen.startswith("127."):
        p.error(f"--listen {a.listen}: the page is served on loopback only")
    return block


class Viewer:
    """The sources feeding the model, the recording and the page."""

    def __init__(self, a: argparse.Namespace, names: list[str], block: int) -> None:
        self.a = a
        self.names = names
        self.model = Model(names, block)
        self.record = RecordWriter(a.record, names) if a.record else None
        self.collected: list[tuple[int, dict[str, Any]]] | None = [] if a.apng else None
        self.web: Any = None

    def deliver(self, src: int, msg: dict[str, Any]) -> None:
        raw = records(msg)  # decoded once, for the model and the pages
        self.model.apply(src, msg, raw)
        if self.record is not None:
            self.record.write(src, msg)
        if self.collected is not None:
            self.collected.append((src, msg))
        if self.web is not None:
            self.web.publish(src, msg, raw)

    def connected(self, src: int) -> None:
        print(f"pynbd view: watching {self.names[src]}", file=sys.stderr, flush=True)

    async def live(self) -> None:
        async def one(i: int, target: str) -> None:
            await follow(target, i, self.deliver, self.connected)
            print(f"pynbd view: {target}: the server went away", file=sys.stderr, flush=True)

        # gather: the first source that fails ends the run with its message
        await asyncio.gather(*(one(i, t) for i, t in enumerate(self.a.sockets)))

    async def replay(self, messages: list[tuple[int, dict[str, Any]]]) -> None:
        speed = self.a.speed
        start_wall = time.monotonic()
        first: float | None = None
        for src, msg in messages:
            t = first_time(msg)
            if speed and t is not None:
                first = t if first is None else first
                delay = (t - first) / speed - (time.monotonic() - start_wall)
                if delay > 0.01:
                    await asyncio.sleep(delay)
            self.deliver(src, msg)

    def finish(self) -> None:
        from pynbd.tools import _view_render as render

        a = self.a
        if self.record is not None:
            self.record.close()
        for p in self.model.panels:
            n = sum(c[0] for c in p.counters.values()) + p.errors
            print(f"pynbd view: {p.name}: {n} requests seen, {p.dropped} missed "
                  "(the viewer fell behind)", file=sys.stderr)
        if a.snapshot:
            render.write_png(a.snapshot, self.model, a.fade, a.columns, a.cell)
            print(f"pynbd view: wrote {a.snapshot}", file=sys.stderr)
        if a.apng and self.collected is not None:
            n = render.write_apng(a.apng, self.names, self.collected, self.model.block,
                                  a.fade, a.columns, a.cell, a.frames, a.frame_ms)
            print(f"pynbd view: wrote {a.apng} ({n} frames)", file=sys.stderr)


async def _run(v: Viewer, messages: list[tuple[int, dict[str, Any]]] | None) -> None:
    a = v.a
    headless = bool(a.snapshot or a.apng)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not headless:
        from pynbd.tools._view_web import WebView

        v.web = WebView(v.model, a.fade, a.zoom)
        url = await v.web.start(a.listen, a.port)
        print(f"pynbd view: {url}", flush=True)
        if a.open:
            webbrowser.open(url)
    work = asyncio.ensure_future(v.replay(messages) if messages is not None else v.live())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
            if not headless:
                await stop.wait()  # the page stays up until Ctrl-C
    finally:
        for t in (work, stopper):
            t.cancel()
        if v.web is not None:
            await v.web.stop()


def main(argv: list[str]) -> int:
    p = _parser()
    a = p.parse_args(argv)
    block = _check(p, a)
    try:
        messages = None
        if a.replay:
            names, messages = read_replay(a.replay)
        else:
            names = list(a.sockets)
        v = Viewer(a, names, block)
        try:
            asyncio.run(_run(v, messages))
        except BaseException:
            if v.record is not None:
                v.record.close()
            raise
        v.finish()
    except ViewError as e:
        print(f"pynbd view: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pynbd view: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 0
