"""The xz filter in one process: one decompression per block however many requests want
it at once, the cache shared by connections reading the same file and bounded per
connection, blocks decompressed in parallel, reads inside a block not copied, the plugin
opened read-only."""

from __future__ import annotations

import lzma
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pynbd.filters import _formats_xz
from pynbd.filters.xz import XzFilter
from pynbd.plugin import Filter
from tests.e2e.shape_chain import Disk, manual_of, open_chain

BLOCK = 65536
RAW = b"".join(i.to_bytes(4, "big") * 1024 for i in range(8 * BLOCK // 4096))  # 8 blocks


def _xz_blocks(data: bytes, block: int) -> bytes:
    """An xz file with a block every ``block`` bytes (what xz --block-size makes)."""
    # The stdlib cannot cut blocks itself: one stream per block, concatenated, is a
    # valid multi-stream xz file with the same random access.
    out = b""
    for off in range(0, len(data), block):
        enc = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
        out += enc.compress(data[off:off + block]) + enc.flush()
    return out


XZ = _xz_blocks(RAW, BLOCK)


def _filter(chain: Any) -> XzFilter:
    flt: Filter = chain.filters[0]
    assert isinstance(flt, XzFilter)
    return flt


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The blocks decompressed, in order (each call of decode_block)."""
    seen: list[int] = []
    real = _formats_xz.decode_block

    def counting(next: Any, idx: Any, i: int) -> bytes:
        seen.append(i)
        return real(next, idx, i)

    monkeypatch.setattr("pynbd.filters.xz.decode_block", counting)
    return seen


def test_reads_and_read_only() -> None:
    disk = Disk(XZ)
    _, ctx = open_chain(disk, (XzFilter, []))
    assert ctx.get_size() == len(RAW) and not ctx.can_write() and not ctx.can_extents()
    assert bytes(ctx.pread(3 * BLOCK + 10, BLOCK - 5)) == RAW[BLOCK - 5:4 * BLOCK + 5]
    inside = ctx.pread(4096, 2 * BLOCK + 4096)
    assert isinstance(inside, memoryview) and bytes(inside) == RAW[2 * BLOCK + 4096:][:4096]
    assert disk.named("pwrite", "zero", "trim") == []


def test_one_decompression_per_block(decodes: list[int]) -> None:
    chain, ctx = open_chain(Disk(XZ), (XzFilter, []))
    start = threading.Barrier(16)

    def read(n: int) -> bytes:
        start.wait()
        return bytes(ctx.pread(512, BLOCK + n * 512))

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(read, range(16)))
    assert got == [RAW[BLOCK + n * 512:][:512] for n in range(16)]
    assert decodes == [1]
    assert _filter(chain).max_depth == 8


def test_cache_shared_by_connections_and_bounded(decodes: list[int]) -> None:
    chain, first = open_chain(Disk(XZ), (XzFilter, ["xz-max-depth=1"]))
    second = chain.open(True, "", False)
    first.pread(10, 0)
    second.pread(10, 5)  # same file, same export: the first connection's block
    assert decodes == [0]
    first.pread(10, BLOCK)
    second.pread(10, 2 * BLOCK)  # two connections keep two blocks: 0 goes
    first.pread(10, BLOCK + 100)
    first.pread(10, 0)
    assert decodes == [0, 1, 2, 0]
    second.close()
    first.pread(10, 3 * BLOCK)  # one connection: one block
    first.pread(10, 0)
    assert decodes == [0, 1, 2, 0, 3, 0]
    first.close()
    assert _filter(chain)._files == {}


def test_parallel_decompression(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different blocks decompress at the same time (liblzma releases the GIL): the
    second decode starts while the first is still running."""
    running = threading.Semaphore(0)
    both = threading.Barrier(2, timeout=10)
    real = _formats_xz.decode_block

    def slow(next: Any, idx: Any, i: int) -> bytes:
        both.wait()  # fails (BrokenBarrierError) unless two decodes overlap
        running.release()
        return real(next, idx, i)

    monkeypatch.setattr("pynbd.filters.xz.decode_block", slow)
    _, ctx = open_chain(Disk(XZ), (XzFilter, []))
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda b: bytes(ctx.pread(8, b * BLOCK)), (4, 5)))
    assert got == [RAW[4 * BLOCK:][:8], RAW[5 * BLOCK:][:8]]


def test_failed_decode_is_not_cached(decodes: list[int]) -> None:
    disk = Disk(XZ)
    _, ctx = open_chain(disk, (XzFilter, []))
    saved = bytes(disk.data[100:160])
    disk.data[100:160] = bytes(b ^ 0x5A for b in saved)
    with pytest.raises(Exception) as e:
        ctx.pread(10, 0)
    assert getattr(e.value, "errno", None) == 5
    disk.data[100:160] = saved
    assert bytes(ctx.pread(10, 0)) == RAW[:10]
    assert decodes == [0, 0]


def test_manual() -> None:
    text = manual_of("xz")
    assert "xz-max-block=SIZE" in text and "xz-max-depth=N" in text
