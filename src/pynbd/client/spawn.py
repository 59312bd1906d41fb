"""Starting the NBD server a client connects to: ``command=`` (the server speaks NBD on its
stdin and stdout, a socket pair) and ``socket_activation=`` (systemd socket activation: a
listening Unix socket as its fd 3, LISTEN_PID and LISTEN_FDS=1).

A server started here is the client's to stop: the engine stops it when the connection ends.
A program that must never leave one behind, whatever way it ends (a signal's default action,
SIGKILL, ``os._exit``), calls :func:`servers_die_with_this_process`: from then on such servers
get SIGTERM from the kernel when the process ends (Linux ``PR_SET_PDEATHSIG``). Every
``pynbd`` tool does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["servers_die_with_this_process", "start_activated", "start_command"]

_PR_SET_PDEATHSIG = 1
_die_with_process = False


def servers_die_with_this_process(on: bool = True) -> bool:
    """Servers started from now on get SIGTERM when this process ends, however it ends
    (``on=False``: no longer). Returns the previous setting.

    The kernel sends it when the *thread* that started the server ends: start servers from
    a thread that lives as long as the process (the main thread, or an event loop's thread
    that does). Off by default, since a library cannot know its threads' lifetimes."""
    global _die_with_process
    was, _die_with_process = _die_with_process, on
    return was


def _child_setup() -> Callable[[], None] | None:
    """The function run in the child before exec (None: nothing to do). The C function is
    looked up here, before the fork, so that the child only calls it."""
    if not _die_with_process:
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent = os.getpid()
    sig = int(signal.SIGTERM)

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return setup


def start_command(argv: Sequence[str], sock: socket.socket) -> subprocess.Popen[bytes]:
    """Run ``argv`` with ``sock`` (one end of a socket pair) as its stdin and stdout."""
    return subprocess.Popen(list(argv), stdin=sock.fileno(), stdout=sock.fileno(),
                            close_fds=True, preexec_fn=_child_setup())  # noqa: PLW1509


#: The listening socket goes in as stdin and the shell moves it to fd 3: dash (/bin/sh on
#: Debian) cannot name descriptors above 9 in a redirection. exec keeps the shell's pid,
#: which is what LISTEN_PID must name.
_ACTIVATION_WRAPPER = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 0</dev/null'


def start_activated(argv: Sequence[str], listener: socket.socket) -> subprocess.Popen[bytes]:
    """Run ``argv`` with systemd socket activation: ``listener`` (a listening socket) as
    its fd 3."""
    return subprocess.Popen(["/bin/sh", "-c", _ACTIVATION_WRAPPER, "sh", *argv],
                            stdin=listener.fileno(), close_fds=True,
                            preexec_fn=_child_setup())  # noqa: PLW1509
