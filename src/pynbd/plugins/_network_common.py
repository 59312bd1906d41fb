"""Helpers shared by the network plugins (curl, ssh, nbd): nbdkit's password parameters and
its header/cookie scripts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_int
from pynbd.plugin import connection

__all__ = ["ScriptRunner", "log_open_error", "read_password"]

log = logging.getLogger("pynbd.server")

#: Seconds a header or cookie script may run before it is stopped.
SCRIPT_TIMEOUT = 60.0


def read_password(value: str) -> str:
    """A password parameter as nbdkit_read_password reads it: ``-`` asks on the terminal,
    ``+FILE`` reads a file, ``-FD`` reads (and closes) an inherited file descriptor, anything
    else is the password itself. One trailing newline read from a file or descriptor is
    dropped. Errors are nbdkit's messages (:class:`ConfigError`)."""
    if value == "-":
        if sys.stdin is None or not sys.stdin.isatty():
            raise ConfigError("stdin is not a tty, cannot read password interactively")
        import getpass

        return getpass.getpass("password: ")
    if value.startswith("+"):
        path = value[1:]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"open {path}: {e.strerror}") from None
    elif value.startswith("-"):
        fd = parse_int("password file descriptor", value[1:])
        if fd <= 2:
            raise ConfigError("cannot use password -FD for stdin/stdout/stderr")
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError as e:
            raise ConfigError(f"fdopen {fd}: {e.strerror}") from None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        data = b"".join(chunks)
    else:
        return value
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8", "surrogateescape")


class ScriptRunner:
    """nbdkit-curl-plugin's header-script / cookie-script: run ``script`` with ``sh -c``
    (with ``$iteration`` and ``$url`` set) the first time its output is needed, and again
    when ``renew`` seconds (0: never) have passed since it last ran. Thread-safe."""

    def __init__(self, what: str, script: str, renew: int, url: str) -> None:
        self.what = what
        self.script = script
        self.renew = renew
        self.url = url
        self.iteration = 0
        self._lock = threading.Lock()
        self._output: str | None = None
        self._when = 0.0

    def output(self) -> str:
        """The script's standard output (run it if due); CommandError(EIO) if it fails."""
        with self._lock:
            now = time.monotonic()
            if self._output is None or (self.renew and now - self._when >= self.renew):
                self._output = self._run()
                self._when = time.monotonic()
            return self._output

    def _run(self) -> str:
        env = dict(os.environ, iteration=str(self.iteration), url=self.url)
        self.iteration += 1
        try:
            cp = subprocess.run(["/bin/sh", "-c", self.script], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=SCRIPT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CommandError(5, f"{self.what}: {e}") from None
        if cp.returncode != 0:
            err = cp.stderr.decode(errors="replace").strip()
            raise CommandError(
                5, f"{self.what} failed (exit code {cp.returncode})" + (f": {err}" if err else ""))
        return cp.stdout.decode("utf-8", "replace")


def log_open_error(plugin: str, e: BaseException) -> None:
    """Log why a client could not be given the export, as nbdkit does
    (``NAME[CONN]: MESSAGE``): the client only learns that opening failed."""
    info = connection()
    who = f"{plugin}[{info.id}]" if info is not None else plugin
    log.error("%s: %s", who, getattr(e, "message", None) or e)
