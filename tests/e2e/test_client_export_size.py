"""Export sizes of 2^63 and more are refused at negotiation by every client path (the
asyncio engine, the blocking connection, pynbd.libnbd and every tool), with one message,
libnbd >= 1.16.5's (CVE-2023-5215): ``server claims size N which does not fit in signed
result``, errno EOVERFLOW. libnbd 1.14 (installed here) does not have the fix: its nbdinfo
prints a negative size for 2^63, and nothing useful for 2^64 - 1.

The sizes reach the client by three ways, each tested: NBD_INFO_EXPORT (GO/INFO), the reply
to NBD_OPT_EXPORT_NAME and the oldstyle greeting.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from fuse_helpers import require_fuse
from helpers import PYNBD, peer_env, run_async, short_tmpdir
from info_helpers import pynbd_info
from raw_server_helpers import PATHS, raw_server

import pynbd.libnbd as nbd
from pynbd.client import AsyncClient
from pynbd.client.blocking import BlockingConnection
from pynbd.protocol.client import ClientHandshake, ExportSizeError
from pynbd.protocol.constants import (
    EXPORT_NAME_REPLY,
    NBDMAGIC,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    TxFlag,
)

HUGE = [(1 << 64) - 1, 1 << 63]
LARGEST = (1 << 63) - 1


def message(size: int) -> str:
    return f"server claims size {size} which does not fit in signed result"


def feed(hs: ClientHandshake, data: bytes) -> object:
    """Feed one byte at a time; the first event."""
    for b in data:
        hs.receive_data(bytes([b]))
        ev = hs.next_event()
        if ev is not None and type(ev).__name__ != "NeedData":
            return ev
    raise AssertionError("no event")


# ------------------------------------------------------------------------- the sans-IO core


@pytest.mark.parametrize("size", [*HUGE, LARGEST])
def test_handshake_oldstyle_greeting(size: int) -> None:
    data = OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, TxFlag.HAS_FLAGS)
    hs = ClientHandshake()
    if size > LARGEST:
        with pytest.raises(ExportSizeError, match=message(size)) as ei:
            feed(hs, data)
        assert ei.value.errno == errno.EOVERFLOW
    else:
        assert feed(hs, data).size == size  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [*HUGE, LARGEST])
def test_handshake_export_name_reply(size: int) -> None:
    hs = ClientHandshake()
    feed(hs, NBDMAGIC.to_bytes(8, "big") + (0x49484156454F5054).to_bytes(8, "big") + b"\0\3")
    hs.client_flags()
    hs.export_name("")
    reply = EXPORT_NAME_REPLY.pack(size, TxFlag.HAS_FLAGS)
    if size > LARGEST:
        with pytest.raises(ExportSizeError, match=message(size)):
            feed(hs, reply)
    else:
        assert feed(hs, reply).size == size  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- the libraries


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", HUGE)
def test_async_client_refuses(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        async def go() -> None:
            with pytest.raises(ExportSizeError, match=message(size)) as ei:
                await AsyncClient.connect(unix=srv.sock, timeout=10)
            assert ei.value.errno == errno.EOVERFLOW

        run_async(go(), 20)
        assert srv.commands == [], "the client sent commands"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", HUGE)
def test_blocking_connection_refuses(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        with pytest.raises(ExportSizeError, match=message(size)):
            BlockingConnection.connect(srv.uri, structured=False)
        assert srv.commands == []


@pytest.mark.parametrize("path", PATHS)
def test_largest_size_accepted(path: str) -> None:
    """2^63 - 1 is a size like any other: every client connects and reads at its end."""
    with raw_server(LARGEST, path) as srv:
        async def go() -> None:
            async with await AsyncClient.connect(unix=srv.sock, timeout=10) as c:
                assert c.size == LARGEST
                assert await c.pread(512, LARGEST - 512) == bytes(512)

        run_async(go(), 20)
        b = BlockingConnection.connect(srv.uri, structured=False)
        try:
            assert b.size == LARGEST
            buf = memoryview(bytearray(b"x" * 512))
            b.pread_into(buf, LARGEST - 512)
            assert buf == bytes(512)
        finally:
            b.close()
        h = nbd.NBD()
        try:
            h.connect_uri(srv.uri)
            assert h.get_size() == LARGEST
            assert h.pread(512, LARGEST - 512) == bytes(512)
        finally:
            h.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", HUGE)
def test_libnbd_connect_refuses(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        h = nbd.NBD()
        try:
            with pytest.raises(nbd.Error) as ei:
                h.connect_uri(srv.uri)
            assert ei.value.errnum == errno.EOVERFLOW
            assert ei.value.string.startswith(f"nbd_connect_uri: {message(size)}")
            assert h.aio_is_dead()
            with pytest.raises(nbd.Error):
                h.get_size()
        finally:
            h.close()
        assert srv.commands == []


@pytest.mark.parametrize("size", HUGE)
def test_libnbd_opt_info_refuses_and_negotiation_goes_on(size: int) -> None:
    """In option mode, NBD_OPT_INFO's size is refused but the connection stays in
    negotiation (the server's replies were well-formed); NBD_OPT_GO's is fatal."""
    with raw_server(size, "go") as srv:
        h = nbd.NBD()
        try:
            h.set_opt_mode(True)
            h.connect_uri(srv.uri)
            with pytest.raises(nbd.Error) as ei:
                h.opt_info()
            assert ei.value.errnum == errno.EOVERFLOW
            assert ei.value.string.startswith(f"nbd_opt_info: {message(size)}")
            assert h.aio_is_negotiating()
            with pytest.raises(nbd.Error, match="nbd_get_size: server has not returned"):
                h.get_size()
            with pytest.raises(nbd.Error) as ei:
                h.opt_go()
            assert ei.value.errnum == errno.EOVERFLOW
            assert h.aio_is_dead()
        finally:
            h.close()


# ------------------------------------------------------------------------- the tools

CASES = [(path, size) for path in ("go", "export-name") for size in HUGE]
IDS = [f"{p}-{s}" for p, s in CASES]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYNBD, *args], check=False, capture_output=True, text=True,
                          timeout=60, env=peer_env(), stdin=subprocess.DEVNULL)


def refused(cp: subprocess.CompletedProcess[str], size: int, prog: str) -> None:
    """Exit status 1, one error naming the size, no traceback, no size on stdout."""
    assert cp.returncode == 1, cp
    assert message(size) in cp.stderr, cp.stderr
    assert cp.stderr.startswith(f"pynbd {prog}: "), cp.stderr
    assert "Traceback" not in cp.stderr
    assert str(size) not in cp.stdout


@pytest.mark.parametrize(("path", "size"), CASES, ids=IDS)
def test_info_refuses(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        for args in ([srv.uri], ["--size", srv.uri], ["--json", srv.uri]):
            r = pynbd_info(*args)
            assert r.rc == 1 and message(size) in r.err, (args, r)
            assert str(size) not in r.out and "Traceback" not in r.err


@pytest.mark.parametrize(("path", "size"), CASES, ids=IDS)
def test_copy_refuses(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        refused(run_tool("copy", srv.uri, "-"), size, "copy")
        refused(run_tool("copy", "-C", "4", srv.uri, "null:"), size, "copy")


@pytest.mark.parametrize(("path", "size"), CASES, ids=IDS)
def test_dump_and_sh_refuse(path: str, size: int) -> None:
    with raw_server(size, path) as srv:
        refused(run_tool("dump", srv.uri), size, "dump")
        refused(run_tool("sh", "-u", srv.uri, "-c", "print(h.get_size())"), size, "sh")


@pytest.mark.parametrize(("path", "size"), CASES, ids=IDS)
def test_fuse_refuses(path: str, size: int) -> None:
    require_fuse()
    mnt = short_tmpdir("pynbd-size-")
    try:
        with raw_server(size, path) as srv:
            for extra in ([], ["-C", "1"]):
                refused(run_tool("fuse", *extra, str(mnt), srv.uri), size, "fuse")
        assert os.listdir(mnt) == []
    finally:
        os.rmdir(mnt)
