"""sparse-random's map of data and hole blocks (private).

The map is a two-state Markov chain over the disk's 4 KiB blocks, drawn as nbdkit 1.32 draws
it so that the same seed gives the same disk: one xoshiro256** generator seeded with the seed
draws one number r per block; the chain starts in the hole state; each block takes the
current state, then the state flips when r (as a double) <= P * 2^64, with P = Pdh (data to
hole, 4096 / runlength) in the data state and Phd = p * Pdh / (1 - p) (p = percent / 100) in
the hole state. The average data run is then runlength bytes and the data share p.

With numpy the stream is drawn by many generators at once (see
:func:`pynbd.plugins._random_prng.stream_map`): lane j draws blocks j*K .. j*K+K-1. A first
pass composes, for each lane, what its K blocks do to the state (where a lane ends when it
starts in either state); the lanes' start states then follow one from the next; a second
pass draws the stream again and records each block's state, 8 blocks per byte.
"""

from __future__ import annotations

from typing import Any

from pynbd.plugins._random_prng import HAVE_NUMPY, lanes_for, stream_map

if HAVE_NUMPY:
    import numpy as np

__all__ = ["BLOCKSIZE", "BlockMap"]

BLOCKSIZE = 4096


class BlockMap:
    """Which blocks of the disk hold data: ``runs(first, end)`` describes a range."""

    def __init__(self, seed: int, size: int, percent: float, runlength: int) -> None:
        self.nblocks = -(-size // BLOCKSIZE)
        self._all: bool | None = None
        self._bits: Any = None
        if percent == 0 or self.nblocks == 0:
            self._all = False
        elif percent == 100:
            self._all = True
        else:
            p_dh = 1.0 / (runlength / BLOCKSIZE)
            p_hd = (percent / 100.0) * p_dh / (1.0 - percent / 100.0)
            two64 = 18446744073709551616.0
            self._build(seed, p_dh * two64, p_hd * two64)

    def _build(self, seed: int, thr_dh: float, thr_hd: float) -> None:
        n = self.nblocks
        if not HAVE_NUMPY:
            bits = bytearray(n)
            cur = [0]

            def visit_py(i: int, r: int) -> None:
                bits[i] = cur[0]
                if float(r) <= (thr_dh if cur[0] else thr_hd):
                    cur[0] ^= 1
            stream_map(seed, n, py_visit=visit_py)
            self._bits = bits
            return
        lanes, k = lanes_for(n)
        # Pass 1: per lane, the end state when starting in hole (g0) and in data (g1).
        g0 = np.zeros(lanes, dtype=bool)
        g1 = np.ones(lanes, dtype=bool)

        def compose(r: Any, step: int) -> None:
            rf = r.astype(np.float64)
            fh, stay = rf <= thr_hd, rf > thr_dh
            np.copyto(g0, np.where(g0, stay, fh))
            np.copyto(g1, np.where(g1, stay, fh))
        stream_map(seed, n, visit=compose)
        start = np.zeros(lanes, dtype=bool)
        for j in range(1, lanes):
            start[j] = g1[j - 1] if start[j - 1] else g0[j - 1]
        # Pass 2: each block's state, packed 8 blocks (steps) to a byte per lane.
        kb = -(-k // 8)
        packed = np.zeros((lanes, kb), dtype=np.uint8)
        state: Any = start

        def record(r: Any, step: int) -> None:
            nonlocal state
            packed[:, step >> 3] |= state.astype(np.uint8) << np.uint8(step & 7)
            rf = r.astype(np.float64)
            state = np.where(state, rf > thr_dh, rf <= thr_hd)
        stream_map(seed, n, visit=record)
        self._k = k
        self._bits = packed

    def _states(self, first: int, end: int) -> Any:
        """Block states of [first, end) as a sequence of 0/1 values."""
        if self._all is not None:
            return None
        if not HAVE_NUMPY:
            return self._bits[first:end]
        k = self._k
        out = []
        blk = first
        while blk < end:  # a range may cross lanes
            lane, step = divmod(blk, k)
            stop = min(end, (lane + 1) * k)
            row = self._bits[lane]
            s0, s1 = step, step + (stop - blk)
            bits = np.unpackbits(row[s0 >> 3:((s1 - 1) >> 3) + 1], bitorder="little")
            out.append(bits[s0 & 7:(s0 & 7) + (s1 - s0)])
            blk = stop
        return np.concatenate(out) if len(out) != 1 else out[0]

    def data_blocks(self, first: int, end: int) -> list[int]:
        """Numbers of the data blocks in [first, end)."""
        if self._all is not None:
            return list(range(first, end)) if self._all else []
        states = self._states(first, end)
        if HAVE_NUMPY:
            return (np.flatnonzero(states) + first).tolist()  # type: ignore[no-any-return]
        return [first + i for i, v in enumerate(states) if v]

    def runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        """[first, end) as runs (first block, number of blocks, is data)."""
        if end <= first:
            return []
        if self._all is not None:
            return [(first, end - first, self._all)]
        states = self._states(first, end)
        if HAVE_NUMPY:
            cuts = (np.flatnonzero(np.diff(states.astype(np.int8))) + 1).tolist()
        else:
            cuts = [i for i in range(1, len(states)) if states[i] != states[i - 1]]
        out = []
        prev = 0
        for c in [*cuts, end - first]:
            out.append((first + prev, c - prev, bool(states[prev])))
            prev = c
        return out
