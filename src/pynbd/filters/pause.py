"""The pause filter: hold requests on command. Its manual page is :class:`PauseFilter`'s
docstring."""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import absolute_path
from pynbd.filters._sleep import POLL_INTERVAL, abort_reason
from pynbd.plugin import Filter, connection

__all__ = ["PauseFilter"]

log = logging.getLogger("pynbd.server")

#: The longest Unix socket path (sun_path holds 108 bytes with the terminating NUL).
UNIX_PATH_MAX = 108


class _Gate:
    """Requests pass while open; closing it waits for those inside to leave."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paused = False
        self.inside = 0

    def enter(self) -> None:
        info = connection()
        with self.cond:
            while self.paused:
                reason = abort_reason(info)
                if reason is not None:  # shutting down: a paused request gives up
                    raise CommandError(errno.ESHUTDOWN, reason.replace("sleep", "pause"))
                self.cond.wait(POLL_INTERVAL)
            self.inside += 1

    def leave(self) -> None:
        with self.cond:
            self.inside -= 1
            self.cond.notify_all()

    def pause(self) -> None:
        with self.cond:
            if self.paused:
                return
            self.paused = True
            log.debug("pause: pausing, waiting for requests to complete")
            while self.inside > 0:
                self.cond.wait()
            log.debug("pause: paused")

    def resume(self) -> None:
        with self.cond:
            if self.paused:
                self.paused = False
                self.cond.notify_all()
                log.debug("pause: resumed")


class _ControlServer:
    """The control socket: one client at a time sends commands (single bytes)."""

    def __init__(self, path: str, gate: _Gate) -> None:
        self.path = path
        self.gate = gate
        with contextlib.suppress(OSError):
            os.unlink(path)  # a stale socket from an earlier run
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            self.sock.listen(socket.SOMAXCONN)
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"{path}: {e.strerror}") from None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopped = False
        # The socket goes away at exit even if the server never got to unload filters
        # (a later layer refusing its configuration, say).
        atexit.register(self.stop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pause-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"q")
        if self._thread is not None:
            self._thread.join()
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._wake_r in ready:
                    return
                try:
                    client, _ = self.sock.accept()
                except OSError as e:
                    log.error("accept: %s", e.strerror)
                    continue
                with client:
                    if self._serve(client, sel):
                        return

    def _serve(self, client: socket.socket, sel: selectors.BaseSelector) -> bool:
        """Answer one client's commands until it hangs up; True if asked to stop. Other
        clients wait in the listen backlog meanwhile."""
        sel.unregister(self.sock)
        sel.register(client, selectors.EVENT_READ)
        try:
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._wake_r in ready:
                    return True
                try:
                    data = client.recv(4096)
                except OSError:
                    return False
                if not data:
                    return False
                reply = self._commands(data)
                try:
                    if reply:
                        client.sendall(reply)
                except OSError:
                    return False
        finally:
            sel.unregister(client)
            sel.register(self.sock, selectors.EVENT_READ)

    def _commands(self, data: bytes) -> bytes:
        out = bytearray()
        for c in data:
            if c == ord("p"):
                self.gate.pause()
                out += b"P"
            elif c == ord("r"):
                self.gate.resume()
                out += b"R"
            elif c in b"\n\t ":
                continue  # typed by hand: ignored, no answer
            else:
                out += b"X"
        return bytes(out)


class PauseFilter(Filter):
    """NAME
        pause - pause NBD requests

    SYNOPSIS
        pynbd serve --filter=pause PLUGIN [PLUGIN-ARGS...] pause-control=SOCKET

    DESCRIPTION
        pause is a filter that stops requests from being served, and later lets them go on,
        on command. It can hold a client still while a snapshot of the storage is taken.

        Control socket
            pause-control names a Unix domain socket the filter listens on for commands:
            the byte 'p' pauses, 'r' resumes. The filter answers each with the same letter
            in upper case ('P', 'R') once it has taken effect: 'P' is sent only after every
            request that had started (before the pause) has finished, so the plugin is then
            idle (unless it works in threads of its own that the filter cannot see).
            Requests received while paused wait until the resume. Newlines, tabs and spaces
            are ignored (no answer), for interactive use; anything else is answered 'X'.
            One control client is served at a time.

        Flush requests are not held (as with nbdkit). A request waiting while the server
        shuts down, or its client disconnects, gives up with ESHUTDOWN. The socket is
        created when the server starts (an existing file of that name is replaced) and
        removed when it exits.

        Kernel clients and virtual machines tolerate only short pauses before their own
        timeouts strike. Pausing several servers cannot give one consistent snapshot of a
        machine's disks: they pause at slightly different moments.

        This is nbdkit-pause-filter(1) for pynbd; the protocol is nbdkit 1.32's.

    PARAMETERS
        pause-control=SOCKET
            The control socket (required). See "Control socket" above.

    EXAMPLES
        Copy a large file slowly, so that a pause can be seen:

            pynbd serve -U - --filter=pause --filter=rate file BIG.iso rate=10M \\
                pause-control=sock --run 'qemu-img convert -p "$nbd" /var/tmp/out'

        Pause it (the copy seems to hang), then resume:

            echo p | nc -U sock
            echo r | nc -U sock
    """

    name = "pause"
    version = "1.0"
    config_help = "pause-control=SOCKET           Control socket."

    def __init__(self) -> None:
        self.sockfile: str | None = None
        self.gate = _Gate()
        self.control: _ControlServer | None = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "pause-control":
            self.sockfile = absolute_path(value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.sockfile is None:
            raise ConfigError("pause-control socket was not set")
        n = len(os.fsencode(self.sockfile))
        if n >= UNIX_PATH_MAX:
            raise ConfigError(f"pause-control socket path too long: length {n} > max "
                              f"{UNIX_PATH_MAX - 1} bytes")
        self.control = _ControlServer(self.sockfile, self.gate)

    def after_fork(self) -> None:
        if self.control is not None:
            self.control.start()

    def unload(self) -> None:
        if self.control is not None:
            self.control.stop()
            self.control = None

    def _through(self, fn: Any, *args: Any) -> Any:
        self.gate.enter()
        try:
            return fn(*args)
        finally:
            self.gate.leave()

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._through(next.pread, count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._through(next.pwrite, buf, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._through(next.zero, count, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._through(next.trim, count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._through(next.extents, count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._through(next.cache, count, offset, flags)
