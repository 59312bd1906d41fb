"""Helpers for the `pynbd copy` tests (e2e and interop)."""

from __future__ import annotations

import hashlib
import os
import select
import time
from pathlib import Path

__all__ = ["data_map", "run_on_terminal", "sha"]


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
