"""The log filter's output: nbdkit's log line format and log scripts (private).

:class:`LogOutput` writes each event the way nbdkit 1.32's log filter does, to a file (one
line, timestamped) and/or to a script (run with the event's fields as shell variables), so
that existing log readers and scripts work unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from typing import Any

__all__ = ["ENTER", "LEAVE", "PRINT", "LogOutput", "error_name", "shell_quote"]

log = logging.getLogger("pynbd.server")

ENTER, LEAVE, PRINT = "ENTER", "LEAVE", "PRINT"

#: Characters a string may hold and still be written unquoted (nbdkit's shell_quote).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/")
#: The shell that runs log scripts (as nbdkit 1.32, which runs bash, calling it "sh").
SCRIPT_SHELL = "/bin/bash"
#: Seconds the server waits at exit for log scripts still running.
SCRIPT_EXIT_WAIT = 5.0


def shell_quote(s: str) -> str:
    """``s`` as a shell word: as is when only safe characters, else double-quoted."""
    if s and all(c in _SAFE for c in s):
        return s
    out = ['"']
    for c in s:
        if c in '$`\\"':
            out.append("\\")
        out.append(c)
    out.append('"')
    return "".join(out)


#: errno -> the NBD error name logged (what the client receives, as nbdkit decodes it).
_ERROR_NAMES = {
    errno.EROFS: "EPERM", errno.EPERM: "EPERM", errno.EIO: "EIO", errno.ENOMEM: "ENOMEM",
    errno.EDQUOT: "ENOSPC", errno.EFBIG: "ENOSPC", errno.ENOSPC: "ENOSPC",
    errno.ESHUTDOWN: "ESHUTDOWN", errno.ENOTSUP: "ENOTSUP", errno.EOPNOTSUPP: "ENOTSUP",
    errno.EOVERFLOW: "EOVERFLOW",
}


def error_name(e: BaseException) -> str:
    """The error a failed call sends the client, by name (nbdkit's leave_simple): an errno
    it cannot send is EINVAL; an exception without errno is EIO (what pynbd sends)."""
    err = getattr(e, "errno", None)
    if not isinstance(err, int) or err == 0:
        return "EIO"
    return _ERROR_NAMES.get(err, "EINVAL")


def _timestamp() -> str:
    ns = time.time_ns()
    secs, usec = divmod(ns // 1000, 1_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)) + f".{usec:06d}"


class LogOutput:
    """Where log events go: a file, a script, both or neither."""

    def __init__(self) -> None:
        self.file: Any = None
        self.script: str | None = None
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[bytes]] = []

    def open_file(self, path: str, append: bool) -> None:
        flags = os.O_CLOEXEC | os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(path, flags, 0o666)
        self.file = os.fdopen(fd, "a" if append else "w", encoding="utf-8",
                              errors="surrogateescape")

    def emit(self, conn: int | None, id: int, act: str, type: str, text: str) -> None:
        """One event: ``conn`` the connection number (None outside a connection), ``id``
        the transaction (0: none), ``text`` the fields (``offset=0x0 count=0x200``)."""
        if self.file is not None:
            self._to_file(conn, id, act, type, text)
        if self.script is not None:
            self._to_script(conn, id, act, type, text)

    def _to_file(self, conn: int | None, id: int, act: str, type: str, text: str) -> None:
        parts = [_timestamp()]
        if conn is not None:
            parts.append(f" connection={conn}")
        parts.append(" ..." if type == LEAVE else " ")
        parts.append(act)
        if id:
            parts.append(f" id={id}")
        if text:
            parts.append(" " + text)
        if type == ENTER:
            parts.append(" ...")
        parts.append("\n")
        line = "".join(parts)
        with self._lock:
            self.file.write(line)
            self.file.flush()

    def _to_script(self, conn: int | None, id: int, act: str, type: str, text: str) -> None:
        lines = [f"act={act}"]
        if conn is not None:
            lines.append(f"connection={conn}")
        lines.append(f"type={type}")
        if id:
            lines.append(f"id={id}")
        lines.append(text)
        lines.append(self.script or "")
        program = "\n".join(lines)
        shell = SCRIPT_SHELL if os.access(SCRIPT_SHELL, os.X_OK) else "/bin/sh"
        with self._lock:
            # Scripts run on their own: their time and exit status never hold a request up.
            self._children = [p for p in self._children if p.poll() is None]
            try:
                self._children.append(subprocess.Popen(
                    ["sh", "-c", program], executable=shell, stdin=subprocess.DEVNULL))
            except OSError as e:
                log.error("logscript: %s", e.strerror)

    def close(self) -> None:
        """Close the file; wait a little for scripts still running."""
        deadline = time.monotonic() + SCRIPT_EXIT_WAIT
        with self._lock:
            children, self._children = self._children, []
        for p in children:
            try:
                p.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                pass
        if self.file is not None:
            self.file.close()
            self.file = None
