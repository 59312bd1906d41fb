"""The xz filter in one process: one decompression per block however many requests want
it at once, the cache shared by connections reading the same file and bounded per
connection, blocks decompressed in parallel, reads inside a block not copied, the plugin
opened read-only."""

from __future__ import annotations

import asyncio
import lzma
import random
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

    def counting(next: Any, idx: Any, i: int, *pool: Any) -> Any:
        seen.append(i)
        return real(next, idx, i, *pool)

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

    def slow(next: Any, idx: Any, i: int, *pool: Any) -> Any:
        both.wait()  # fails (BrokenBarrierError) unless two decodes overlap
        running.release()
        return real(next, idx, i, *pool)

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


class _Bytes:
    """What a filter calls below it, over a bytearray."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def get_size(self) -> int:
        return len(self.data)

    def pread(self, count: int, offset: int, flags: int) -> bytes:
        return bytes(self.data[offset:offset + count])


def _index_of(data: bytes) -> tuple[Any, Any]:
    disk = _Bytes(data)
    return disk, _formats_xz.read_index(disk)


@pytest.mark.parametrize("damage", ["none", "data", "check", "header", "short", "long"])
def test_liblzma_called_directly_as_lzma_does(damage: str) -> None:
    """The decoder called through ctypes gives the bytes and the errors of the lzma
    module's: good blocks, corrupt data, a wrong integrity check, a broken block header,
    and an index that says the block is shorter or longer than it is."""
    from pynbd.filters._xz_decoder import DecoderPool

    pool = DecoderPool(2)
    assert pool.decoders is not None, "liblzma cannot be called: the fast path is untested"
    disk, idx = _index_of(XZ)
    i, off, total = 3, idx.offsets[3], idx.totals[3]
    if damage == "data":
        disk.data[off + total // 2] ^= 0x40
    elif damage == "check":
        disk.data[off + total - 1] ^= 0x01  # the CRC64's last byte
    elif damage == "header":
        disk.data[off + 1] ^= 0xFF  # block flags
    elif damage == "short":
        idx.sizes[i] -= 1
    elif damage == "long":
        idx.sizes[i] += 1

    def outcome(p: Any) -> Any:
        try:
            return bytes(_formats_xz.decode_block(disk, idx, i, p))
        except Exception as e:  # noqa: BLE001 - compared below
            return (type(e), getattr(e, "errno", None), str(e))

    direct, stdlib = outcome(pool), outcome(None)
    assert direct == stdlib
    assert (direct == RAW[3 * BLOCK:4 * BLOCK]) == (damage == "none")
    assert outcome(pool) == direct  # the decoder is reset between blocks, even after errors


def _strided(b: bytes) -> memoryview:
    spaced = bytearray(2 * len(b))
    spaced[::2] = b
    return memoryview(spaced)[::2]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "view", "readonly view", "strided"])
def test_decoder_reads_any_buffer_the_plugin_returns(kind: str) -> None:
    """The compressed block is decoded from the buffer the layer below returns, whatever
    buffer it is (read in place when it can be, else copied once)."""
    from pynbd.filters._xz_decoder import DecoderPool

    pool = DecoderPool(1)
    assert pool.decoders is not None, "liblzma cannot be called: the fast path is untested"
    disk, idx = _index_of(XZ)
    wrap = {"bytes": bytes, "bytearray": bytearray,
            "view": lambda b: memoryview(bytearray(b)),
            "readonly view": lambda b: memoryview(b),
            "strided": _strided}[kind]
    given: list[Any] = []

    def pread(count: int, offset: int, flags: int) -> Any:
        given.append(wrap(bytes(disk.data[offset:offset + count])))
        return given[-1]

    disk.pread = pread  # type: ignore[method-assign]
    for i in (2, 5):
        assert bytes(_formats_xz.decode_block(disk, idx, i, pool)) == RAW[i * BLOCK:][:BLOCK]
    assert len(given) == 2


def test_block_buffers_reused_only_when_unreferenced() -> None:
    """An evicted block's buffer is decoded into again only once nothing refers to it: a
    view returned by an earlier read (a reply not yet sent) keeps its bytes."""
    chain, ctx = open_chain(Disk(XZ), (XzFilter, ["xz-max-depth=1"]))
    held = ctx.pread(100, 0)
    assert held.readonly
    for b in range(1, 8):
        assert bytes(ctx.pread(100, b * BLOCK)) == RAW[b * BLOCK:][:100]
    assert bytes(held) == RAW[:100]
    pool = _filter(chain)._pool
    if pool.decoders is not None:
        free = pool._free.get(BLOCK, [])
        assert free, "no buffer came back for reuse"
        assert all(not any(memoryview(buf)[:0]) for buf in free)  # bytearrays, usable


def test_reads_through_the_lzma_module_without_ctypes() -> None:
    """Where liblzma cannot be called through ctypes, the lzma module serves the same."""
    chain, ctx = open_chain(Disk(XZ), (XzFilter, ["xz-max-depth=1"]))
    _filter(chain)._pool.decoders = None
    for off in (0, 3 * BLOCK - 7, 5 * BLOCK + 100, 0):
        assert bytes(ctx.pread(2 * BLOCK, off)) == RAW[off:off + 2 * BLOCK]


@pytest.mark.parametrize("damage", ["none", "data"])
def test_block_read_in_several_chunks(monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """A block bigger than one read of the plugin below decodes chunk by chunk, the same
    through ctypes as through the lzma module."""
    from pynbd.filters._xz_decoder import DecoderPool

    monkeypatch.setattr(_formats_xz, "_CHUNK", 1000)
    pool = DecoderPool(1)
    raw = random.Random(5).randbytes(2 * BLOCK)  # incompressible: a block is 64 KiB
    disk, idx = _index_of(_xz_blocks(raw, BLOCK))
    assert idx.totals[1] > 60000
    if damage == "data":
        disk.data[idx.offsets[1] + 2500] ^= 0x10
    results = []
    for p in (pool, None, pool):
        try:
            results.append(bytes(_formats_xz.decode_block(disk, idx, 1, p)))
        except Exception as e:  # noqa: BLE001 - compared below
            results.append(str(e))
    assert results[0] == results[1] == results[2]
    assert (results[0] == raw[BLOCK:]) == (damage == "none")
    assert pool.decoders is None or len(pool.decoders) == 1  # one decoder, reused


def _loop_reads(ctx: Any, flt: XzFilter, reads: list[tuple[int, int]]) -> list[Any]:
    """``reads`` (offset, length) started at once with the filter's ``start_pread`` on an
    event loop, as the server starts them: each its bytes, or the exception it failed
    with; every answer is checked to come on the loop's thread."""
    fh, nxt = ctx.handle

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        me = threading.get_ident()
        futs = []
        for off, n in reads:
            fut = loop.create_future()

            def done(err: Any, value: Any, fut: Any = fut) -> None:
                assert threading.get_ident() == me
                fut.set_result(err if err is not None else bytes(value))
            flt.start_pread(nxt, fh, n, off, 0, done)
            futs.append(fut)
        return await asyncio.wait_for(asyncio.gather(*futs), 20)

    return asyncio.run(main())


def test_reads_answered_on_the_event_loop(decodes: list[int]) -> None:
    """The server's path: reads started on the loop, answered there when their block is
    decoded (in the filter's threads), once per block however many wait for it, the
    cached ones at once, reads across blocks put together."""
    chain, ctx = open_chain(Disk(XZ), (XzFilter, []))
    flt = _filter(chain)
    reads = [(BLOCK + n * 4096, 4096) for n in range(16)]
    reads += [(3 * BLOCK - 10, 2 * BLOCK + 20), (5 * BLOCK, BLOCK), (0, 1)]
    got = _loop_reads(ctx, flt, reads)
    assert got == [RAW[off:off + n] for off, n in reads]
    assert sorted(decodes) == [0, 1, 2, 3, 4, 5]
    again = [(BLOCK + 100, 200), (4 * BLOCK - 1, 2)]
    assert _loop_reads(ctx, flt, again) == [RAW[off:off + n] for off, n in again]
    assert len(decodes) == 6  # all cached


def test_failed_decode_fails_every_read_waiting_for_it(decodes: list[int]) -> None:
    disk = Disk(XZ)
    chain, ctx = open_chain(disk, (XzFilter, []))
    flt = _filter(chain)
    disk.data[100:160] = bytes(b ^ 0x5A for b in disk.data[100:160])
    got = _loop_reads(ctx, flt, [(0, 10), (4096, 10), (BLOCK - 5, 10), (BLOCK, 10)])
    assert [getattr(e, "errno", None) for e in got[:3]] == [5, 5, 5]
    assert got[3] == RAW[BLOCK:BLOCK + 10]
    assert sorted(decodes) == [0, 1]


def test_decoding_threads_end_with_the_server() -> None:
    before = set(threading.enumerate())
    chain, ctx = open_chain(Disk(XZ), (XzFilter, []))
    assert _loop_reads(ctx, _filter(chain), [(0, 10)]) == [RAW[:10]]
    named = [t for t in set(threading.enumerate()) - before if t.name.startswith("pynbd-xz-")]
    assert named
    ctx.close()
    chain.cleanup()
    for t in named:
        t.join(10)
        assert not t.is_alive()
