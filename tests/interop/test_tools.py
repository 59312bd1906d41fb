"""nbdcopy, qemu-img, qemu-io and fio against `pynbd serve`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import peer_env, require, run_peer

PYNBD_SERVE = [sys.executable, "-m", "pynbd", "serve"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def random_64m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB: random data with zero runs (so sparseness and zero detection are exercised)."""
    path = tmp_path_factory.mktemp("data") / "random.img"
    with open(path, "wb") as f:
        for i in range(64):
            if i % 5 == 3:
                f.write(bytes(1 << 20))
            else:
                f.write(os.urandom(1 << 20))
    return path


# ---------------------------------------------------------------------------- nbdcopy


def test_nbdcopy_round_trip(pynbd_server, random_64m: Path, tmp_path: Path) -> None:
    srv = pynbd_server("memory", "64M")
    run_peer("nbdcopy", random_64m, srv.uri, timeout=120)
    out = tmp_path / "out.img"
    run_peer("nbdcopy", srv.uri, out, timeout=120)
    assert sha256(out) == sha256(random_64m)
    # And through a pipe (synchronous mode, no extents).
    cp = run_peer("nbdcopy", srv.uri, "-", timeout=120)
    assert hashlib.sha256(cp.stdout).hexdigest() == sha256(random_64m)


def test_nbdcopy_between_two_servers_and_file_plugin(pynbd_server, random_64m: Path,
                                                      tmp_path: Path) -> None:
    src = pynbd_server("-r", "file", random_64m)
    dst_file = tmp_path / "dst.img"
    dst_file.write_bytes(b"")
    os.truncate(dst_file, 64 << 20)
    dst = pynbd_server("file", dst_file)
    run_peer("nbdcopy", "--flush", src.uri, dst.uri, timeout=120)
    dst.stop()
    assert sha256(dst_file) == sha256(random_64m)


def test_nbdcopy_options(pynbd_server, random_64m: Path, tmp_path: Path) -> None:
    srv = pynbd_server("memory", "64M")
    run_peer("nbdcopy", "--synchronous", "--request-size=65536", random_64m, srv.uri, timeout=120)
    out = tmp_path / "o.img"
    run_peer("nbdcopy", "-C", "1", "-R", "4", "--allocated", srv.uri, out, timeout=120)
    assert sha256(out) == sha256(random_64m)


def test_nbdcopy_socket_activation(tmp_path: Path) -> None:
    """nbdcopy's `[ CMD ]` form starts pynbd with systemd socket activation."""
    out = tmp_path / "out.img"
    run_peer("nbdcopy", "--", "[", *PYNBD_SERVE, "memory", "1M", "]", out, timeout=60)
    assert out.stat().st_size == 1 << 20
    assert out.read_bytes() == bytes(1 << 20)
    pat = tmp_path / "pattern.img"
    run_peer("nbdcopy", "--", "[", *PYNBD_SERVE, "pattern", "1M", "]", pat, timeout=60)
    data = pat.read_bytes()
    assert data[8:16] == (8).to_bytes(8, "big")
    assert data[-8:] == ((1 << 20) - 8).to_bytes(8, "big")


def test_nbdcopy_to_socket_activated_server(tmp_path: Path, random_64m: Path) -> None:
    """Into a [ CMD ] destination (pynbd serve file), then read back through another one."""
    small = tmp_path / "small.img"
    small.write_bytes(random_64m.read_bytes()[: 4 << 20])
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    run_peer("nbdcopy", small, "--", "[", *PYNBD_SERVE, "file", disk, "]", timeout=60)
    assert sha256(disk) == sha256(small)  # what the server wrote
    back = tmp_path / "back.img"
    run_peer("nbdcopy", "--", "[", *PYNBD_SERVE, "-r", "file", disk, "]", back, timeout=60)
    assert sha256(back) == sha256(small)  # what a second server reads back


def test_nbdcopy_from_nbdkit_to_pynbd(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    src = nbdkit_server("pattern", "8M")
    dst = pynbd_server("memory", "8M")
    run_peer("nbdcopy", src.uri, dst.uri, timeout=60)
    a, b = tmp_path / "a", tmp_path / "b"
    run_peer("nbdcopy", src.uri, a)
    run_peer("nbdcopy", dst.uri, b)
    assert sha256(a) == sha256(b)


# ---------------------------------------------------------------------------- qemu


def test_qemu_img_info(pynbd_server) -> None:
    srv = pynbd_server("memory", "64M")
    info = json.loads(run_peer("qemu-img", "info", "--output=json", srv.uri).stdout)
    assert info["virtual-size"] == 64 << 20
    assert info["format"] == "raw"


def test_qemu_img_convert_and_compare(pynbd_server, random_64m: Path, tmp_path: Path) -> None:
    srv = pynbd_server("memory", "64M")
    # -W -m 16: 16 coroutines writing out of order, many requests in flight.
    run_peer("qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw",
             random_64m, srv.uri, timeout=120)
    run_peer("qemu-img", "compare", "-f", "raw", "-F", "raw", random_64m, srv.uri, timeout=120)
    out = tmp_path / "back.qcow2"
    run_peer("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, out, timeout=120)
    run_peer("qemu-img", "compare", "-f", "raw", "-F", "qcow2", random_64m, out, timeout=120)
    # A difference is found and reported (exit 1) once a byte changes.
    run_peer("qemu-io", "-f", "raw", "-c", "write -P 0x01 1000 1", srv.uri)
    cp = run_peer("qemu-img", "compare", "-f", "raw", "-F", "raw", random_64m, srv.uri,
                  check=False, timeout=120)
    assert cp.returncode == 1
    assert b"Content mismatch at offset 512" in cp.stdout  # the sector holding byte 1000


def test_qemu_img_map(pynbd_server) -> None:
    srv = pynbd_server("memory", "16M")
    run_peer("qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 1M", srv.uri)
    m = json.loads(run_peer("qemu-img", "map", "--output=json", "-f", "raw", srv.uri).stdout)
    data = [e for e in m if e["data"]]
    assert [(e["start"], e["length"]) for e in data] == [(1 << 20, 1 << 20)]
    assert all(e["zero"] for e in m if not e["data"])


def test_qemu_io_patterns(pynbd_server) -> None:
    srv = pynbd_server("memory", "16M")
    cmds = [
        "write -P 0xab 0 64k",
        "write -P 0xcd 64k 4k",
        "write -z 128k 64k",
        "write -P 0x11 1M 1M",
        "discard 1M 512k",
        "write -P 0x22 -f 2M 4k",  # FUA
        "write -P 0x23 3M 64k",
        "write -z -u 3M 32k",  # write zeroes, may trim
        "flush",
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 4k",
        "read -P 0 128k 64k",
        "read -P 0 1M 512k",
        "read -P 0x11 1536k 512k",
        "read -P 0x22 2M 4k",
        "read -P 0 15M 1M",
        "read -P 0 3M 32k",
        "read -P 0x23 3104k 32k",
        "aio_write -P 0x44 4M 64k",
        "aio_write -P 0x45 5M 64k",
        "aio_flush",
        "read -P 0x44 4M 64k",
        "read -P 0x45 5M 64k",
    ]
    args = ["-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run_peer("qemu-io", *args, srv.uri)
    out = cp.stdout.decode()
    assert "Pattern verification failed" not in out
    assert "error" not in out.lower()
    assert out.count("read ") >= 9
    # A wrong pattern is detected (the check is real).
    cp = run_peer("qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", srv.uri, check=False)
    assert b"Pattern verification failed" in cp.stdout


def test_qemu_io_readonly(pynbd_server) -> None:
    srv = pynbd_server("-r", "pattern", "1M")
    cp = run_peer("qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", srv.uri)
    assert b"read 65536/65536" in cp.stdout
    # Opening a read-only export read-write fails before any write, as against nbdkit -r.
    cp = run_peer("qemu-io", "-f", "raw", "-c", "write 0 4k", srv.uri, check=False)
    assert cp.returncode == 1, cp
    assert b"Could not open image: Permission denied" in cp.stderr
    assert b"wrote" not in cp.stdout


def test_qemu_nbd_list(pynbd_server, tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a").write_bytes(bytes(4096))
    (d / "b").write_bytes(bytes(8192))
    srv = pynbd_server("file", f"dir={d}")
    out = run_peer("qemu-nbd", "--list", "-k", srv.sock).stdout.decode()
    assert re.search(r"export: 'a'", out) and re.search(r"export: 'b'", out)
    assert "size:  8192" in out


# ---------------------------------------------------------------------------- fio


def test_fio_verify(pynbd_server) -> None:
    srv = pynbd_server("memory", "64M")
    cp = run_peer(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={srv.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64M",
        "--io_size=16M",
        "--verify=crc32c",
        "--verify_state_save=0",  # no *-verify.state file left in the cwd
        "--do_verify=1",
        "--runtime=30",
        "--output-format=json",
        timeout=120,
    )
    report = json.loads(cp.stdout[cp.stdout.index(b"{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0
    assert job["read"]["io_bytes"] > 0  # the verify pass read everything back
    assert job["write"]["total_ios"] and job["read"]["total_ios"]


def test_fio_mixed_block_sizes(pynbd_server) -> None:
    srv = pynbd_server("memory", "64M")
    cp = run_peer(
        "fio",
        "--name=mixed",
        "--ioengine=nbd",
        f"--uri={srv.uri}",
        "--rw=randrw",
        "--bssplit=4k/50:64k/40:1m/10",
        "--iodepth=32",
        "--size=64M",
        "--io_size=32M",
        "--runtime=20",
        "--verify=crc32c",
        "--verify_state_save=0",  # no *-verify.state file left in the cwd
        "--output-format=json",
        timeout=120,
    )
    report = json.loads(cp.stdout[cp.stdout.index(b"{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0  # a verify failure is an error
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_run_with_peers() -> None:
    """`--run` hands libnbd's tools the URI; status is the command's."""
    require("nbdinfo")
    env = peer_env()
    cp = subprocess.run([*PYNBD_SERVE, "-U", "-", "memory", "1M", "--run", "nbdinfo --size $uri"],
                        check=False, capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "1048576"
    cp = subprocess.run(
        [*PYNBD_SERVE, "-U", "-", "memory", "1M", "--run",
         ('qemu-io -f raw -c "write -P 7 0 4k" -c "read -P 7 0 4k" "$uri" && '
          'nbdcopy "$uri" - | cmp -n 4096 - /dev/zero; test $? = 1')],
        check=False, capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = subprocess.run([*PYNBD_SERVE, "-U", "-", "memory", "1M", "--run", "nbdinfo --size $uri; exit 3"],
                        check=False, capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 3
    assert cp.stdout.strip() == "1048576"


def test_run_unixsocket_with_qemu_nbd_list() -> None:
    require("qemu-nbd")
    cp = subprocess.run([*PYNBD_SERVE, "-U", "-", "memory", "1M", "--run",
                         "qemu-nbd --list -k $unixsocket"],
                        check=False, capture_output=True, text=True, timeout=60, env=peer_env())
    assert cp.returncode == 0, cp.stderr
    assert "size:  1048576" in cp.stdout


def test_run_port_and_exportname() -> None:
    require("nbdinfo")
    from helpers import free_tcp_port

    port = free_tcp_port()
    cp = subprocess.run([*PYNBD_SERVE, "-p", str(port), "-e", "exp", "memory", "1M", "--run",
                         'echo "$port $exportname $uri"; nbdinfo --json "$uri"'],
                        check=False, capture_output=True, text=True, timeout=60, env=peer_env())
    assert cp.returncode == 0, cp.stderr
    first, rest = cp.stdout.split("\n", 1)
    assert first == f"{port} exp nbd://localhost:{port}/exp"
    # The export name only names the URI; the server serves any name (as nbdkit).
    assert json.loads(rest)["exports"][0]["export-size"] == 1 << 20
    # The captive server is gone once the command returns: nothing listens on the port.
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_nbddump_same_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    ours = run_peer("nbddump", "--length=4096", pynbd_server("pattern", "1M").uri).stdout
    theirs = run_peer("nbddump", "--length=4096", nbdkit_server("pattern", "1M").uri).stdout
    assert ours == theirs
    # A sparse memory disk: nbddump collapses the zero run.
    srv = pynbd_server("memory", "1M")
    run_peer("qemu-io", "-f", "raw", "-c", "write -P 0x41 64k 16", srv.uri)
    out = run_peer("nbddump", srv.uri).stdout.decode()
    assert "0000010000: 41 41 41 41" in out
