"""The delay filter: slow requests down. Its manual page is :class:`DelayFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_bool, parse_unsigned, scan_unsigned
from pynbd.filters._sleep import nanosleep
from pynbd.plugin import Filter, Flag

__all__ = ["DelayFilter"]

log = logging.getLogger("pynbd.server")

_UINT_MAX = (1 << 32) - 1

#: Parameter -> the delays it sets (milliseconds): nbdkit 1.32's names and aliases.
_KEYS: dict[str, tuple[str, ...]] = {
    "rdelay": ("read",), "delay-read": ("read",), "delay-reads": ("read",),
    "wdelay": ("write", "zero", "trim"),
    "delay-write": ("write",), "delay-writes": ("write",),
    "delay-zero": ("zero",), "delay-zeroes": ("zero",),
    "delay-trim": ("trim",), "delay-trims": ("trim",),
    "delay-discard": ("trim",), "delay-discards": ("trim",),
    "delay-extent": ("extents",), "delay-extents": ("extents",),
    "delay-cache": ("cache",),
    "delay-open": ("open",), "delay-close": ("close",),
}


def parse_delay(key: str, value: str) -> int:
    """A delay in milliseconds: ``NN`` seconds or ``NNms`` (nbdkit 1.32's rules)."""
    if len(value) > 2 and value.endswith("ms"):
        ms = scan_unsigned(value)
        if ms is None:
            raise ConfigError(f"cannot parse {key} in milliseconds parameter: {value}")
        return ms
    secs = parse_unsigned(key, value)
    if secs * 1000 > _UINT_MAX:
        raise ConfigError(f"seconds parameter {key} is too large: {value}")
    return secs * 1000


class DelayFilter(Filter):
    """NAME
        delay - pynbd delay filter

    SYNOPSIS
        pynbd serve --filter=delay PLUGIN rdelay=SECS wdelay=SECS [PLUGIN-ARGS...]

        pynbd serve --filter=delay PLUGIN rdelay=NNms wdelay=NNms [PLUGIN-ARGS...]

        pynbd serve --filter=delay PLUGIN [PLUGIN-ARGS...]
                    delay-read=(SECS|NNms) delay-write=(SECS|NNms)
                    delay-zero=(SECS|NNms) delay-trim=(SECS|NNms)
                    delay-extents=(SECS|NNms) delay-cache=(SECS|NNms)
                    delay-fast-zero=BOOL
                    delay-open=(SECS|NNms) delay-close=(SECS|NNms)

    DESCRIPTION
        delay is a filter that makes requests wait for some seconds or milliseconds before
        they are passed on. It simulates a slow or distant server, or opens the window of a
        race in a client. To limit bandwidth instead, use the rate filter.

        A delayed request waits in a worker thread: other requests, of the same client and of
        other clients, go on meanwhile. A request still waiting when the server shuts down,
        or when its client disconnects, gives up at once and fails with ESHUTDOWN ("aborting
        sleep because of server shut down"), as nbdkit's does.

        This is nbdkit-delay-filter(1) for pynbd; the parameters are nbdkit 1.32's.

    PARAMETERS
        rdelay=SECS | rdelay=NNms
        delay-read=SECS | delay-read=NNms
            Delay reads by SECS seconds or NN milliseconds. (Also spelt delay-reads.)

        delay-write=SECS | delay-write=NNms
            Delay writes. (Also delay-writes.)

        delay-zero=SECS | delay-zero=NNms
            Delay zero requests (see also delay-fast-zero). (Also delay-zeroes.)

        delay-trim=SECS | delay-trim=NNms
            Delay trim (discard) requests. (Also delay-trims, delay-discard,
            delay-discards.)

        delay-extents=SECS | delay-extents=NNms
            Delay block status (extents) requests. (Also delay-extent.)

        delay-cache=SECS | delay-cache=NNms
            Delay advisory cache requests.

        wdelay=SECS | wdelay=NNms
            Delay writes, zero and trim requests.

        delay-fast-zero=BOOL
            By default (true) a fast zero request waits like any zero request. With false,
            and a zero delay set, fast zero requests fail at once with ENOTSUP without
            reaching the plugin (and fast zero is advertised).

        delay-open=SECS | delay-open=NNms
            Delay each client's connection (the open of the export).

        delay-close=SECS | delay-close=NNms
            Delay each client's disconnection. Only clients that disconnect politely
            (NBD_CMD_DISC, libnbd's nbd_shutdown) are held; one that drops the connection is
            not. A server shutting down also waits for it.

        SECS is a whole number of seconds (decimal, 0x hex or 0 octal, as C reads it); NNms
        a number of milliseconds. 0 means no delay (the default for every operation).

    EXAMPLES
        Reads and writes each take 100 ms more:

            pynbd serve --filter=delay file disk.img rdelay=100ms wdelay=100ms

        Only zero requests are slow (one second); nothing else is affected:

            pynbd serve --filter=delay file disk.img delay-zero=1
    """

    name = "delay"
    version = "1.0"
    config_help = (
        "rdelay=<NN>[ms]                Read delay in seconds/milliseconds.\n"
        "delay-read=<NN>[ms]            Read delay in seconds/milliseconds.\n"
        "delay-write=<NN>[ms]           Write delay in seconds/milliseconds.\n"
        "delay-zero=<NN>[ms]            Zero delay in seconds/milliseconds.\n"
        "delay-trim=<NN>[ms]            Trim delay in seconds/milliseconds.\n"
        "delay-extents=<NN>[ms]         Extents delay in seconds/milliseconds.\n"
        "delay-cache=<NN>[ms]           Cache delay in seconds/milliseconds.\n"
        "wdelay=<NN>[ms]                Write, zero and trim delay in secs/msecs.\n"
        "delay-fast-zero=<BOOL>         Delay fast zero requests (default true).\n"
        "delay-open=<NN>[ms]            Open delay in seconds/milliseconds.\n"
        "delay-close=<NN>[ms]           Close delay in seconds/milliseconds.")

    def __init__(self) -> None:
        #: Delay of each operation, in milliseconds.
        self.ms = dict.fromkeys(
            ("read", "write", "zero", "trim", "extents", "cache", "open", "close"), 0)
        self.delay_fast_zero = True

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key in _KEYS:
            ms = parse_delay(key, value)
            for what in _KEYS[key]:
                self.ms[what] = ms
        elif key == "delay-fast-zero":
            self.delay_fast_zero = parse_bool(value)
        else:
            next_config(key, value)

    def _wait(self, what: str) -> None:
        nanosleep(self.ms[what] / 1000)

    def _fails_fast_zero(self) -> bool:
        return bool(self.ms["zero"]) and not self.delay_fast_zero

    # Connection ------------------------------------------------------------------------
    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        try:
            self._wait("open")
        except CommandError as e:
            raise CommandError(e.errno, f"delay: {os.strerror(e.errno)}") from None
        next_open(readonly, export_name)
        return None

    def finalize(self, next: Any, h: Any) -> None:
        # A plain sleep: the connection is closing, which would cut nanosleep short; this
        # holds a polite client (and a shutdown) for the whole delay, as nbdkit does.
        ms = self.ms["close"]
        if ms:
            time.sleep(ms / 1000)

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        if self._fails_fast_zero():
            return True  # answered here, at once
        return bool(next.can_fast_zero())

    # Data ------------------------------------------------------------------------------
    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._wait("read")
        return next.pread(count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._wait("write")
        next.pwrite(buf, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & Flag.FAST_ZERO and self._fails_fast_zero():
            raise CommandError(errno.ENOTSUP, "fast zero is not supported")
        self._wait("zero")
        next.zero(count, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._wait("trim")
        next.trim(count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        self._wait("extents")
        return next.extents(count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._wait("cache")
        next.cache(count, offset, flags)
