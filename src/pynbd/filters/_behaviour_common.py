"""Helpers of the behaviour filters (private): running a shell command the way C's
``system()``/``popen()`` do, for the filters that take scripts (exportname's
``exportdesc=script:``, exitwhen's ``exit-when-script``), and the retry filters' sleep, which
ends early when the server shuts down (``nbdkit_nanosleep``). Their parameters are parsed by
:mod:`pynbd.filters._params`.
"""

from __future__ import annotations

import subprocess
import time

from pynbd.plugin import connection

__all__ = ["shell", "sleep"]


def shell(command: str, capture: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` with ``/bin/sh -c`` (as C's ``system``/``popen`` do): stdin from
    /dev/null, stdout captured with ``capture``, else (like stderr) the server's own."""
    return subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else None, check=False)


#: How often a sleep looks whether the server is shutting down.
_SLEEP_STEP = 0.1


def sleep(seconds: float) -> bool:
    """Sleep ``seconds`` in the calling (worker) thread, as ``nbdkit_nanosleep``: False if
    the sleep was cut short because the server began shutting down, else True."""
    info = connection()
    server = info.server if info is not None else None
    deadline = time.monotonic() + seconds
    while True:
        if server is not None and getattr(server, "closing", False):
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, _SLEEP_STEP))
