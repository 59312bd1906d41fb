"""The page of ``pynbd view`` (private): aiohttp serves the assets and a WebSocket.

A page that connects gets one ``init`` message: the display settings, each panel as it was
at the start of the history (its size, block, and block states as base64, one byte a
block: 0 hole, 1 data) with its counters, and the history itself (the messages of the last
minutes, each with its source). Then every message as it arrives: the filter's requests as
a binary message (the source, u32 little-endian, then the filter's 40-byte records as they
came: no JSON or base64 for the page to decode), any other message as JSON with ``src``
added. The page replays the history to draw the present, and again up to any moment the
timeline is moved to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from importlib import resources
from typing import Any

from pynbd.tools._view_model import Model, Panel, as_json

__all__ = ["WebView"]

#: Messages a page may leave unsent before it is dropped.
MAX_PAGE_BACKLOG = 10_000

_ASSETS = {"index.html": "text/html", "view.js": "text/javascript", "view.css": "text/css"}


def _web() -> Any:
    try:
        from aiohttp import web
    except ImportError:
        raise SystemExit("pynbd view: the page needs aiohttp (pip install 'pynbd[view]')") from None
    return web


def _panel_json(p: Panel) -> dict[str, Any]:
    return {"name": p.name, "size": p.size, "block": p.block,
            "base": base64.b64encode(bytes(p.base)).decode(),
            "counters": p.counters, "errors": p.errors, "dropped": p.dropped}


class WebView:
    """The web server: ``start`` it, ``publish`` messages, ``stop`` it."""

    def __init__(self, model: Model, fade: float, zoom: int) -> None:
        self.model = model
        self.settings = {"fade": fade, "zoom": zoom}
        self.sockets: dict[Any, Any] = {}
        self._closing: set[asyncio.Future[Any]] = set()
        self.runner: Any = None
        self.url = ""

    def _app(self) -> Any:
        web = _web()
        app = web.Application()
        app.router.add_get("/", self._asset)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))
        for name in _ASSETS:
            app.router.add_get(f"/{name}", self._asset)
        return app

    async def start(self, host: str, port: int) -> str:
        web = _web()
        self.runner = web.AppRunner(self._app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise SystemExit(f"pynbd view: {host}:{port}: {e.strerror}") from None
        sock = site._server.sockets[0]  # the port chosen when 0 was asked
        h, p = sock.getsockname()[:2]
        h = f"[{h}]" if ":" in h else h
        self.url = f"http://{h}:{p}/"
        return self.url

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _asset(self, request: Any) -> Any:
        web = _web()
        name = request.path.lstrip("/") or "index.html"
        data = resources.files("pynbd.tools").joinpath("view_page", name).read_bytes()
        return web.Response(body=data, content_type=_ASSETS[name],
                            headers={"Cache-Control": "no-store"})

    async def _ws(self, request: Any) -> Any:
        web = _web()
        # not compressed: on loopback, deflating every batch only costs both ends CPU
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=0, compress=False)
        await ws.prepare(request)
        init = {"type": "init", "settings": self.settings,
                "panels": [_panel_json(p) for p in self.model.origin],
                "history": [{**as_json(m), "src": s} for s, m in self.model.history]}
        queue: asyncio.Queue[str | bytes] = asyncio.Queue()
        queue.put_nowait(json.dumps(init, separators=(",", ":")))
        self.sockets[ws] = queue
        sender = asyncio.ensure_future(self._send(ws, queue))
        try:
            async for _ in ws:  # the page sends nothing we need
                pass
        finally:
            self.sockets.pop(ws, None)
            sender.cancel()
        return ws

    async def _send(self, ws: Any, queue: Any) -> None:
        try:
            while True:
                item = await queue.get()
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_str(item)
        except (ConnectionError, RuntimeError):
            self.sockets.pop(ws, None)

    def publish(self, src: int, msg: dict[str, Any], raw: bytes | bytearray | None = None) -> None:
        """Queue a message for every page (a page that stopped reading is dropped: it
        can reload); ``raw``: an ``events`` message's records, sent as they are."""
        if not self.sockets:
            return
        text: str | bytes
        if raw is not None:
            text = struct.pack("<I", src) + raw
        else:
            text = json.dumps({**as_json(msg), "src": src}, separators=(",", ":"))
        for ws, queue in list(self.sockets.items()):
            if ws.closed or queue.qsize() > MAX_PAGE_BACKLOG:
                self.sockets.pop(ws, None)
                if not ws.closed:  # it stopped reading: closed, it says "reload"
                    fut = asyncio.ensure_future(ws.close())
                    self._closing.add(fut)
                    fut.add_done_callback(self._closing.discard)
                continue
            queue.put_nowait(text)
