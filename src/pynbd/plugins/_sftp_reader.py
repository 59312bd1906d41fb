"""SFTP reads for the ssh plugin on an SSH channel of their own, without asyncssh's SFTP
client: the data path of ``pynbd serve ssh``.

asyncssh's SFTP client reads a reply through its stream layer (buffered, joined, parsed
into a packet object, sliced), then its parallel reader copies each part into a bytearray
and that into bytes, with a task and a future per SFTP request: about as much Python and
copying per byte as the SSH transport itself. Here the channel's data goes straight from
each SSH packet into the buffer that becomes the NBD reply (one copy), the SFTP READ
requests of an NBD request leave in one channel write (one SSH packet, one system call), and
a callback ends each NBD request.

Only SFTP version 3's INIT, OPEN, READ and CLOSE are spoken (the rest of the plugin uses
asyncssh's client on another channel of the same connection); a short DATA reply is asked
for again from where it stopped, a STATUS reply fails the read with the server's message.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import struct
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugins._common import settle

__all__ = ["SftpReader"]

_INIT, _VERSION, _OPEN, _CLOSE, _READ = 1, 2, 3, 4, 5
_STATUS, _HANDLE, _DATA = 101, 102, 103
_FXF_READ = 0x01
_EOF = 1
_HDR = struct.Struct(">IBI")  # length, type, request id
_DATA_HDR = struct.Struct(">IBII")  # ... and the DATA reply's byte count
_READ_ARGS = struct.Struct(">QI")
#: Largest non-DATA reply accepted (STATUS, HANDLE, VERSION are small).
_MAX_SMALL = 256 * 1024

Done = Callable[[BaseException | None, Any], None]


def _string(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


class _Read:
    """One NBD read: its buffer and the SFTP requests still out for it."""

    __slots__ = ("buf", "done", "error", "offset", "out", "view")

    def __init__(self, count: int, offset: int, done: Done) -> None:
        self.buf = bytearray(count)
        self.view = memoryview(self.buf)
        self.offset = offset
        self.done = done
        self.out = 0
        self.error: BaseException | None = None


def _status_message(body: bytes) -> tuple[int, str]:
    """The code and message of a STATUS reply's body (after the request id)."""
    code = int.from_bytes(body[:4], "big")
    n = int.from_bytes(body[4:8], "big") if len(body) >= 8 else 0
    return code, body[8:8 + n].decode("utf-8", "replace") or f"SFTP status {code}"


def _status_errno(code: int) -> int:
    return {2: errno.ENOENT, 3: errno.EPERM, 4: errno.EIO, 8: errno.ENOTSUP,
            14: errno.ENOSPC, 15: errno.EDQUOT}.get(code, errno.EIO)


class SftpReader:
    """An asyncssh session (``SSHClientSession``) speaking SFTP for reads of one file."""

    def __init__(self, block: int) -> None:
        self.block = block
        self._chan: Any = None
        self._loop = asyncio.get_running_loop()
        self._next_id = 1
        #: request id -> (read, position in its buffer, bytes asked), or a future for the
        #: small replies of INIT/OPEN/CLOSE.
        self._pending: dict[int, Any] = {}
        self._handle = b""
        self._lost: BaseException | None = None
        # The reply being received: its header so far, then its body or DATA bytes.
        self._hdr = bytearray()
        self._left = 0
        self._body: bytearray | None = None
        self._dst: Any = None  # (read, position, asked) while DATA bytes come in
        self._pos = 0
        self._cur = (0, 0)

    # asyncssh's session interface ---------------------------------------------------
    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail_all(CommandError(errno.EIO, f"SFTP channel closed{f': {exc}' if exc else ''}"))

    def session_started(self) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        pass

    def xon_xoff_requested(self, client_can_do: bool) -> None:
        pass

    def exit_status_received(self, status: int) -> None:
        pass

    def exit_signal_received(self, *args: Any) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: Any) -> None:
        # hot path: every byte read through the ssh plugin passes here, straight into the
        # NBD reply's buffer (benchmarks/network.py --only ssh)
        mv = memoryview(data)
        i, n = 0, len(data)
        try:
            while i < n:
                if self._left:
                    k = min(self._left, n - i)
                    if self._body is None:
                        self._dst[0].view[self._pos:self._pos + k] = mv[i:i + k]
                        self._pos += k
                    else:
                        self._body += mv[i:i + k]
                    self._left -= k
                    i += k
                    if not self._left:
                        self._reply_done()
                    continue
                i = self._header(mv, i, n)
        except CommandError as e:
            self._fail_all(e)
            self._chan.close()

    # Receiving ----------------------------------------------------------------------
    def _header(self, mv: memoryview, i: int, n: int) -> int:
        """Take the reply header's bytes from mv[i:n]; return where the body starts."""
        hdr = self._hdr
        want = 13 if len(hdr) >= 5 and hdr[4] == _DATA else 9
        k = min(want - len(hdr), n - i)
        hdr += mv[i:i + k]
        i += k
        if len(hdr) == 9 and hdr[4] != _DATA:
            length, kind, rid = _HDR.unpack(hdr)
            if length - 5 > _MAX_SMALL or length < 5:
                raise CommandError(errno.EIO, f"bad SFTP reply length {length}")
            self._cur, self._body, self._left = (kind, rid), bytearray(), length - 5
            hdr.clear()
            if not self._left:
                self._reply_done()
        elif len(hdr) == 13:
            _, kind, rid, count = _DATA_HDR.unpack(hdr)
            dst = self._pending.get(rid)
            if not isinstance(dst, tuple) or count > dst[2]:
                raise CommandError(errno.EIO, "unexpected SFTP DATA reply")
            self._cur, self._body, self._dst, self._left = (kind, rid), None, dst, count
            self._pos = dst[1]
            hdr.clear()
            if not count:
                self._reply_done()
        return i

    def _reply_done(self) -> None:
        kind, rid = self._cur
        body, self._body = self._body, None
        waiter = self._pending.pop(rid, None) if kind != _VERSION else \
            self._pending.pop(0, None)
        if waiter is None:
            raise CommandError(errno.EIO, f"SFTP reply to no request ({rid})")
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result((kind, bytes(body or b"")))
            return
        read, pos, asked = waiter
        if kind == _DATA:
            got = self._pos - pos
            if got < asked:  # a short reply: ask again for the rest
                self._chan.write(self._ask(read, pos + got, asked - got))
        elif kind == _STATUS:
            code, msg = _status_message(bytes(body or b""))
            read.error = read.error or CommandError(
                _status_errno(code), "read failed: unexpected end of file" if code == _EOF
                else f"read failed: {msg}")
        else:
            read.error = read.error or CommandError(errno.EIO, f"bad SFTP reply type {kind}")
        read.out -= 1
        if not read.out:
            read.done(read.error, None if read.error else read.buf)

    def _fail_all(self, e: BaseException) -> None:
        self._lost = self._lost or e
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(e)
                continue
            read = waiter[0]
            read.out -= 1
            read.error = read.error or e
            if not read.out:
                read.done(read.error, None)

    # Sending ------------------------------------------------------------------------
    def _ask(self, read: _Read, pos: int, count: int) -> bytes:
        """A READ request for count bytes of the read at pos in its buffer (to send)."""
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF or 1
        self._pending[rid] = (read, pos, count)
        read.out += 1
        handle = self._handle
        return _HDR.pack(len(handle) + 17, _READ, rid) + handle + \
            _READ_ARGS.pack(read.offset + pos, count)

    async def _request(self, kind: int, *args: bytes) -> tuple[int, bytes]:
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF or 1
        fut = self._loop.create_future()
        self._pending[rid] = fut
        payload = b"".join(args)
        self._chan.write(_HDR.pack(len(payload) + 5, kind, rid) + payload)
        got: tuple[int, bytes] = await fut
        return got

    # The plugin's interface ---------------------------------------------------------
    async def open(self, path: bytes) -> None:
        """INIT, then OPEN the file for reading."""
        fut = self._loop.create_future()
        self._pending[0] = fut
        self._chan.write(_HDR.pack(5, _INIT, 3))
        await fut
        kind, body = await self._request(_OPEN, _string(path), _FXF_READ.to_bytes(4, "big"),
                                         b"\0\0\0\0")
        if kind == _HANDLE:
            n = int.from_bytes(body[:4], "big")
            self._handle = _string(body[4:4 + n])
            return
        code, msg = _status_message(body) if kind == _STATUS else (4, "bad reply")
        raise CommandError(_status_errno(code), msg)

    def start_read(self, count: int, offset: int, done: Done) -> None:
        """Read count bytes at offset; ``done(error, data)`` is called on the loop."""
        if self._lost is not None:
            raise self._lost
        read = _Read(count, offset, done)
        if not count:
            done(None, read.buf)
            return
        block = self.block
        if count <= block:
            self._chan.write(self._ask(read, 0, count))
        else:  # every part asked at once, in one SSH packet
            self._chan.write(b"".join([self._ask(read, pos, min(block, count - pos))
                                       for pos in range(0, count, block)]))

    async def read(self, count: int, offset: int) -> bytearray:
        fut = self._loop.create_future()
        self.start_read(count, offset, functools.partial(settle, fut))
        data: bytearray = await fut
        return data

    async def close(self) -> None:
        if self._lost is None and self._handle:
            try:
                await asyncio.wait_for(self._request(_CLOSE, self._handle), 5)
            except (TimeoutError, CommandError):
                pass
        if self._chan is not None:
            self._chan.close()
