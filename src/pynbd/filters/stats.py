"""The stats filter: operation statistics. Its manual page is :class:`StatsFilter`'s docstring."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from pynbd.errors import ConfigError
from pynbd.filters._params import absolute_path, parse_bool, parse_int
from pynbd.plugin import Filter, ThreadModel

__all__ = ["StatsFilter"]

_KiB, _MiB, _GiB = 1 << 10, 1 << 20, 1 << 30


def humansize(n: int) -> str:
    if n < _KiB:
        return f"{n} bytes"
    if n < _MiB:
        return f"{n / _KiB:.2f} KiB"
    if n < _GiB:
        return f"{n / _MiB:.2f} MiB"
    return f"{n / _GiB:.2f} GiB"


def humanrate(n: int, usecs: int) -> str:
    secs = usecs / 1_000_000
    return humansize(int(n / secs)) if secs != 0 else "(n/a)"


class _Class:
    """Requests whose size needs the same number of bits: how many, their bytes, and how
    many per alignment of the offset (trailing zero bits; -1 for offset 0: any)."""

    __slots__ = ("aligns", "bytes", "count")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.aligns: dict[int, int] = {}


class _Stat:
    """One kind of operation."""

    __slots__ = ("bytes", "classes", "name", "ops", "usecs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops = 0
        self.bytes = 0
        self.usecs = 0
        self.classes: dict[int, _Class] = {}  # by size bits, in first-seen order

    def histogram(self, count: int, offset: int) -> None:
        bits = count.bit_length() - 1 if count else 0
        align = (offset & -offset).bit_length() - 1 if offset else -1
        c = self.classes.get(bits)
        if c is None:
            c = self.classes[bits] = _Class()
        c.count += 1
        c.bytes += count
        c.aligns[align] = c.aligns.get(align, 0) + 1


def _alignments(c: _Class, threshold: float, out: list[str]) -> None:
    """How many requests of a class have each alignment or more (nbdkit's format): one line
    per alignment where the count drops, stopping once under (1 - threshold) of the class."""
    anywhere = c.aligns.get(-1, 0)  # offset 0 is aligned to everything
    keys = sorted(k for k in c.aligns if k >= 0)
    total = c.count
    cumulative = {}
    running = 0
    for k in reversed(keys):
        running += c.aligns[k]
        cumulative[k] = running + anywhere
    cutoff = int((1 - threshold) * total)
    for i, bits in enumerate(keys):
        requests = cumulative[bits]
        if requests < cutoff:
            out.append(f"         {bits:2d}+ bit-aligned: {requests / total * 100:4.1f}% "
                       f"({requests})")
            break
        if i + 1 == len(keys) or cumulative[keys[i + 1]] != requests:
            out.append(f"         {bits:2d} bit aligned: {requests * 100 / total:5.1f}% "
                       f"({requests})")


def _breakdown(st: _Stat, threshold: float, out: list[str]) -> None:
    """Request sizes, most frequent first, until ``threshold`` of the requests are shown."""
    out.append("  Request size and alignment breakdown:")
    total = sum(c.count for c in st.classes.values())
    ranked = sorted(st.classes.items(), key=lambda kv: -kv[1].count)  # stable: first seen
    to_print = int(threshold * total)
    printed = printed_bytes = 0
    for bits, c in ranked:
        if printed >= to_print:
            rest = total - printed
            out.append(f"    other sizes: {rest / total * 100:4.1f}% ({rest} reqs, "
                       f"{humansize(sum(x.bytes for x in st.classes.values()) - printed_bytes)}"
                       " total)")
            break
        out.append(f"    {bits:2d} bits: {c.count / total * 100:4.1f}% ({c.count} reqs, "
                   f"{humansize(c.bytes)} total)")
        printed += c.count
        printed_bytes += c.bytes
        _alignments(c, threshold, out)
    out.append("")


class StatsFilter(Filter):
    """NAME
        stats - display statistics about operations

    SYNOPSIS
        pynbd serve --filter=stats PLUGIN statsfile=FILE
                    [statsappend=true] [statsthreshold=PERCENTILE]

    DESCRIPTION
        stats is a filter that counts the requests of each kind, their bytes and the time
        the layers below spent on them, and writes the figures to a file once, when the
        server exits. The format is nbdkit's stats filter's:

            total: 191 ops, 21.917545 s, 25.13 GiB, 1.15 GiB/s
            read: 136 ops, 0.000230 s, 3.16 MiB, 13.43 GiB/s op, 147.83 KiB/s total
              Request size and alignment breakdown:
                12 bits: 68.4% (93 reqs, 372.00 KiB total)
                     12 bit aligned: 100.0% (93)
                     13 bit aligned:  72.0% (67)
                14 bits: 10.3% (14 reqs, 296.00 KiB total)
                     12 bit aligned: 100.0% (14)
                     19 bit aligned:  21.4% (3)
                other sizes:  3.7% (5 reqs, 3.16 MiB total)

            write: 36 ops, 0.125460 s, 132.38 MiB, 1.03 GiB/s op, 6.04 MiB/s total
            ...
            flush: 5 ops, 0.000002 s, 0 bytes, 0 bytes/s op, 0 bytes/s total

        "total" is the time since the server started, the operations (reads, writes, trims,
        zeroes, extents and flushes), their bytes and the rate over that time. Each kind of
        operation that happened (read, write, trim, zero, extents, cache, flush) then has a
        line: successful operations, the time spent in them, their bytes, the rate while
        busy ("op") and over the whole run ("total").

        The breakdown groups requests by the bits their size needs (12 bits: 4096 to 8191
        bytes), most frequent first, and each group by how aligned the offsets are (the
        trailing zero bits; an offset of 0 counts as aligned to everything), each line
        counting the requests aligned that much or more. It stops once PERCENTILE of the
        requests are shown ("other sizes" counts the rest). It counts every request,
        successful or not.

        This is nbdkit-stats-filter(1) for pynbd; the parameters are nbdkit 1.32's.

    PARAMETERS
        statsfile=FILE
            The file the statistics are written to (required). It is created (or
            truncated) when the server starts.

        statsappend=true
            Append to FILE instead of replacing it.

        statsthreshold=PERCENTILE
            How much of the requests the breakdown shows, from 0 to 100; 0 leaves the
            breakdown out. The default is 95.

    EXAMPLES
        The operations of making a file system on a RAM disk:

            pynbd serve --filter=exitlast --filter=stats memory 25G statsfile=example.txt
            nbd-client localhost /dev/nbd1 && mkfs.ext4 /dev/nbd1 && nbd-client -d /dev/nbd1
            cat example.txt
    """

    name = "stats"
    version = "1.0"
    config_help = (
        "statsfile=<FILE>    (required) The file to place the log in.\n"
        "statsappend=<BOOL>  True to append to the log (default false).")

    def __init__(self) -> None:
        self.filename: str | None = None
        self.append = False
        self.threshold = 0.95
        self.file: IO[str] | None = None
        self.start_us = 0
        self._lock = threading.Lock()
        self.stats = {k: _Stat(k) for k in
                      ("read", "write", "trim", "zero", "extents", "cache", "flush")}

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "statsfile":
            self.filename = absolute_path(value)
        elif key == "statsappend":
            self.append = parse_bool(value)
        elif key == "statsthreshold":
            n = parse_int("printing threshold", value)
            if not 0 <= n <= 100:
                raise ConfigError("statsthreshold must be between 0 and 100 (percent)")
            self.threshold = n / 100
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.filename is None:
            raise ConfigError("stats filter requires statsfile parameter")

    def get_ready(self, thread_model: ThreadModel) -> None:
        assert self.filename is not None
        flags = os.O_CLOEXEC | os.O_WRONLY | os.O_CREAT | (
            os.O_APPEND if self.append else os.O_TRUNC)
        try:
            fd = os.open(self.filename, flags, 0o666)
        except OSError as e:
            raise ConfigError(f"open: {self.filename}: {e.strerror}") from None
        self.file = os.fdopen(fd, "a" if self.append else "w", encoding="utf-8")
        self.start_us = time.time_ns() // 1000

    def unload(self) -> None:
        if self.file is None:
            return
        usecs = time.time_ns() // 1000 - self.start_us
        if usecs > 0:
            with self._lock:
                self.file.write(self.report(usecs))
        self.file.close()
        self.file = None

    def report(self, usecs: int) -> str:
        """The statistics after ``usecs`` microseconds of running (the file's text)."""
        s = self.stats
        ops = sum(s[k].ops for k in ("read", "write", "trim", "zero", "extents", "flush"))
        nbytes = sum(s[k].bytes for k in ("read", "write", "trim", "zero"))
        total = (f"total: {ops} ops, {usecs / 1e6:.6f} s, {humansize(nbytes)}, "
                 f"{humanrate(nbytes, usecs)}/s")
        out = [total]
        for st in s.values():
            if st.ops == 0:
                continue
            out.append(f"{st.name}: {st.ops} ops, {st.usecs / 1e6:.6f} s, "
                       f"{humansize(st.bytes)}, {humanrate(st.bytes, st.usecs)}/s op, "
                       f"{humanrate(st.bytes, usecs)}/s total")
            if self.threshold and st.classes:
                _breakdown(st, self.threshold, out)
        return "\n".join(out) + "\n"

    def _timed(self, st: _Stat, count: int, offset: int | None, fn: Callable[..., Any],
               *args: Any) -> Any:
        if offset is not None and self.threshold:
            with self._lock:
                st.histogram(count, offset)
        start = time.monotonic_ns()
        r = fn(*args)
        usecs = (time.monotonic_ns() - start) // 1000
        with self._lock:
            st.ops += 1
            st.bytes += count
            st.usecs += usecs
        return r

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._timed(self.stats["read"], count, offset, next.pread, count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        count = memoryview(buf).nbytes
        self._timed(self.stats["write"], count, offset, next.pwrite, buf, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._timed(self.stats["trim"], count, offset, next.trim, count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._timed(self.stats["zero"], count, offset, next.zero, count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._timed(self.stats["extents"], count, offset, next.extents, count, offset,
                           flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._timed(self.stats["cache"], count, offset, next.cache, count, offset, flags)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        self._timed(self.stats["flush"], 0, None, next.flush, flags)
