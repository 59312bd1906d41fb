"""Helpers for the `pynbd copy` tests (e2e and interop)."""

from __future__ import annotations

import hashlib
import os
import select
import time
from pathlib import Path

__all__ = ["IMAGES", "data_map", "make_dense", "make_mixed", "make_sparse", "run_on_terminal",
           "sha"]

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data extents [(offset, length)] from SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    finally:
        os.close(fd)
    return out


def run_on_terminal(argv: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its controlling terminal (what /dev/tty opens);
    return its status and everything written to the terminal."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode()


# ------------------------------------------------------------------------------- images

def make_dense(path: Path, size: int = 3 * MiB) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def make_sparse(path: Path) -> Path:
    """8 MiB: holes, 5 bytes at 1,000,000, 256 KiB of data at 3 MiB."""
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(1_000_000)
        f.write(b"hello")
        f.seek(3 * MiB)
        f.write(os.urandom(256 * 1024))
    return path


def make_mixed(path: Path) -> Path:
    """5 MiB + 3000 bytes (an unaligned tail): data with written 4 KiB zero blocks and
    zero runs, a hole, data again."""
    with open(path, "wb") as f:
        f.truncate(5 * MiB + 3000)
        blob = bytearray(os.urandom(2 * MiB))
        for i in range(0, len(blob), 64 * 1024):
            blob[i + 8192:i + 12288] = bytes(4096)        # a written zero block
        blob[MiB:MiB + 300 * 1024] = bytes(300 * 1024)       # a longer written zero run
        f.write(blob)
        f.seek(4 * MiB)
        f.write(os.urandom(MiB + 3000))
    return path


IMAGES = {"dense": make_dense, "sparse": make_sparse, "mixed": make_mixed}
