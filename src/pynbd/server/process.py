"""The serving process: privileges, daemonizing, pid files, --run, --exit-with-parent, signals.

Each function does one of the things nbdkit does to its own process between binding and
serving; :mod:`pynbd.server.main` calls them in nbdkit's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from pynbd.errors import ConfigError
from pynbd.server.options import Options
from pynbd.server.server import Server

__all__ = [
    "Terminated",
    "catch_early_signals",
    "change_user",
    "daemonize",
    "detach_stdio",
    "keep_heap",
    "listen_fds",
    "lock_memory",
    "run_captive",
    "run_loop",
    "set_pdeathsig",
    "start_command",
    "write_pidfile",
]

#: Modules the server may import lazily while serving, imported before -u/-g drop
#: privileges: the new user may not be able to read the Python installation (a pyenv
#: under /root), and a failed lazy import then would break a running server.
_PRELOAD = ("concurrent.futures.thread", "traceback", "linecache", "encodings.idna",
            "pynbd.server.connection", "pynbd.server.stream", "pynbd.stream")


class Terminated(BaseException):
    """SIGTERM or SIGQUIT arrived before the event loop took signals over."""


def _early_signal(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def catch_early_signals() -> None:
    """Until the loop installs its handlers, SIGTERM/SIGQUIT raise :class:`Terminated`.

    The exception unwinds through the finally blocks (listeners closed, the -U - directory
    removed, plugin cleanup) instead of killing the process where it stands: a supervisor
    may signal a server that is still loading.
    """
    for sig in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, _early_signal)


# ---- privileges ----------------------------------------------------------------------------


def _uid(user: str) -> int:
    import pwd

    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def _gid(group: str) -> int:
    import grp

    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def change_user(o: Options, tmpdir: str | None = None) -> None:
    """-g GROUP then -u USER (names or numbers), after binding, as nbdkit.

    A private ``-U -`` directory is handed to the new user so the server can still remove
    it at exit.
    """
    if o.group is None and o.user is None:
        return
    for mod in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    if tmpdir is not None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            os.chown(tmpdir, -1 if o.user is None else _uid(o.user),
                     -1 if o.group is None else _gid(o.group))
    if o.group is not None:
        try:
            gid = _gid(o.group)
        except KeyError:
            raise ConfigError(f"-g: unknown group: {o.group}") from None
        try:
            os.setgroups([gid])
            os.setgid(gid)
        except OSError as e:
            raise ConfigError(f"-g {o.group}: cannot change group: {e.strerror}") from None
    if o.user is not None:
        try:
            uid = _uid(o.user)
        except KeyError:
            raise ConfigError(f"-u: unknown user: {o.user}") from None
        try:
            os.setuid(uid)
        except OSError as e:
            raise ConfigError(f"-u {o.user}: cannot change user: {e.strerror}") from None


def lock_memory() -> None:
    """--swap: mlockall, so serving swap to our own host cannot deadlock on paging us in."""
    libc = ctypes.CDLL(None, use_errno=True)
    MCL_CURRENT, MCL_FUTURE = 1, 2
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        raise ConfigError(f"--swap: mlockall: {os.strerror(err)}")


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: With TLS: allocations up to this size come from the heap, not a mapping of their own.
HEAP_MMAP_THRESHOLD = 4 * 1024 * 1024
#: With TLS: free memory at the top of the heap kept for reuse, up to this much.
HEAP_TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_heap() -> None:
    """Let glibc keep freed heap memory for reuse instead of returning it to the kernel
    (``mallopt``; nothing where there is no glibc, or when the environment tunes malloc).

    For TLS: every batch of encrypted replies leaves OpenSSL's memory BIO as a new bytes
    object (``MemoryBIO.read``, 256 KiB and up), freed once written. With glibc's
    defaults the freed top of the heap goes back to the kernel whenever it exceeds twice
    the largest block seen, and the next batches fault fresh pages in again: 10,000-30,000
    page faults per GiB sent to nbdcopy, 3-9% of the server's time (docs/performance.md).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "trim_threshold" in tunables or "mmap_threshold" in tunables or \
            "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # the user's own settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)


def set_pdeathsig() -> None:
    """--exit-with-parent: SIGTERM when the parent process dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# ---- stdio, daemonizing, pid file ----------------------------------------------------------


def detach_stdio() -> None:
    """Point fds 0 and 1 at /dev/null (nbdkit does this after get_ready)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
    finally:
        os.close(devnull)


def write_pidfile(o: Options) -> None:
    if o.pidfile:
        tmp = o.pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, o.pidfile)


def daemonize(verbose: bool) -> None:
    """Fork into the background: the parent exits 0, the child leads a new session in /."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not verbose:
        os.dup2(devnull, 2)
    os.close(devnull)


def listen_fds() -> list[socket.socket] | None:
    """systemd's socket activation (LISTEN_PID, LISTEN_FDS): the sockets, or None."""
    pid = os.environ.get("LISTEN_PID")
    nfds = os.environ.get("LISTEN_FDS")
    if pid is None or nfds is None:
        return None
    if pid != str(os.getpid()):
        logging.getLogger("pynbd").info("LISTEN_PID was not for us (ignored)")
        return None
    del os.environ["LISTEN_PID"]
    del os.environ["LISTEN_FDS"]
    os.environ.pop("LISTEN_FDNAMES", None)
    try:
        n = int(nfds)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS is not a number: {nfds!r}") from None
    if not 1 <= n <= 16:
        raise ConfigError(f"LISTEN_FDS out of range: {n}")
    socks = []
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


# ---- running: the loop, --run ----------------------------------------------------------


def start_command(cmd: str, uri: str, o: Options, unix_path: str | None,
                  port: int | None) -> subprocess.Popen[bytes]:
    """--run CMD under /bin/sh with nbdkit's variables ($uri, $nbd, $port, $unixsocket...)."""
    assigns = {
        "uri": uri, "nbd": uri, "port": "" if port is None else str(port),
        "unixsocket": unix_path or "", "exportname": o.export,
    }
    script = "".join(f"{k}={shlex.quote(v)}\n" for k, v in assigns.items()) + cmd
    return subprocess.Popen(["/bin/sh", "-c", script], close_fds=True)


def run_loop(server: Server, main_coro: Coroutine[Any, Any, None]) -> int:
    """Run the server's coroutine; SIGINT, SIGTERM and SIGQUIT shut it down cleanly."""
    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(sig, server.shutdown)
        await main_coro

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        asyncio.run(runner())
    finally:
        # Closing the loop put SIGTERM back to its default: a repeated SIGTERM while the
        # listeners, the -U - directory and the plugin are cleaned up must not cut that short.
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


def run_captive(server: Server, listeners: list[socket.socket],
                runner: subprocess.Popen[bytes]) -> int:
    """Serve until --run's command exits; exit with its status (128+N for signal N)."""
    async def both() -> None:
        loop = asyncio.get_running_loop()

        def wait_for_cmd() -> None:
            # A plain thread, not the loop's executor: nothing to import lazily (which can
            # fail after -u), and nothing that can fail and leave the server running
            # forever after CMD is gone.
            try:
                runner.wait()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(server.shutdown)

        watcher = threading.Thread(target=wait_for_cmd, name="pynbd-run-wait", daemon=True)
        watcher.start()
        try:
            await server.serve(listeners)
        finally:
            if runner.poll() is None:
                runner.terminate()

    run_loop(server, both())
    rc = runner.returncode
    if rc is None:
        rc = runner.wait()
    return 128 - rc if rc < 0 else rc
