"""A plugin written with ``async def``, for the tests of coroutine callbacks on the loop.

Regions of the disk (1 MiB each) behave differently:
0: plain memory (read and write);
1: a READ waits until $ASYNC_GATE reads of this region are waiting at once, then all go
   on (with fewer requests in flight than that, it never returns);
2: a READ fails with EPERM;
3: a READ returns the id of the connection serving it (pynbd.plugin.connection()),
   asked after a few turns of the event loop;
4: a READ counts how many such reads run at once, for 10 ms;
5: a READ returns the most that ran at once in region 4.
The thread model comes from $ASYNC_THREAD_MODEL (default PARALLEL).
"""

import asyncio
import errno
import os

from pynbd.plugin import Plugin, ThreadModel, connection

MIB = 1 << 20


class AsyncPlugin(Plugin):
    name = "asyncplug"
    thread_model = ThreadModel[os.environ.get("ASYNC_THREAD_MODEL", "PARALLEL")]

    def __init__(self):
        self.data = bytearray(MIB)
        self.gate = int(os.environ.get("ASYNC_GATE", "32"))
        self.waiting = 0
        self.event = None
        self.active = 0
        self.most = 0

    def get_size(self, h):
        return 6 * MIB

    def can_write(self, h):
        return True

    def can_flush(self, h):
        return True

    async def open(self, readonly, export_name, is_tls):
        return object()

    async def pread(self, h, count, offset, flags):
        region = offset // MIB
        if region == 0:
            return bytes(self.data[offset:offset + count])
        if region == 1:
            if self.event is None:
                self.event = asyncio.Event()
            self.waiting += 1
            if self.waiting >= self.gate:
                self.event.set()
            await self.event.wait()
            return b"G" * count
        if region == 2:
            raise OSError(errno.EPERM, "not allowed")
        if region == 3:
            for _ in range(5):
                await asyncio.sleep(0)
            return str(connection().id).encode().ljust(count, b" ")
        if region == 4:
            self.active += 1
            self.most = max(self.most, self.active)
            await asyncio.sleep(0.01)
            self.active -= 1
            return b"C" * count
        return str(self.most).encode().ljust(count, b" ")

    async def pwrite(self, h, buf, offset, flags):
        await asyncio.sleep(0)
        self.data[offset:offset + len(buf)] = buf

    async def flush(self, h, flags):
        await asyncio.sleep(0)
