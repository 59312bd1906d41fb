"""Shared test helpers: peers, servers, libnbd's Python bindings.

Import from any test module as ``from helpers import ...`` (``tests/`` is put on
``sys.path`` by ``tests/conftest.py``).

The rule for real peers (DESIGN.md, convention 13): a missing peer is a clear
*skip* on a developer's machine and a *failure* in CI (``CI=true``), where
``.ci/run`` installs them all. ``CI`` counts as set when it is one of the usual truthy
spellings (``true``, ``1``, ``yes``, ``on``; any case), and under it no test may skip at all
(tests/ci_mode.py) except through :func:`not_here`.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

__all__ = [
    "CI_TRUE",
    "IN_CI",
    "PEER_PACKAGES",
    "PYNBD",
    "SYSTEM_PYTHON",
    "DaemonServer",
    "NotHere",
    "Server",
    "ci_enabled",
    "free_tcp_port",
    "missing",
    "not_here",
    "peer_env",
    "require",
    "require_libnbd_python",
    "run_libnbd",
    "run_peer",
    "run_pynbd",
    "short_tmpdir",
    "start_daemon_server",
    "start_server",
    "unix_uri",
    "wait_listening",
]

#: The values of ``CI`` that mean "this is CI" (what CI systems set, and what people type).
CI_TRUE = frozenset({"true", "1", "yes", "on"})


def ci_enabled(value: str | None) -> bool:
    """True when the ``CI`` variable's `value` is a truthy spelling (case and spaces ignored)."""
    return value is not None and value.strip().lower() in CI_TRUE


#: True when running in CI, where every peer must be present and nothing may skip.
IN_CI: bool = ci_enabled(os.environ.get("CI"))

#: The checkout this test suite belongs to.
ROOT = Path(__file__).resolve().parents[1]
#: The command that runs this checkout's pynbd (never a `pynbd` found on PATH).
PYNBD: list[str] = [sys.executable, "-m", "pynbd"]

#: Debian's python3-libnbd is built for the system interpreter only.
SYSTEM_PYTHON = "/usr/bin/python3"

#: Which Debian package brings each peer (for the skip / failure message).
PEER_PACKAGES: dict[str, str] = {
    "nbdkit": "nbdkit",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbddump": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "nbdsh": "python3-libnbd",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
    "fio": "fio",
    "fusermount3": "fuse3",
    "tmux": "tmux",
    "file": "file",
    "ss": "iproute2",
    "pgrep": "procps",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "fallocate": "util-linux",
    "unshare": "util-linux",
}

#: A Unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
UNIX_PATH_MAX = 107

#: How long a server may take from exec to listening (seen: 3-5 s for pynbd on a loaded 2-CPU machine).
SERVER_START_TIMEOUT = 20.0
#: How long a server may take to exit after SIGTERM before it is killed (a failure).
SERVER_STOP_TIMEOUT = 10.0


def _strs(args: Sequence[str | os.PathLike[str]]) -> list[str]:
    return [os.fspath(a) for a in args]


def missing(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI, because something it needs is not here."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing peer is a failure)", pytrace=False)
    pytest.skip(reason)


class NotHere(pytest.skip.Exception):
    """A skip that stays a skip under CI (tests/ci_mode.py): raised by :func:`not_here`."""


def not_here(reason: str) -> NoReturn:
    """Skip, also in CI, because this machine lacks something no package can bring (an IPv6
    loopback, a user id). Never for a tool or a peer: those go through :func:`missing`."""
    raise NotHere(reason)


def require(tool: str) -> str:
    """Return the absolute path of peer binary `tool`; skip (or fail in CI) if absent."""
    path = shutil.which(tool)
    if path is None:
        pkg = PEER_PACKAGES.get(tool)
        hint = f" (Debian package {pkg})" if pkg else ""
        missing(f"{tool} not found on PATH{hint}")
    if tool == "nbdsh":
        require_libnbd_python()
    return path


# --------------------------------------------------------------------------- peers' environment

_peer_bin: str | None = None


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for running Debian's peers.

    ``nbdsh`` is a shell script that runs ``python3 -mnbd``: with pyenv's or a
    venv's python3 first on PATH it fails with "No module named nbd". This
    puts a directory whose only entry is ``python3 -> /usr/bin/python3`` first
    on PATH, so nbdsh (also when started by ``nbdkit --run``) finds libnbd.
    """
    global _peer_bin
    env = dict(os.environ)
    if os.path.exists(SYSTEM_PYTHON):
        if _peer_bin is None or not os.path.exists(_peer_bin):
            d = tempfile.mkdtemp(prefix="pynbd-peerbin-")
            os.symlink(SYSTEM_PYTHON, os.path.join(d, "python3"))
            atexit.register(shutil.rmtree, d, True)
            _peer_bin = d
        env["PATH"] = _peer_bin + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def _run_captured(argv: list[str], timeout: float, check: bool, input: bytes | None,
                  env: Mapping[str, str] | None) -> subprocess.CompletedProcess[bytes]:
    """Run argv with peer_env(), output captured; with check, a non-zero exit fails the test."""
    cp = subprocess.run(
        argv,
        check=False,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=peer_env(env),
    )
    if check and cp.returncode != 0:
        pytest.fail(
            f"{shlex.join(argv)} exited {cp.returncode}\n"
            f"stdout:\n{cp.stdout.decode(errors='replace')}\n"
            f"stderr:\n{cp.stderr.decode(errors='replace')}",
            pytrace=False,
        )
    return cp


def run_peer(
    tool: str,
    *args: str | os.PathLike[str],
    timeout: float = 60,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run peer `tool` (after `require`) with `peer_env()`; output is captured as bytes.

    With `check` (the default) a non-zero exit fails the test showing stderr.
    """
    argv = [require(tool), *_strs(args)]
    return _run_captured(argv, timeout, check, input, env)


# --------------------------------------------------------------------------- libnbd's Python API

_libnbd_ok: bool | None = None
_libnbd_why: str = ""


def require_libnbd_python() -> str:
    """Return the interpreter that has Debian's ``import nbd``; skip (fail in CI) if none."""
    global _libnbd_ok, _libnbd_why
    if _libnbd_ok is None:
        if not os.path.exists(SYSTEM_PYTHON):
            _libnbd_ok, _libnbd_why = False, f"{SYSTEM_PYTHON} not found"
        else:
            cp = subprocess.run(
                [SYSTEM_PYTHON, "-c", "import nbd"],
                check=False,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
            _libnbd_ok = cp.returncode == 0
            _libnbd_why = cp.stderr.strip().splitlines()[-1] if cp.stderr.strip() else ""
    if not _libnbd_ok:
        missing(
            f"libnbd's Python bindings not importable by {SYSTEM_PYTHON}"
            f" (Debian package python3-libnbd): {_libnbd_why}"
        )
    return SYSTEM_PYTHON


def run_libnbd(
    script: str,
    *args: str | os.PathLike[str],
    timeout: float = 60,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Python `script` under the system interpreter, where ``import nbd`` works.

    `args` become ``sys.argv[1:]``. Output is text; read ``.stdout``. With
    `check` (the default) a non-zero exit fails the test showing the traceback.
    Example::

        out = run_libnbd(
            "import nbd, sys\\n"
            "h = nbd.NBD(); h.connect_uri(sys.argv[1]); print(h.get_size())",
            server.uri,
        ).stdout
    """
    py = require_libnbd_python()
    argv = [py, "-c", script, *_strs(args)]
    env = peer_env()
    # Never let the test venv's settings leak into the system interpreter.
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)
    cp = subprocess.run(
        argv,
        check=False,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and cp.returncode != 0:
        pytest.fail(
            f"libnbd script exited {cp.returncode}\n--- script:\n{script}\n"
            f"--- args: {_strs(args)}\n"
            f"--- stdout:\n{cp.stdout}\n--- stderr:\n{cp.stderr}",
            pytrace=False,
        )
    return cp


def run_pynbd_libnbd(
    script: str,
    *args: str | os.PathLike[str],
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the same kind of `script` as :func:`run_libnbd`, with ``import nbd`` loading
    ``pynbd.libnbd`` (this checkout's, under this interpreter): for differential tests."""
    prelude = "import sys, pynbd.libnbd; sys.modules['nbd'] = pynbd.libnbd\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LIBNBD_DEBUG", None)
    cp = subprocess.run([sys.executable, "-c", prelude + script, *_strs(args)],
                        capture_output=True, check=False, text=True, timeout=timeout, env=env,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        pytest.fail(
            f"pynbd.libnbd run exited {cp.returncode}\n--- script:\n{script}\n"
            f"--- args: {_strs(args)}\n--- stdout:\n{cp.stdout}\n--- stderr:\n{cp.stderr}",
            pytrace=False,
        )
    return cp


_T = TypeVar("_T")


def run_async(coro: Awaitable[_T], timeout: float = 30) -> _T:
    """Run `coro` on a fresh event loop with a deadline; no task may be left behind (the
    client's structured-concurrency promise)."""
    import asyncio

    async def main() -> _T:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            me = asyncio.current_task()
            left = [t for t in asyncio.all_tasks() if t is not me]
            assert not left, f"tasks left behind: {left}"

    return asyncio.run(main())


# --------------------------------------------------------------------------- paths and ports


def short_tmpdir(prefix: str = "pynbd-") -> Path:
    """A fresh directory under /tmp, short enough for Unix socket paths.

    pytest's tmp_path can exceed the 107-byte sun_path limit with long test
    names. The caller removes it (the `sockdir` fixture does).
    """
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def unix_uri(sock: str | os.PathLike[str], export: str = "") -> str:
    """The NBD URI of a Unix socket (``nbd+unix:///EXPORT?socket=PATH``)."""
    return f"nbd+unix:///{export}?socket={os.fspath(sock)}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the kernel picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- readiness

_SO_ACCEPTCON = 0x00010000  # /proc/net/unix "Flags" of a listening socket


def _unix_listening(path: str) -> bool:
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & _SO_ACCEPTCON:
                    return True
    except OSError:
        # No procfs: fall back to a probe connection.
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                return False
    return False


def _tcp_listening(port: int) -> bool:
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                found_table = True
                next(f)
                for line in f:
                    parts = line.split()
                    # local_address is HEXIP:HEXPORT; st 0A is LISTEN.
                    if (
                        len(parts) > 3
                        and parts[3] == "0A"
                        and int(parts[1].rsplit(":", 1)[1], 16) == port
                    ):
                        return True
        except OSError:
            pass
    if not found_table:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0
    return False


def wait_listening(
    *,
    sock: str | os.PathLike[str] | None = None,
    port: int | None = None,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = SERVER_START_TIMEOUT,
    probe: str = "listen",
    describe: str = "server",
    stderr_path: Path | None = None,
) -> None:
    """Wait until something listens on Unix `sock` or TCP `port`.

    probe="listen" (default) reads /proc/net and makes no connection, so the
    server never sees a probe client (which would count as a connection, be
    logged, or end a server meant to exit after its last client).
    probe="connect" connects and closes, as a client would.
    Fails the test with the server's stderr if `proc` exits first or on timeout.
    """
    assert (sock is None) != (port is None), "give exactly one of sock, port"

    def stderr_text() -> str:
        if stderr_path is not None and stderr_path.exists():
            return stderr_path.read_text(errors="replace")
        return ""

    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if sock is not None:
            path = os.fspath(sock)
            if probe == "connect":
                with socket.socket(socket.AF_UNIX) as s:
                    ready = s.connect_ex(path) == 0
            else:
                ready = os.path.exists(path) and _unix_listening(path)
        else:
            assert port is not None
            if probe == "connect":
                with socket.socket() as s:
                    s.settimeout(1)
                    ready = s.connect_ex(("127.0.0.1", port)) == 0
            else:
                ready = _tcp_listening(port)
        if ready:
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"{describe} exited with {proc.returncode} before listening\n"
                f"--- stderr:\n{stderr_text()}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"{describe} not listening on {sock or port} after {timeout}s\n"
                f"--- stderr:\n{stderr_text()}",
                pytrace=False,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A server process started by `start_server`.

    `uri` is the NBD URI to reach it; `sock` the Unix socket path (or None),
    `host`/`port` for TCP; `proc` the Popen; `stdout`/`stderr` read what it
    printed so far (captured to files in `logdir`, so a chatty server never
    blocks on a full pipe).
    """

    argv: list[str]
    proc: subprocess.Popen[bytes]
    logdir: Path
    sock: str | None = None
    host: str | None = None
    port: int | None = None
    export: str = ""
    ok_returncodes: tuple[int, ...] = (0, -signal.SIGTERM)
    _stopped: bool = field(default=False, repr=False)

    @property
    def uri(self) -> str:
        if self.sock is not None:
            return unix_uri(self.sock, self.export)
        return f"nbd://{self.host}:{self.port}/{self.export}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return (self.logdir / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.logdir / "stderr").read_text(errors="replace")

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT, check: bool = True) -> int:
        """SIGTERM, wait; if it is still running after `timeout`, SIGKILL and fail.

        With `check`, also fail if it exits with a code outside `ok_returncodes`
        (0, or death by the SIGTERM itself). Returns the exit code. Idempotent.
        """
        if self._stopped:
            return self.proc.returncode
        self._stopped = True
        hung = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                hung = True
                _kill_group(self.proc)
                self.proc.wait(timeout)
        rc = self.proc.returncode
        if hung:
            pytest.fail(
                f"{shlex.join(self.argv)} did not exit within {timeout}s of SIGTERM"
                f" (killed)\n--- stderr:\n{self.stderr}",
                pytrace=False,
            )
        if check and rc not in self.ok_returncodes:
            pytest.fail(
                f"{shlex.join(self.argv)} exited with {rc}\n--- stderr:\n{self.stderr}",
                pytrace=False,
            )
        return rc

    def kill(self) -> None:
        """SIGKILL the server (and its process group) without checks."""
        self._stopped = True
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait(SERVER_STOP_TIMEOUT)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def start_server(
    argv: Sequence[str | os.PathLike[str]],
    *,
    logdir: Path,
    sock: str | os.PathLike[str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    export: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = SERVER_START_TIMEOUT,
    probe: str = "listen",
) -> Server:
    """Start `argv` (a server that stays in the foreground) and wait until it listens.

    Give `sock` (Unix) or `port` (TCP). The process gets its own session so a
    stuck server and its children can be killed together; stdin is /dev/null.
    """
    if sock is not None and len(os.fspath(sock)) > UNIX_PATH_MAX:
        raise ValueError(f"Unix socket path too long ({len(os.fspath(sock))} bytes): {sock}")
    cmd = _strs(argv)
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "stdout", "wb") as out, open(logdir / "stderr", "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=peer_env(env),
            cwd=cwd,
            start_new_session=True,
        )
    server = Server(
        argv=cmd,
        proc=proc,
        logdir=logdir,
        sock=os.fspath(sock) if sock is not None else None,
        host=host if port is not None else None,
        port=port,
        export=export,
    )
    try:
        wait_listening(
            sock=sock,
            port=port,
            proc=proc,
            timeout=timeout,
            probe=probe,
            describe=shlex.join(cmd),
            stderr_path=logdir / "stderr",
        )
    except BaseException:
        server.kill()
        raise
    return server


def _pid_gone(pid: int) -> bool:
    """True if `pid` no longer runs (absent, or a zombie nobody reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


@dataclass
class DaemonServer:
    """A server that forks into the background and writes a pid file (nbd-server).

    Same shape as `Server` for tests: `uri`, `sock`, `pid`, `stderr`, `stop()`.
    """

    argv: list[str]
    pid: int
    logdir: Path
    sock: str | None = None
    host: str | None = None
    port: int | None = None
    export: str = ""
    _stopped: bool = field(default=False, repr=False)

    uri = Server.uri

    @property
    def stderr(self) -> str:
        return (self.logdir / "stderr").read_text(errors="replace")

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT, check: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        if _pid_gone(self.pid):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _pid_gone(self.pid):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                if check:
                    pytest.fail(
                        f"{shlex.join(self.argv)} (pid {self.pid}) did not exit within"
                        f" {timeout}s of SIGTERM (killed)",
                        pytrace=False,
                    )
                return
            time.sleep(0.02)

    def kill(self) -> None:
        self._stopped = True
        if not _pid_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)


def _wait_pidfile(pidfile: Path, deadline: float, cmd: list[str]) -> int:
    """The pid a daemonized server wrote to `pidfile` (failing the test at `deadline`)."""
    pid = 0
    while not pid:
        try:
            pid = int(pidfile.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            pass
        if not pid:
            if time.monotonic() > deadline:
                pytest.fail(f"{shlex.join(cmd)} wrote no pid file {pidfile}", pytrace=False)
            time.sleep(0.01)
    return pid


def start_daemon_server(
    argv: Sequence[str | os.PathLike[str]],
    *,
    pidfile: Path,
    logdir: Path,
    sock: str | os.PathLike[str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    export: str = "",
    timeout: float = SERVER_START_TIMEOUT,
) -> DaemonServer:
    """Run `argv`, which daemonizes and writes `pidfile`; wait for the pid file and listener."""
    cmd = _strs(argv)
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "stdout", "wb") as out, open(logdir / "stderr", "wb") as err:
        cp = subprocess.run(
            cmd,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=peer_env(),
            timeout=timeout,
        )
    if cp.returncode != 0:
        pytest.fail(
            f"{shlex.join(cmd)} exited {cp.returncode}\n--- stderr:\n"
            + (logdir / "stderr").read_text(errors="replace"),
            pytrace=False,
        )
    deadline = time.monotonic() + timeout
    pid = _wait_pidfile(pidfile, deadline, cmd)
    server = DaemonServer(
        argv=cmd,
        pid=pid,
        logdir=logdir,
        sock=os.fspath(sock) if sock is not None else None,
        host=host if port is not None else None,
        port=port,
        export=export,
    )
    try:
        wait_listening(
            sock=sock,
            port=port,
            timeout=max(0.1, deadline - time.monotonic()),
            describe=shlex.join(cmd),
            stderr_path=logdir / "stderr",
        )
    except BaseException:
        server.kill()
        raise
    return server


def run_pynbd(
    *args: str | os.PathLike[str],
    timeout: float = 60,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run this checkout's ``pynbd ARGS`` (``sys.executable -m pynbd``), capturing bytes.

    With `check` (the default) a non-zero exit fails the test showing stderr.
    """
    argv = [*PYNBD, *_strs(args)]
    return _run_captured(argv, timeout, check, input, env)
