"""The client engine's reader: replies received from the stream into a buffer of its own,
or straight into a read's destination, and decoded by THE reply decoder
(:mod:`pynbd.protocol.replies`). A part of :class:`pynbd.client.engine.AsyncClient`."""

from __future__ import annotations

import functools
import os

from pynbd.errors import ProtocolError, RemoteProtocolError
from pynbd.stream import FdStream

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["RECV_BUF", "ReplyReader"]

#: The receive buffer's size (it grows for a chunk that needs more, and shrinks back).
RECV_BUF = 1024 * 1024
#: Reads per readiness callback before the event loop runs other work.
_READS_PER_WAKEUP = 8
#: With a payload being received into its destination, at most this much more is read into
#: the receive buffer in the same system call: the next reply headers, and small replies,
#: without copying much of the next large payload twice.
_SCATTER_TAIL = 4096
#: Requests in flight averaging more than this many bytes count as large reads.
_BIG_READS = 32 * 1024


class ReplyReader:
    """The reader of :class:`~pynbd.client.engine.AsyncClient` (whose ``__init__`` sets
    the state it uses: ``_dec``, ``_buf``, ``_view``, ``_pos``, ``_end``, ``_sink_got``,
    ``_rstats``; :meth:`_use_stream` sets ``_readv``)."""

    _dec: Any
    _buf: bytearray
    _view: memoryview
    _pos: int
    _end: int
    _sink_got: int
    _bytes_in_flight: int
    _pending: dict[int, Any]
    stream: Any
    closed: bool
    #: Counts the bytes received (``bytes_received``); pynbd.libnbd's handle shares it.
    _rstats: Any
    _readv: Callable[[list[memoryview]], int]
    _fail: Callable[[BaseException], None]
    _flush: Callable[[], None]
    _flush_due: bool
    _flush_scheduled: bool
    loop: Any

    def _on_readable(self) -> None:
        try:
            self._read_guarded()
        finally:
            if self._flush_due:
                # Callers woken by replies run in the next turn of the event loop and queue
                # their next requests; the write goes after them, in that turn (not one
                # more turn later).
                self._flush_due = False
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.loop.call_soon(self._flush)

    def _read_guarded(self) -> None:
        """:meth:`_read_replies`, and what a failed read or a bad reply means: the
        connection fails, with a message; never a reader left dead and callers hanging."""
        try:
            self._read_replies()
        except BlockingIOError:
            pass
        except ProtocolError as e:
            self._fail(e)
        except OSError as e:
            self._fail(ConnectionError(f"read from the server failed: {e}"))
        except Exception as e:  # noqa: BLE001 - never leave the reader dead, callers hanging
            err = RemoteProtocolError(f"unexpected error handling a reply: {e!r}")
            err.__cause__ = e
            self._fail(err)

    def _read_replies(self) -> None:
        # hot path: a large reply comes in chunks (a round through the event loop costs more
        # than a read), so up to _READS_PER_WAKEUP reads per wake-up, each with no call on the
        # way to the system call (benchmarks/client_read.py, bulk: ~2.5 reads per reply)
        dec = self._dec
        readv = self._readv
        for _ in range(_READS_PER_WAKEUP):
            sink = dec.sink
            if sink is not None:
                # The rest of a payload straight into its destination, and what follows
                # (the next reply headers) into the receive buffer, empty in this state.
                got = self._sink_got
                want = len(sink) - got
                room = (_SCATTER_TAIL if self._bytes_in_flight > _BIG_READS * len(
                    self._pending) else len(self._buf))
                n = readv([sink[got:] if got else sink, self._view[:room]])
                self._rstats.bytes_received += n
                if n < want:
                    if n == 0:
                        self._fail(ConnectionError(
                            "server closed the connection in the middle of a reply"))
                        return
                    self._sink_got = got + n
                    continue
                self._sink_got = 0
                self._pos, self._end = 0, n - want
                dec.sink_filled()
                if n == want:  # nothing after it was there: nothing else to decode
                    return
                more = n == want + room
            else:
                if self._end == len(self._buf):
                    self._compact()
                end = min(len(self._buf), self._end + self._read_limit())
                n = readv([self._view[self._end:end]])
                self._rstats.bytes_received += n
                if n == 0:
                    self._fail(ConnectionError(
                        "server closed the connection in the middle of a reply"
                        if self._end > self._pos else "server closed the connection"))
                    return
                self._end += n
                more = self._end == end
            if self.closed:
                return
            # decode what is buffered, then make room for what the decoder needs next,
            # unless a payload is to go straight to its destination
            pos = dec.feed(self._view, self._pos, self._end)
            if dec.sink is not None:  # everything buffered was used
                self._pos = self._end = 0
            else:
                self._settle(pos)
            if not more or self.closed:
                return

    def _use_stream(self, stream: Any) -> None:
        """Read replies from ``stream`` from now on: straight from its descriptor with
        ``os.readv`` (one C call) when it is a plain :class:`~pynbd.stream.FdStream`, else
        through its ``readinto``/``readinto2`` (TLS)."""
        cls = type(stream)
        if cls.readinto is FdStream.readinto and cls.readinto2 is FdStream.readinto2:
            self._readv = functools.partial(os.readv, stream.rfd)
        else:
            def readv(bufs: list[memoryview]) -> int:
                if len(bufs) == 1:
                    return stream.readinto(bufs[0])  # type: ignore[no-any-return]
                return stream.readinto2(bufs[0], bufs[1])  # type: ignore[no-any-return]
            self._readv = readv
        stream.set_reader(self._on_readable)

    def _read_limit(self) -> int:
        """How much one read may put in the receive buffer. With mostly large reads in flight,
        little more than the next reply header, so that their payloads land in their
        destinations (the decoder's sink) rather than here first; otherwise all that is
        there."""
        if self._bytes_in_flight > _BIG_READS * len(self._pending):
            return _SCATTER_TAIL
        return len(self._buf)

    def _compact(self) -> None:
        rest = self._end - self._pos
        if self._pos:
            self._buf[:rest] = self._buf[self._pos:self._end]
        self._pos, self._end = 0, rest

    def _settle(self, pos: int) -> None:
        """After the decoder (pynbd.protocol.replies) reached ``pos`` in what is buffered and
        set no sink: make room in the receive buffer for what it needs next."""
        dec = self._dec
        if pos == self._end:
            self._pos = self._end = 0
            if len(self._buf) > RECV_BUF:  # grown for one huge chunk: give it back
                self._buf = bytearray(RECV_BUF)
                self._view = memoryview(self._buf)
            return
        self._pos = pos
        n = dec.need
        if pos + n > len(self._buf):
            if n > len(self._buf):
                newbuf = bytearray(n)
                rest = self._end - pos
                newbuf[:rest] = self._buf[pos:self._end]
                self._buf = newbuf
                self._view = memoryview(newbuf)
                self._pos, self._end = 0, rest
            else:
                self._compact()
