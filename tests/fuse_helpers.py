"""Test helpers for `pynbd fuse`: start a mount, wait until it is live, and always clean up.

The `fuse_mount` fixture is a factory; whatever it mounted is unmounted at the end of the test
even when the test failed (``fusermount3 -u``, then ``umount -l``), and every process it
started is gone. Tests that need a real kernel FUSE skip without /dev/fuse (fail under CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers import PYNBD, missing, peer_env, short_tmpdir

#: How long a mount may take to appear (python start + connect + mount).
MOUNT_TIMEOUT = 20.0
#: How long `pynbd fuse` may take to exit after an unmount or a signal.
EXIT_TIMEOUT = 10.0


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse is missing (no FUSE in this kernel/container)")
    if shutil.which("fusermount3") is None:
        missing("fusermount3 not found (Debian package fuse3)")


def in_threads(fn: Callable[[int], None], n: int) -> None:
    """Run fn(0), ..., fn(n - 1) in n threads at once and wait for them all; none may fail
    (the failures are the assertion's message)."""
    import threading

    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def is_mounted(path: str | os.PathLike[str]) -> bool:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == p:
                return True
    return False


class FuseMount:
    """A running ``pynbd fuse ... TARGET MODE...`` whose file is at :attr:`file`."""

    def __init__(self, target: Path, file: Path, args: Sequence[str], logdir: Path,
                 wait: bool = True, pass_fds: Sequence[int] = (),
                 env: dict[str, str] | None = None) -> None:
        self.target = target
        self.file = file
        self.mountpoint = target if target.is_file() else file.parent
        self.pidfile = logdir / f"fuse-{time.monotonic_ns()}.pid"
        self.errpath = logdir / f"fuse-{time.monotonic_ns()}.err"
        self.argv = [*PYNBD, "fuse", "-P", str(self.pidfile), *args]
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env=peer_env(env), start_new_session=True,
                                         pass_fds=tuple(pass_fds))
        if wait:
            self.wait_mounted()

    @property
    def stderr(self) -> str:
        return self.errpath.read_text(errors="replace")

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"pynbd fuse exited {self.proc.returncode} before mounting:\n"
                            f"{self.stderr}")
            if self.pidfile.exists() and is_mounted(self.mountpoint):
                return
            time.sleep(0.02)
        pytest.fail(f"pynbd fuse did not mount within {MOUNT_TIMEOUT} s:\n{self.stderr}")

    def unmount(self) -> int:
        """``fusermount3 -u``, then wait for the process: its exit status."""
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True,
                       capture_output=True)
        return self.wait_exit()

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pynbd fuse did not exit within {timeout} s:\n{self.stderr}")

    def children(self) -> list[int]:
        """Pids of the processes `pynbd fuse` started (a server from --command etc.)."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid:
                out.append(int(d))
        return out

    def cleanup(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True, check=False)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True,
                           check=False)
        if self.proc.poll() is None:
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        else:  # the session leader is gone; a server it started may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class FuseFactory:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.mounts: list[FuseMount] = []
        self.n = 0

    def __call__(self, *mode: str, name: str | None = None, options: Sequence[str] = (),
                 file_mode: bool = False, wait: bool = True,
                 pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> FuseMount:
        """Mount ``mode`` (a URI, or ``--command ...`` etc.) at a fresh directory (holding
        ``name`` or the default ``nbd``), or over a fresh regular file with ``file_mode``."""
        self.n += 1
        mp = self.dir / f"mp{self.n}"
        if file_mode:
            mp.write_bytes(b"")
            target, file = mp, mp
        else:
            mp.mkdir()
            target = mp / name if name else mp
            file = mp / (name or "nbd")
        m = FuseMount(target, file, [*options, str(target), *mode], self.dir, wait=wait,
                      pass_fds=pass_fds, env=env)
        self.mounts.append(m)
        return m

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            m.cleanup()


@pytest.fixture
def fuse_mount() -> Iterator[Callable[..., FuseMount]]:
    require_fuse()
    d = short_tmpdir("pynbd-fuse-")
    f = FuseFactory(d)
    try:
        yield f
    finally:
        f.cleanup()
        for m in f.mounts:
            assert not is_mounted(m.mountpoint)
        shutil.rmtree(d, ignore_errors=True)
