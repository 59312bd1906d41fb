"""The handle, ``nbd.NBD``: its state, the calls that make progress (``poll``,
``aio_notify_*``) or report it (``aio_is_*``, ``aio_command_completed``...), statistics and
closing. The other calls are its parts: :mod:`~pynbd.libnbd.settings`,
:mod:`~pynbd.libnbd.connect`, :mod:`~pynbd.libnbd.options` and
:mod:`~pynbd.libnbd.commands`."""

from __future__ import annotations

import contextlib
import errno as _errno
import itertools
import os
import sys
import threading
import time
import weakref
from operator import index as _index
from typing import Self

from pynbd.libnbd.callbacks import index
from pynbd.libnbd.calls import api
from pynbd.libnbd.commands import Commands
from pynbd.libnbd.connect import Connecting
from pynbd.libnbd.constants import (
    AIO_DIRECTION_READ,
    AIO_DIRECTION_WRITE,
    ALLOW_TRANSPORT_MASK,
    CLOSE_TIMEOUT,
    HANDSHAKE_FLAG_MASK,
    STRICT_MASK,
    TLS_ALLOW,
    TLS_DISABLE,
)
from pynbd.libnbd.driver import Driver, wait_until
from pynbd.libnbd.engine import Engine, Stats
from pynbd.libnbd.errors import ClosedHandle
from pynbd.libnbd.options import Options
from pynbd.libnbd.settings import Settings
from pynbd.libnbd.states import (
    CLOSED,
    CONNECTING,
    CREATED,
    DEAD,
    NEGOTIATING,
    READY,
    ST_INFLIGHT,
    STATE_TEXT,
)
from pynbd.protocol.client import CState
from pynbd.protocol.constants import Cmd, Opt
from pynbd.protocol.transmission import build_request

__all__ = ["NBD", "close_all"]

_live: weakref.WeakSet[NBD] = weakref.WeakSet()
_names = itertools.count(1)


class NBD(Settings, Connecting, Options, Commands):
    """NBD handle."""

    def __init__(self) -> None:
        """Create a new NBD handle."""
        self._gone = False
        self._lock = threading.RLock()
        self._ctx = ""
        self._name = f"nbd{next(_names)}"
        self._debug_on = os.environ.get("LIBNBD_DEBUG") == "1"
        self._debug_cb = None
        self._private: int = 0
        # settings
        self._export_name = ""
        self._full_info = False
        self._tls = TLS_DISABLE
        self._tls_verify = True
        self._tls_username = None
        self._tls_certs = None
        self._tls_psk = None
        self._tls_hostname = None
        self._request_sr = True
        self._request_bs = True
        self._pread_init = True
        self._hflags = HANDSHAKE_FLAG_MASK
        self._strict = STRICT_MASK
        self._opt_mode = False
        self._meta = []
        self._allow_transports = ALLOW_TRANSPORT_MASK
        self._allow_tls = TLS_ALLOW
        self._allow_local_file = False
        # connection
        self._state = CREATED
        self._driver = Driver()
        self._eng = None
        self._connecting = None
        self._stats = Stats()
        self._info = None                       # ExportInfo once the server sent it
        self._contexts = set()
        self._rules = None
        self._uri = None                        # how we connected, for get_uri
        self._disconnecting = False
        self._cookie = 1
        self._eager = False
        self._inflight = {}
        self._done = {}
        self._pending_opt = None                # an aio option or connect in progress
        self._phase = ["connect"]               # "handshake" once the socket is connected
        _live.add(self)

    def __del__(self) -> None:
        if getattr(self, "_gone", True):
            return
        with contextlib.suppress(Exception):
            self._teardown(wait=not sys.is_finalizing())

    def __repr__(self) -> str:
        return f"<nbd.NBD {self._name} {STATE_TEXT[self._state][0]}>"

    def _refresh(self) -> str:
        """The state as libnbd knows it. A handle learns that the server hung up when it
        reads, which happens only inside its own calls."""
        eng = self._eng
        if self._state == READY and eng is not None and (eng.failure is not None or eng.closed):
            self._state = CLOSED if self._disconnecting else DEAD
        return self._state

    # ---- making progress -----------------------------------------------------------------
    @api()
    def poll(self, timeout: int) -> int:
        """Wait up to ``timeout`` ms (-1: forever) for the connection and make progress
        (callbacks run here); 1 if anything happened, 0 on timeout."""
        t = _index(timeout)
        st = self._refresh()
        if st not in (CONNECTING, READY):
            raise self._err(f"nothing to poll for in state {STATE_TEXT[st][0]}", _errno.EINVAL)
        deadline = None if t < 0 else time.monotonic() + t / 1000
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._driver.step(left):
                self._refresh()
                return 1
            if left is not None and time.monotonic() >= deadline:  # type: ignore[operator]
                return 0
            if self._driver.fd_events() is None:
                return 0

    @api()
    def aio_get_fd(self) -> int:
        """The connection's socket: poll it for aio_get_direction() and then call
        aio_notify_read() or aio_notify_write()."""
        w = self._driver.fd_events()
        if w is None:
            raise self._err("connection has not been established", _errno.ENOTCONN)
        self._eager = True
        if self._eng is not None and self._eng._out:
            self._eng.write_queued()
        return w[0]

    @api()
    def aio_get_direction(self) -> int:
        """What the connection waits for: AIO_DIRECTION_READ, _WRITE, both, or 0."""
        w = self._driver.fd_events()
        if w is None or self._refresh() not in (CONNECTING, READY):
            return 0
        ev = w[1]
        return (AIO_DIRECTION_READ if ev & 1 else 0) | (AIO_DIRECTION_WRITE if ev & 4 else 0)

    @api()
    def aio_notify_read(self) -> None:
        """The socket is readable: read and process what arrived (callbacks run here)."""
        self._driver.notify(readable=True)
        self._refresh()

    @api()
    def aio_notify_write(self) -> None:
        """The socket is writable: write what is queued."""
        self._driver.notify(readable=False)
        self._refresh()

    # ---- what the handle is doing --------------------------------------------------------
    @api()
    def aio_is_created(self) -> bool:
        return self._state == CREATED

    @api()
    def aio_is_connecting(self) -> bool:
        return self._refresh() == CONNECTING

    @api()
    def aio_is_negotiating(self) -> bool:
        return self._refresh() == NEGOTIATING

    @api()
    def aio_is_ready(self) -> bool:
        return self._refresh() == READY

    @api()
    def aio_is_processing(self) -> bool:
        return False

    @api()
    def aio_is_dead(self) -> bool:
        return self._refresh() == DEAD

    @api()
    def aio_is_closed(self) -> bool:
        return self._refresh() == CLOSED

    @api()
    def aio_command_completed(self, cookie: int) -> bool:
        """False while pending (or unknown); True once done and retired; raises nbd.Error
        with the command's errno if it failed."""
        cmd = self._done.get(index(cookie))
        if cmd is None:
            return False
        self._retire(cmd)
        return True

    @api()
    def aio_peek_command_completed(self) -> int:
        """The first completed, unretired cookie; 0 if commands are in flight but none is
        done; EINVAL when nothing is in flight."""
        if self._done:
            return next(iter(self._done))
        if self._inflight:
            return 0
        raise self._err("no commands are in flight", _errno.EINVAL)

    @api(ST_INFLIGHT)
    def aio_in_flight(self) -> int:
        """Commands issued whose replies have not been processed yet."""
        return len(self._inflight)

    @api()
    def connection_state(self) -> str:
        """``"STATE: description"``."""
        short, text = STATE_TEXT[self._refresh()]
        return f"{short}: {text}"

    @api()
    def kill_subprocess(self, signum: int) -> None:
        """Signal the server started by connect_command (0 means SIGTERM)."""
        import signal as _signal

        s = index(signum)
        if s < 0:
            raise self._err("signum: invalid value for parameter", _errno.EINVAL)
        eng = self._eng or self._connecting
        proc = eng._proc if eng is not None else None
        if proc is None:
            raise self._err("no subprocess exists", _errno.ESRCH)
        try:
            proc.send_signal(s or _signal.SIGTERM)
        except OSError as e:
            raise self._err("kill", e.errno or _errno.ESRCH) from None

    # ---- statistics (1.16) ---------------------------------------------------------------
    @api()
    def stats_bytes_sent(self) -> int:
        return self._stats.bytes_sent

    @api()
    def stats_chunks_sent(self) -> int:
        return self._stats.chunks_sent

    @api()
    def stats_bytes_received(self) -> int:
        return self._stats.bytes_received

    @api()
    def stats_chunks_received(self) -> int:
        """Option replies, simple replies and structured reply chunks received."""
        eng = self._eng
        return self._stats.chunks_received + (eng._dec.chunks if eng is not None else 0)

    # ---- closing (1.16) ------------------------------------------------------------------
    def close(self) -> None:
        """Close the handle and its connection. Any later call raises nbd.ClosedHandle."""
        if self._gone:
            raise ClosedHandle("NBD handle is closed")
        with self._lock:
            self._teardown(wait=True)

    def _teardown(self, wait: bool) -> None:
        """Polite when it may wait: commands in flight may finish (for up to CLOSE_TIMEOUT
        seconds; their callbacks are not called), then NBD_CMD_DISC (NBD_OPT_ABORT while
        negotiating); then the hang-up, and a server we started is stopped."""
        if self._gone:
            return
        if self._debug_on and not self._ctx and wait:
            self._ctx = "nbd_close"
            try:
                self._debug_msg("closing handle")
            finally:
                self._ctx = ""
        self._gone = True
        _live.discard(self)
        eng, self._eng = self._eng, None
        connecting, self._connecting = self._connecting, None
        for cmd in list(self._inflight.values()) + list(self._done.values()):
            cmd.unpin()
        self._inflight.clear()
        self._done.clear()
        driver = self._driver
        driver.cancel()
        if connecting is not None and connecting is not eng:
            connecting.hang_up()
            connecting.reap(wait=False)
        if eng is None:
            return
        if wait and not eng.closed:
            with contextlib.suppress(Exception):
                self._goodbye(eng)
        eng.hang_up()
        driver.forget_fd()
        eng.reap(wait=wait)

    def _goodbye(self, eng: Engine) -> None:
        """Let commands in flight finish, then say goodbye (best effort)."""
        driver = self._driver
        driver.eng = eng
        if eng.connected:
            wait_until(lambda: not eng._pending or eng.closed, driver.step, CLOSE_TIMEOUT)
            if eng.closed:
                return
            if not self._disconnecting:
                eng._out.append(build_request(Cmd.DISC, self._cookie, 0, 0, 0, eng.extended))
        elif eng.hs.state is CState.OPTIONS and eng.hs.fixed_newstyle and eng.stream is not None:
            eng.stream.write([eng.hs.option(Opt.ABORT)])  # the reply need not be read
        else:
            return
        eng.write_queued()
        wait_until(lambda: eng.stream is None or not eng.stream.pending or eng.closed,
                   driver.step, CLOSE_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._gone:
            self.close()


def close_all() -> None:
    """At exit: close every handle still open."""
    for h in list(_live):
        with contextlib.suppress(Exception):
            h._teardown(wait=True)
