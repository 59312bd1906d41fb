"""How a handle runs the client engine in the caller's thread, as libnbd runs its state
machine: progress is made inside the library calls (``poll()``, the blocking calls,
``aio_notify_read()``/``aio_notify_write()``), never behind the caller's back, and there is
no thread and no event loop.

A :class:`Driver` has at most one coroutine on the go (connecting and negotiating, or an
option): it awaits only :class:`~pynbd.stream.WantIO` (a descriptor ready for reading or
writing), so the driver waits with ``poll(2)`` and resumes it. Once the connection is in
transmission, the engine's commands are queued by the calls that make them
(:meth:`AsyncClient.submit <pynbd.client.engine.AsyncClient.submit>`), written when the
driver steps, and their replies decoded when the socket is readable; each command's
completion runs then, in the thread that called the library.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pynbd.libnbd.engine import Engine
from pynbd.stream import WantIO

__all__ = ["Driver", "connect", "wait_until"]

_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT
_DONE = select.POLLIN | select.POLLHUP | select.POLLERR


class Driver:
    """Steps one handle's connection in the caller's thread."""

    def __init__(self) -> None:
        self.eng: Engine | None = None
        self.coro: Coroutine[Any, Any, Any] | None = None
        self._then: Callable[[Any, BaseException | None], None] | None = None
        #: What the coroutine waits for.
        self.want: WantIO | None = None
        #: How a coroutine ended in an aio call, to be reported by the next step.
        self._ended: tuple[Any, BaseException | None] | None = None
        self._fd = -1  # the descriptor it waited on last
        self._poll = select.poll()
        self._polled: tuple[int, int] | None = None

    # ---- the coroutine --------------------------------------------------------------------
    def start(self, coro: Coroutine[Any, Any, Any],
              then: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``coro`` from now on, stepped by :meth:`step`; ``then(result, exception)``
        when it ends (in the call that stepped it last)."""
        self.coro, self._then, self.want = coro, then, None

    def resume(self, defer: bool = False) -> None:
        """Run the coroutine until it waits again or ends. ``defer``: in an aio call, which
        reports nothing: an end is reported by the next step, as libnbd reports it."""
        coro = self.coro
        assert coro is not None
        try:
            want = coro.send(None)
        except StopIteration as e:
            self._end(e.value, None, defer)
            return
        except BaseException as e:  # noqa: BLE001 - handed to then()
            self._end(None, e, defer)
            return
        if not isinstance(want, WantIO):
            self._end(None, RuntimeError(f"a handle's coroutine awaited {want!r}"), defer)
            return
        self.want = want
        self._fd = want.fd

    def _end(self, result: Any, exc: BaseException | None, defer: bool = False) -> None:
        if defer:
            self.want = None
            self._ended = (result, exc)
            return
        then = self._then
        self.coro = self._then = self.want = None
        assert then is not None
        then(result, exc)

    def _report(self) -> None:
        result, exc = self._ended  # type: ignore[misc]
        self._ended = None
        self._end(result, exc)

    def cancel(self) -> None:
        """Drop the coroutine (closing the handle)."""
        coro, self.coro, self._then, self.want = self.coro, None, None, None
        self._ended = None
        if coro is not None:
            coro.close()

    # ---- waiting ---------------------------------------------------------------------------
    def fd_events(self) -> tuple[int, int] | None:
        """The descriptor to wait on and for what, or None if there is nothing to wait for."""
        if self.coro is not None:
            w = self.want
            if w is None:
                return (self._fd, _POLLIN) if self._ended is not None else None
            return w.fd, w.events
        eng = self.eng
        if eng is None or eng.closed or eng.stream is None:
            return None
        st = eng.stream
        return st.rfd, _POLLIN | (_POLLOUT if st.pending or eng._out else 0)

    def _wait(self, fd: int, events: int, timeout: float | None) -> int:
        """poll(2) one descriptor: the events that happened (0: timed out)."""
        p = self._poll
        if self._polled != (fd, events):
            if self._polled is not None and self._polled[0] != fd:
                try:
                    p.unregister(self._polled[0])
                except KeyError:
                    pass
            p.register(fd, events)
            self._polled = (fd, events)
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        while True:
            try:
                r = p.poll(ms)
            except InterruptedError:
                continue
            return r[0][1] if r else 0

    def forget_fd(self) -> None:
        """The descriptor was closed: never poll it again."""
        if self._polled is not None:
            try:
                self._poll.unregister(self._polled[0])
            except KeyError:
                pass
            self._polled = None

    # ---- stepping --------------------------------------------------------------------------
    def step(self, timeout: float | None) -> bool:
        """Make progress, waiting up to ``timeout`` seconds (None: as long as it takes) for
        the connection to be ready: True if something happened."""
        if self.coro is not None:
            if self._ended is not None:
                self._report()
                return True
            if self.want is None:
                self.resume()
                return True
            if not self._wait(self.want.fd, self.want.events, timeout):
                return False
            self.resume()
            return True
        eng = self.eng
        if eng is None or eng.closed or eng.stream is None:
            return False
        st = eng.stream
        if eng._out:
            eng._flush()  # write_queued
        got = eng.lib_stats.bytes_received
        # what has already arrived, without waiting (hot path: benchmarks/client_read.py)
        if getattr(st, "buffered", None) is None:
            eng._read_guarded()
        else:
            self._read_ready(eng)
        if eng.lib_stats.bytes_received != got or eng.closed:
            return True
        r = self._wait(st.rfd, _POLLIN | (_POLLOUT if st.pending else 0), timeout)
        if not r:
            return False
        if r & _POLLOUT and not eng.closed:
            st.flush()
        if r & _DONE and not eng.closed:
            self._read_ready(eng)
        return True

    @staticmethod
    def _read_ready(eng: Engine) -> None:
        """Read what is there; over TLS also what OpenSSL holds already decrypted, which the
        descriptor does not signal."""
        eng._on_readable()
        st = eng.stream
        buffered = getattr(st, "buffered", None)
        while buffered is not None and not eng.closed and buffered():
            eng._on_readable()

    def notify(self, readable: bool) -> None:
        """``aio_notify_read``/``aio_notify_write``: the program's own poll says the
        descriptor is ready; make what progress there is, without waiting."""
        if self.coro is not None:
            if self._ended is not None:
                self._report()
            else:
                self.resume()
            return
        eng = self.eng
        if eng is None or eng.closed or eng.stream is None:
            return
        if eng._out:
            eng.write_queued()
        if readable:
            self._read_ready(eng)
        else:
            eng.stream.flush()


async def connect(eng: Engine, where: dict[str, Any], export_name: str,
                  phase: list[str]) -> Engine:
    """Connect (``where`` is what the call prepared: a connect(2) in progress, a socket,
    a command or socket activation to start) and negotiate; ``phase[0]`` becomes
    "handshake" once connected."""
    pending = where.get("pending")
    if pending is not None:
        sock, rest = pending
        sock = await _finish_connect(sock, rest)
    elif "sock" in where:
        sock = where["sock"]
    elif "command" in where:
        sock = eng.start_command(where["command"])
    elif "socket_activation" in where:
        sock = eng.start_activation(where["socket_activation"])
    else:
        raise ValueError(f"nothing to connect to: {where!r}")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    eng.attach(sock)
    phase[0] = "handshake"
    await eng._handshake(export_name)
    return eng


async def _finish_connect(sock: socket.socket, rest: list[Any]) -> socket.socket:
    """Wait for a connect(2) in progress; if it fails try the other getaddrinfo()
    addresses in turn, as libnbd; raise the last failure."""
    while True:
        await WantIO(sock.fileno(), _POLLOUT)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            return sock
        sock.close()
        last = OSError(err, os.strerror(err))
        nxt = None
        while rest and nxt is None:
            family, kind, proto, _canon, addr = rest.pop(0)
            try:
                s = socket.socket(family, kind, proto)
            except OSError as e:
                last = e
                continue
            s.setblocking(False)
            try:
                s.connect(addr)
                return s
            except BlockingIOError:
                nxt = s
            except OSError as e:
                s.close()
                last = e
        if nxt is None:
            raise last
        sock = nxt


def wait_until(pred: Callable[[], bool], step: Callable[[float | None], bool],
               timeout: float) -> bool:
    """Step until ``pred()`` or ``timeout`` seconds have passed (closing)."""
    deadline = time.monotonic() + timeout
    while not pred():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not step(left):
            return pred()
    return True
