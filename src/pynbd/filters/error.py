"""The error filter: inject errors. Its manual page is :class:`ErrorFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import absolute_path, scan_double
from pynbd.plugin import Filter

__all__ = ["ErrorFilter"]

log = logging.getLogger("pynbd.server")

#: The errors a client can be sent (the NBD protocol has few), by nbdkit's names.
ERRORS = {"EPERM": errno.EPERM, "EIO": errno.EIO, "ENOMEM": errno.ENOMEM,
          "EINVAL": errno.EINVAL, "ENOSPC": errno.ENOSPC, "ESHUTDOWN": errno.ESHUTDOWN}
_NAMES = {v: k for k, v in ERRORS.items()}
#: The requests errors can be injected into (``error-METHOD...`` parameters).
METHODS = ("pread", "pwrite", "trim", "zero", "extents", "cache")
_UINT32_MAX = (1 << 32) - 1
#: Parameter -> (the requests it applies to, what it sets).
_PARAMETERS: dict[str, tuple[tuple[str, ...], str]] = {
    "error": (METHODS, "error"), "error-rate": (METHODS, "rate"),
    "error-file": (METHODS, "file"),
    **{f"error-{m}": ((m,), "error") for m in METHODS},
    **{f"error-{m}-rate": ((m,), "rate") for m in METHODS},
    **{f"error-{m}-file": ((m,), "file") for m in METHODS},
}


class _Settings:
    """What to inject into one kind of request."""

    __slots__ = ("error", "file", "rate")

    def __init__(self) -> None:
        self.error = errno.EIO
        self.rate = 0.0
        self.file: str | None = None


def parse_error(key: str, value: str) -> int:
    try:
        return ERRORS[value]
    except KeyError:
        raise ConfigError(f"{key}: unknown error name '{value}'") from None


def parse_error_rate(key: str, value: str) -> float:
    """``N%`` or a probability 0..1 (C's floating point syntax)."""
    scanned = scan_double(value)
    if scanned is None or scanned[1] not in ("", "%"):
        raise ConfigError(f"{key}: could not parse rate '{value}'")
    d = scanned[0] / 100.0 if scanned[1] == "%" else scanned[0]
    if d < 0 or d > 1:
        raise ConfigError(f"{key}: rate out of range: '{value}' parsed as {d:g}")
    return d


class ErrorFilter(Filter):
    """NAME
        error - inject errors for testing clients

    SYNOPSIS
        pynbd serve --filter=error PLUGIN
            [error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN]
            [error-rate=10%|0.1]
            [error-file=/tmp/inject]
            [error-pread=...] [error-pread-rate=...] [error-pread-file=...]
            [error-pwrite=...] [error-pwrite-rate=...] [error-pwrite-file=...]
            [error-trim=...] [error-trim-rate=...] [error-trim-file=...]
            [error-zero=...] [error-zero-rate=...] [error-zero-file=...]
            [error-extents=...] [error-extents-rate=...] [error-extents-file=...]
            [error-cache=...] [error-cache-rate=...] [error-cache-file=...]

    DESCRIPTION
        error is a filter that makes requests fail at random, to test how NBD clients cope
        with errors. Each injected error is logged ("injecting EIO error into pread") and the
        client gets that errno; the request never reaches the plugin.

        Every parameter is optional, but without a rate (error-rate or an error-*-rate) the
        filter does nothing. Flush requests are never failed.

        This is nbdkit-error-filter(1) for pynbd; the parameters are nbdkit 1.32's.

    PARAMETERS
        error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN
            The error to inject (the NBD protocol carries only these). The default is EIO.

        error-rate=N%
        error-rate=0..1
            The share of requests that fail: a percentage from 0% to 100%, or a probability
            from 0 to 1. 0 (the default) never fails, 100% or 1 always does.

        error-file=FILENAME
            Inject errors only while FILENAME exists (the rate still applies). Create the
            file to start failing at a chosen moment; delete it to let a client recover.

        error-pread, error-pread-rate, error-pread-file
        error-pwrite, error-pwrite-rate, error-pwrite-file
        error-trim, error-trim-rate, error-trim-file
        error-zero, error-zero-rate, error-zero-file
        error-extents, error-extents-rate, error-extents-file
        error-cache, error-cache-rate, error-cache-file
            The same as error, error-rate and error-file, for one kind of request only
            (reads, writes, trims, zeroes, block status, cache). Later parameters override
            earlier ones.

    EXAMPLES
        A few errors at random:

            pynbd serve --filter=error file disk.img error-rate=1%

        Reads, trims, cache and block status succeed; every write and zero fails with "No
        space left on device":

            pynbd serve --filter=error file disk.img error=ENOSPC \\
                error-pwrite-rate=100% error-zero-rate=100%

        Every request fails from the moment /tmp/inject is created:

            rm -f /tmp/inject
            pynbd serve --filter=error file disk.img error-rate=100% error-file=/tmp/inject
            sleep 60; touch /tmp/inject
    """

    name = "error"
    version = "1.0"
    #: A stat() of error-file at most: never waits, so it may run on the event loop.
    nonblocking = True
    config_help = (
        "error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN\n"
        "                               The error indication to return.\n"
        "error-rate=0%..100%|0..1       Rate of errors to generate.\n"
        "error-file=TRIGGER             Set trigger filename.\n"
        "error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*\n"
        "                               Apply settings only to read/write/etc")

    def __init__(self) -> None:
        self.settings = {m: _Settings() for m in METHODS}
        self._random = random.Random()
        self._lock = threading.Lock()

    def config(self, next_config: Any, key: str, value: str) -> None:
        what = _PARAMETERS.get(key)
        if what is None:
            next_config(key, value)
            return
        methods, field = what
        targets = [self.settings[m] for m in methods]
        if field == "error":
            err = parse_error(key, value)
            for s in targets:
                s.error = err
        elif field == "rate":
            rate = parse_error_rate(key, value)
            for s in targets:
                s.rate = rate
        else:
            path = absolute_path(value)
            for s in targets:
                s.file = path

    def _maybe_fail(self, method: str) -> None:
        """Raise the configured error, at the configured rate (nbdkit's random_error)."""
        s = self.settings[method]
        if s.rate <= 0:
            return
        if s.file is not None and not os.path.exists(s.file):
            return
        if not s.rate >= 1:
            with self._lock:
                r = self._random.getrandbits(32)
            if r >= s.rate * _UINT32_MAX:
                return
        msg = f"injecting {_NAMES[s.error]} error into {method}"
        log.error("%s", msg)
        raise CommandError(s.error, msg)

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._maybe_fail("pread")
        return next.pread(count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._maybe_fail("pwrite")
        next.pwrite(buf, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._maybe_fail("trim")
        next.trim(count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._maybe_fail("zero")
        next.zero(count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._maybe_fail("extents")
        return next.extents(count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._maybe_fail("cache")
        next.cache(count, offset, flags)
