"""The client engine as a libnbd handle uses it: :class:`pynbd.client.engine.AsyncClient`
without an event loop (the handle drives it in the caller's thread, see
:mod:`pynbd.libnbd.driver`), on a stream that counts protocol bytes for ``stats_*``, with
libnbd's ways of starting a server subprocess and of option mode on a plain newstyle server.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

from pynbd.client.engine import PROC_EXIT_GRACE, PROC_TERM_WAIT, AsyncClient
from pynbd.libnbd.errors import HangUp
from pynbd.stream import FdStream, WantIO

__all__ = ["CountingStream", "Engine", "Stats", "child_perror", "exec_error", "reap"]

_POLLIN = 1


class Stats:
    """What ``stats_*`` report: protocol bytes and chunks each way."""

    __slots__ = ("bytes_received", "bytes_sent", "chunks_received", "chunks_sent")

    def __init__(self) -> None:
        self.bytes_sent = self.chunks_sent = self.bytes_received = self.chunks_received = 0


class CountingStream(FdStream):
    """The engine's stream, driven by the handle (no event loop), counting the protocol bytes
    and the request and option headers sent, and the bytes received while negotiating (the
    engine's reader counts those of replies)."""

    def __init__(self, sock: socket.socket, stats: Stats) -> None:
        super().__init__(None, sock.fileno(), owner=sock)
        self.stats = stats

    def write(self, bufs: list[Any]) -> None:
        st = self.stats
        for b in bufs:
            n = memoryview(b).nbytes
            st.bytes_sent += n
            if isinstance(b, bytes) and n != 4:  # headers and options; not the client flags
                st.chunks_sent += 1
        super().write(bufs)

    def write_joined(self, data: bytes, parts: int) -> None:
        st = self.stats
        st.bytes_sent += len(data)
        st.chunks_sent += parts  # request headers, one chunk each
        FdStream.write_joined(self, data, parts)

    async def read_some(self, n: int = 65536) -> bytes:
        """Negotiation reads. A reset connection raises (libnbd: "recv: Connection reset by
        peer") and EOF raises :class:`~pynbd.libnbd.errors.HangUp`."""
        while True:
            if self.closed:
                raise HangUp("server closed the connection during the handshake")
            try:
                data = os.read(self.rfd, n)
                break
            except BlockingIOError:
                await WantIO(self.rfd, _POLLIN)
        if not data:
            raise HangUp("server closed the connection during the handshake")
        self.stats.bytes_received += len(data)
        return data


def _counting_tls_stream() -> type:
    """CountingStream's counting over TLS (client/tls.py, which imports ssl, is imported
    when a handle first uses TLS)."""
    from pynbd.client.tls_stream import TlsStream

    class _CountingTlsStream(TlsStream):
        def __init__(self, ssock: Any, stats: Stats) -> None:
            super().__init__(None, ssock)
            self.stats = stats

        def write(self, bufs: list[Any]) -> None:
            st = self.stats
            for b in bufs:
                n = memoryview(b).nbytes
                st.bytes_sent += n
                if isinstance(b, bytes) and n != 4:  # as CountingStream counts
                    st.chunks_sent += 1
            super().write(bufs)

        def write_joined(self, data: bytes, parts: int) -> None:
            st = self.stats
            st.bytes_sent += len(data)
            st.chunks_sent += parts  # as CountingStream counts
            TlsStream.write(self, [data])

        async def read_some(self, n: int = 65536) -> bytes:
            data = await super().read_some(n)
            if not data:
                raise HangUp("server closed the connection during the handshake")
            self.stats.bytes_received += len(data)
            return data

    return _CountingTlsStream


def counting_tls_stream(ssock: Any, stats: Stats) -> Any:
    """A CountingStream over TLS (the class is made on first use)."""
    global _CTS
    if _CTS is None:
        _CTS = _counting_tls_stream()
    return _CTS(ssock, stats)


_CTS: Any = None


class Engine(AsyncClient):
    """The engine with a handle's pre-connect settings applied and libnbd's ways."""

    def __init__(self, stats: Stats, settings: dict[str, Any]) -> None:
        super().__init__()
        self.lib_stats = stats
        self._rstats = stats  # the reader counts the bytes it receives there
        self.lib_in_handshake = False
        for k, v in settings.items():
            setattr(self, k, v)

    def attach(self, sock: socket.socket) -> None:
        """Talk NBD over ``sock`` (connected), driven by the handle."""
        sock.setblocking(False)
        self._owner = sock
        self.stream = CountingStream(sock, self.lib_stats)  # type: ignore[assignment]

    async def _handshake(self, *a: Any, **kw: Any) -> Any:
        self.lib_in_handshake = True
        try:
            return await super()._handshake(*a, **kw)
        finally:
            self.lib_in_handshake = False

    async def _export_name(self, name: str) -> None:
        # libnbd in option mode stays in negotiation with a plain newstyle server too, and
        # sends NBD_OPT_EXPORT_NAME at opt_go().
        if self.opt_mode and self.lib_in_handshake:
            return
        await super()._export_name(name)

    async def lib_export_name(self, name: str) -> None:
        """opt_go() on a plain newstyle server: NBD_OPT_EXPORT_NAME, then transmission."""
        await super()._export_name(name)

    async def _wait_fd(self, fd: int, events: int) -> None:
        await WantIO(fd, events)

    def _tls_stream(self, ssock: Any) -> Any:
        return counting_tls_stream(ssock, self.lib_stats)

    async def _recv_event(self) -> Any:
        ev = await super()._recv_event()
        self.lib_stats.chunks_received += 1
        return ev

    def start_command(self, argv: list[str]) -> socket.socket:
        """connect_command: a program that cannot be run gets libnbd's child's message on
        stderr, and the handle then sees the server hang up, as in libnbd."""
        from pynbd.client.spawn import start_command

        mine, theirs = socket.socketpair()
        try:
            self._proc = start_command(argv, theirs)
        except OSError as e:
            child_perror(argv[0], e)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._proc_grace = PROC_EXIT_GRACE
        return mine

    def start_activation(self, argv: list[str]) -> socket.socket:
        """connect_systemd_socket_activation: the server gets a listening Unix socket as fd
        3 and this end connects to it at once. It keeps the listener open until connected,
        so a server that cannot start or exits early resets the connection. A program that
        cannot be run gets libnbd's child's message on stderr."""
        from pynbd.client.spawn import start_activated

        d = tempfile.mkdtemp(prefix="pynbd-sa-")
        path = os.path.join(d, "sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ls.bind(path)
            ls.listen(socket.SOMAXCONN)
            failed = exec_error(argv[0])
            if failed is not None:
                child_perror(argv[0], failed)
            else:
                self._proc = start_activated(argv, ls)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
        finally:
            ls.close()
            shutil.rmtree(d, ignore_errors=True)
        return sock

    def hang_up(self) -> None:
        """Close the connection at once (what was queued is not sent)."""
        if not self.closed:
            self._shutdown(ConnectionError("the connection was closed"))
        elif self.stream is None and self._owner is not None:
            self._owner.close()

    def reap(self, wait: bool = True) -> None:
        """Stop a server this engine started (see :func:`reap`)."""
        p, self._proc = self._proc, None
        if p is not None:
            reap(p, self._proc_grace if wait else 0.0)


def reap(p: Any, grace: float) -> None:
    """Wait for a server we started: ``grace`` seconds to exit by itself (a socket-pair
    server sees EOF), then SIGTERM, then SIGKILL."""

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        delay = 0.001
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return p.poll() is not None

    try:
        if not wait(grace):
            p.terminate()
            wait(PROC_TERM_WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def exec_error(prog: str) -> OSError | None:
    """What execvp(prog) would fail with before running anything (None: it would run)."""
    def check(path: str) -> OSError | None:
        if not os.path.exists(path):
            return FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return PermissionError(_errno.EACCES, os.strerror(_errno.EACCES))
        return None

    if not prog:
        return FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))
    if "/" in prog:
        return check(prog)
    seen: OSError | None = None
    for d in os.environ.get("PATH", "/bin:/usr/bin").split(os.pathsep):
        err = check(os.path.join(d or ".", prog))
        if err is None:
            return None
        if isinstance(err, PermissionError):
            seen = err
    return seen or FileNotFoundError(_errno.ENOENT, os.strerror(_errno.ENOENT))


def child_perror(prog: str, err: OSError) -> None:
    """The line libnbd's child writes on stderr when it cannot run the server."""
    text = f"{prog}: {os.strerror(err.errno or _errno.ENOENT)}\n"
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        os.write(2, text.encode("utf-8", "surrogateescape"))
