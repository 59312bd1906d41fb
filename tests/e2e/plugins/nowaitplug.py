"""A blocking plugin with a pread_nowait fast path, for tests.

Even 4 KiB blocks are "cached": pread_nowait returns them filled with b"N". Odd blocks
raise BlockingIOError, so the server must fall back to pread in a worker thread, which
fills with b"T". The thread model comes from $NOWAIT_THREAD_MODEL (default PARALLEL).
"""

import os

from pynbd.plugin import Plugin, ThreadModel, parse_size


class NowaitPlugin(Plugin):
    name = "nowait"
    magic_config_key = "size"
    thread_model = ThreadModel[os.environ.get("NOWAIT_THREAD_MODEL", "PARALLEL")]

    def config(self, key, value):
        self.size = parse_size(value)

    def get_size(self, h):
        return self.size

    def pread_nowait(self, h, count, offset, flags):
        if (offset // 4096) % 2:
            raise BlockingIOError
        return b"N" * count

    def pread(self, h, count, offset, flags):
        return b"T" * count
