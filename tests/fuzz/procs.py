"""A ``pynbd serve`` process under fuzzing: start it, watch its log and its memory, stop it.

Plain Python (no pytest), so that ``scripts/fuzz`` runs the same code as the tests.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ServerProc", "log_problems", "rss_kib"]

#: How long the server may take from exec to listening (a loaded 2-CPU machine: seconds).
START_TIMEOUT = 30.0
#: How long it may take to exit after SIGTERM.
STOP_TIMEOUT = 15.0

_TRACEBACK = "Traceback (most recent call last)"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/PID/status in KiB (VmRSS, VmHWM, VmSize...); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def log_problems(text: str) -> tuple[int, list[str]]:
    """(tracebacks, other problem lines) in a server's stderr.

    A misbehaving client must cost one log line, never a traceback: a line that starts with
    whitespace continues a multi-line message (a traceback's frames, or worse).
    """
    tracebacks = text.count(_TRACEBACK)
    odd = [ln for ln in text.splitlines() if ln[:1] in (" ", "\t") and _TRACEBACK not in ln]
    return tracebacks, odd[:20]


class ServerProc:
    """``pynbd serve -f -U SOCK ARGS...`` with stderr in a file."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.args = args
        self.workdir = workdir
        self.name = name
        self.sock = str(workdir / f"{name}.sock")
        self.errpath = workdir / f"{name}.stderr"
        self.argv = [sys.executable, "-m", "pynbd", "serve", "-f", "-U", self.sock, *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> str:
        return shlex.join(["pynbd", "serve", "-f", "-U", "SOCK", *self.args])

    def start(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        with open(self.errpath, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()} exited with {self.proc.returncode}:\n"
                                   f"{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.command()} not listening after {START_TIMEOUT} s")
            time.sleep(0.02)
        self.started = time.monotonic()

    def _listening(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(self.sock) == 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.errpath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit. Returns the exit status."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return p.returncode

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait(STOP_TIMEOUT)


def first_lines(text: str, pattern: str, n: int = 3) -> list[str]:
    """The first ``n`` lines of ``text`` matching ``pattern`` (for reports)."""
    rx = re.compile(pattern)
    return [ln for ln in text.splitlines() if rx.search(ln)][:n]
