"""The rate filter: limit bandwidth. Its manual page is :class:`RateFilter`'s docstring."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._params import absolute_path, parse_size, scan_double
from pynbd.filters._sleep import nanosleep
from pynbd.plugin import Filter, ThreadModel

__all__ = ["Bucket", "RateFilter"]

log = logging.getLogger("pynbd.server")


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class Bucket:
    """A token bucket holding bits (nbdkit's bucket.c, the same arithmetic).

    Tokens arrive at ``rate`` bits per second up to ``capacity`` (``rate`` times the
    burstiness in seconds); a bucket starts full. ``rate`` 0 means no limit. Not locked:
    the caller holds the bucket's lock.
    """

    __slots__ = ("capacity", "capacity_secs", "last_us", "level", "lock", "rate")

    def __init__(self, rate: int, capacity_secs: float) -> None:
        self.rate = rate
        self.capacity_secs = capacity_secs
        self.capacity = int(rate * capacity_secs)
        self.level = self.capacity
        self.last_us = _now_us()
        self.lock = threading.Lock()

    def adjust_rate(self, rate: int) -> int:
        """Set a new rate (the capacity follows); return the old one."""
        old = self.rate
        self.rate = rate
        self.capacity = int(rate * self.capacity_secs)
        self.level = min(self.level, self.capacity)
        return old

    def run(self, bits: int) -> tuple[int, float]:
        """Take ``bits`` tokens: (0, 0) if there were enough, else (the bits still missing,
        seconds until they will have arrived) after taking all there were."""
        if self.rate == 0:
            return 0, 0.0
        now = _now_us()
        elapsed = max(now - self.last_us, 0)
        add = min(self.rate * elapsed // 1_000_000, self.capacity - self.level)
        self.level += max(add, 0)
        self.last_us = now
        if self.level >= bits:
            self.level -= bits
            return 0, 0.0
        bits -= self.level
        self.level = 0
        nsec = 1_000_000_000 * bits // self.rate
        return bits, nsec / 1e9


class RateFilter(Filter):
    """NAME
        rate - limit bandwidth by connection or server

    SYNOPSIS
        pynbd serve --filter=rate PLUGIN [PLUGIN-ARGS...]
                    [rate=BITSPERSEC] [connection-rate=BITSPERSEC]
                    [rate-file=FILENAME] [connection-rate-file=FILENAME]
                    [burstiness=SECS]

    DESCRIPTION
        rate is a filter that limits the bandwidth the server uses, for each connection
        and/or for the server as a whole. Reads and writes have separate limits (download
        and upload are counted apart); both are counted in bits of data (headers and the
        transport are not counted), so zero and trim requests, which carry no data, are free.

        The limits are token buckets: tokens (bits) arrive at the rate, up to a capacity of
        "burstiness" seconds' worth. A request takes the tokens for its data, waiting (in a
        worker thread: other requests and clients go on) for those missing. Each bucket
        starts full, so a client may burst at full speed for the first burstiness seconds,
        and again after a pause. Requests much larger than the rate give long, lumpy waits;
        a blocksize filter in front of this one, or a larger burstiness, smooths them.

        A request waiting when the server shuts down or its client disconnects gives up at
        once with ESHUTDOWN.

        This is nbdkit-rate-filter(1) for pynbd; the parameters are nbdkit 1.32's.

    PARAMETERS
        rate=BITSPERSEC
            Limit the whole server's bandwidth (all connections together).

        connection-rate=BITSPERSEC
            Limit each connection's bandwidth.

            BITSPERSEC is a number of bits per second, with an optional K, M, G... suffix
            (powers of 1024: 1M is 1048576 bits per second, 128 KiB/s). With neither rate
            nor connection-rate the filter does nothing. Each may be given once.

        rate-file=FILENAME
        connection-rate-file=FILENAME
            Change the limit while the server runs: the first line of FILENAME, if it
            exists, is the rate (same syntax), read again before each request. Without the
            file the rate parameter applies (or no limit); a deleted file leaves the last
            rate read in force. Update the file atomically (write another, rename it over).
            A rate of 0 in the file lifts the limit.

        burstiness=SECS
            The buckets' capacity, in seconds of the rate: how long a client may go at full
            speed after being idle. The default is 2.0; smaller is not recommended. It must
            be greater than 0.

    EXAMPLES
        A 64M RAM disk limited to 1 Mbit/s for the whole server:

            pynbd serve --filter=rate memory 64M rate=1M

        Each connection limited to 50 Kbit/s, and the server to 1 Mbit/s:

            pynbd serve --filter=rate memory 64M connection-rate=50K rate=1M

        Start at 1 Mbit/s; change the limit later by writing a new rate into /tmp/rate:

            pynbd serve --filter=rate memory 64M rate=1M rate-file=/tmp/rate
            echo 10M > /tmp/rate.new && mv /tmp/rate.new /tmp/rate
    """

    name = "rate"
    version = "1.0"
    config_help = (
        "rate=BITSPERSEC                Limit total bandwidth.\n"
        "connection-rate=BITSPERSEC     Limit per-connection bandwidth.\n"
        "rate-file=FILENAME             Dynamically adjust total bandwidth.\n"
        "connection-rate-file=FILENAME  Dynamically adjust per-connection bandwidth.")

    def __init__(self) -> None:
        self.rate = 0
        self.connection_rate = 0
        self.rate_file: str | None = None
        self.connection_rate_file: str | None = None
        self.burstiness = 2.0
        self.read_bucket = Bucket(0, self.burstiness)
        self.write_bucket = Bucket(0, self.burstiness)

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key in ("rate", "connection-rate"):
            attr = key.replace("-", "_")
            if getattr(self, attr) > 0:
                raise ConfigError(f"{key} set twice on the command line")
            rate = parse_size(value)
            if rate == 0:
                raise ConfigError(f"{key} cannot be set to 0")
            setattr(self, attr, rate)
        elif key in ("rate-file", "connection-rate-file"):
            setattr(self, key.replace("-", "_"), absolute_path(value))
        elif key == "burstiness":
            scanned = scan_double(value)
            if scanned is None:
                raise ConfigError("burstiness must be a floating point number (seconds)")
            if not (scanned[0] > 0 and math.isfinite(scanned[0])):
                raise ConfigError(f"burstiness must be greater than 0 seconds: {value}")
            self.burstiness = scanned[0]
        else:
            next_config(key, value)

    def get_ready(self, thread_model: ThreadModel) -> None:
        self.read_bucket = Bucket(self.rate, self.burstiness)
        self.write_bucket = Bucket(self.rate, self.burstiness)

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        return (Bucket(self.connection_rate, self.burstiness),
                Bucket(self.connection_rate, self.burstiness))

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        _limit(self.rate_file, self.read_bucket, count)
        _limit(self.connection_rate_file, h[0], count)
        return next.pread(count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        count = memoryview(buf).nbytes
        _limit(self.rate_file, self.write_bucket, count)
        _limit(self.connection_rate_file, h[1], count)
        next.pwrite(buf, offset, flags)


def _limit(rate_file: str | None, bucket: Bucket, count: int) -> None:
    """Re-read the rate file (if any), then wait for ``count`` bytes' worth of tokens."""
    if rate_file is not None:
        _maybe_adjust(rate_file, bucket)
    bits = count * 8
    while bits > 0:
        with bucket.lock:
            bits, secs = bucket.run(bits)
        if bits > 0:
            nanosleep(secs)


def _maybe_adjust(path: str, bucket: Bucket) -> None:
    """A new rate from the first line of ``path``; a missing or bad file changes nothing."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            line = f.readline()
    except FileNotFoundError:
        return
    except OSError as e:
        log.debug("could not read rate file: %s: %s", path, e.strerror)
        return
    if not line:
        log.debug("could not read rate file: %s: empty", path)
        return
    try:
        new_rate = parse_size(line.removesuffix("\n"))
    except ConfigError as e:
        log.error("%s", e)
        return
    with bucket.lock:
        old = bucket.adjust_rate(new_rate)
    if old != new_rate:
        log.debug("rate adjusted from %d to %d", old, new_rate)
