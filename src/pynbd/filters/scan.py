"""The scan filter: prefetch the whole disk in the background. Its manual page is
:class:`ScanFilter`'s docstring."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._params import parse_bool, parse_size
from pynbd.plugin import CacheMode, Filter, ThreadModel, connection

__all__ = ["ScanFilter"]

log = logging.getLogger("pynbd.filters.scan")

_QUIT = -1  # a command for the scanning thread; other commands are read offsets


class _Clock:
    """Where the scan has got to, shared by every connection (scan-clock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.offset = 0

    def advance(self, offset: int) -> None:
        with self.lock:
            self.offset = max(self.offset, offset)

    def reset(self) -> None:
        with self.lock:
            self.offset = 0


class _Scanner:
    """One connection's scanning thread and its command queue."""

    def __init__(self, flt: ScanFilter, next: Any) -> None:
        self.filter = flt
        self.next = next
        self.commands: collections.deque[int] = collections.deque()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="pynbd-scan", daemon=True)

    def send(self, command: int) -> None:
        with self.lock:
            self.commands.append(command)

    def _commands(self, offset: int) -> int | None:
        """Apply the queued commands: the new offset, or None to quit."""
        with self.lock:
            while self.commands:
                cmd = self.commands.popleft()
                if cmd == _QUIT:
                    log.debug("scan: exiting background thread on connection close")
                    return None
                offset = max(offset, cmd)
        return offset

    def run(self) -> None:
        flt = self.filter
        try:
            size = self.next.get_size()
        except Exception as e:  # noqa: BLE001 - nothing to scan without a size
            log.debug("scan: get_size: %s", e)
            return
        while True:
            offset: int | None = flt.clock.offset if flt.scan_clock else 0
            while offset is not None and offset < size:
                offset = self._commands(offset)
                if offset is None:
                    return
                flt.clock.advance(offset)
                if offset < size:
                    try:
                        self.next.cache(min(flt.scan_size, size - offset), offset, 0)
                    except Exception as e:  # noqa: BLE001 - a prefetch is only advice
                        log.debug("scan: cache: %s", e)
                offset += flt.scan_size
            if not flt.scan_forever:
                log.debug("scan: finished scanning the plugin")
                return
            flt.clock.reset()


class ScanFilter(Filter):
    """NAME
        scan - pynbd scan filter: prefetch the disk ahead of sequential reads

    SYNOPSIS
        pynbd serve --filter=scan PLUGIN [scan-ahead=false] [scan-clock=false]
                    [scan-forever=true] [scan-size=]NN [PLUGIN-ARGS...]

        pynbd serve --filter=scan --filter=cache PLUGIN
        pynbd serve --filter=scan --filter=cow PLUGIN cow-on-cache=true

    DESCRIPTION
        scan prefetches the disk: when a client connects, the filter starts sending cache
        (prefetch) requests to the plugin over the whole disk, in the background, so that
        later reads are faster. Worth it when the client is expected to read the disk from
        start to end. For plugins that cannot prefetch, put the cache filter after (below)
        this one; or the cow filter with cow-on-cache=true.

        The readahead filter is a similar filter.

        The filter does nothing (and logs a warning saying why) when:

        - the server's thread model is not PARALLEL: the prefetches could not run beside
          the client's requests;
        - the client did not ask for the default export "" (only that one is scanned);
        - the layer below cannot cache (NBD_CMD_CACHE): add --filter=cache after this one.

        It scans only while clients are connected. Prefetching a whole disk through the
        cache or cow filter fills their temporary file with all of it: that is the point,
        but mind the space (the cache filter's cache-max-size limits it).

        This is nbdkit-scan-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        scan-ahead=false
            By default the scan keeps ahead of the client: when a read goes past the
            prefetch point, the scan skips forward to just after it. With false the scan
            goes on in order whatever the client reads.

        scan-clock=false
            By default, when every client has gone and another connects, the scan resumes
            where it was (like a clock stopped and started). With false each connection
            scans from the start of the disk.

        scan-forever=true
            By default the disk is scanned once. With true the scan starts over at the end,
            for as long as clients are connected.

        scan-size=NN
            The size of each prefetch: a power of 2 from 512 bytes to 32M. Default 2M. Most
            plugins limit how much one prefetch may ask for.

    EXAMPLES
        Read a slow remote disk ahead of a sequential client, through a local cache:

            pynbd serve --filter=scan --filter=cache curl https://example.com/disk.img
    """

    name = "scan"
    config_help = (
        "scan-ahead=false         Skip ahead when client reads faster.\n"
        "scan-clock=false         Always start prefetching from beginning.\n"
        "scan-forever=true        Scan in a loop while clients connected.\n"
        "scan-size=NN             Set scan block size.")

    def __init__(self) -> None:
        self.scan_ahead = True
        self.scan_clock = True
        self.scan_forever = False
        self.scan_size = 2 * 1024 * 1024
        self.clock = _Clock()

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "scan-ahead":
            self.scan_ahead = parse_bool(value)
        elif key == "scan-clock":
            self.scan_clock = parse_bool(value)
        elif key == "scan-forever":
            self.scan_forever = parse_bool(value)
        elif key == "scan-size":
            self.scan_size = parse_size(value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        n = self.scan_size
        if not 512 <= n <= 32 * 1024 * 1024 or n & (n - 1):
            raise ConfigError("scan-size parameter should be [512..32M] and a power of two")

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        return {"default": export_name == "", "scanner": None}

    def prepare(self, next: Any, h: dict[str, Any], readonly: bool) -> None:
        if not h["default"]:
            log.error("scan: warning: not the default export, not scanning")
            return
        info = connection()
        model = getattr(info.server if info is not None else None, "thread_model",
                        ThreadModel.PARALLEL)
        if model != ThreadModel.PARALLEL:
            log.error("scan: warning: underlying plugin does not support the PARALLEL "
                      "thread model, not scanning")
            return
        if next.can_cache() != CacheMode.NATIVE:
            log.error("scan: warning: underlying plugin does not support NBD_CMD_CACHE, "
                      "not scanning; try adding --filter=cache after this filter")
            return
        scanner = _Scanner(self, next)
        scanner.thread.start()
        h["scanner"] = scanner

    def finalize(self, next: Any, h: dict[str, Any]) -> None:
        scanner = h["scanner"]
        if scanner is not None:
            h["scanner"] = None
            scanner.send(_QUIT)
            scanner.thread.join()

    def pread(self, next: Any, h: dict[str, Any], count: int, offset: int, flags: int) -> Any:
        scanner = h["scanner"]
        if self.scan_ahead and scanner is not None:
            scanner.send(offset + count)
        return next.pread(count, offset, flags)
