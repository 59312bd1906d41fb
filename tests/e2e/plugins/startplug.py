"""A plugin with ``start_pread``/``start_pwrite`` (the loop's callback path), for the tests of
how a WRITE payload reaches ``start_pwrite``.

A write finishes a few turns of the event loop after it started (the server meanwhile
receives the next requests into its buffer). With $START_COPIES=1 the plugin says
``start_pwrite_copies = True`` and copies the payload before ``start_pwrite`` returns;
otherwise it keeps the buffer it was given and copies it only when the write finishes.
A READ of the last 4 KiB of the disk says what the payloads were: "lent N" (N payloads were
views into the server's receive buffer) or "owned N" (all were the plugin's own).
With $START_BATCH=1 writes finish together, every one started so far in one ``done`` batch
inside ``pynbd.plugin.completions()`` (as the rbd plugin delivers librbd's completions).
With $START_VEC=1 (and $START_COPIES=1) it has ``start_pwritev`` too, for WRITEs one after
the other on the disk, and the report says how many came that way: "lent N vec K".
"""

import os

from pynbd.plugin import Plugin, ThreadModel, completions

SIZE = 4 << 20
REPORT = SIZE - 4096


class StartPlugin(Plugin):
    name = "startplug"
    thread_model = ThreadModel.PARALLEL
    start_pwrite_copies = os.environ.get("START_COPIES") == "1"

    def __init__(self):
        self.data = bytearray(SIZE)
        self.lent = 0
        self.owned = 0
        self.vec = 0
        self.batch = []  # (done, offset, data) waiting for the next batch

    def get_size(self, h):
        return SIZE

    def can_write(self, h):
        return True

    async def open(self, readonly, export_name, is_tls):
        import asyncio

        self.loop = asyncio.get_running_loop()
        return object()

    def pread(self, h, count, offset, flags):  # the worker threads' way, unused here
        raise AssertionError("start_pread expected")

    def start_pread(self, h, count, offset, flags, done):
        if offset == REPORT:
            what = f"lent {self.lent}" if self.lent else f"owned {self.owned}"
            if self.vec:
                what += f" vec {self.vec}"
            done(None, what.encode().ljust(count, b" "))
        else:
            done(None, bytes(self.data[offset:offset + count]))

    def start_pwrite(self, h, buf, offset, flags, done):
        if isinstance(getattr(buf, "obj", None), bytes):
            self.owned += 1
        else:
            self.lent += 1
        if self.start_pwrite_copies:
            buf = bytes(buf)

        if os.environ.get("START_BATCH") == "1":
            self.batch.append((done, offset, buf))
            if len(self.batch) == 1:
                self.loop.call_soon(self.finish_batch)
            return

        self._store_later(3, buf, offset, done)

    if os.environ.get("START_VEC") == "1":
        def start_pwritev(self, h, bufs, offset, flags, done):
            assert len(bufs) > 1
            self.vec += 1
            self.lent += len(bufs)
            data = b"".join(bufs)  # a copy: the payloads are lent

            self._store_later(2, data, offset, done)

    def _store_later(self, turns, data, offset, done):
        """Store ``data`` at ``offset`` and answer, ``turns`` loop turns from now."""
        if turns:
            self.loop.call_soon(self._store_later, turns - 1, data, offset, done)
            return
        self.data[offset:offset + len(data)] = data
        done(None, None)

    def finish_batch(self):
        batch, self.batch = self.batch, []
        with completions():
            for done, offset, buf in batch:
                self.data[offset:offset + len(buf)] = buf
                done(None, None)
