"""The nbd plugin (a proxy) side by side with nbdkit's, in front of real servers: nbdkit,
qemu-nbd (also started by command=) and nbd-server. Both proxies reach the same server and
libnbd's Python bindings drive them with the same operations: size, every flag, data,
extents, write zeroes (fast or not), trim, flush and the server's errors must match."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import PYNBD, Server, peer_env, require, run_peer, unix_uri
from side_by_side import assert_same, assert_views_equal, probe, serve_both

from pynbd.client.engine import AsyncClient
from pynbd.errors import NBDError

MIB = 1 << 20
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def image(tmp_path: Path, size: int = 4 * MIB) -> Path:
    """A sparse image with data at 0, 1M and the last 4k (holes in between)."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(size)
        for off in (0, MIB, size - 4096):
            f.seek(off)
            f.write(pattern(65536 if off < size - 4096 else 4096, off // MIB))
    return p


#: Operations whose outcome does not depend on whether the other proxy ran them first.
OPS = [
    ("size",), ("pread", 8192, 0), ("pread", 4096, MIB - 2048), ("pread", 512, 4 * MIB - 512),
    ("extents", 4 * MIB, 0), ("extents", 4 * MIB, 0, REQ_ONE), ("extents", 4 * MIB - 4096, 4096),
    ("pwrite", pattern(4096, 9), 2 * MIB), ("pwrite", pattern(512, 3), 3 * MIB, FUA),
    ("pread", 8192, 2 * MIB - 4096), ("zero", 65536, 5 * 65536),
    ("zero", 4096, 6 * 65536, NO_HOLE), ("zero", 4096, 7 * 65536, FAST_ZERO),
    ("zero", 4096, 8 * 65536, FUA), ("trim", 4096, 9 * 65536), ("flush",),
    ("cache", 4096, 0), ("pread", 4096, 4 * MIB), ("pwrite", b"x" * 512, 4 * MIB - 256),
    ("pread", 65536 * 4, 5 * 65536),
]


def through_both(pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server],
                 backend: Callable[[], Server], params: Callable[[Server], list[str]],
                 ops: list[Any], **kw: Any) -> dict[str, Any]:
    """Each proxy in front of its own fresh backend (writes cannot leak from one run into
    the other); the two views must be the same. Returns pynbd's."""
    got = probe(pynbd_server("nbd", *params(backend())).uri, ops, **kw)
    want = probe(nbdkit_server("nbd", *params(backend())).uri, ops, **kw)
    assert_views_equal(got, want, "nbd proxy")
    return got


def memory_backend(nbdkit_server: Callable[..., Server], tcp: bool = False) -> Server:
    """nbdkit memory with data, a zeroed megabyte and holes."""
    back = nbdkit_server("memory", "4M", tcp=tcp)
    run_peer("nbdcopy", "--", "[", "nbdkit", "pattern", "4M", "]", back.uri)
    run_peer("nbdsh", "-u", back.uri, "-c", f"h.zero({MIB}, {2 * MIB})")
    return back


def test_in_front_of_nbdkit_memory(pynbd_server, nbdkit_server):
    """nbdkit's memory plugin (holes, zeroes, fast zero, trim, multi-conn, cache) behind
    both proxies, over a Unix socket, over TCP and by URI."""
    got = through_both(pynbd_server, nbdkit_server, lambda: memory_backend(nbdkit_server),
                       lambda b: [f"socket={b.sock}"], OPS)
    assert got["flags"]["can_multi_conn"] is True and got["flags"]["can_fast_zero"] is True
    assert got["results"][4][1] == [2 * MIB, 0, MIB, 3, MIB, 0]
    through_both(pynbd_server, nbdkit_server, lambda: memory_backend(nbdkit_server, True),
                 lambda b: ["hostname=127.0.0.1", f"port={b.port}"], OPS)
    through_both(pynbd_server, nbdkit_server, lambda: memory_backend(nbdkit_server),
                 lambda b: [b.uri], OPS)


def test_in_front_of_nbdkit_errors(pynbd_server, nbdkit_server):
    """The server's errors reach the client unchanged (nbdkit's error filter: EPERM,
    ENOSPC; the full plugin: ENOSPC on write; read-only: EPERM)."""
    back = nbdkit_server("--filter=error", "memory", "1M", "error=ENOSPC",
                         "error-pwrite-rate=1", "error-trim=EPERM", "error-trim-rate=1")
    got = assert_same(pynbd_server, nbdkit_server, ["nbd", f"socket={back.sock}"],
                      ops=[("pread", 4096, 0), ("pwrite", b"a" * 512, 0), ("trim", 512, 0)])
    assert got["results"][1] == ["error", 28] and got["results"][2] == ["error", 1]
    ro = nbdkit_server("-r", "memory", "1M")
    got = assert_same(pynbd_server, nbdkit_server, ["nbd", f"socket={ro.sock}"],
                      ops=[("pread", 512, 0), ("pwrite", b"a" * 512, 0)])
    assert got["flags"]["is_read_only"] is True


def test_in_front_of_qemu_nbd(pynbd_server, nbdkit_server, qemu_nbd_server, tmp_path):
    """qemu-nbd: structured replies, block status of a sparse file, and the whole disk
    copied byte for byte by nbdcopy through the proxy."""
    img = image(tmp_path)
    q = qemu_nbd_server(img, "-f", "raw", "--persistent", "--shared=4")
    got = assert_same(pynbd_server, nbdkit_server, ["nbd", f"socket={q.sock}"], ops=OPS[:7])
    assert got["results"][4][1][:4] == [65536, 0, MIB - 65536, 3]
    p = pynbd_server("-r", "nbd", f"socket={q.sock}")
    out = tmp_path / "copy.img"
    run_peer("nbdcopy", p.uri, out)
    assert out.read_bytes() == img.read_bytes()


def test_command_starts_qemu_nbd(pynbd_server, nbdkit_server, tmp_path):
    """command= with arg= runs qemu-nbd by socket activation (a shared connection); it is
    stopped when the server exits."""
    require("qemu-nbd")
    img = image(tmp_path)
    args = ["nbd", "command=qemu-nbd", "arg=-f", "arg=raw", f"arg={img}"]
    p, n = serve_both(pynbd_server, nbdkit_server, ["-r", *args])
    assert_views_equal(probe(p.uri, OPS[:7]), probe(n.uri, OPS[:7]), "command=qemu-nbd")
    # Two clients share the one connection.
    assert probe(p.uri, [("pread", 512, MIB)])["results"][0][1] == pattern(512, 1)
    p.stop()
    n.stop()
    ps = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{img}"], capture_output=True, text=True,
                        check=False)
    assert ps.stdout.strip() == "", "qemu-nbd was left running"


def test_in_front_of_nbd_server(pynbd_server, nbdkit_server, nbd_server, tmp_path):
    """nbd-server (no structured replies, no block status): the proxy gives its client
    structured replies anyway and reports the data as such; the bytes are the file's."""
    img = image(tmp_path)
    srv = nbd_server(img, export="disk")
    args = ["nbd", f"socket={srv.sock}", "export=disk"]
    got = assert_same(pynbd_server, nbdkit_server, args, ops=OPS[:7] + [("flush",)])
    assert got["structured"] is True
    assert got["results"][4][1] == [4 * MIB, 0]  # all data: nbd-server has no block status
    p = pynbd_server("-r", *args)
    out = tmp_path / "copy.img"
    run_peer("nbdcopy", p.uri, out)
    assert out.read_bytes() == img.read_bytes()


def test_no_structured_replies_to_the_client(pynbd_server, nbdkit_server):
    back = nbdkit_server("pattern", "1M")
    assert_same(pynbd_server, nbdkit_server, ["nbd", f"socket={back.sock}"],
                ops=[("pread", 4096, 4096)], no_sr=True)


def test_dynamic_export(pynbd_server, nbdkit_server, tmp_path):
    """dynamic-export=true passes the client's export name through, and lists the server's
    exports; without it every client gets export= (or the URI's)."""
    d = tmp_path / "exports"
    d.mkdir()
    (d / "a").write_bytes(pattern(65536, 1))
    (d / "b").write_bytes(pattern(131072, 2))
    back = nbdkit_server("file", f"dir={d}")
    dyn = pynbd_server("nbd", f"socket={back.sock}", "dynamic-export=true")
    ref = nbdkit_server("nbd", f"socket={back.sock}", "dynamic-export=true")
    for export in ("a", "b"):
        got = probe(unix_uri(dyn.sock, export), [("pread", 4096, 0)])
        want = probe(unix_uri(ref.sock, export), [("pread", 4096, 0)])
        assert_views_equal(got, want, f"export {export}")
        assert got["size"] == (65536 if export == "a" else 131072)
    listed = run_peer("nbdinfo", "--list", "--json", dyn.uri).stdout
    assert b'"export-name": "a"' in listed and b'"export-name": "b"' in listed
    fixed = pynbd_server("nbd", f"socket={back.sock}", "export=b")
    assert probe(unix_uri(fixed.sock, "anything"), [("size",)])["size"] == 131072
    uri = f"nbd+unix:///a?socket={back.sock}"
    assert probe(pynbd_server("nbd", uri).uri, [("size",)])["size"] == 65536


def test_shared_connection(pynbd_server, nbdkit_server):
    """shared=true: one connection to the server for every client (nbdkit's limit filter
    would refuse a second one if the proxy opened two)."""
    back = nbdkit_server("--filter=limit", "memory", "1M", "limit=1")
    p = pynbd_server("nbd", f"socket={back.sock}", "shared=true")
    for i in range(3):
        r = probe(p.uri, [("pwrite", bytes([i]) * 512, i * 512), ("pread", 512 * 3, 0)])
        assert r["results"][1][1][: 512 * (i + 1)] == b"".join(bytes([j]) * 512
                                                               for j in range(i + 1))
    p.stop()  # its one connection ends, so nbdkit can exit


def test_socket_fd(tmp_path, sockdir):
    """socket-fd=FD: a connected socket inherited from the parent."""
    require("nbdkit")
    import socket as s

    back_sock = sockdir / "back.sock"
    back = subprocess.Popen([require("nbdkit"), "-f", "-U", str(back_sock), "pattern", "1M"],
                            stdin=subprocess.DEVNULL)
    try:
        from helpers import wait_listening

        wait_listening(sock=back_sock, proc=back)  # type: ignore[arg-type]
        c = s.socket(s.AF_UNIX)
        c.connect(str(back_sock))
        front = sockdir / "front.sock"
        srv = subprocess.Popen([*PYNBD, "serve", "-f", "-U", str(front), "nbd",
                                f"socket-fd={c.fileno()}"], pass_fds=[c.fileno()],
                               stdin=subprocess.DEVNULL, env=peer_env())
        c.close()
        try:
            wait_listening(sock=front, proc=srv)  # type: ignore[arg-type]
            r = probe(f"nbd+unix:///?socket={front}", [("pread", 16, 8)])
            assert r["results"][0][1] == (8).to_bytes(8, "big") + (16).to_bytes(8, "big")
        finally:
            srv.terminate()
            srv.wait(10)
    finally:
        back.terminate()
        back.wait(10)


BAD = [
    [],
    ["socket=/x", "hostname=h"],
    ["uri=nbd://x", "command=foo"],
    ["socket=/x", "port=10"],
    ["socket=/x", "retry=abc"],
    ["socket=/x", "retry=-1"],
    ["socket=/x", "shared=maybe"],
    ["socket-fd=abc"],
    ["socket-fd=-3"],
    ["vsock=abc"],
    ["socket=/x", "dynamic-export=true", "export=a"],
    ["socket=/x", "dynamic-export=true", "shared=true"],
    ["socket=/x", "bogus=1"],
    ["socket=/" + "x" * 120],
]


@pytest.mark.parametrize("params", BAD, ids=[" ".join(p) or "none" for p in BAD])
def test_bad_parameters(params, sockdir):
    """One line, nbdkit's message, exit 1."""
    run = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        cp = subprocess.run([*cmd, "-U", str(sockdir / "x.sock"), "nbd", *params, "--run",
                             "true"], capture_output=True, text=True, env=peer_env(),
                            stdin=subprocess.DEVNULL, timeout=60, check=False)
        run.append(cp)
    p, n = run
    assert n.returncode == 1 and p.returncode == 1, (p.stderr, n.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.split("error: ", 1)[1] == n.stderr.split("error: ", 1)[1]


def test_unreachable_server_is_logged(pynbd_server, sockdir):
    """A server that is not there: the client's open fails, the log says why (one line)."""
    p = pynbd_server("nbd", f"socket={sockdir / 'nothing.sock'}", "retry=1")
    r = probe(p.uri)
    assert "connect_error" in r
    assert "nbd_connect_unix: connect: No such file or directory" in p.stderr
    assert "Traceback" not in p.stderr


def test_read_errors_and_many_reads_in_flight(pynbd_server, nbdkit_server):
    """READs go to the server many at once (the loop's fast path): a failing read is that
    read's error, the others get their data."""
    errs = nbdkit_server("--filter=error", "memory", "1M", "error-pread=EPERM",
                         "error-pread-rate=1")
    got = assert_same(pynbd_server, nbdkit_server, ["nbd", f"socket={errs.sock}"],
                      ops=[("pread", 4096, 0), ("pread", 512, 8192)])
    assert got["results"][0] == ["error", 1]
    pat = nbdkit_server("pattern", "4M")
    srv = pynbd_server("nbd", f"socket={pat.sock}")

    async def many() -> list[bytearray]:
        async with await AsyncClient.connect(srv.uri) as c:
            return list(await asyncio.gather(*(c.pread(4096, i * 65536) for i in range(64))))

    for i, data in enumerate(asyncio.run(many())):
        assert data == b"".join((i * 65536 + k * 8).to_bytes(8, "big") for k in range(512))


def test_server_gone_with_reads_in_flight(pynbd_server, nbdkit_server):
    """The server behind the proxy dies: the client's requests fail (no hang, no
    traceback)."""
    back = nbdkit_server("memory", "1M")
    srv = pynbd_server("nbd", f"socket={back.sock}")

    async def go() -> None:
        async with await AsyncClient.connect(srv.uri) as c:
            assert await c.pread(512, 0) == bytes(512)
            back.kill()
            with pytest.raises((NBDError, OSError)):
                await asyncio.gather(*(c.pread(512, i * 512) for i in range(8)))

    asyncio.run(asyncio.wait_for(go(), 30))
    assert "Traceback" not in srv.stderr
