"""The exitwhen filter: exit gracefully when an event happens. Its manual page is
:class:`ExitwhenFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._behaviour_common import shell
from pynbd.filters._params import absolute_path, parse_int, parse_uint64, parse_unsigned
from pynbd.plugin import Filter, ThreadModel, shutdown

__all__ = ["ExitwhenFilter"]

log = logging.getLogger("pynbd.filters.exitwhen")

#: A script's exit status meaning "the event happened".
EVENT_STATUS = 88


@dataclass
class _Event:
    kind: str  # file-created, file-deleted, fd-closed, process-exits, script
    path: str = ""  # the file, or the script
    fd: int = -1  # the pipe's fd, or /proc/PID/stat held open


def _happened(event: _Event) -> bool:
    """Whether ``event`` has happened (errors are logged and count as not yet)."""
    if event.kind == "file-created":
        if os.access(event.path, os.R_OK):
            log.debug("exit-when-file-created: detected %s created", event.path)
            return True
        return False
    if event.kind == "file-deleted":
        try:
            os.stat(event.path)
        except (FileNotFoundError, NotADirectoryError):
            log.debug("exit-when-file-deleted: detected %s deleted", event.path)
            return True
        except OSError as e:
            log.error("exit-when-file-deleted: access: %s: %s", event.path, e.strerror)
        return False
    if event.kind == "process-exits":
        # /proc/PID/stat of the original process, held open since configuration: once
        # the process is gone a read fails with ESRCH, even if the PID is reused.
        try:
            os.pread(event.fd, 1, 0)
        except ProcessLookupError:
            log.debug("exit-when-process-exits: detected process exit")
            return True
        except OSError as e:
            log.error("exit-when-process-exits: read: %s", e.strerror)
        return False
    if event.kind == "fd-closed":
        return _fd_closed(event.fd)
    return _script(event.path)


def _fd_closed(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)
    try:
        ready = poller.poll(0)
    except OSError as e:
        log.error("exit-when-pipe-closed: poll: %s", e.strerror)
        return False
    revents = ready[0][1] if ready else 0
    if revents & select.POLLHUP:
        log.debug("exit-when-pipe-closed: detected pipe closed")
        return True
    if revents & select.POLLNVAL:
        # A bad descriptor is the user's mistake: found at get_ready, it ends the server.
        log.error("exit-when-pipe-closed: invalid file descriptor")
        return True
    return False


def _script(command: str) -> bool:
    try:
        rc = shell(command).returncode
    except OSError as e:
        log.error("exit-when-script: %s", e)
        return False
    if rc == 0:
        return False
    if rc == EVENT_STATUS:
        log.debug("exit-when-script: detected scripted event")
        return True
    if rc > 0:
        log.error("exit-when-script: command failed with exit code %d", rc)
    else:
        log.error("exit-when-script: command was killed by signal %d", -rc)
    return False


class ExitwhenFilter(Filter):
    """NAME
        exitwhen - pynbd exitwhen filter: exit gracefully when an event happens

    SYNOPSIS
        pynbd serve --filter=exitwhen PLUGIN [exit-when-file-created=FILENAME]
                    [exit-when-file-deleted=FILENAME] [exit-when-pipe-closed=FD]
                    [exit-when-process-exits=PID] [exit-when-script=SCRIPT]
                    [exit-when-poll=SECS] [PLUGIN-ARGS...]

    DESCRIPTION
        exitwhen makes the server exit gracefully when something happens outside it: a
        file is created or deleted, a pipe is closed, a process exits, or a script of yours
        says so.

        Once the event has happened the server refuses new clients, waits until the
        connected ones have gone, and exits (status 0). If it happened before the server
        started, the server exits at once.

        Events are looked for when a client connects or disconnects, and, while no client
        is connected, every exit-when-poll seconds.

        The exitlast filter is a similar filter; --exit-with-parent (or running the client
        with --run) are other ways to end the server.

        This is nbdkit-exitwhen-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        Several exit-when-* events may be given: the server exits when any of them
        happens. With none, the filter does nothing.

        exit-when-file-created=FILENAME
        exit-when-file-deleted=FILENAME
            Exit when FILENAME is created (exists and can be read), or deleted. A relative
            name is taken from the directory the server was started in.

        exit-when-pipe-closed=FD
            FD is the read end of a pipe(2) passed to the server: exit when the other end
            is closed. Nothing is read from the pipe. (exit-when-fd-closed is the same.)

        exit-when-process-exits=PID
            Exit when the process PID exits. There is a small race between handing the PID
            to the server and the filter first looking at it: an unrelated process could
            take the PID meanwhile; the pipe is more reliable when the other program can be
            changed. (exit-when-pid-exits is the same.)

        exit-when-script=SCRIPT
            Run the shell command SCRIPT to find out whether the event happened: exit
            status 0 means not yet; 88, that it happened; 1 to 87 are logged as errors,
            and the server goes on; 89 and above are kept for later uses. Use an absolute
            path for a script file (the server may change directory in the background).

        exit-when-poll=SECS
            While no client is connected, look for the events every SECS seconds (with
            clients connected, the filter looks when one connects or disconnects). Default
            60.

    EXAMPLES
        Exit once /tmp/stop exists and the clients have gone:

            pynbd serve --filter=exitwhen memory 1G exit-when-file-created=/tmp/stop

        Exit when process 1234 has exited and the clients have gone:

            pynbd serve --filter=exitwhen memory 1G exit-when-process-exits=1234
    """

    name = "exitwhen"
    nonblocking = True

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.pollsecs = 60
        self.exiting = False
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key in ("exit-when-file-created", "exit-when-file-deleted"):
            self.events.append(_Event(key[10:], path=absolute_path(value)))
        elif key in ("exit-when-pipe-closed", "exit-when-fd-closed"):
            self.events.append(_Event("fd-closed", fd=parse_int("exit-when-pipe-closed",
                                                               value)))
        elif key in ("exit-when-process-exits", "exit-when-pid-exits"):
            pid = parse_uint64("exit-when-process-exits", value)
            path = f"/proc/{pid}/stat"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ConfigError(f"exit-when-process-exits: {path}: {e.strerror}") from None
            self.events.append(_Event("process-exits", fd=fd))
        elif key == "exit-when-script":
            self.events.append(_Event("script", path=value))
        elif key == "exit-when-poll":
            self.pollsecs = parse_unsigned("exit-when-poll", value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        # Only a script makes a check wait: otherwise checks are a few system calls.
        self.nonblocking = not any(  # type: ignore[misc]
            e.kind == "script" for e in self.events)

    def _check(self) -> bool:
        """Look for the events (call with the lock held): True once one has happened."""
        if not self.exiting:
            for event in self.events:
                if _happened(event):
                    self.exiting = True
        return self.exiting

    def get_ready(self, thread_model: ThreadModel) -> None:
        with self._lock:
            if self._check():
                raise SystemExit(0)  # the event happened before we started: exit now

    def after_fork(self) -> None:
        self._poller = threading.Thread(target=self._poll, name="pynbd-exitwhen",
                                        daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        """While no client is connected, look for the events every pollsecs seconds."""
        while not self._stop.is_set():
            with self._lock:
                if self.connections == 0 and self._check():
                    log.debug("exitwhen: shutdown from polling thread")
                    shutdown()
            self._stop.wait(self.pollsecs)

    def preconnect(self, next_preconnect: Any, readonly: bool) -> None:
        with self._lock:
            if self._check():
                raise CommandError(errno.ESHUTDOWN,
                                   "exitwhen: nbdkit is exiting: rejecting new connection")
        next_preconnect(readonly)

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        with self._lock:
            self.connections += 1
        return None

    def close(self, h: Any) -> None:
        with self._lock:
            self._check()
            self.connections -= 1
            if self.connections == 0 and self.exiting:
                log.debug("exitwhen: exiting on last client connection")
                shutdown()

    def cleanup(self) -> None:
        self._stop.set()

    def unload(self) -> None:
        self._stop.set()
        for event in self.events:
            if event.fd >= 0:  # /proc/PID/stat, or the pipe handed to us
                os.close(event.fd)
                event.fd = -1
