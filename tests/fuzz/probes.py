"""Memory probes against a running server, and a well-behaved client for health checks.

A probe returns None, or one line saying what went wrong (a finding). The server fuzzer runs
them on fresh servers at the end of a run; tests/fuzz/test_findings.py runs them too.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from typing import Self

from fuzz import wire as W
from fuzz.procs import rss_kib
from fuzz.server_check import Conn, Hangup, Wrong

__all__ = ["CONNECTION_BOUND_KIB", "IDLE_BOUND_KIB", "Client", "greedy_probe", "idle_probe"]

#: The per-connection bound docs/limits.md promises (MAX_BYTES_IN_FLIGHT, 256 MiB), plus
#: the receive buffer and slack for the allocator.
CONNECTION_BOUND_KIB = (256 + 64) * 1024
#: What 100 connections idle after the greeting may cost together (nbdkit: about 1 MiB).
IDLE_BOUND_KIB = 64 * 1024
#: Longest wait for the server in a probe.
TIMEOUT = 20.0


def greedy_probe(sock: str, pid: int) -> str | None:
    """Write 8 MiB of data, then pipeline 600 reads of 1 MiB of it and read no reply until
    the server's memory stops growing: it must stay within the per-connection bound."""
    c = Client(sock).__enter__()
    try:
        data = random.Random(0).randbytes(1 << 20)
        for k in range(8):
            c.pwrite(k << 20, data)
        base = rss_kib(pid)
        reqs = b"".join(W.request(W.CMD.READ, n, (n % 8) << 20, 1 << 20) for n in range(600))
        c.sock.setblocking(False)
        sent = 0
        peak = base
        still = time.monotonic()
        while time.monotonic() - still < 1.0:  # until it has not grown for a second
            try:
                sent += c.sock.send(reqs[sent:]) if sent < len(reqs) else 0
            except BlockingIOError:
                pass
            time.sleep(0.05)
            rss = rss_kib(pid)
            if rss > peak + 1024:
                still = time.monotonic()
            peak = max(peak, rss)
            if peak - base > 2 * CONNECTION_BOUND_KIB:
                break
    finally:
        c.c.close()
    if peak - base > CONNECTION_BOUND_KIB:
        return (f"unread replies: VmRSS grew by {peak - base} KiB with {sent // 28} reads of "
                f"1 MiB pipelined and no reply read (bound {CONNECTION_BOUND_KIB} KiB)")
    return None


def idle_probe(sock: str, pid: int) -> str | None:
    """100 connections that stop after the greeting: what they cost together."""
    base = rss_kib(pid)
    socks = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(TIMEOUT)
            s.connect(sock)
            s.recv(18)
        held = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    if held - base > IDLE_BOUND_KIB:
        return (f"idle connections: VmRSS grew by {held - base} KiB with 100 connections idle "
                f"after the greeting (bound {IDLE_BOUND_KIB} KiB)")
    return None


class Client:
    """A well-behaved client for health checks: GO, simple replies."""

    def __init__(self, path: str) -> None:
        self.c = Conn(path)
        self.cookie = 0

    def __enter__(self) -> Self:
        c = self.c
        c.recv_exact(W.GREETING.size)
        c.send(struct.pack(">I", 3) + W.option(W.OPT.GO, W.info_request("")))
        while True:
            _, _, rep, n = W.OPT_REPLY.unpack(c.recv_exact(W.OPT_REPLY.size))
            c.recv_exact(n)
            if rep == W.REP.ACK:
                break
            if rep & W.REP.ERR:
                raise Wrong(f"GO failed with {rep:#x}")
        self.sock = c.sock
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.c.send(W.request(W.CMD.DISC, 0, 0, 0))
        except (OSError, Hangup):
            pass
        self.c.close()

    def _reply(self) -> int:
        magic, err, cookie = W.SIMPLE.unpack(self.c.recv_exact(W.SIMPLE.size))
        if magic != W.SIMPLE_MAGIC or cookie != self.cookie:
            raise Wrong(f"simple reply {magic:#x} cookie {cookie}")
        return int(err)

    def pread(self, off: int, n: int) -> bytes:
        self.cookie += 1
        self.c.send(W.request(W.CMD.READ, self.cookie, off, n))
        err = self._reply()
        if err:
            raise Wrong(f"READ {off}+{n} failed with {err}")
        return self.c.recv_exact(n)

    def pwrite(self, off: int, data: bytes) -> None:
        self.cookie += 1
        self.c.send(W.request(W.CMD.WRITE, self.cookie, off, len(data)) + data)
        err = self._reply()
        if err:
            raise Wrong(f"WRITE {off}+{len(data)} failed with {err}")
