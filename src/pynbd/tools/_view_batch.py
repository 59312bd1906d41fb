"""A batch of the view filter's records applied to a panel at once, with numpy (private).

The filter sends its requests as 40-byte records (``<BBHIQQqq``: kind, flags, error,
connection, offset, length, time, duration), a few thousand a line. Unpacking them into
tuples and applying them one by one in Python cost ``pynbd view`` about 1.5 µs a request,
a fifth of what serving the request costs the server (benchmarks/view.py); with numpy
the whole batch is a handful of array operations, about 0.1 µs a request. The result is
the same as applying the requests one by one, in order: a block shows the last request
that touched it, and its state (hole or data) the last write, trim or zero.

numpy comes with the ``view`` extra; without it :class:`~pynbd.tools._view_model.Panel`
applies the records one by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional (the view extra has it)
    np = None  # type: ignore[assignment]

from pynbd.filters._view_publish import records_to_us

if TYPE_CHECKING:
    from pynbd.tools._view_model import Panel

__all__ = ["HAVE_NUMPY", "apply_records", "ns_to_us"]

HAVE_NUMPY = np is not None
#: Blocks marked in one vectorised pass at most (bounds the temporary arrays); a batch
#: touching more (a whole disk trimmed) is applied in several passes.
MAX_PASS_BLOCKS = 1 << 20

if np is not None:
    _DTYPE = np.dtype([("k", "u1"), ("f", "u1"), ("e", "<u2"), ("c", "<u4"), ("o", "<u8"),
                       ("n", "<u8"), ("t", "<i8"), ("d", "<i8")])
    #: By a record's kind code: counted (R W T Z C F E), drawn (R W T Z C), and what it
    #: leaves the block's state at (1 data: W; 0 hole: T and Z; 2 unchanged).
    _COUNTED = np.zeros(256, bool)
    _COUNTED[[ord(k) for k in "RWTZCFE"]] = True
    _DRAWN = np.zeros(256, bool)
    _DRAWN[[ord(k) for k in "RWTZC"]] = True
    _STATE = np.full(256, 2, np.uint8)
    _STATE[ord("W")] = 1
    _STATE[[ord("T"), ord("Z")]] = 0


def ns_to_us(raw: bytes | bytearray, start: int = 0, size: int = -1) -> bytearray:
    """The whole records of ``raw`` (``size`` bytes from ``start``; to its end by default)
    with TIME and DURATION in nanoseconds (a ``"time":"ns"`` events message) as the
    stream's usual records, in microseconds (the floor, as the filter divides them for
    other viewers). One copy, divided in place."""
    n = (len(raw) - start if size < 0 else size) // 40
    out = bytearray(memoryview(raw)[start:start + 40 * n])
    if np is None:
        out[:] = records_to_us(out)
    else:
        np.frombuffer(out, "<i8").reshape(-1, 5)[:, 3:] //= 1000
    return out


def apply_records(panel: Panel, raw: bytes | bytearray) -> None:
    """Apply the records in ``raw`` (whole records only) to ``panel``."""
    rec = np.frombuffer(raw, _DTYPE, len(raw) // _DTYPE.itemsize)
    if len(rec) and _apply_uniform(panel, rec):
        return
    counted = _COUNTED[rec["k"]]
    if not counted.all():
        rec = rec[counted]
    if not len(rec):
        return
    panel.last_time = max(panel.last_time, int(rec["t"].max()) / 1e6)
    failed = rec["e"] != 0
    if failed.any():
        panel.errors += int(failed.sum())
        rec = rec[~failed]
    kinds = rec["k"]
    for code in np.unique(kinds).tolist():
        mine = kinds == code
        c = panel.counters[chr(code)]
        c[0] += int(mine.sum())
        c[1] += int(rec["n"][mine].sum())
    rec = rec[_DRAWN[kinds] & (rec["n"] > 0)]
    if not len(rec):
        return
    offset, length = rec["o"].astype(np.int64), rec["n"].astype(np.int64)
    end = int((offset + length).max())
    if -(-end // panel.block) > panel.nblocks:
        panel.resize(end)
    block = panel.block
    first = offset // block
    stop = np.minimum((offset + length + (block - 1)) // block, panel.nblocks)
    _mark_runs(panel, rec, first, np.maximum(stop - first, 0))


def _apply_uniform(panel: Panel, rec: Any) -> bool:
    """The usual batch, applied in a dozen array operations (~15 ns a record, a seventh
    of the general way): requests of one kind that draws, none failed, each within one
    block inside the panel, started in order. Returns False, having changed nothing, for
    any other batch."""
    kinds = rec["k"]
    code = int(kinds[0])
    if not _DRAWN[code] or not (kinds == code).all() or rec["e"].any():
        return False
    t = rec["t"]
    if len(t) > 1 and not (t[1:] >= t[:-1]).all():
        return False
    offset, length = rec["o"].astype(np.int64), rec["n"].astype(np.int64)
    block = panel.block
    blocks = offset // block
    if not ((offset + length + (block - 1)) // block - blocks == 1).all() \
            or int(blocks.max()) >= panel.nblocks or int(offset.min()) < 0:
        return False
    c = panel.counters[chr(code)]
    c[0] += len(rec)
    c[1] += int(length.sum())
    panel.last_time = max(panel.last_time, int(t[-1]) / 1e6)
    # A block named twice gets its last request's time: the largest, the times being in
    # order (``maximum.at`` over the blocks cleared first), and the same kind and state.
    when = np.frombuffer(panel.when, np.float64)
    when[blocks] = -np.inf
    np.maximum.at(when, blocks, t / 1e6)
    np.frombuffer(panel.kind, np.uint8)[blocks] = code
    if _STATE[code] != 2:
        np.frombuffer(panel.base, np.uint8)[blocks] = _STATE[code]
    return True


def _mark_runs(panel: Panel, rec: Any, first: Any, count: Any) -> None:
    """Mark the blocks of the requests in order, in passes of at most MAX_PASS_BLOCKS."""
    total = int(count.sum())
    if total <= MAX_PASS_BLOCKS:
        _mark(panel, rec, first, count, total)
        return
    start, blocks = 0, 0
    for i, n in enumerate(count.tolist()):
        if blocks + n > MAX_PASS_BLOCKS and i > start:
            _mark(panel, rec[start:i], first[start:i], count[start:i], blocks)
            start, blocks = i, 0
        blocks += n
    _mark(panel, rec[start:], first[start:], count[start:], blocks)


def _mark(panel: Panel, rec: Any, first: Any, count: Any, total: int) -> None:
    """One pass: every block of every request (in order), then for each block the last
    request that touched it, and the last that changed its state."""
    if (count == 1).all():  # one block each: most requests
        blocks, which = first, None
    else:
        which = np.repeat(np.arange(len(count)), count)
        starts = np.cumsum(count) - count
        blocks = first[which] + (np.arange(total) - starts[which])
    last = _last_touch(panel, blocks)
    ev = last if which is None else which[last]
    # Every occurrence of a block is given the same values (its last request's): the
    # result does not depend on the order numpy assigns them in.
    np.frombuffer(panel.kind, np.uint8)[blocks] = rec["k"][ev]
    np.frombuffer(panel.when, np.float64)[blocks] = rec["t"][ev] / 1e6
    states = _STATE[rec["k"]]
    if which is not None:
        states = states[which]
    changes = np.flatnonzero(states != 2)
    if changes.size:
        blocks, states = blocks[changes], states[changes]
        np.frombuffer(panel.base, np.uint8)[blocks] = states[_last_touch(panel, blocks)]


def _last_touch(panel: Panel, blocks: Any) -> Any:
    """For each entry of ``blocks``, the index of the last entry naming the same block."""
    scratch = panel.scratch
    if scratch is None or len(scratch) < panel.nblocks:
        scratch = panel.scratch = np.empty(panel.nblocks, np.int64)
    scratch[blocks] = -1
    np.maximum.at(scratch, blocks, np.arange(len(blocks)))
    return scratch[blocks]
