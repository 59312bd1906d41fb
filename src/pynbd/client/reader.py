"""The client engine's reader: replies received from the stream into a buffer of its own,
or straight into a read's destination, and decoded by THE reply decoder
(:mod:`pynbd.protocol.replies`). A part of :class:`pynbd.client.engine.AsyncClient`."""

from __future__ import annotations

from pynbd.errors import ProtocolError, RemoteProtocolError

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
    the state it uses: ``_dec``, ``_buf``, ``_view``, ``_pos``, ``_end``, ``_sink_got``)."""

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
    _fail: Callable[[BaseException], None]

    def _on_readable(self) -> None:
        # A large reply comes in chunks; a round through the event loop costs more than a read.
        for _ in range(_READS_PER_WAKEUP):
            if not self._read_once() or self.closed:
                return

    def _read_once(self) -> bool:
        """One read and what it completes; True if more may wait (a payload's rest, a full read)."""
        try:
            dec = self._dec
            sink = dec.sink
            if sink is not None:
                # The rest of a payload straight into its destination, and what follows (the
                # next reply headers) into the receive buffer, which is empty in this state.
                got = self._sink_got
                want = len(sink) - got
                room = self._read_limit()
                n = self.stream.readinto2(  # type: ignore[union-attr]
                    sink[got:], self._view[:room])
                if n == 0:
                    self._fail(ConnectionError(
                        "server closed the connection in the middle of a reply"))
                    return False
                if n < want:
                    self._sink_got = got + n
                    return True
                self._sink_got = 0
                self._pos, self._end = 0, n - want
                more = n == want + room
                dec.sink_filled()
            else:
                if self._end == len(self._buf):
                    self._compact()
                end = min(len(self._buf), self._end + self._read_limit())
                n = self.stream.readinto(self._view[self._end:end])  # type: ignore[union-attr]
                if n == 0:
                    self._fail(ConnectionError(
                        "server closed the connection in the middle of a reply"
                        if self._end > self._pos else "server closed the connection"))
                    return False
                self._end += n
                more = self._end == end
            self._process()
            return more
        except BlockingIOError:
            return False
        except ProtocolError as e:
            self._fail(e)
        except OSError as e:
            self._fail(ConnectionError(f"read from the server failed: {e}"))
        except Exception as e:  # noqa: BLE001 - never leave the reader dead and callers hanging
            err = RemoteProtocolError(f"unexpected error handling a reply: {e!r}")
            err.__cause__ = e
            self._fail(err)
        return False

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

    def _process(self) -> None:
        """Decode what is buffered (pynbd.protocol.replies); then make room for what the
        decoder needs next, unless a payload is to go straight to its destination."""
        dec = self._dec
        if self.closed:
            return
        pos = dec.feed(self._view, self._pos, self._end)
        if dec.sink is not None:  # everything buffered was used
            self._pos = self._end = 0
            return
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
