"""Pictures of the panels without a browser (private): ``--snapshot`` PNG, ``--apng``.

Layout (what the tests and docs rely on): a margin of :data:`MARGIN` pixels, then the
panels left to right, :data:`GAP` pixels apart. Each panel is its name on a strip
:data:`LABEL` pixels high, then its grid: ``columns`` cells a row, ``cell`` pixels square,
block ``b`` at column ``b % columns``, row ``b // columns``. Pillow encodes the PNGs.
"""

from __future__ import annotations

import os
from typing import Any

from pynbd.tools._view_model import BACKGROUND, DATA, HOLE, Model, Panel, block_colour, first_time

__all__ = ["GAP", "LABEL", "MARGIN", "cell_origin", "render", "write_apng", "write_png"]

MARGIN = 8
GAP = 16
LABEL = 16
#: Frames an animation has at most (``--frames``' ceiling).
MAX_FRAMES = 1000


def _image_module() -> Any:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise SystemExit("pynbd view: pictures need Pillow (pip install 'pynbd[view]')") from None
    return Image, ImageDraw


def cell_origin(model_or_panels: Any, panel: int, block: int, columns: int,
                cell: int) -> tuple[int, int]:
    """Top-left pixel of ``block`` of panel number ``panel``."""
    x = MARGIN + panel * (columns * cell + GAP) + (block % columns) * cell
    y = MARGIN + LABEL + (block // columns) * cell
    return x, y


def render(panels: list[Panel], now: float, fade: float, columns: int, cell: int,
           rows: int = 0) -> Any:
    """The picture of ``panels`` at time ``now`` as a Pillow image (RGB), with room for
    ``rows`` rows of cells at least."""
    Image, ImageDraw = _image_module()
    rows = max(rows, *(-(-p.nblocks // columns) for p in panels), 1)
    width = 2 * MARGIN + len(panels) * columns * cell + (len(panels) - 1) * GAP
    height = 2 * MARGIN + LABEL + rows * cell
    im = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for i, p in enumerate(panels):
        x0 = MARGIN + i * (columns * cell + GAP)
        draw.text((x0, MARGIN), _label(p, columns * cell), fill=(0, 0, 0))
        _grid(im, p, now, fade, columns, cell, x0, MARGIN + LABEL)
    return im


#: Pixels a character of Pillow's default font takes, about.
_CHAR_WIDTH = 6


def _label(p: Panel, width: int) -> str:
    """The panel's name, with its size and request counts when they fit."""
    name = os.path.basename(p.name) or p.name
    w, r = p.counters["W"], p.counters["R"]
    for text in (f"{name}  {p.size >> 20} MiB  R {r[0]} W {w[0]}", f"{name}  {p.size >> 20} MiB",
                 name):
        if len(text) * _CHAR_WIDTH <= width:
            return text
    return name[:max(width // _CHAR_WIDTH, 1)]


def _grid(im: Any, p: Panel, now: float, fade: float, columns: int, cell: int,
          x0: int, y0: int) -> None:
    """Draw one panel: one pixel per block into a small image, scaled up by ``cell``."""
    Image, _ = _image_module()
    n = p.nblocks
    if not n:
        return
    rows = -(-n // columns)
    # Resting colours through a palette (0 hole, 1 data, 2 past the end), then the blocks
    # a request touched recently, one by one.
    small = Image.frombytes("P", (columns, rows), bytes(p.base) + b"\2" * (rows * columns - n))
    small.putpalette([*HOLE, *DATA, *BACKGROUND])
    small = small.convert("RGB")
    put = small.putpixel
    since = now - fade if fade > 0 else float("-inf")
    when, kinds, base = p.when, p.kind, p.base
    for i, k in enumerate(kinds):
        if k and when[i] > since:
            put((i % columns, i // columns), block_colour(base[i], k, now - when[i], fade))
    big = small.resize((columns * cell, rows * cell), Image.Resampling.NEAREST)
    im.paste(big, (x0, y0))


def write_png(path: str, model: Model, fade: float, columns: int, cell: int) -> None:
    im = render(model.panels, model.now, fade, columns, cell)
    im.save(path, format="PNG", optimize=True)


def write_apng(path: str, names: list[str], messages: list[tuple[int, dict[str, Any]]],
               block: int, fade: float, columns: int, cell: int, frames: int,
               frame_ms: int) -> int:
    """Replay ``messages`` into fresh panels and write an animated PNG of ``frames``
    pictures evenly spread over the run's time. Returns the number of pictures made
    (Pillow merges identical ones that follow each other into one longer frame)."""
    frames = max(1, min(frames, MAX_FRAMES))
    times = [t for _, m in messages if (t := first_time(m)) is not None]
    final = Model(names, block)  # every frame as large as the last one
    for src, msg in messages:
        final.panels[src].apply(msg)
    rows = max(-(-p.nblocks // columns) for p in final.panels)
    model = Model(names, block)
    if not times:
        pictures = [render(model.panels, 0.0, fade, columns, cell, rows)]
    else:
        start, end = min(times), max(times) + max(fade, 0.0)
        step = (end - start) / frames if end > start else 1.0
        pictures = []
        it = iter(messages)
        pending = next(it, None)
        for k in range(1, frames + 1):
            t = start + k * step
            while pending is not None and (first_time(pending[1]) or 0.0) <= t:
                model.panels[pending[0]].apply(pending[1])
                pending = next(it, None)
            pictures.append(render(model.panels, t, fade, columns, cell, rows))
    pictures[0].save(path, format="PNG", save_all=True, append_images=pictures[1:],
                     duration=frame_ms, loop=0, optimize=True)
    return len(pictures)
