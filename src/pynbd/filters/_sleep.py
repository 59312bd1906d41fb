"""Sleeping in a filter without holding up a shutdown (private to the built-in filters).

:func:`nanosleep` is nbdkit's ``nbdkit_nanosleep`` for filters that wait (delay, rate): it
sleeps in the calling worker thread (never on the event loop), and gives up early, failing
the request with ESHUTDOWN, when the server is shutting down or the client's connection is
closing (the client sent NBD_CMD_DISC, hung up, or broke the protocol). nbdkit's messages are
logged as errors: "aborting sleep because of server shut down" / "... connection close or
error".
"""

from __future__ import annotations

import errno
import logging
import time

from pynbd.errors import CommandError
from pynbd.plugin import ConnectionInfo, connection

__all__ = ["POLL_INTERVAL", "abort_reason", "nanosleep"]

log = logging.getLogger("pynbd.server")

#: Seconds between two looks at the server and connection state during a long sleep:
#: how late, at most, a shutdown notices a sleeping request. The sleep itself ends on time.
POLL_INTERVAL = 0.05


def abort_reason(info: ConnectionInfo | None) -> str | None:
    """Why a sleep for connection ``info`` must stop now (nbdkit's message), or None."""
    if info is None:
        return None
    if getattr(info.server, "closing", False):
        return "aborting sleep because of server shut down"
    if info.closing:
        return "aborting sleep because of connection close or error"
    return None


def nanosleep(seconds: float) -> None:
    """Sleep ``seconds`` in this worker thread; raise ``CommandError(ESHUTDOWN)`` if the
    server shuts down or this client's connection closes meanwhile."""
    if seconds <= 0:
        return
    info = connection()
    deadline = time.monotonic() + seconds
    while True:
        reason = abort_reason(info)
        if reason is not None:
            log.error("%s", reason)
            raise CommandError(errno.ESHUTDOWN, reason)
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, POLL_INTERVAL))
