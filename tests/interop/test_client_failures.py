"""pynbd's client engine when commands fail: server errors, slow and out-of-order replies,
strict-mode rejections before the wire and, with ``strict=False``, the server's own errno.

nbdkit's filters make the failures: ``error`` (EIO), ``delay`` (slow reads), ``fua``/``nozero``
(flags not advertised), ``blocksize-policy`` (a 512-byte minimum), ``-r`` (read-only).
"""

from __future__ import annotations

import asyncio
import errno as E
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from helpers import run_async

from pynbd.client import AsyncClient, Client
from pynbd.client.engine import STRICT_ALL, STRICT_BOUNDS
from pynbd.errors import CommandError
from pynbd.protocol.constants import CmdFlag

run = run_async


async def fails(aw: Awaitable[Any], errno: int) -> CommandError:
    with pytest.raises(CommandError) as ei:
        await aw
    assert ei.value.errno == errno, ei.value
    return ei.value


# --------------------------------------------------------------------------- server errors


@pytest.mark.parametrize("sr", [True, False], ids=["structured", "simple"])
def test_error_filter_eio_connection_lives(nbdkit_server, sr: bool) -> None:
    srv = nbdkit_server(*([] if sr else ["--no-sr"]), "--filter=error", "memory", "1M",
                        "error-pread=EIO", "error-pread-rate=1")

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            assert c.structured == sr
            await fails(c.pread(4096, 0), E.EIO)
            # many failing reads in flight with writes between them: every read gets EIO,
            # every write succeeds, nothing hangs, the connection lives
            ops: list[Awaitable[Any]] = []
            for i in range(64):
                ops.append(c.pread(512, i * 512))
                ops.append(c.pwrite(bytes([i]) * 512, i * 512))
            res = await asyncio.gather(*ops, return_exceptions=True)
            reads, writes = res[0::2], res[1::2]
            assert all(isinstance(r, CommandError) and r.errno == E.EIO for r in reads)
            assert writes == [None] * 64
            await c.flush()
            await c.zero(4096, 65536)
            if sr:
                bs = await c.block_status(65536, 0)
                assert bs["base:allocation"][0][1] == 0
            assert c.failure is None and c.connected
            buf = bytearray(b"\x77" * 512)
            await fails(c.pread_into(buf, 0), E.EIO)

    run(go())
    # the same through the blocking facade
    with Client.connect(srv.uri) as c:
        with pytest.raises(CommandError) as ei:
            c.pread(512, 0)
        assert ei.value.errno == E.EIO
        c.pwrite(b"ok", 0)


# --------------------------------------------------------------------------- slow replies


def test_delay_out_of_order_replies(nbdkit_server) -> None:
    """A slow read first, fast writes after it: the writes are answered first, and every
    reply finds its own request by cookie."""
    srv = nbdkit_server("--filter=delay", "memory", "1M", "rdelay=600ms")

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            done: list[str] = []

            async def tag(name: str, aw: Awaitable[Any]) -> Any:
                r = await aw
                done.append(name)
                return r

            await c.pwrite(b"S" * 4096, 0)
            slow = asyncio.ensure_future(tag("read", c.pread(4096, 0)))
            await asyncio.sleep(0.05)
            await asyncio.gather(*(tag(f"w{i}", c.pwrite(bytes([i]) * 512, 65536 + i * 512))
                                   for i in range(32)))
            await tag("flush", c.flush())
            assert done[-1] == "flush" and "read" not in done
            assert await slow == b"S" * 4096
            assert done[-1] == "read"

    run(go())


def test_out_of_order_reads_matched_by_cookie(nbdkit_server) -> None:
    """Reads at offset 0 take 0.6 s, others answer at once; each buffer gets its own data."""
    srv = nbdkit_server(
        "eval", "get_size=echo 1M", "thread_model=echo parallel",
        'pread=if [ $4 -eq 0 ]; then sleep 0.6; fi; printf "%0${3}d" $4')

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            order: list[int] = []

            async def read(off: int) -> bytes:
                b = await c.pread(512, off)
                order.append(off)
                return bytes(b)

            offs = [0] + [512 * i for i in range(1, 17)]
            t0 = time.monotonic()
            got = await asyncio.gather(*(read(o) for o in offs))
            assert time.monotonic() - t0 < 5
            for o, b in zip(offs, got, strict=True):
                assert b == b"%0512d" % o
            assert order[-1] == 0 and sorted(order) == offs

    run(go())


def test_request_timeout_against_slow_server(nbdkit_server) -> None:
    srv = nbdkit_server("--filter=delay", "memory", "1M", "rdelay=3", "wdelay=3")

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri, request_timeout=0.3)
        assert c.request_timeout == 0.3
        t0 = time.monotonic()
        res = await asyncio.gather(c.pread(512, 0), c.pwrite(b"x" * 512, 0),
                                   return_exceptions=True)
        assert time.monotonic() - t0 < 2
        assert all(isinstance(r, TimeoutError) for r in res), res
        assert c.closed and isinstance(c.failure, TimeoutError)
        with pytest.raises(ConnectionError):
            await c.pread(512, 0)
        await c.close()

    run(go())


# --------------------------------------------------------------------------- strict mode


def _rejected_before_wire(c: AsyncClient) -> Any:
    """Context: the command failed at once, used no cookie and left nothing in flight."""

    class Ctx:
        def __enter__(self) -> None:
            self.cookie = c._next_cookie

        def __exit__(self, *exc: object) -> None:
            assert c._next_cookie == self.cookie and not c._pending
            assert c.failure is None

    return Ctx()


async def _strict_rejections(aligned: str, nofua: str, ro: str, size: int) -> None:
    """strict (the default): every bad request fails before the wire."""
    c = await AsyncClient.connect(aligned)
    try:
        assert c.block_size() == (512, 4096, 65536)
        cases = [
            (c.pread(512, size), E.EINVAL),  # out of bounds
            (c.pread(1024, size - 512), E.EINVAL),  # straddling the end
            (c.pwrite(b"x" * 512, size), E.ENOSPC),  # a write out of bounds: libnbd's
            (c.pread(0, 0), E.EINVAL),  # zero length
            (c.zero(0, 0), E.EINVAL),
            (c.pread(100, 0), E.EINVAL),  # unaligned length
            (c.pread(512, 100), E.EINVAL),  # unaligned offset
            (c.trim(512, 256), E.EINVAL),
            (c.pwrite(b"x" * 131072, 0), E.ERANGE),  # over the advertised maximum
            (c.pread(512, 0, CmdFlag.FUA), E.EINVAL),  # not a READ flag
            (c.pwrite(b"x" * 512, 0, CmdFlag.REQ_ONE), E.EINVAL),
            (c.pread(512, 0, 1 << 12), E.EINVAL),  # unknown flag
        ]
        for aw, errno in cases:
            with _rejected_before_wire(c):
                await fails(aw, errno)
        assert await c.pread(512, 512) == bytes(512)
    finally:
        await c.close()
    c = await AsyncClient.connect(nofua)
    try:
        assert not c.can_fua() and not c.can_zero() and c.can_flush()
        for aw in [c.pwrite(b"x", 0, CmdFlag.FUA), c.zero(512, 0),
                   c.trim(512, 0, CmdFlag.FUA)]:
            with _rejected_before_wire(c):
                await fails(aw, E.EINVAL)
    finally:
        await c.close()
    c = await AsyncClient.connect(ro)
    try:
        # libnbd's order: a command the server lacks (a read-only export has no
        # WRITE_ZEROES or TRIM) is EINVAL before the export being read-only is EPERM
        for aw, errno in [(c.pwrite(b"x", 0), E.EPERM), (c.zero(512, 0), E.EINVAL),
                          (c.trim(512, 0), E.EINVAL)]:
            with _rejected_before_wire(c):
                await fails(aw, errno)
    finally:
        await c.close()


async def _server_errnos(aligned: str, nofua: str, ro: str, size: int) -> None:
    """strict=False: the same requests go out and the server's errno comes back, the
    connection surviving each; then a libnbd-style mask."""
    c = await AsyncClient.connect(aligned, strict=False)
    try:
        await fails(c.pread(512, size), E.EINVAL)
        await fails(c.pwrite(b"x" * 512, size), E.ENOSPC)
        await fails(c.pread(0, 0), E.EINVAL)
        await fails(c.pread(100, 0), E.EINVAL)
        await fails(c.pread(512, 100), E.EINVAL)
        await fails(c.pread(131072, 0), E.EINVAL)
        assert await c.pread(512, 512) == bytes(512)
        assert c.failure is None
    finally:
        await c.close()
    c = await AsyncClient.connect(nofua, strict=False)
    try:
        await fails(c.pwrite(b"x", 0, CmdFlag.FUA), E.EINVAL)
        await c.pwrite(b"y", 0)
    finally:
        await c.close()
    c = await AsyncClient.connect(ro, strict=False)
    try:
        await fails(c.pwrite(b"x", 0), E.EPERM)
        await fails(c.trim(512, 0), E.EPERM)
        assert await c.pread(1, 0) == b"\0"
    finally:
        await c.close()
    # a libnbd-style mask: only bounds checked here; a short read goes to the server
    c = await AsyncClient.connect(aligned, strict=STRICT_BOUNDS)
    try:
        with _rejected_before_wire(c):
            await fails(c.pread(512, size), E.EINVAL)
        await fails(c.pread(100, 0), E.EINVAL)  # from the server this time
        c.strict = STRICT_ALL
        with _rejected_before_wire(c):
            await fails(c.pread(100, 0), E.EINVAL)
    finally:
        await c.close()


def test_strict_rejections_and_server_errnos(nbdkit_server) -> None:
    aligned = nbdkit_server("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=512",
                            "blocksize-maximum=65536", "blocksize-error-policy=error")
    nofua = nbdkit_server("--filter=fua", "--filter=nozero", "memory", "1M")
    ro = nbdkit_server("-r", "memory", "1M")
    size = 1 << 20
    uris = (aligned.uri, nofua.uri, ro.uri)
    run(_strict_rejections(*uris, size))
    run(_server_errnos(*uris, size))
