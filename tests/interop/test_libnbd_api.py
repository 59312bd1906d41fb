"""libnbd's Python bindings (Debian's python3-libnbd) against `pynbd serve`.

Each script runs under /usr/bin/python3 (helpers.run_libnbd); `sys.argv[1]` is the URI.
Scripts print JSON or nothing and assert inside, so a failure shows the script and the
traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONNECT = (
    "import nbd, sys, json, errno\nh = nbd.NBD()\n"
    "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_uri(sys.argv[1])\n"
)


def test_connect_uri_read_write(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    out = libnbd(
        CONNECT
        + "h.pwrite(b'hello world', 1000)\n"
        "print(json.dumps([h.get_size(), h.pread(11, 1000).decode(),\n"
        "                  h.get_export_name() if hasattr(h, 'get_export_name') else '',\n"
        "                  h.get_protocol(), h.get_structured_replies_negotiated()]))\n"
        "h.shutdown()\n",
        srv.uri,
    ).stdout
    assert json.loads(out) == [1 << 20, "hello world", "", "newstyle-fixed", True]


def test_aio_many_in_flight(pynbd_server, libnbd) -> None:
    """64 x 64 KiB writes then 64 x 64 KiB reads all in flight at once, data checked."""
    srv = pynbd_server("memory", "8M")
    libnbd(
        CONNECT
        + "N, SZ = 64, 65536\n"
        "def pat(i):\n"
        "    return bytes([(i * 7 + j) & 255 for j in range(256)]) * (SZ // 256)\n"
        "cookies = []\n"
        "for i in range(N):\n"
        "    buf = nbd.Buffer.from_bytearray(bytearray(pat(i)))\n"
        "    cookies.append(h.aio_pwrite(buf, i * SZ))\n"
        "assert h.aio_in_flight() > 1\n"
        "while h.aio_in_flight() > 0:\n"
        "    h.poll(-1)\n"
        "for c in cookies:\n"
        "    assert h.aio_command_completed(c)\n"
        "bufs, cookies = [], []\n"
        "for i in range(N):\n"
        "    b = nbd.Buffer(SZ)\n"
        "    bufs.append(b)\n"
        "    cookies.append(h.aio_pread(b, i * SZ))\n"
        "pending = set(cookies)\n"
        "while pending:\n"
        "    h.poll(-1)\n"
        "    for c in list(pending):\n"
        "        if h.aio_command_completed(c):\n"
        "            pending.discard(c)\n"
        "for i, b in enumerate(bufs):\n"
        "    assert bytes(b.to_bytearray()) == pat(i), i\n"
        "# completion callbacks too\n"
        "done = []\n"
        "def cb(i, err):\n"
        "    assert err.value == 0\n"
        "    done.append(i)\n"
        "    return 1\n"
        "bufs = [nbd.Buffer(4096) for _ in range(128)]\n"
        "for i, b in enumerate(bufs):\n"
        "    h.aio_pread(b, (i * 4096 * 13) % (8 << 20), lambda err, i=i: cb(i, err))\n"
        "while h.aio_in_flight() > 0:\n"
        "    h.poll(-1)\n"
        "assert sorted(done) == list(range(128))\n"
        "h.shutdown()\n",
        srv.uri,
        timeout=120,
    )


def test_block_status_holes_after_trim_and_zero(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    out = libnbd(
        CONNECT
        + "assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
        "h.pwrite(b'\\xaa' * (1 << 20), 0)\n"
        "h.trim(131072, 65536)\n"
        "h.zero(65536, 524288)\n"
        "def extents(offset, count, flags=0):\n"
        "    got = []\n"
        "    def cb(ctx, off, entries, err):\n"
        "        assert ctx == nbd.CONTEXT_BASE_ALLOCATION\n"
        "        got.append((off, list(entries)))\n"
        "        return 0\n"
        "    h.block_status(count, offset, cb, flags)\n"
        "    (off, entries), = got\n"
        "    out, pos = [], off\n"
        "    for i in range(0, len(entries), 2):\n"
        "        out.append((pos, entries[i], entries[i + 1]))\n"
        "        pos += entries[i]\n"
        "    return out\n"
        "full = extents(0, 1 << 20)\n"
        "one = extents(65536, (1 << 20) - 65536, nbd.CMD_FLAG_REQ_ONE)\n"
        "print(json.dumps({'full': full, 'one': one}))\n",
        srv.uri,
    ).stdout
    res = json.loads(out)
    full = [tuple(e) for e in res["full"]]
    # Coverage: contiguous from 0 (may stop early: a server may return fewer extents).
    pos = 0
    for off, length, _ in full:
        assert off == pos and length > 0
        pos += length
    def state(at: int) -> int:
        return next(t for o, n, t in full if o <= at < o + n)
    assert state(0) == 0
    assert state(65536) & 3 == 3 and state(65536 + 131071) & 3 == 3  # trimmed: hole,zero
    assert state(196608) == 0
    assert state(524288) & 2 and state(524288 + 65535) & 2  # zeroed: zero (maybe hole)
    assert state(589824) == 0
    (one,) = res["one"]  # REQ_ONE: exactly one extent, starting at the offset
    assert one[0] == 65536 and one[2] & 3 == 3 and 0 < one[1] <= 131072


def test_block_status_pattern_and_null(pynbd_server, libnbd) -> None:
    script = (
        CONNECT
        + "got = []\n"
        "h.block_status(65536, 4096, lambda c, o, e, err: got.extend(e) or 0)\n"
        "print(json.dumps(got))\n"
    )
    e = json.loads(libnbd(script, pynbd_server("pattern", "1M").uri).stdout)
    assert e[1] == 0 and sum(e[0::2]) >= 65536
    e = json.loads(libnbd(script, pynbd_server("null", "1M").uri).stdout)
    assert e[1] & 2 and sum(e[0::2]) >= 65536


def test_opt_list_file_dir(pynbd_server, libnbd, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for name, size in (("one.img", 4096), ("two.img", 8192), ("three", 512)):
        (d / name).write_bytes(b"\x11" * size)
    srv = pynbd_server("file", f"dir={d}")
    out = libnbd(
        "import nbd, sys, json\n"
        "h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])\n"
        "names = []\n"
        "n = h.opt_list(lambda name, desc: names.append(name) or 0)\n"
        "assert n == len(names)\n"
        "sizes = {}\n"
        "for name in names:\n"
        "    h.set_export_name(name); h.opt_info(); sizes[name] = h.get_size()\n"
        "h.set_export_name('two.img'); h.opt_go()\n"
        "assert h.pread(4, 4096) == b'\\x11' * 4\n"
        "print(json.dumps(sizes))\n",
        srv.uri,
    ).stdout
    assert json.loads(out) == {"one.img": 4096, "two.img": 8192, "three": 512}


def test_pread_structured_chunks(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    out = libnbd(
        CONNECT
        + "h.pwrite(b'D' * 4096, 8192)\n"
        "chunks = []\n"
        "def chunk(buf, offset, status, err):\n"
        "    chunks.append((offset, len(buf), status, bytes(buf[:1]).hex()))\n"
        "    return 0\n"
        "data = h.pread_structured(32768, 0, chunk)\n"
        "assert bytes(data[8192:12288]) == b'D' * 4096\n"
        "assert bytes(data[:8192]) == bytes(8192) and bytes(data[12288:]) == bytes(20480)\n"
        "df = []\n"
        "h.pread_structured(32768, 0, lambda b, o, s, e: df.append((o, len(b), s)) or 0,\n"
        "                   nbd.CMD_FLAG_DF)\n"
        "print(json.dumps({'chunks': chunks, 'df': df}))\n",
        srv.uri,
    ).stdout
    res = json.loads(out)
    covered = sorted((o, n) for o, n, *_ in res["chunks"])
    pos = 0
    for o, n in covered:
        assert o == pos
        pos += n
    assert pos == 32768
    for o, n, status, _ in res["chunks"]:
        assert status in (1, 2)  # READ_DATA or READ_HOLE
    assert len(res["df"]) == 1 and res["df"][0][:2] == [0, 32768]  # DF: one chunk


def test_every_command_and_flag(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "4M")
    libnbd(
        CONNECT
        + "F = nbd\n"
        "assert h.can_flush() and h.can_trim() and h.can_zero() and h.can_fua()\n"
        "h.pwrite(b'\\x5a' * 65536, 0, F.CMD_FLAG_FUA)\n"
        "h.flush()\n"
        "got = h.pread_structured(65536, 0, lambda *a: 0, F.CMD_FLAG_DF)\n"
        "assert bytes(got) == b'\\x5a' * 65536\n"
        "h.zero(4096, 0, F.CMD_FLAG_NO_HOLE)\n"
        "assert h.pread(4096, 0) == bytes(4096)\n"
        "h.zero(4096, 4096, F.CMD_FLAG_FUA)\n"
        "assert h.pread(8192, 0) == bytes(8192)\n"
        "if h.can_fast_zero():\n"
        "    try:\n"
        "        h.zero(4096, 8192, F.CMD_FLAG_FAST_ZERO)\n"
        "        assert h.pread(4096, 8192) == bytes(4096)\n"
        "    except nbd.Error as e:\n"
        "        assert e.errno == 'ENOTSUP', e\n"
        "h.trim(4096, 12288)\n"
        "h.trim(4096, 16384, F.CMD_FLAG_FUA)\n"
        "assert h.pread(4096, 12288) == bytes(4096)\n"
        "if h.can_cache():\n"
        "    h.cache(65536, 0)\n"
        "assert h.pread(4096, (4 << 20) - 4096) == bytes(4096)\n"
        "h.pwrite(b'end', (4 << 20) - 3, F.CMD_FLAG_FUA)\n"
        "assert h.pread(3, (4 << 20) - 3) == b'end'\n"
        "h.flush()\n"
        "h.shutdown()\n",
        srv.uri,
    )


CAN_SCRIPT = (
    CONNECT
    + "names = ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua',\n"
    "         'can_multi_conn', 'can_trim', 'can_zero', 'is_read_only', 'is_rotational']\n"
    "d = {n: bool(getattr(h, n)()) for n in names}\n"
    "d['base:allocation'] = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))\n"
    "d['size'] = h.get_size()\n"
    "print(json.dumps(d))\n"
)


@pytest.mark.parametrize(
    "args",
    [("memory", "1M"), ("null", "1M"), ("pattern", "1M"), ("-r", "memory", "1M"),
     ("full", "1M"), ("zero",)],
    ids=lambda a: " ".join(a),
)
def test_can_getters_match_plugin(pynbd_server, libnbd, args: tuple[str, ...]) -> None:
    """What libnbd sees is what the plugin class says (after the core's rules)."""
    from pynbd.plugin import CacheMode, FuaMode
    from pynbd.server.backend import Chain
    from pynbd.server.main import apply_params, load_plugin

    ro = args[0] == "-r"
    name, params = (args[1], list(args[2:])) if ro else (args[0], list(args[1:]))
    cls = load_plugin(name)
    plugin = cls()
    chain = Chain(plugin, [])
    apply_params(chain, cls, params)
    chain.config_complete()
    chain.get_ready()
    h = plugin.open(ro, "", False)
    writable = not ro and bool(plugin.can_write(h))
    want = {
        "is_read_only": not writable,
        "can_flush": bool(plugin.can_flush(h)),
        "can_trim": writable and bool(plugin.can_trim(h)),
        "can_fua": writable and FuaMode(plugin.can_fua(h)) != FuaMode.NONE,
        "can_multi_conn": bool(plugin.can_multi_conn(h)),
        "is_rotational": bool(plugin.is_rotational(h)),
        "can_df": True,
        "base:allocation": True,
        "size": plugin.get_size(h),
    }
    if CacheMode(plugin.can_cache(h)) != CacheMode.NONE:
        want["can_cache"] = True
    srv = pynbd_server(*args)
    got = json.loads(libnbd(CAN_SCRIPT, srv.uri).stdout)
    assert {k: got[k] for k in want} == want
    if not writable:
        assert got["can_zero"] is False and got["can_fast_zero"] is False


def test_can_getters_same_as_nbdkit(pynbd_server, nbdkit_server, libnbd, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    for args in (("memory", "1M"), ("null", "1M"), ("pattern", "1M"), ("-r", "memory", "1M"),
                 ("file", str(disk)), ("full", "1M")):
        ours = json.loads(libnbd(CAN_SCRIPT, pynbd_server(*args).uri).stdout)
        theirs = json.loads(libnbd(CAN_SCRIPT, nbdkit_server(*args).uri).stdout)
        assert ours == theirs, args


ERRNO_SCRIPT = (
    CONNECT
    + "h.set_strict_mode(0)\n"
    "size = h.get_size()\n"
    "def err(f, *a):\n"
    "    try:\n"
    "        f(*a)\n"
    "    except nbd.Error as e:\n"
    "        return e.errno\n"
    "    return 'ok'\n"
    "res = {\n"
    " 'read_past_end': err(h.pread, 4096, size - 512),\n"
    " 'read_beyond': err(h.pread, 512, size + 4096),\n"
    " 'write_past_end': err(h.pwrite, b'x' * 4096, size - 512),\n"
    " 'zero_past_end': err(h.zero, 4096, size - 512),\n"
    " 'trim_past_end': err(h.trim, 4096, size - 512),\n"
    " 'cache_past_end': err(h.cache, 4096, size - 512),\n"
    " 'bs_past_end': err(h.block_status, 4096, size + 512, lambda *a: 0),\n"
    " 'read_zero_len': err(h.pread, 0, 0),\n"
    " 'write_zero_len': err(h.pwrite, b'', 0),\n"
    " 'zero_zero_len': err(h.zero, 0, 0),\n"
    " 'trim_zero_len': err(h.trim, 0, 0),\n"
    " 'bs_zero_len': err(h.block_status, 0, 0, lambda *a: 0),\n"
    " 'read_bad_flag': err(h.pread, 512, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE),\n"
    " 'write_req_one': err(h.pwrite, b'x', 0, nbd.CMD_FLAG_REQ_ONE),\n"
    "}\n"
    "# The connection still works after every refusal.\n"
    "h.pwrite(b'alive', 0)\n"
    "assert h.pread(5, 0) == b'alive'\n"
    "print(json.dumps(res))\n"
)


def test_strict_mode_off_errors(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    res = json.loads(libnbd(ERRNO_SCRIPT, srv.uri).stdout)
    assert res["read_past_end"] == "EINVAL"
    assert res["read_beyond"] == "EINVAL"
    assert res["write_past_end"] == "ENOSPC"
    assert res["zero_past_end"] == "ENOSPC"
    assert res["trim_past_end"] == "EINVAL"
    assert res["cache_past_end"] == "EINVAL"
    assert res["bs_past_end"] == "EINVAL"
    assert res["bs_zero_len"] == "EINVAL"
    for k in ("read_zero_len", "write_zero_len", "zero_zero_len", "trim_zero_len"):
        assert res[k] in ("ok", "EINVAL"), k
    assert res["read_bad_flag"] == "EINVAL"
    assert res["write_req_one"] == "EINVAL"


def test_strict_mode_off_same_as_nbdkit(pynbd_server, nbdkit_server, libnbd) -> None:
    ours = json.loads(libnbd(ERRNO_SCRIPT, pynbd_server("memory", "1M").uri).stdout)
    theirs = json.loads(libnbd(ERRNO_SCRIPT, nbdkit_server("memory", "1M").uri).stdout)
    # pynbd documents its zero-length policy (ok for data commands; nbdkit says EINVAL for
    # some); compare everything else.
    for k in ours:
        if "zero_len" not in k:
            assert ours[k] == theirs[k], (k, ours[k], theirs[k])


def test_readonly_writes_eperm(pynbd_server, libnbd) -> None:
    srv = pynbd_server("-r", "memory", "1M")
    out = libnbd(
        CONNECT
        + "h.set_strict_mode(0)\n"
        "res = []\n"
        "for f, a in ((h.pwrite, (b'x', 0)), (h.trim, (512, 0)), (h.zero, (512, 0))):\n"
        "    try:\n"
        "        f(*a); res.append('ok')\n"
        "    except nbd.Error as e:\n"
        "        res.append(e.errno)\n"
        "assert h.pread(1, 0) == b'\\0'\n"
        "print(json.dumps(res))\n",
        srv.uri,
    ).stdout
    assert json.loads(out) == ["EPERM", "EPERM", "EPERM"]


def test_connect_command_single(libnbd) -> None:
    """`-s` under libnbd's connect_command; the server exits when the handle closes."""
    out = libnbd(
        "import nbd, sys, os, time, json\n"
        "h = nbd.NBD()\n"
        "h.connect_command([sys.argv[1], '-m', 'pynbd', 'serve', '-s', '--exit-with-parent',\n"
        "                   'memory', '1M'])\n"
        "h.pwrite(b'stdio', 4096)\n"
        "data = h.pread(5, 4096)\n"
        "size = h.get_size()\n"
        "# find our child (the server) before closing; other processes may vanish\n"
        "def ppid(p):\n"
        "    try:\n"
        "        return open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1]\n"
        "    except OSError:\n"
        "        return None\n"
        "kids = [int(p) for p in os.listdir('/proc') if p.isdigit()\n"
        "        and ppid(p) == str(os.getpid())]\n"
        "h.shutdown()\n"
        "del h\n"
        "def alive(pid):\n"
        "    try:\n"
        "        st = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "    except OSError:\n"
        "        return False\n"
        "    return st not in 'ZX'\n"
        "deadline = time.time() + 15\n"
        "while any(alive(k) for k in kids) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps([size, data.decode(), len(kids), [k for k in kids if alive(k)]]))\n",
        sys.executable,
    ).stdout
    size, data, nkids, left = json.loads(out)
    assert (size, data) == (1 << 20, "stdio")
    assert nkids >= 1
    assert left == []


def test_connect_systemd_socket_activation(libnbd) -> None:
    out = libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD()\n"
        "h.connect_systemd_socket_activation([sys.argv[1], '-m', 'pynbd', 'serve',\n"
        "                                     'pattern', '1M'])\n"
        "print(h.get_size(), h.pread(8, 8).hex())\n"
        "h.shutdown()\n",
        sys.executable,
    ).stdout.split()
    assert out[0] == "1048576"
    # nbdkit's pattern: each 8-byte big-endian word holds its own offset.
    assert out[1] == struct.pack(">Q", 8).hex()


def test_pattern_same_as_nbdkit(pynbd_server, nbdkit_server, libnbd) -> None:
    script = (
        CONNECT
        + "import hashlib\n"
        "print(hashlib.sha256(h.pread(1 << 20, 0)).hexdigest(),\n"
        "      h.pread(13, 1000003).hex())\n"
    )
    ours = libnbd(script, pynbd_server("pattern", "2M").uri).stdout
    theirs = libnbd(script, nbdkit_server("pattern", "2M").uri).stdout
    assert ours == theirs


def test_same_program_memory_vs_nbdkit(pynbd_server, nbdkit_server, libnbd) -> None:
    script = (
        CONNECT
        + "import random, hashlib\n"
        "rnd = random.Random(42)\n"
        "size = h.get_size()\n"
        "for i in range(200):\n"
        "    op = rnd.choice('wwwztr')\n"
        "    n = rnd.choice((1, 511, 512, 4096, 65536, 100000))\n"
        "    off = rnd.randrange(0, size - n)\n"
        "    if op == 'w': h.pwrite(bytes([i & 255]) * n, off)\n"
        "    elif op == 'z': h.zero(n, off)\n"
        "    elif op == 't': h.trim(n, off)\n"
        "    else: h.pread(n, off)\n"
        "print(hashlib.sha256(h.pread(size, 0)).hexdigest())\n"
    )
    ours = libnbd(script, pynbd_server("memory", "2M").uri).stdout
    theirs = libnbd(script, nbdkit_server("memory", "2M").uri).stdout
    assert ours == theirs


def test_past_end_keeps_connection_nbdsh(pynbd_server) -> None:
    from helpers import run_peer

    srv = pynbd_server("memory", "1M")
    out = run_peer(
        "nbdsh", "-u", srv.uri, "-c",
        "h.set_strict_mode(0)\n"
        "for f in (lambda: h.pread(512, 1 << 20), lambda: h.pwrite(b'x' * 512, 1 << 20)):\n"
        "    try:\n"
        "        f()\n"
        "    except nbd.Error as e:\n"
        "        print(e.errno)\n"
        "h.pwrite(b'ok', 0)\n"
        "print(h.pread(2, 0).decode())\n",
    ).stdout.decode().split()
    assert out == ["EINVAL", "ENOSPC", "ok"]


def _raw_handshake(sock: socket.socket) -> None:
    def recv(n: int) -> bytes:
        b = b""
        while len(b) < n:
            c = sock.recv(n - len(b))
            assert c
            b += c
        return b
    assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0))
    recv(10)


def test_client_killed_mid_write(pynbd_server, libnbd) -> None:
    """A client dies half-way through a write's payload; the server serves others."""
    srv = pynbd_server("memory", "16M")
    # Same process, raw socket: announce a 8 MiB write, send 1 MiB of it, vanish.
    for how in ("close", "rst"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(srv.sock)
        _raw_handshake(s)
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 8 << 20) + b"\xee" * (1 << 20))
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    # A client in another process killed by SIGKILL mid-write.
    child = subprocess.Popen(
        [sys.executable, "-c",
         ("import socket, struct, sys, time\n"
          f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
          "from test_libnbd_api import _raw_handshake\n"
          "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); _raw_handshake(s)\n"
          "s.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 1, 1, 0, 8 << 20) + b'x' * 65536)\n"
          "print('sent', flush=True)\n"
          "time.sleep(60)\n"),
         srv.sock],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "sent"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    time.sleep(0.2)
    assert srv.proc.poll() is None, srv.stderr
    out = libnbd(
        CONNECT
        + "h.pwrite(b'second client', 0)\n"
        "print(h.pread(13, 0).decode(), h.pread(4, 512 * 1024).hex())\n",
        srv.uri,
    ).stdout.split()
    # The partial write was never applied.
    assert out == ["second", "client", "00000000"]
    assert "Traceback" not in srv.stderr


def test_client_garbage_then_others_served(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 100, b""):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(srv.sock)
        s.sendall(junk)
        s.close()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(srv.sock)
    _raw_handshake(s)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))  # bad request magic
    s.settimeout(10)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()
    out = libnbd(CONNECT + "print(h.get_size())\n", srv.uri).stdout
    assert out.strip() == "1048576"
    assert srv.proc.poll() is None


def test_many_connections_at_once(pynbd_server, libnbd) -> None:
    """8 handles in threads, each writing its own region with requests in flight; then each
    handle checks every other handle's data (multi-conn: flushed writes are visible)."""
    srv = pynbd_server("memory", "32M")
    libnbd(
        "import nbd, sys, threading, hashlib\n"
        "N, REGION, SZ = 8, 4 << 20, 65536\n"
        "handles = []\n"
        "for i in range(N):\n"
        "    h = nbd.NBD(); h.connect_uri(sys.argv[1]); handles.append(h)\n"
        "assert handles[0].can_multi_conn()\n"
        "def data(i, j):\n"
        "    return hashlib.sha256(b'%d/%d' % (i, j)).digest() * (SZ // 32)\n"
        "errors = []\n"
        "def writer(i):\n"
        "    try:\n"
        "        h = handles[i]\n"
        "        for j in range(REGION // SZ):\n"
        "            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data(i, j))),\n"
        "                         i * REGION + j * SZ)\n"
        "            while h.aio_in_flight() >= 16:\n"
        "                h.poll(-1)\n"
        "        while h.aio_in_flight() > 0:\n"
        "            h.poll(-1)\n"
        "        h.flush()\n"
        "    except Exception as e:\n"
        "        errors.append(e)\n"
        "ts = [threading.Thread(target=writer, args=(i,)) for i in range(N)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not errors, errors\n"
        "for k, h in enumerate(handles):\n"
        "    i = (k + 3) % N\n"
        "    for j in range(0, REGION // SZ, 7):\n"
        "        assert h.pread(SZ, i * REGION + j * SZ) == data(i, j), (k, i, j)\n"
        "for h in handles:\n"
        "    h.shutdown()\n",
        srv.uri,
        timeout=120,
    )


def test_file_dir_refuses_unknown_and_escaping_names(pynbd_server, libnbd, tmp_path: Path) -> None:
    d = tmp_path / "exports"
    d.mkdir()
    (d / "a").write_bytes(b"A" * 512)
    srv = pynbd_server("file", f"dir={d}")
    out = libnbd(
        "import nbd, sys, json\n"
        "res = {}\n"
        "for name in ['a', 'nonexistent', '', '../a', '/etc/passwd', 'a/../a', './a']:\n"
        "    h = nbd.NBD(); h.set_export_name(name)\n"
        "    try:\n"
        "        h.connect_unix(sys.argv[1]); res[name] = h.get_size()\n"
        "    except nbd.Error as e:\n"
        "        res[name] = e.errno\n"
        "print(json.dumps(res))\n",
        srv.sock,
    ).stdout
    res = json.loads(out)
    assert res.pop("a") == 512
    assert set(res.values()) == {"ENOENT"}, res


def test_client_variants(pynbd_server, libnbd) -> None:
    """Unusual but legal clients: plain newstyle, no structured replies, unknown contexts,
    full info, disconnect and abandon with requests in flight."""
    srv = pynbd_server("memory", "32M")
    out = libnbd(
        "import nbd, sys, json\n"
        "uri = sys.argv[1]\n"
        "res = {}\n"
        "h = nbd.NBD(); h.add_meta_context('qemu:dirty-bitmap:x')\n"
        "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); h.connect_uri(uri)\n"
        "res['meta'] = [h.can_meta_context('qemu:dirty-bitmap:x'),\n"
        "               h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)]\n"
        "h = nbd.NBD(); h.set_handshake_flags(0); h.connect_uri(uri)\n"
        "h.pwrite(b'plain', 0)\n"
        "res['plain'] = [h.get_protocol(), h.pread(5, 0).decode()]\n"
        "h = nbd.NBD(); h.set_request_structured_replies(False); h.connect_uri(uri)\n"
        "res['nosr'] = [h.get_structured_replies_negotiated(), h.pread(5, 0).decode()]\n"
        "h = nbd.NBD(); h.set_full_info(True); h.set_opt_mode(True); h.connect_uri(uri)\n"
        "h.opt_info()\n"
        "res['info'] = [h.get_canonical_export_name(), h.get_size()]\n"
        "h.opt_go()\n"
        "res['go'] = h.pread(5, 0).decode()\n"
        "h = nbd.NBD(); h.connect_uri(uri)\n"
        "bufs = [nbd.Buffer(1 << 20) for _ in range(16)]\n"
        "for i, b in enumerate(bufs):\n"
        "    h.aio_pread(b, i << 20)\n"
        "h.aio_disconnect()\n"
        "while h.aio_in_flight() > 0:\n"
        "    h.poll(-1)\n"
        "res['disconnect'] = h.aio_is_closed()\n"
        "h = nbd.NBD(); h.connect_uri(uri)\n"
        "for i in range(16):\n"
        "    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b'w' * (1 << 20))), i << 20)\n"
        "h.shutdown(nbd.SHUTDOWN_ABANDON_PENDING)\n"
        "del h\n"
        "h = nbd.NBD(); h.connect_uri(uri)\n"
        "res['after'] = h.pread(5, 0).decode()\n"
        "print(json.dumps(res))\n",
        srv.uri,
    ).stdout
    res = json.loads(out)
    # Abandoned writes already on the wire may or may not have been applied.
    assert res.pop("after") in ("plain", "wwwww")
    assert res == {
        "meta": [False, True],
        "plain": ["newstyle", "plain"],
        "nosr": [False, "plain"],
        "info": ["", 32 << 20],
        "go": "plain",
        "disconnect": True,
    }
    assert srv.proc.poll() is None


def test_tls_refused_cleanly(pynbd_server, libnbd) -> None:
    """No TLS in this server: a client requiring it fails (ENOTSUP), one allowing it gets
    plaintext, and the server keeps serving."""
    srv = pynbd_server("memory", "1M")
    out = libnbd(
        "import nbd, sys, json\n"
        "h = nbd.NBD(); h.set_tls(nbd.TLS_REQUIRE)\n"
        "try:\n"
        "    h.connect_uri(sys.argv[1]); req = 'connected'\n"
        "except nbd.Error as e:\n"
        "    req = e.errno\n"
        "h = nbd.NBD(); h.set_tls(nbd.TLS_ALLOW); h.connect_uri(sys.argv[1])\n"
        "print(json.dumps([req, h.get_tls_negotiated(), h.get_size()]))\n",
        srv.uri,
    ).stdout
    assert json.loads(out) == ["ENOTSUP", False, 1 << 20]
    assert srv.proc.poll() is None
