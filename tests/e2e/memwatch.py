"""Watch a process's memory and activity from /proc, for the tests of the server's bounds.

    reset_peak(pid)              # VmHWM := VmRSS (writes 5 to /proc/PID/clear_refs)
    wait_idle(pid)               # until the process used no CPU for a while
    peak(pid) - base             # the most it held since the reset
"""

from __future__ import annotations

import os
import socket
import threading
import time

__all__ = ["MiB", "Sender", "open_fds", "peak", "reset_peak", "rss", "wait_idle", "wait_until"]

MiB = 1024 * 1024
_TICK = os.sysconf("SC_CLK_TCK")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss(pid: int) -> int:
    """Resident memory now, in bytes (VmRSS)."""
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    """The most resident memory since start or :func:`reset_peak` (VmHWM), in bytes."""
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """CPU time used by ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def wait_idle(pid: int, quiet: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until ``pid`` has used no CPU for ``quiet`` seconds (it waits for its clients)."""
    deadline = time.monotonic() + timeout
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"process {pid} still busy after {timeout}s")


def wait_until(cond: object, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Sender(threading.Thread):
    """Send ``data`` on ``sock`` from a thread: the test goes on while the server reads
    it (or stops reading it)."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self, timeout: float = 30.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the sender is still blocked"
        if self.error is not None:
            raise self.error
