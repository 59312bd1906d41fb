"""How a tool ends, as libnbd's C tools do: a server it started never outlives it, and a
signal whose default action is to kill it kills it, with no traceback and no message.

:func:`tool` wraps the main of a tool that may start a server. :func:`die_of` ends the
process as the signal's default action would (the shell sees 128 + the signal number), after
the caller has cleaned up what it could.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import NoReturn

__all__ = ["die_of", "tool"]


@contextlib.contextmanager
def tool(*, default_sigint: bool = False) -> Iterator[None]:
    """Run a tool's main: servers it starts (``[ CMD ]``, ``--command``...) get SIGTERM from
    the kernel when the process ends, whatever way it ends (SIGTERM, SIGHUP, SIGKILL,
    SIGPIPE...; a normal end stops them itself). ``default_sigint``: Ctrl-C kills at once, as
    in a C program, rather than raising KeyboardInterrupt (which a blocked write does not
    see). Both are as they were afterwards (a main called in a test's process)."""
    from pynbd.client import spawn

    was = spawn.servers_die_with_this_process(True)
    old_sigint = None
    if default_sigint and threading.current_thread() is threading.main_thread():
        old_sigint = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
        spawn.servers_die_with_this_process(was)


def die_of(signum: int) -> NoReturn:
    """End this process by signal ``signum``'s default action."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached (a signal that does not kill: exit as if it did)
