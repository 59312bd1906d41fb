"""pynbd's client engine (AsyncClient) against the real servers.

nbdkit (memory, pattern, null, file; oldstyle and plain newstyle), qemu-nbd (raw and qcow2:
OFFSET_HOLE chunks, split reads, qemu:allocation-depth and qemu:dirty-bitmap contexts),
nbd-server (no structured replies) and ``pynbd serve``; every can_*/is_* flag compared with
``nbdinfo --json`` on the same server; ``command=`` and ``socket_activation=`` connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import require, run_async, run_peer

from pynbd.client import AsyncClient, Client
from pynbd.errors import CommandError
from pynbd.protocol.constants import CmdFlag, State

FLAGS = ["is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero", "can_flush",
         "can_fua", "can_multi_conn", "can_trim", "can_zero"]


run = run_async


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ for every seed (n a multiple of 8)."""
    return b"".join((seed * 1_000_003 + i).to_bytes(8, "little") for i in range(n // 8))


def nbdkit_pattern(offset: int, n: int) -> bytes:
    """What nbdkit's pattern plugin reads: each 8-byte word is its offset, big-endian."""
    start = offset - offset % 8
    words = b"".join(o.to_bytes(8, "big") for o in range(start, offset + n + 8, 8))
    return words[offset - start:offset - start + n]


def nbdinfo(uri: str) -> dict[str, Any]:
    return json.loads(run_peer("nbdinfo", "--json", uri).stdout)


async def check_against_nbdinfo(uri: str, info: dict[str, Any]) -> None:
    """Every flag, the size, protocol, SR, block sizes and contexts agree with nbdinfo's."""
    e = info["exports"][0]
    # nbdinfo --json takes the size from NBD_OPT_INFO, where nbd-server 3.24 says 0
    size = int(run_peer("nbdinfo", "--size", uri).stdout)
    c = await AsyncClient.connect(uri)
    try:
        got = {k: getattr(c, k)() for k in FLAGS}
        assert got == {k: e[k] for k in FLAGS}
        assert c.size == size
        assert c.protocol == info["protocol"]
        assert c.structured == info["structured"]
        if "block_size_minimum" in e:
            assert c.block_size() == (e["block_size_minimum"], e["block_size_preferred"],
                                      e["block_size_maximum"])
        else:
            assert c.export.block_size is None
    finally:
        await c.close()
    if info["protocol"] == "newstyle-fixed":
        o = await AsyncClient.connect(uri, opt_mode=True, meta_contexts=())
        try:
            ctxs = await o.opt_list_meta_context() if o.structured else []
            assert sorted(ctxs) == sorted(e.get("contexts", []))
        finally:
            await o.close()


# --------------------------------------------------------------------------- flags vs nbdinfo


def _image(d: Path, name: str, data: dict[int, bytes], size: int = 1 << 20) -> Path:
    p = d / name
    with open(p, "wb") as f:
        f.truncate(size)
        for off, b in data.items():
            f.seek(off)
            f.write(b)
    return p


SERVERS: dict[str, Callable[[Any, Path], Any]] = {
    "nbdkit-memory": lambda r, d: r.getfixturevalue("nbdkit_server")("memory", "1M"),
    "nbdkit-memory-ro": lambda r, d: r.getfixturevalue("nbdkit_server")("-r", "memory", "1M"),
    "nbdkit-pattern": lambda r, d: r.getfixturevalue("nbdkit_server")("pattern", "1M"),
    "nbdkit-null": lambda r, d: r.getfixturevalue("nbdkit_server")("null", "1M"),
    "nbdkit-file": lambda r, d: r.getfixturevalue("nbdkit_server")(
        "file", _image(d, "f.img", {4096: b"x" * 4096})),
    "nbdkit-blocksize": lambda r, d: r.getfixturevalue("nbdkit_server")(
        "--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=512"),
    "nbdkit-nofua": lambda r, d: r.getfixturevalue("nbdkit_server")(
        "--filter=fua", "--filter=nozero", "memory", "1M"),
    "nbdkit-no-sr": lambda r, d: r.getfixturevalue("nbdkit_server")("--no-sr", "memory", "1M"),
    "qemu-raw": lambda r, d: r.getfixturevalue("qemu_nbd_server")(
        _image(d, "q.img", {65536: b"y" * 65536}), "-f", "raw", "-t"),
    "qemu-qcow2-ro": lambda r, d: r.getfixturevalue("qemu_nbd_server")(
        _qcow2(d), "-f", "qcow2", "-t", "-r", "-A"),
    "nbd-server": lambda r, d: r.getfixturevalue("nbd_server")(
        _image(d, "n.img", {}), export_options={"flush": "true", "fua": "true",
                                                  "trim": "true"}),
    "pynbd-memory": lambda r, d: r.getfixturevalue("pynbd_server")("memory", "1M"),
    "pynbd-file": lambda r, d: r.getfixturevalue("pynbd_server")(
        "file", _image(d, "p.img", {0: b"z" * 512})),
    "pynbd-memory-ro": lambda r, d: r.getfixturevalue("pynbd_server")("-r", "memory", "1M"),
}


def _qcow2(d: Path, bitmap: str | None = None) -> Path:
    img = d / ("b.qcow2" if bitmap else "q.qcow2")
    run_peer("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    if bitmap:
        run_peer("qemu-img", "bitmap", "--add", img, bitmap)
    run_peer("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 64k 64k", img)
    return img


@pytest.mark.parametrize("kind", list(SERVERS))
def test_flags_match_nbdinfo(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    srv = SERVERS[kind](request, tmp_path)
    info = nbdinfo(srv.uri)
    run(check_against_nbdinfo(srv.uri, info))


# --------------------------------------------------------------------------- data paths


async def _many_in_flight(c: AsyncClient, n: int = 256, size: int = 4096) -> None:
    """n writes then n reads all in flight at once (more than max_in_flight), checksummed."""
    blocks = [pattern(size, i) for i in range(n)]
    await asyncio.gather(*(c.pwrite(b, i * size) for i, b in enumerate(blocks)))
    bufs = await asyncio.gather(*(c.pread(size, i * size) for i in range(n)))
    assert hashlib.sha256(b"".join(bufs)).digest() == hashlib.sha256(b"".join(blocks)).digest()
    # reads into one big caller-owned buffer, in odd pieces
    whole = bytearray(n * size)
    mv = memoryview(whole)
    step = 3 * 512
    await asyncio.gather(*(c.pread_into(mv[o:o + step], o) for o in range(0, n * size, step)))
    assert hashlib.sha256(whole).digest() == hashlib.sha256(b"".join(blocks)).digest()


def test_nbdkit_memory_commands(nbdkit_server) -> None:
    srv = nbdkit_server("memory", "2M")

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri)
        try:
            assert c.structured and c.meta_contexts == {1: "base:allocation"} or \
                list(c.meta_contexts.values()) == ["base:allocation"]
            await _many_in_flight(c)
            # FUA write, flush, DF read
            await c.pwrite(b"F" * 4096, 1 << 20, CmdFlag.FUA)
            await c.flush()
            assert await c.pread(4096, 1 << 20, CmdFlag.DF) == b"F" * 4096
            # zero with NO_HOLE, then FAST_ZERO (memory can zero fast)
            await c.zero(1024, (1 << 20) + 512, CmdFlag.NO_HOLE)
            assert await c.pread(2048, 1 << 20) == b"F" * 512 + bytes(1024) + b"F" * 512
            await c.zero(4096, 1 << 20, CmdFlag.FAST_ZERO | CmdFlag.FUA)
            assert await c.pread(4096, 1 << 20) == bytes(4096)
            # trim reads back as zeroes on memory; cache is a hint
            await c.pwrite(b"T" * 65536, 1 << 20)
            await c.trim(65536, 1 << 20)
            assert await c.pread(65536, 1 << 20) == bytes(65536)
            await c.cache(65536, 0)
            # block status: allocated data then a hole; REQ_ONE gives exactly one extent
            bs = await c.block_status(2 << 20, 0)
            ext = bs["base:allocation"]
            assert sum(n for n, _ in ext) >= 256 * 4096 and ext[0][1] == 0
            one = await c.block_status(1 << 20, 512 * 1024, CmdFlag.REQ_ONE)
            assert len(one["base:allocation"]) == 1
            assert one["base:allocation"][0][0] <= 1 << 20
            hole = await c.block_status(65536, (2 << 20) - 65536, CmdFlag.REQ_ONE)
            assert hole["base:allocation"] == [(65536, State.HOLE | State.ZERO)]
        finally:
            await c.close()

    run(go())


def test_nbdkit_pattern_and_null(nbdkit_server) -> None:
    pat = nbdkit_server("pattern", "1M")
    null = nbdkit_server("null", "1M")

    async def go() -> None:
        async with await AsyncClient.connect(pat.uri) as c:
            reads = [(o, n) for o, n in [(0, 512), (13, 77), (65531, 4096), ((1 << 20) - 5, 5)]]
            got = await asyncio.gather(*(c.pread(n, o) for o, n in reads))
            for (o, n), b in zip(reads, got, strict=True):
                assert bytes(b) == nbdkit_pattern(o, n)
            with pytest.raises(CommandError) as ei:
                await c.pwrite(b"x", 0)
            assert ei.value.errno == 1  # EPERM: read-only, refused before the wire
        async with await AsyncClient.connect(null.uri) as c:
            buf = bytearray(b"\xaa" * 65536)
            await c.pread_into(buf, 4096)
            assert buf == bytes(65536)
            await c.pwrite(b"discarded", 0)
            assert await c.pread(9, 0) == bytes(9)

    run(go())


def test_nbdkit_file(nbdkit_server, tmp_path: Path) -> None:
    img = _image(tmp_path, "disk.img", {0: b"hello", 300_000: b"world"})
    srv = nbdkit_server("file", img)

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            assert await c.pread(5, 0) == b"hello"
            assert await c.pread(5, 300_000) == b"world"
            await c.pwrite(b"written by pynbd", 1000, CmdFlag.FUA)
            await c.zero(4096, 8192)
            await c.flush()

    run(go())
    data = img.read_bytes()
    assert data[1000:1016] == b"written by pynbd" and data[8192:12288] == bytes(4096)


# --------------------------------------------------------------------------- qemu-nbd


def test_qemu_raw_holes_and_split_reads(qemu_nbd_server, tmp_path: Path) -> None:
    """qemu sends OFFSET_HOLE chunks and splits reads: holes become zeroes in the caller's
    buffer (pre-filled with garbage), data lands at the right place, nothing else written."""
    data = {65536: pattern(65536, 1), 262144 + 4096: pattern(8192, 2)}
    img = _image(tmp_path, "raw.img", data)
    srv = qemu_nbd_server(img, "-f", "raw")
    expect = bytearray(1 << 20)
    for off, b in data.items():
        expect[off:off + len(b)] = b

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            assert c.structured
            chunks: list[tuple[int, int, int]] = []

            def cb(buf: memoryview, off: int, status: int, err: int) -> None:
                chunks.append((off, len(buf), status))

            whole = bytearray(b"\xee" * ((1 << 20) + 64))
            mv = memoryview(whole)
            await c.pread_into(mv[32:32 + (1 << 20)], 0, chunk_cb=cb)
            assert whole[:32] == b"\xee" * 32 and whole[-32:] == b"\xee" * 32
            assert whole[32:32 + (1 << 20)] == expect
            assert any(s == 2 for _, _, s in chunks), f"no hole chunk: {chunks}"
            assert len(chunks) >= 3, f"read not split: {chunks}"
            # chunks cover the request exactly once
            pos = 0
            for off, n, _ in sorted(chunks):
                assert off == pos
                pos += n
            assert pos == 1 << 20
            # many reads straddling data/hole boundaries, in flight together
            spans = [(o, 12288) for o in range(0, (1 << 20) - 12288, 12288 + 512)]
            bufs = [bytearray(b"\x11" * n) for _, n in spans]
            await asyncio.gather(*(c.pread_into(b, o) for b, (o, _) in zip(bufs, spans,
                                                                             strict=True)))
            for b, (o, n) in zip(bufs, spans, strict=True):
                assert b == expect[o:o + n]
            # a DF read comes back in one chunk
            df: list[tuple[int, int, int]] = []
            got = bytearray(131072)
            await c.pread_into(got, 0, CmdFlag.DF,
                               chunk_cb=lambda b, o, s, e: df.append((o, len(b), s)))
            assert got == expect[:131072] and len(df) == 1
            ext = (await c.block_status(1 << 20, 0))["base:allocation"]
            assert sum(n for n, _ in ext) == 1 << 20

    run(go())


def test_qemu_qcow2_contexts(qemu_nbd_server, tmp_path: Path) -> None:
    """qemu:allocation-depth (-A) and qemu:dirty-bitmap:b0 (-B b0) via opt_set_meta_context."""
    img = _qcow2(tmp_path, bitmap="b0")
    srv = qemu_nbd_server(img, "-f", "qcow2", "-A", "-B", "b0", "-t")
    want = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri, opt_mode=True, meta_contexts=())
        try:
            assert sorted(await c.opt_list_meta_context()) == want
            assert await c.opt_list_meta_context(["qemu:"]) == want[1:]
            info = await c.opt_info()
            assert info.size == 1 << 20
            assert sorted(await c.opt_set_meta_context(want)) == want
            await c.opt_go()
            assert all(c.can_meta_context(n) for n in want)
            bs = await c.block_status(1 << 20, 0)
            assert set(bs) == set(want)
            assert bs["qemu:dirty-bitmap:b0"] == [(65536, 0), (65536, 1), (917504, 0)]
            depth = bs["qemu:allocation-depth"]
            assert depth[0] == (65536, 0) and depth[1] == (65536, 1)
            assert bs["base:allocation"][1] == (65536, 0)
            buf = bytearray(b"\xff" * 196608)
            await c.pread_into(buf, 0)  # unallocated qcow2 clusters read as zeroes
            assert buf == bytes(65536) + b"\x55" * 65536 + bytes(65536)
            one = await c.block_status(1 << 20, 0, CmdFlag.REQ_ONE)
            assert all(len(e) == 1 for e in one.values())
        finally:
            await c.close()
        # asked for at connect time, with one unknown context that the server ignores
        c = await AsyncClient.connect(srv.uri, meta_contexts=["qemu:dirty-bitmap:b0",
                                                              "qemu:dirty-bitmap:nope"])
        try:
            assert list(c.meta_contexts.values()) == ["qemu:dirty-bitmap:b0"]
            bs = await c.block_status(65536, 65536)
            assert bs == {"qemu:dirty-bitmap:b0": [(65536, 1)]}
        finally:
            await c.close()

    run(go())


# --------------------------------------------------------------------------- nbd-server


def test_nbd_server_simple_replies(nbd_server, tmp_path: Path) -> None:
    """nbd-server 3.24 refuses structured replies: simple replies, reads and writes work."""
    img = _image(tmp_path, "nbd.img", {0: b"hello"})
    srv = nbd_server(img, generic={"allowlist": "true"},
                     export_options={"flush": "true", "fua": "true"})

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri)
        try:
            assert c.protocol == "newstyle-fixed"
            assert not c.structured and not c.meta_contexts and not c.can_df()
            assert await c.pread(5, 0) == b"hello"
            await _many_in_flight(c, n=128)
            await c.pwrite(b"fua", 1 << 19, CmdFlag.FUA)
            await c.flush()
            with pytest.raises(CommandError) as ei:
                await c.block_status(4096, 0)
            assert ei.value.errno == 95  # ENOTSUP: no context could be negotiated
            with pytest.raises(CommandError):
                await c.pread(4096, 0, CmdFlag.DF)
        finally:
            await c.close()
        o = await AsyncClient.connect(srv.uri, opt_mode=True)
        try:
            assert [n for n, _ in await o.opt_list()] == ["disk"]
            info = await o.opt_info("disk")
            assert info.eflags & 1 and info.size in (0, 1 << 20)  # 3.24's INFO says size 0
            await o.opt_go("disk")
            assert await o.pread(3, 1 << 19) == b"fua"
        finally:
            await o.close()

    run(go())
    assert img.read_bytes()[1 << 19:(1 << 19) + 3] == b"fua"


# --------------------------------------------------------------------------- negotiation


def test_opt_mode_list_info(nbdkit_server, tmp_path: Path) -> None:
    d = tmp_path / "exports"
    d.mkdir()
    for name, size in [("a", 4096), ("b", 8192), ("c.img", 512)]:
        (d / name).write_bytes(b"q" * size)
    srv = nbdkit_server("file", f"dir={d}")
    listed = json.loads(run_peer("nbdinfo", "--list", "--json", srv.uri).stdout)

    async def go() -> None:
        c = await AsyncClient.connect(srv.uri, opt_mode=True)
        try:
            assert not c.connected
            names = sorted(n for n, _ in await c.opt_list())
            assert names == sorted(e["export-name"] for e in listed["exports"])
            c.full_info = True
            for e in listed["exports"]:
                info = await c.opt_info(e["export-name"])
                assert info.size == e["export-size"]
                assert info.canonical_name in (None, e["export-name"])
            assert await c.opt_list_meta_context(name="b") == ["base:allocation"]
            await c.opt_set_meta_context(["base:allocation"], "b")
            await c.opt_go("b")
            assert c.connected and c.size == 8192 and c.export.name == "b"
            assert await c.pread(8192, 0) == b"q" * 8192
            assert (await c.block_status(8192, 0))["base:allocation"][0][1] == 0
        finally:
            await c.close()
        c = await AsyncClient.connect(srv.uri, opt_mode=True)
        await c.opt_abort()
        assert c.closed

    run(go())


def test_export_name_fallback_and_oldstyle(nbdkit_server) -> None:
    plain = nbdkit_server("--mask-handshake=0", "memory", "1M")
    old = nbdkit_server("-o", "memory", "1M")

    async def go() -> None:
        for srv, proto in [(plain, "newstyle"), (old, "oldstyle")]:
            c = await AsyncClient.connect(unix=srv.sock)
            try:
                assert c.protocol == proto
                assert not c.structured and c.size == 1 << 20 and c.can_flush()
                await _many_in_flight(c, n=64)
                with pytest.raises(CommandError):
                    await c.block_status(512, 0)
            finally:
                await c.close()

    run(go())


# --------------------------------------------------------------------------- started servers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("server", ["nbdkit", "pynbd"])
@pytest.mark.parametrize("how", ["command", "socket_activation"])
def test_started_server_is_reaped(server: str, how: str) -> None:
    if server == "nbdkit":
        argv = [require("nbdkit"), *(["-s"] if how == "command" else []), "memory", "1M"]
    else:
        argv = [sys.executable, "-m", "pynbd", "serve", *(["-s"] if how == "command" else []),
                "memory", "1M"]

    async def go() -> tuple[subprocess.Popen[bytes], int]:
        c = await AsyncClient.connect(**{how: argv})
        proc = c._proc
        assert proc is not None and proc.poll() is None
        await c.pwrite(b"abc" * 1000, 4096)
        assert await c.pread(3000, 4096) == b"abc" * 1000
        assert c.size == 1 << 20
        await c.close()
        return proc, proc.pid

    proc, pid = run(go())
    assert proc.returncode is not None, "child not reaped"
    assert not _alive(pid)
    if how == "command":
        assert proc.returncode == 0  # it exited by itself when we hung up
    else:
        assert proc.returncode in (0, -15)


def test_sync_client_command(tmp_path: Path) -> None:
    """The blocking facade over a command= server: same results, the child reaped."""
    with Client.connect(command=[sys.executable, "-m", "pynbd", "serve", "-s", "memory",
                                 "1M"]) as c:
        proc = c.engine._proc
        c.pwrite(b"sync" * 128, 0)
        assert c.pread(512, 0) == b"sync" * 128
        assert c.size == 1 << 20 and c.can_trim()
    assert proc is not None and proc.returncode == 0


def test_tcp_connect(nbdkit_server) -> None:
    """nbd://host:port: TCP_NODELAY set, data flows, nothing left open after close."""
    import socket

    srv = nbdkit_server("memory", "1M", tcp=True)

    async def go() -> None:
        before = set(os.listdir("/proc/self/fd"))
        c = await AsyncClient.connect(srv.uri)
        try:
            assert c._owner.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await _many_in_flight(c, n=64)
        finally:
            await c.close()
        c = await AsyncClient.connect(host="127.0.0.1", port=srv.port)
        await c.close()
        assert set(os.listdir("/proc/self/fd")) == before

    run(go())
