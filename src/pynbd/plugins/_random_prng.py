"""The pseudo-random generator of the random and sparse-random plugins (private).

Both plugins must serve the bytes nbdkit serves for the same seed, so they use the same
generator: xoshiro256** whose 256-bit state is seeded by four outputs of splitmix64 (the
published reference algorithms of Blackman and Vigna). This module implements both twice:
in plain Python (any size, slow) and vectorised with numpy, when installed (the ``random``
extra), over many independent generators at once.

How each plugin uses the generator:

- random: byte ``i`` of the disk is the low byte of the third output of a generator seeded
  with ``seed + i`` (modulo 2^64). Expanding the first two steps, that output depends only
  on three splitmix64 outputs (state words 0, 1 and 3): see :func:`_third_output_byte`.
- sparse-random: one generator seeded with ``seed`` draws one number per 4 KiB block
  (a Markov chain of data and hole runs); a data block is filled with the low byte of the
  first output of a generator seeded with ``seed + block offset`` (never 0), or, with
  random-content, with the low bytes of its first 4096 outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None  # type: ignore[assignment]

__all__ = ["HAVE_NUMPY", "block_bytes", "block_contents", "random_bytes", "stream_map"]

HAVE_NUMPY = np is not None
_M = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: Bytes computed per numpy pass (bounds the temporary arrays to a few MiB each).
_CHUNK = 1 << 16


# Plain Python -------------------------------------------------------------------------
def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _M
    z = ((z ^ (z >> 27)) * _MIX2) & _M
    return z ^ (z >> 31)


def seed_state(seed: int) -> list[int]:
    """The xoshiro256** state seeded from ``seed`` by splitmix64."""
    return [_mix((seed + k * _GOLDEN) & _M) for k in (1, 2, 3, 4)]


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & _M


def next_output(s: list[int]) -> int:
    """Step the state ``s`` (in place) and return the output."""
    result = (_rotl((s[1] * 5) & _M, 7) * 9) & _M
    t = (s[1] << 17) & _M
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return result


def _third_byte_py(x: int) -> int:
    s0 = _mix((x + _GOLDEN) & _M)
    s1 = _mix((x + 2 * _GOLDEN) & _M)
    s3 = _mix((x + 4 * _GOLDEN) & _M)
    # After two steps, state word 1 is s0 ^ s3 ^ (s1 << 17); the third output is made from it.
    v = (s0 ^ s3 ^ (s1 << 17)) & _M
    return ((_rotl((v * 5) & _M, 7) * 9) & 0xFF)


# numpy --------------------------------------------------------------------------------
def _mix_np(z: Any) -> Any:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def _third_output_byte(x: Any) -> Any:
    """Low byte of the third output of generators seeded with each of ``x`` (uint64)."""
    g = np.uint64(_GOLDEN)
    s0 = _mix_np(x + g)
    s1 = _mix_np(x + np.uint64((2 * _GOLDEN) & _M))
    s3 = _mix_np(x + np.uint64((4 * _GOLDEN) & _M))
    v = (s0 ^ s3 ^ (s1 << np.uint64(17))) * np.uint64(5)
    # Only the low byte of rotl(v, 7) * 9 is needed: v's bit 0 and its top 7 bits.
    low = ((v << np.uint64(7)) | (v >> np.uint64(57))).astype(np.uint8)
    return low * np.uint8(9)


def _mix_into(z: Any, t: Any) -> None:
    """splitmix64's mixing of ``z`` in place (``t`` is scratch of the same shape)."""
    np.right_shift(z, np.uint64(30), out=t)
    z ^= t
    z *= np.uint64(_MIX1)
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= np.uint64(_MIX2)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t


def _random_chunk(x: Any, out: Any, scratch: list[Any]) -> None:
    """:func:`_third_output_byte` of ``x`` into ``out``, in place (no temporaries)."""
    s0, s1, t = scratch
    np.add(x, np.uint64(_GOLDEN), out=s0)
    _mix_into(s0, t)
    np.add(x, np.uint64((2 * _GOLDEN) & _M), out=s1)
    _mix_into(s1, t)
    s1 <<= np.uint64(17)
    s0 ^= s1
    np.add(x, np.uint64((4 * _GOLDEN) & _M), out=s1)
    _mix_into(s1, t)
    s0 ^= s1
    s0 *= np.uint64(5)
    np.left_shift(s0, np.uint64(7), out=t)
    s0 >>= np.uint64(57)
    s0 |= t
    np.multiply(s0.astype(np.uint8), np.uint8(9), out=out)


def random_bytes(seed: int, offset: int, count: int) -> bytes | bytearray:
    """The random plugin's ``count`` bytes at ``offset``."""
    if not HAVE_NUMPY:
        base = seed + offset
        return bytes(_third_byte_py((base + i) & _M) for i in range(count))
    out = bytearray(count)
    view = np.frombuffer(out, dtype=np.uint8)
    n0 = min(_CHUNK, count)
    steps = np.arange(n0, dtype=np.uint64)
    x = np.empty(n0, dtype=np.uint64)
    scratch = [np.empty(n0, dtype=np.uint64) for _ in range(3)]
    with np.errstate(over="ignore"):
        for pos in range(0, count, n0):
            n = min(n0, count - pos)
            np.add(steps[:n], np.uint64((seed + offset + pos) & _M), out=x[:n])
            _random_chunk(x[:n], view[pos:pos + n], [a[:n] for a in scratch])
    return out


def block_bytes(seed: int, offsets: Any) -> Any:
    """For each block offset, the byte a data block is filled with (sparse-random): the
    low byte of the first output, 1 where that is 0. A numpy array when numpy is there."""
    if not HAVE_NUMPY:
        out = []
        for off in offsets:
            b = next_output(seed_state((seed + off) & _M)) & 0xFF
            out.append(b or 1)
        return out
    with np.errstate(over="ignore"):
        x = np.asarray(offsets, dtype=np.uint64) + np.uint64(seed & _M)
        # The first output is made from state word 1 alone: splitmix64's second output.
        v = _mix_np(x + np.uint64((2 * _GOLDEN) & _M)) * np.uint64(5)
        b = ((v << np.uint64(7)) | (v >> np.uint64(57))).astype(np.uint8) * np.uint8(9)
    b[b == 0] = 1
    return b


def block_contents(seed: int, offsets: list[int], size: int) -> bytes:
    """random-content=true: the ``size`` bytes of each data block at ``offsets``, joined."""
    if not HAVE_NUMPY or len(offsets) < 4:
        parts = []
        for off in offsets:
            s = seed_state((seed + off) & _M)
            parts.append(bytes(next_output(s) & 0xFF for _ in range(size)))
        return b"".join(parts)
    with np.errstate(over="ignore"):
        states = np.array([seed_state((seed + off) & _M) for off in offsets], dtype=np.uint64)
        out = np.empty((size, len(offsets)), dtype=np.uint8)
        for i in range(size):  # one generator per block, all stepped together
            out[i] = _out_np(states).astype(np.uint8)
            states = _step_np(states)
    return out.T.tobytes()


# sparse-random's chain: a sequential stream, made parallel ------------------------------
# xoshiro256**'s step is linear over GF(2) on its 256 state bits, so the state after n steps
# is a fixed 256x256 bit matrix applied to the first state. A matrix is held as the images
# of the 256 unit states (an array of 256 rows of 4 uint64). With them, many generators
# ("lanes") are started at evenly spaced points of one stream and stepped together.
def _step_np(s: Any) -> Any:
    """One step of xoshiro256** on a (n, 4) uint64 array of states (returns the new array)."""
    s0, s1, s2, s3 = s[:, 0].copy(), s[:, 1].copy(), s[:, 2].copy(), s[:, 3].copy()
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return np.stack([s0, s1, s2, s3], axis=1)


def _apply(images: Any, states: Any) -> Any:
    """The linear map given by ``images`` applied to each row of ``states``."""
    out = np.zeros_like(states)
    one = np.uint64(1)
    for b in range(256):
        word, bit = divmod(b, 64)
        mask = ((states[:, word] >> np.uint64(bit)) & one).astype(bool)
        if mask.any():
            out[mask] ^= images[b]
    return out


def _unit_images() -> Any:
    eye = np.zeros((256, 4), dtype=np.uint64)
    for b in range(256):
        eye[b, b // 64] = np.uint64(1) << np.uint64(b % 64)
    return eye


def _power(n: int) -> Any:
    """Images of the step matrix raised to ``n``."""
    result = _unit_images()
    base = _step_np(_unit_images())
    while n:
        if n & 1:
            result = _apply(base, result)
        n >>= 1
        if n:
            base = _apply(base, base)
    return result


def _lane_starts(first: list[int], lanes: int, k: int) -> Any:
    """States at 0, k, 2k, ... (``lanes`` of them) of the stream starting at ``first``."""
    states = np.array([first], dtype=np.uint64)
    jump = _power(k)
    while len(states) < lanes:
        states = np.concatenate([states, _apply(jump, states)])
        jump = _apply(jump, jump)
    return states[:lanes]


def _out_np(s: Any) -> Any:
    v = s[:, 1] * np.uint64(5)
    v = (v << np.uint64(7)) | (v >> np.uint64(57))
    return v * np.uint64(9)


def stream_map(seed: int, n: int, visit: Callable[[Any, int], None] | None = None,
               py_visit: Callable[[int, int], None] | None = None) -> None:
    """Draw the first ``n`` outputs of the generator seeded with ``seed``.

    With numpy: ``visit(outputs, k)`` is called for k = 0, 1, ... with the k-th output of
    every lane (lane j covers outputs j*K .. j*K+K-1; see :func:`lanes_for`). Without numpy:
    ``py_visit(i, output)`` for each output in order.
    """
    if not HAVE_NUMPY or visit is None:
        assert py_visit is not None
        s = seed_state(seed & _M)
        for i in range(n):
            py_visit(i, next_output(s))
        return
    lanes, k = lanes_for(n)
    with np.errstate(over="ignore"):
        states = _lane_starts(seed_state(seed & _M), lanes, k)
        for step in range(k):
            visit(_out_np(states), step)
            states = _step_np(states)


def lanes_for(n: int) -> tuple[int, int]:
    """(lanes, steps per lane) used to draw ``n`` outputs in parallel."""
    lanes = 1
    while lanes * 4096 < n and lanes < (1 << 16):
        lanes *= 2
    return lanes, max(1, -(-n // lanes))
