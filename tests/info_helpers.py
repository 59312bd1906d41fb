"""Helpers for the ``pynbd info`` tests (tests/e2e and tests/interop test_tool_info.py)."""

from __future__ import annotations

import io
import re
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

from helpers import run_peer

import pynbd.libnbd as nbd
from pynbd.tools import info as info_mod

__all__ = ["Result", "nbdinfo", "pynbd_info", "write"]


@dataclass(frozen=True)
class Result:
    """What one run printed and returned; `err` with the program name as ``pynbd info``."""

    rc: int
    out: str
    err: str


def pynbd_info(*args: str) -> Result:
    """Run ``pynbd info ARGS`` in this process (a Python start costs ~0.3 s per run)."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    err = io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = info_mod.main(list(args))
    out.flush()
    return Result(rc, raw.getvalue().decode("utf-8", "surrogateescape"), err.getvalue())


def nbdinfo(*args: str, timeout: float = 60) -> Result:
    """Run Debian's nbdinfo; its ``nbdinfo:`` message prefixes read ``pynbd info:``."""
    cp: subprocess.CompletedProcess[bytes] = run_peer("nbdinfo", *args, timeout=timeout,
                                                      check=False)
    err = cp.stderr.decode("utf-8", "surrogateescape")
    # nbdinfo names itself by its argv[0] (here the absolute path run_peer runs).
    err = re.sub(r"^\S*nbdinfo: ", "pynbd info: ", err, flags=re.MULTILINE)
    return Result(cp.returncode, cp.stdout.decode("utf-8", "surrogateescape"), err)


def write(uri: str, data: bytes, offset: int) -> None:
    """Write data at offset on the export at uri (with pynbd.libnbd)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, offset)
    h.shutdown()
    h.close()
