"""`pynbd fuse` against the real peers: nbdkit (with its log and delay filters), nbdcopy,
qemu-nbd (qcow2 by socket activation) and nbdfuse itself.

Every mount goes through the `fuse_mount` fixture, which unmounts and reaps it even when the
test fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fuse_helpers import (  # noqa: F401 (fixture)
    fuse_mount,
    in_threads,
    is_mounted,
    require_fuse,
)
from helpers import require, run_peer

from pynbd.tools.fuse import RELEASE_TIMEOUT

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

MiB = 1 << 20


def pattern(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (n // len(block) + 1))[:n]


def log_ops(log: Path, op: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if f" {op} id=" in line]


def wait_log(log: Path, text: str, n: int = 1, timeout: float = 20.0) -> None:
    """Wait until nbdkit's log filter has logged `text` `n` times (a request arrived, a
    connection opened): the state a test needs before it acts."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.read_text().count(text) >= n):
        assert time.monotonic() < deadline, f"{text!r} x{n} not logged in {timeout} s"
        time.sleep(0.02)


def test_round_trip_with_nbdcopy(nbdkit_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """Write a pattern through the FUSE file; nbdcopy reads the same bytes from the server."""
    require("nbdcopy")
    srv = nbdkit_server("memory", "8M")
    m = fuse_mount(srv.uri)
    data = pattern(8 * MiB, 3)
    with open(m.file, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    out = tmp_path / "copy.raw"
    run_peer("nbdcopy", srv.uri, out)
    assert out.read_bytes() == data
    assert m.unmount() == 0


def test_commands_reach_the_server(nbdkit_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """write -> NBD_CMD_WRITE, fsync -> FLUSH, punch hole -> TRIM, zero range -> WRITE_ZEROES;
    multi-conn opens -C connections when nbdkit allows it; unmount flushes."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "memory", "1M", f"logfile={log}")
    m = fuse_mount(srv.uri, options=["-C", "2"])
    with open(m.file, "r+b", buffering=0) as f:
        f.write(b"\xaa" * 65536)
        n_flush = len(log_ops(log, "Flush"))
        os.fsync(f.fileno())
        assert len(log_ops(log, "Flush")) > n_flush
    subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4096", str(m.file)], check=True)
    subprocess.run(["fallocate", "-z", "-o", "8192", "-l", "4096", str(m.file)], check=True)
    with open(m.file, "r+b", buffering=0) as f:
        f.write(b"last write")
    before_unmount = len(log_ops(log, "Flush"))
    assert m.unmount() == 0
    text = log.read_text()
    assert log_ops(log, "Write")
    assert any("offset=0x0 count=0x1000" in line for line in log_ops(log, "Trim"))
    assert any("offset=0x2000 count=0x1000" in line for line in log_ops(log, "Zero"))
    assert len(log_ops(log, "Flush")) > before_unmount  # outstanding writes flushed
    connects = [line for line in text.splitlines() if " Connect " in line]
    # -C 2: at most two connections at a time (the first one only looks at the export
    # before the worker processes take over with theirs)
    open_now = most = 0
    for line in text.splitlines():
        open_now += (" Connect " in line) - (" Disconnect " in line)
        most = max(most, open_now)
    assert most <= 2, text
    assert 1 <= len(connects) <= 3, text
    assert text.count("Disconnect") == len(connects)  # each connection closed cleanly


def test_requests_in_flight(nbdkit_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """Eight readers against a server that takes 0.5 s per read, on ONE connection: all
    eight reads reach the server before the first is answered (nbdkit's log filter, outside
    the delay, records each on arrival): FUSE requests in flight are NBD requests in flight."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "--filter=delay", "memory", "8M", "rdelay=500ms",
                        f"logfile={log}")
    m = fuse_mount(srv.uri, options=["-C", "1"])

    def read(i: int) -> None:
        fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [buf], i * MiB) == 4096
        finally:
            os.close(fd)

    in_threads(read, 8)
    assert m.unmount() == 0
    lines = log.read_text().splitlines()
    reads = [(i, re.search(r" Read id=\d+ offset=0x([0-9a-f]+) count=0x1000 ", line))
             for i, line in enumerate(lines)]
    arrived = [i for i, m in reads if m and int(m[1], 16) % MiB == 0]
    answered = [i for i, line in enumerate(lines) if " ...Read id=" in line]
    assert len(arrived) == 8, lines
    assert max(arrived) < min(answered), "\n".join(lines)  # all eight in flight at once


# -C 1: the main process serves on its event loop; -C 2: worker processes in blocking calls
SERVING = pytest.mark.parametrize("connections", ["1", "2"], ids=["event-loop", "workers"])


@SERVING
def test_server_killed_mid_read(nbdkit_server, fuse_mount, connections,  # noqa: F811
                                tmp_path) -> None:
    """A read waiting on a server that dies gets EIO at once (not after the server's 30 s
    delay, not a hang); later ones too; the mount still unmounts cleanly."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "--filter=delay", "memory", "8M", "rdelay=30",
                        f"logfile={log}")
    m = fuse_mount(srv.uri, options=["-C", connections])
    result: list[BaseException | int] = []

    def read() -> None:
        fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
        try:
            result.append(os.preadv(fd, [mmap.mmap(-1, 4096)], 0))
        except OSError as e:
            result.append(e)
        finally:
            os.close(fd)

    th = threading.Thread(target=read)
    th.start()
    wait_log(log, " Read id=")  # the read is at the server, waiting out its delay
    t = time.monotonic()
    srv.proc.kill()  # SIGKILL: the reply never comes, the socket closes
    th.join(20)
    assert not th.is_alive(), "the reader hung"
    assert time.monotonic() - t < 15, "the reader waited for the dead server's delay"
    assert isinstance(result[0], OSError) and result[0].errno == errno.EIO, result
    fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.preadv(fd, [mmap.mmap(-1, 4096)], 8192)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert m.unmount() == 0
    srv.stop(check=False)


@SERVING
def test_signal_with_a_hung_server(nbdkit_server, fuse_mount, connections,  # noqa: F811
                                   tmp_path) -> None:
    """SIGTERM while a read waits on a server that will not answer for a minute: pynbd fuse
    gives up on it after its 5 s limit, unmounts and exits; the reader gets an error."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "--filter=delay", "memory", "1M", "rdelay=60",
                        f"logfile={log}")
    m = fuse_mount(srv.uri, options=["-C", connections])
    result: list[BaseException | int] = []

    def read() -> None:
        try:
            fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            result.append(e)
            return
        try:
            result.append(os.preadv(fd, [mmap.mmap(-1, 4096)], 0))
        except OSError as e:
            result.append(e)
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the connection is aborted
                os.close(fd)

    th = threading.Thread(target=read)
    th.start()
    wait_log(log, " Read id=")  # the read is at the server, which will not answer
    t = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    # RELEASE_TIMEOUT (5 s) to give up, then the unmount; not the server's 60 s
    assert m.wait_exit(timeout=RELEASE_TIMEOUT + 25) == 0, m.stderr
    assert time.monotonic() - t < RELEASE_TIMEOUT + 25
    th.join(5)
    assert not th.is_alive(), "the reader hung"
    assert isinstance(result[0], OSError), result
    assert not is_mounted(m.mountpoint)
    assert "giving up" in m.stderr


def test_signal_while_workers_connect(nbdkit_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """SIGTERM while the worker processes are still negotiating with a slow server (5 s to
    open each connection; the mount appears once they are done): they stop at once and
    the mount goes away (nothing waits for their handshakes)."""
    log = tmp_path / "nbdkit.log"
    srv = nbdkit_server("--filter=log", "--filter=delay", "memory", "1M", "delay-open=5",
                        f"logfile={log}")
    m = fuse_mount(srv.uri, options=["-C", "2"], wait=False)
    # the main connection is done (5 s) and nbdkit accepted both workers' connections:
    # they are in their handshakes now
    wait_log(log, " Preconnect id=", 3)
    assert len(m.children()) == 2
    t = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait_exit() == 0, m.stderr
    assert time.monotonic() - t < 3.5, m.stderr  # waiting out the handshakes takes ~5 s
    # the workers never finished a handshake: the signal came in time
    assert " Connect " not in log.read_text().split(" Preconnect id=3 ", 1)[1], log.read_text()
    assert not is_mounted(m.mountpoint)
    assert "Traceback" not in m.stderr


def test_no_worker_can_connect(qemu_nbd_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """qemu-nbd (read-only, two clients, not persistent) advertises multi-conn but exits
    when the first client hangs up: the workers cannot connect, so the mount stops with
    a message instead of staying there unanswered."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    srv = qemu_nbd_server(img, "-r", "-e", "2", "-f", "raw")
    m = fuse_mount(srv.uri, options=["-C", "2"], wait=False)
    assert m.wait_exit() == 1
    assert "no worker process could start" in m.stderr, m.stderr
    assert f"pynbd fuse: {srv.uri}: No such file or directory" in m.stderr
    assert "Traceback" not in m.stderr
    assert not is_mounted(m.mountpoint)


def test_qcow2_by_socket_activation(fuse_mount, tmp_path) -> None:  # noqa: F811
    """`pynbd fuse dir/file.raw --socket-activation qemu-nbd -f qcow2 file.qcow2`: the qcow2
    image as a raw file; what is written lands in the qcow2; qemu-nbd is gone afterwards."""
    require("qemu-nbd")
    require("qemu-img")
    img = tmp_path / "file.qcow2"
    run_peer("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    m = fuse_mount("--socket-activation", "qemu-nbd", "-f", "qcow2", str(img),
                   name="file.raw")
    assert os.stat(m.file).st_size == 16 * MiB
    data = pattern(2 * MiB, 9)
    with open(m.file, "r+b") as f:
        f.seek(5 * MiB)
        f.write(data)
    kids = m.children()
    assert kids
    assert m.unmount() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}"), "qemu-nbd was left running"
    raw = tmp_path / "out.raw"
    run_peer("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
    got = raw.read_bytes()
    assert got[5 * MiB:7 * MiB] == data
    assert got[:5 * MiB] == bytes(5 * MiB)
    # the bracket form is the same mode
    n = fuse_mount("[", "qemu-nbd", "-f", "qcow2", str(img), "]")
    with open(n.file, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(2 * MiB) == data
    assert n.unmount() == 0


def test_command_nbdkit_single(fuse_mount) -> None:  # noqa: F811
    require("nbdkit")
    m = fuse_mount("--command", "nbdkit", "-s", "--exit-with-parent", "pattern", "1M")
    got = m.file.read_bytes()
    assert len(got) == MiB
    assert got[8:16] == (8).to_bytes(8, "big")  # nbdkit pattern: each 8 bytes its offset
    assert m.unmount() == 0


def test_same_view_as_nbdfuse(nbdkit_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """nbdfuse and pynbd fuse show the same file for the same export (read-write and
    read-only): name, size, type, mode and bytes."""
    require("nbdfuse")
    rw = nbdkit_server("pattern", "3M")
    ro = nbdkit_server("-r", "pattern", "1M")
    for srv in (rw, ro):
        ours = fuse_mount(srv.uri)
        theirs_dir = tmp_path / f"nbdfuse{srv.pid}"
        theirs_dir.mkdir()
        p = subprocess.Popen(["nbdfuse", str(theirs_dir), srv.uri], stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not is_mounted(theirs_dir) and time.monotonic() < deadline:
                assert p.poll() is None, p.stderr.read() if p.stderr else ""
                time.sleep(0.02)
            a, b = os.stat(ours.file), os.stat(theirs_dir / "nbd")
            assert os.listdir(ours.mountpoint) == os.listdir(theirs_dir) == ["nbd"]
            assert (a.st_size, a.st_mode) == (b.st_size, b.st_mode)
            assert stat.S_ISREG(a.st_mode)
            assert ours.file.read_bytes() == (theirs_dir / "nbd").read_bytes()
        finally:
            subprocess.run(["fusermount3", "-u", str(theirs_dir)], check=False)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
            if is_mounted(theirs_dir):
                subprocess.run(["umount", "-l", str(theirs_dir)], check=False)
            if p.stderr:
                p.stderr.close()
        assert ours.unmount() == 0
