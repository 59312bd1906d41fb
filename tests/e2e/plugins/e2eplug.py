"""A memory plugin for the end-to-end tests, with knobs.

    pynbd serve tests/e2e/plugins/e2eplug.py SIZE [exports=a,b] [slow=OFFSET] [delay=SECS]
                [stats=FILE] [sleep=SECS]

Environment (read when the server loads the file, since class attributes are read before the
parameters): E2E_THREAD_MODEL (a ThreadModel name, default PARALLEL), E2E_NONBLOCKING (1 = run
on the event loop, default 0).

- exports=a,b: only these export names open (plus ""); others fail with ENOENT.
- slow=OFFSET delay=SECS: a pread at exactly OFFSET sleeps SECS first.
- sleep=SECS: every pread sleeps SECS (to measure concurrency).
- stats=FILE: after every pread, FILE holds "max_concurrent_preads max_concurrent_connections".
- minblock=N: advertise block sizes (N, max(N, 4096), 32M).
- Plugin bugs on demand: boom_export=NAME (open of NAME raises RuntimeError), boom_list=1
  (list_exports raises), boom_read=OFFSET (pread at OFFSET raises RuntimeError),
  bad_read=OFFSET (pread at OFFSET returns None).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import Plugin, ThreadModel, parse_size


class E2EPlugin(Plugin):
    name = "e2e"
    magic_config_key = "size"
    thread_model = ThreadModel[os.environ.get("E2E_THREAD_MODEL", "PARALLEL")]
    nonblocking = os.environ.get("E2E_NONBLOCKING", "0") == "1"

    def __init__(self) -> None:
        self.size = 1 << 20
        self.exports: list[str] | None = None
        self.slow: int | None = None
        self.delay = 1.0
        self.sleep = 0.0
        self.stats: str | None = None
        self.boom_export: str | None = None
        self.boom_list = False
        self.boom_read: int | None = None
        self.bad_read: int | None = None
        self.minblock: int | None = None
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.open_conns = 0
        self.max_conns = 0

    def config(self, key: str, value: str) -> None:
        if key == "size":
            self.size = parse_size(value)
        elif key == "exports":
            self.exports = value.split(",")
        elif key == "slow":
            self.slow = int(value)
        elif key == "delay":
            self.delay = float(value)
        elif key == "sleep":
            self.sleep = float(value)
        elif key == "stats":
            self.stats = value
        elif key == "boom_export":
            self.boom_export = value
        elif key == "boom_list":
            self.boom_list = value == "1"
        elif key == "boom_read":
            self.boom_read = int(value)
        elif key == "bad_read":
            self.bad_read = int(value)
        elif key == "minblock":
            self.minblock = int(value)
        else:
            super().config(key, value)

    def get_ready(self) -> None:
        self.data = bytearray(self.size)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        if export_name == self.boom_export:
            raise RuntimeError("boom in open")
        if self.exports is not None and export_name and export_name not in self.exports:
            raise CommandError(errno.ENOENT, f"no export named {export_name!r}")
        with self.lock:
            self.open_conns += 1
            self.max_conns = max(self.max_conns, self.open_conns)
            self._write_stats()
        return object()

    def close(self, h: Any) -> None:
        with self.lock:
            self.open_conns -= 1

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        if self.boom_list:
            raise RuntimeError("boom in list_exports")
        if self.exports is None:
            return None
        return [(e, f"export {e}") for e in self.exports]

    def get_size(self, h: Any) -> int:
        return self.size

    def block_size(self, h: Any) -> tuple[int, int, int] | None:
        if self.minblock is None:
            return None
        return (self.minblock, max(self.minblock, 4096), 32 * 1024 * 1024)

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def _write_stats(self) -> None:
        if self.stats:
            tmp = self.stats + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.max_active} {self.max_conns}\n")
            os.replace(tmp, self.stats)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if offset == self.boom_read:
                raise RuntimeError("boom in pread")
            if offset == self.bad_read:
                return None
            if self.slow is not None and offset == self.slow:
                time.sleep(self.delay)
            if self.sleep:
                time.sleep(self.sleep)
            return bytes(self.data[offset : offset + count])
        finally:
            with self.lock:
                self.active -= 1
                self._write_stats()

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        self.data[offset : offset + len(buf)] = buf

    def flush(self, h: Any, flags: int) -> None:
        pass

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.data[offset : offset + count] = bytes(count)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self.data[offset : offset + count] = bytes(count)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        """Blocks of 64 KiB: all-zero ones are reported as holes (HOLE|ZERO)."""
        out = []
        blk = 65536
        pos = offset - offset % blk
        end = min(offset + count, self.size)
        while pos < end:
            n = min(blk, self.size - pos)
            zero = self.data[pos : pos + n] == bytes(n)
            out.append((pos, n, 3 if zero else 0))
            pos += n
        return out
