"""The random plugins' generator: the plain-Python and numpy paths agree, and both give
nbdkit 1.32's first bytes for seed 1 (checked against `nbdkit random size=32 seed=1`)."""

from __future__ import annotations

import pytest

from pynbd.plugins import _random_bitmap, _random_prng

NBDKIT_SEED1 = bytes.fromhex(
    "1405517eae4896061772ad7bf81875ffb9f3d12dc341c507f84909a0ebdad220")


@pytest.fixture(params=[True, False], ids=["numpy", "python"])
def numpy_or_not(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param:
        pytest.importorskip("numpy")
    else:
        monkeypatch.setattr(_random_prng, "HAVE_NUMPY", False)
        monkeypatch.setattr(_random_bitmap, "HAVE_NUMPY", False)
    return bool(request.param)


def test_random_bytes(numpy_or_not: bool) -> None:
    assert bytes(_random_prng.random_bytes(1, 0, 32)) == NBDKIT_SEED1
    assert bytes(_random_prng.random_bytes(1, 5, 10)) == NBDKIT_SEED1[5:15]
    # seed + offset wraps modulo 2^64 in both paths
    top = (1 << 64) - 3
    assert len(_random_prng.random_bytes(0xFFFFFFFF, top, 8)) == 8


def test_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    fast = bytes(_random_prng.random_bytes(7, 12345, 3000))
    blocks = [int(b) for b in _random_prng.block_bytes(7, [0, 4096, 1 << 40])]
    content = _random_prng.block_contents(7, [0, 4096, 8192, 1 << 30], 64)
    bmap = _random_bitmap.BlockMap(9, 64 << 20, 30.0, 65536)
    runs = bmap.runs(0, bmap.nblocks)
    monkeypatch.setattr(_random_prng, "HAVE_NUMPY", False)
    monkeypatch.setattr(_random_bitmap, "HAVE_NUMPY", False)
    assert bytes(_random_prng.random_bytes(7, 12345, 3000)) == fast
    assert list(_random_prng.block_bytes(7, [0, 4096, 1 << 40])) == blocks
    assert _random_prng.block_contents(7, [0, 4096, 8192, 1 << 30], 64) == content
    slow = _random_bitmap.BlockMap(9, 64 << 20, 30.0, 65536)
    assert slow.runs(0, slow.nblocks) == runs
    assert any(is_data for _, _, is_data in runs) and len(runs) > 2
