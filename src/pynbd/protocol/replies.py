"""The client's side of transmission, sans-IO: THE reply decoder of pynbd.

Every client drives this one decoder: the asyncio engine (:mod:`pynbd.client.engine`, and so
:class:`~pynbd.client.Client`, :mod:`pynbd.libnbd` and the tools built on them) and the
blocking connection (:mod:`pynbd.client.blocking`). It knows simple replies, structured
replies and extended headers, and makes every check the NBD spec and libnbd's strict reply
handling make; a server that breaks one gets the same answer from every client.

How a driver uses it:

- for each request it sends, it registers a :class:`Pending` (:meth:`ReplyDecoder.expect`):
  the command, its offset, length and flags, and for a READ the buffer its data goes to;
- it receives bytes into a buffer of its own and calls :meth:`~ReplyDecoder.feed` with a
  memoryview of it and the range ``[pos, end)`` that holds unread bytes. ``feed`` decodes
  what it can and returns the position it reached. It stops when

  * it needs more bytes: :attr:`~ReplyDecoder.need` is how many must be buffered from the
    returned position before the next ``feed`` can go on (a driver makes room for that many);
  * the next bytes of the stream are read data: :attr:`~ReplyDecoder.sink` is the part of
    the request's buffer still to fill. The driver receives straight into it (data never
    goes through its own buffer when it is not there already), then calls
    :meth:`~ReplyDecoder.sink_filled`, and goes on feeding what follows;

- a request whose reply is complete is handed to the driver's ``on_done`` (set when the
  decoder is made), with :attr:`Pending.error` (a local errno, 0 for success),
  :attr:`Pending.message` and, for BLOCK_STATUS, :attr:`Pending.result`
  (``{context name: [(length, flags), ...]}``);
- a violation raises :class:`~pynbd.errors.RemoteProtocolError`: the connection cannot go on,
  and every request still in :attr:`~ReplyDecoder.pending` (the one whose reply was bad
  included) is the driver's to fail.

Requests are encoded by :func:`pynbd.protocol.transmission.build_request`.
"""

from __future__ import annotations

import errno as _errno
import struct

from pynbd.errors import RemoteProtocolError
from pynbd.limits import MAX_STRING
from pynbd.protocol.constants import (
    EXT_REPLY,
    EXT_REPLY_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
    nbd_to_errno,
)

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["MAX_CHUNK", "Pending", "ReplyDecoder"]

#: Largest reply chunk accepted that is not read data (a block-status chunk of 2^20 extents
#: fits; libnbd's cap is its 64 MiB request limit too). More is a hard disconnect.
MAX_CHUNK = 64 * 1024 * 1024


_U32 = struct.Struct(">I")
#: A structured reply chunk's header and the offset that starts an OFFSET_DATA payload.
_SR_DATA = struct.Struct(">IHHQIQ")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")
_BS_ENTRY = struct.Struct(">II")
_BS_EXT = struct.Struct(">QQ")
# Plain ints on the hot path (enum operators are Python functions).
_READ, _BS = int(Cmd.READ), int(Cmd.BLOCK_STATUS)
_DONE, _REQ_ONE = int(ReplyFlag.DONE), int(CmdFlag.REQ_ONE)
_NONE, _DATA, _HOLE_T = int(ReplyType.NONE), int(ReplyType.OFFSET_DATA), \
    int(ReplyType.OFFSET_HOLE)
_BS_T, _BS_EXT_T = int(ReplyType.BLOCK_STATUS), int(ReplyType.BLOCK_STATUS_EXT)
_ERROR_T, _ERROR_OFFSET_T = int(ReplyType.ERROR), int(ReplyType.ERROR_OFFSET)
_SIMPLE_MAGIC, _SR_MAGIC, _EXT_MAGIC = SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, \
    EXT_REPLY_MAGIC
_STATUS_DATA, _STATUS_HOLE, _STATUS_ERROR = 1, 2, 3


class Pending:
    """A request awaiting its reply. A driver may subclass it to keep its own state (a
    future, a byte count) in more slots."""

    __slots__ = ("chunk_cb", "cmd", "cookie", "covered", "dest", "error", "extents", "flags",
                 "length", "message", "offset", "result")

    def __init__(self, cookie: int, cmd: int, offset: int, length: int, flags: int = 0,
                 dest: memoryview | None = None, chunk_cb: Any = None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.flags = flags
        #: Where a READ's data goes (``length`` bytes).
        self.dest = dest
        #: chunk(data, offset, status, error), called per data, hole and error-offset
        #: chunk; status 1 = data, 2 = hole, 3 = error (libnbd's READ_DATA, READ_HOLE,
        #: READ_ERROR); error is the read's error so far (for an error chunk, its own).
        #: An exception or a negative return fails the read with EIO.
        self.chunk_cb = chunk_cb
        #: A local errno once a reply said the command failed (the first error is kept).
        self.error = 0
        self.message = ""
        #: (start, length) of each data or hole chunk of a structured READ (once one came).
        self.covered: list[tuple[int, int]] | None = None
        #: Block status by context id, while the chunks come (once one came).
        self.extents: dict[int, list[tuple[int, int]]] | None = None
        #: BLOCK_STATUS: {context name: [(length, flags), ...]} once done.
        self.result: Any = None


class ReplyDecoder:
    """Decodes the replies of one connection (see the module's documentation)."""

    def __init__(self, on_done: Callable[[Pending], Any], *, structured: bool = False,
                 extended: bool = False, contexts: dict[int, str] | None = None) -> None:
        self.on_done = on_done
        self.structured = structured or extended
        self.extended = extended
        #: The negotiated meta contexts: id -> name.
        self.contexts: dict[int, str] = dict(contexts or {})
        #: cookie -> request awaiting (the rest of) its reply.
        self.pending: dict[int, Pending] = {}
        #: Bytes needed from the position ``feed`` returned (when :attr:`sink` is None).
        self.need = 32 if extended else 16
        #: The part of a request's buffer the next bytes of the stream fill, or None.
        self.sink: memoryview | None = None
        self._sink_of: tuple[Pending, int, int, int] | None = None  # (p, start, n, flags)
        #: Replies and chunks received (a simple reply is one; each structured chunk is one).
        self.chunks = 0

    def expect(self, p: Pending) -> None:
        """Register a request sent (before its reply can arrive)."""
        self.pending[p.cookie] = p

    # ---- feeding ----------------------------------------------------------------------
    def feed(self, view: memoryview, pos: int, end: int) -> int:
        """Decode replies from ``view[pos:end]``; return the position reached (see the
        module's documentation for when it stops)."""
        if self.sink is not None:
            raise RuntimeError("feed() while a sink is to be filled")
        pending = self.pending
        # hot path: one loop for every reply in the buffer, kept in one function (longer
        # than the size budget) because each reply would otherwise pay a call per step:
        # the random job of benchmarks/client_read.py spends ~10 us of CPU per request in
        # all, and a call costs ~0.1 us. A simple reply (a write's, a flush's, or any reply
        # from a server without structured replies) is one call, to _simple.
        sr = self.structured and not self.extended
        while True:
            avail = end - pos
            if sr and avail >= 28:
                # The usual reply first, with one unpack: a structured OFFSET_DATA chunk that
                # answers a whole READ and ends it, its data here. Anything else (and
                # anything to check) goes the general way below.
                magic, flags, rtype, cookie, length, doff = _SR_DATA.unpack_from(view, pos)
                if magic == _SR_MAGIC and rtype == _DATA and flags & _DONE:
                    p = pending.get(cookie)
                    n = length - 8
                    if (p is not None and p.cmd == _READ and p.covered is None
                            and doff == p.offset and n == p.length and n > 0
                            and not p.error and p.chunk_cb is None and p.dest is not None):
                        pos += 28
                        self.chunks += 1
                        if avail - 28 >= n:
                            p.dest[:n] = view[pos:pos + n]
                            pos += n
                            del pending[cookie]
                            self.on_done(p)
                            continue
                        # its data still coming: what is here, then the rest to the sink
                        take = end - pos
                        dest = p.dest
                        if take:
                            dest[:take] = view[pos:end]
                        p.covered = [(0, n)]
                        self.sink = dest[take:n]
                        self._sink_of = (p, 0, n, flags)
                        return end
            if avail < 16:
                self.need = 32 if self.extended else 16
                return pos
            magic = _U32.unpack_from(view, pos)[0]
            if magic == _SIMPLE_MAGIC and not self.extended:
                pos = self._simple(view, pos, end)
                if pos < 0:
                    return end  # the rest of a READ's data goes to the sink
                continue
            if magic == _SR_MAGIC and self.structured and not self.extended:
                hsize = 20
                if avail < 20:
                    self.need = 20
                    return pos
                _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack_from(view, pos)
            elif magic == _EXT_MAGIC and self.extended:
                hsize = 32
                if avail < 32:
                    self.need = 32
                    return pos
                _, flags, rtype, cookie, _off, length = EXT_REPLY.unpack_from(view, pos)
            else:
                raise RemoteProtocolError(f"bad reply magic {magic:#x}")
            p = pending.get(cookie)
            if p is None:
                raise RemoteProtocolError(f"reply chunk with an unknown cookie {cookie:#x}")
            self.chunks += 1
            if rtype == _DATA:
                if p.cmd != _READ or length < 9:
                    raise RemoteProtocolError("unexpected or malformed OFFSET_DATA chunk")
                if avail < hsize + 8:
                    self.need = hsize + 8
                    return pos
                start = _U64.unpack_from(view, pos + hsize)[0] - p.offset
                n = length - 8
                if start < 0 or start + n > p.length:
                    raise RemoteProtocolError("OFFSET_DATA chunk outside the request")
                pos += hsize + 8
                if p.covered is None:
                    if (n == p.length and flags & _DONE and end - pos >= n and not p.error
                            and p.chunk_cb is None):
                        # the usual reply: all of the data, here, in one chunk that ends it
                        # (with extended headers; without them the top of the loop took it)
                        p.dest[:n] = view[pos:pos + n]  # type: ignore[index]
                        pos += n
                        del pending[cookie]
                        self.on_done(p)
                        continue
                    p.covered = [(start, n)]
                else:
                    p.covered.append((start, n))
                if not self._data(p, start, n, flags, view, pos, end):
                    return end
                pos += n
                continue
            if length > MAX_CHUNK:
                raise RemoteProtocolError(f"reply chunk of {length} bytes is too large")
            if avail < hsize + length:
                self.need = hsize + length
                return pos
            self._chunk(p, flags, rtype, view[pos + hsize:pos + hsize + length])
            pos += hsize + length

    def sink_filled(self) -> None:
        """The driver filled :attr:`sink` from the stream."""
        s = self._sink_of
        if s is None:
            raise RuntimeError("no sink to fill")
        self.sink = None
        self._sink_of = None
        self.need = 32 if self.extended else 16
        p, start, n, flags = s
        if (flags & _DONE and not start and n == p.length and p.chunk_cb is None
                and not p.error and p.covered is not None and len(p.covered) == 1):
            # hot path (benchmarks/client_read.py bulk): the usual structured READ, one
            # data chunk of all of it that ends it (_data_done, _done, _check_covered)
            del self.pending[p.cookie]
            self.on_done(p)
            return
        self._data_done(p, start, n, flags)

    # ---- read data ----------------------------------------------------------------------
    def _simple(self, view: memoryview, pos: int, end: int) -> int:
        """One simple reply at ``pos`` (its 16 bytes are here): the position after it and
        its data, or -1 when the data is to fill :attr:`sink`."""
        _, error, cookie = SIMPLE_REPLY.unpack_from(view, pos)
        p = self.pending.get(cookie)
        if p is None:
            raise RemoteProtocolError(f"reply with an unknown cookie {cookie:#x}")
        pos += 16
        self.chunks += 1
        if error:
            p.error = nbd_to_errno(error)
            self._done(p)
            return pos
        if p.cmd == _READ:
            if self.structured:
                raise RemoteProtocolError("simple reply to a structured READ")
            n = p.length
            if end - pos >= n and p.chunk_cb is None and p.dest is not None:
                # all of it is here, and nobody to tell chunk by chunk
                p.dest[:n] = view[pos:pos + n]
                del self.pending[cookie]
                self.on_done(p)
                return pos + n
            if not self._data(p, 0, n, _DONE, view, pos, end):
                return -1
            return pos + n
        if p.cmd == _BS:
            raise RemoteProtocolError("simple reply to a successful BLOCK_STATUS")
        self._done(p)
        return pos

    def _data(self, p: Pending, start: int, n: int, flags: int, view: memoryview, pos: int,
              end: int) -> bool:
        """``n`` bytes of data for ``p.dest[start:]`` follow at ``pos``: copy what is
        buffered; True if that was all of it (else :attr:`sink` is set)."""
        dest = p.dest
        if dest is None:
            raise RemoteProtocolError("read data for a request that has no buffer")
        take = min(end - pos, n)
        if take:
            dest[start:start + take] = view[pos:pos + take]
        if take == n:
            self._data_done(p, start, n, flags)
            return True
        self.sink = dest[start + take:start + n]
        self._sink_of = (p, start, n, flags)
        return False

    def _data_done(self, p: Pending, start: int, n: int, flags: int) -> None:
        if p.chunk_cb is not None:
            assert p.dest is not None
            self._call_chunk_cb(p, p.dest[start:start + n], p.offset + start, _STATUS_DATA,
                                p.error)
        if flags & _DONE:
            self._done(p)

    def _call_chunk_cb(self, p: Pending, data: memoryview, offset: int, status: int,
                       error: int) -> None:
        try:
            r = p.chunk_cb(data.toreadonly(), offset, status, error)
        except Exception as e:  # noqa: BLE001 - the read fails, the connection lives
            if not p.error:
                p.error = _errno.EIO
                p.message = f"chunk callback failed: {e}"
            return
        if isinstance(r, int) and r < 0 and not p.error:
            p.error = _errno.EIO

    # ---- other chunks -------------------------------------------------------------------
    def _chunk(self, p: Pending, flags: int, rtype: int, payload: memoryview) -> None:
        if rtype == _NONE:
            if len(payload) or not flags & _DONE:
                raise RemoteProtocolError("malformed NONE chunk")
        elif rtype == _HOLE_T:
            self._hole(p, payload)
        elif rtype == _BS_T or rtype == _BS_EXT_T:
            self._status(p, rtype, payload)
        elif rtype & 0x8000:
            self._error(p, rtype, payload)
        else:
            raise RemoteProtocolError(f"unknown reply chunk type {rtype}")
        if flags & _DONE:
            self._done(p)

    def _hole(self, p: Pending, payload: memoryview) -> None:
        if p.cmd != _READ or len(payload) != 12:
            raise RemoteProtocolError("unexpected or malformed OFFSET_HOLE chunk")
        hoff, hlen = _HOLE.unpack(payload)
        start = hoff - p.offset
        if hlen == 0 or start < 0 or start + hlen > p.length:
            raise RemoteProtocolError("OFFSET_HOLE chunk outside the request")
        dest = p.dest
        if dest is None:
            raise RemoteProtocolError("read data for a request that has no buffer")
        dest[start:start + hlen] = bytes(hlen)
        if p.covered is None:
            p.covered = [(start, hlen)]
        else:
            p.covered.append((start, hlen))
        if p.chunk_cb is not None:
            self._call_chunk_cb(p, dest[start:start + hlen], hoff, _STATUS_HOLE, p.error)

    def _error(self, p: Pending, rtype: int, payload: memoryview) -> None:
        """Every error chunk type, known or not, starts with error and message length; the
        chunk's length then covers the type's other fields (ignored for unknown types)."""
        size = len(payload)
        if size < 6:
            raise RemoteProtocolError("error chunk too short")
        err, mlen = _ERR.unpack_from(payload)
        if 6 + mlen > size:
            raise RemoteProtocolError("error chunk message overruns the chunk")
        if mlen > MAX_STRING:
            raise RemoteProtocolError(f"error chunk message longer than {MAX_STRING} bytes")
        extra = 8 if rtype == _ERROR_OFFSET_T else 0
        if (rtype == _ERROR_T or extra) and size != 6 + mlen + extra:
            raise RemoteProtocolError("error chunk length does not match its message")
        # The spec requires a non-zero error; libnbd reads a zero as EINVAL.
        errno = nbd_to_errno(err) if err else _errno.EINVAL
        if extra:
            eoff = _U64.unpack_from(payload, 6 + mlen)[0]
            start = eoff - p.offset
            if not 0 <= start < max(p.length, 1):
                raise RemoteProtocolError("ERROR_OFFSET chunk outside the request")
            if p.cmd == _READ and p.chunk_cb is not None and p.dest is not None:
                self._call_chunk_cb(p, p.dest[start:start], eoff, _STATUS_ERROR, errno)
        if not p.error:
            p.error = errno
            p.message = bytes(payload[6:6 + mlen]).decode("utf-8", "replace")

    def _status(self, p: Pending, rtype: int, payload: memoryview) -> None:
        if p.cmd != _BS:
            raise RemoteProtocolError("block status chunk for another command")
        size = len(payload)
        if rtype == _BS_T:
            if self.extended or size < 12 or (size - 4) % 8:
                raise RemoteProtocolError("malformed BLOCK_STATUS chunk")
            ctx = _U32.unpack_from(payload)[0]
            ents = list(_BS_ENTRY.iter_unpack(payload[4:]))
        else:
            if not self.extended or size < 24 or (size - 8) % 16:
                raise RemoteProtocolError("malformed BLOCK_STATUS_EXT chunk")
            ctx, count = _BS_ENTRY.unpack_from(payload)
            ents = list(_BS_EXT.iter_unpack(payload[8:]))
            if count != len(ents):
                raise RemoteProtocolError("BLOCK_STATUS_EXT count does not match its length")
        if ctx not in self.contexts:
            raise RemoteProtocolError(f"block status for an unknown context id {ctx}")
        if p.extents is None:
            p.extents = {}
        elif ctx in p.extents:
            raise RemoteProtocolError("two block status chunks for one context")
        if any(n == 0 for n, _ in ents):
            raise RemoteProtocolError("zero-length extent in block status")
        if p.flags & _REQ_ONE and len(ents) != 1:
            raise RemoteProtocolError("more than one extent in a REQ_ONE block status reply")
        p.extents[ctx] = ents

    # ---- the end of a reply ---------------------------------------------------------------
    def _done(self, p: Pending) -> None:
        """A reply is complete: check it as a whole, then hand it over. A bad one raises
        with the request still pending (the driver fails it with the connection)."""
        if not p.error:
            if p.cmd == _READ and self.structured:
                self._check_covered(p)
            elif p.cmd == _BS:
                got = p.extents or {}
                missing = set(self.contexts) - set(got)
                if missing:
                    names = ", ".join(self.contexts[c] for c in sorted(missing))
                    raise RemoteProtocolError(f"block status reply without extents for {names}")
                p.result = {self.contexts[c]: e for c, e in got.items()}
        del self.pending[p.cookie]
        self.on_done(p)

    @staticmethod
    def _check_covered(p: Pending) -> None:
        """A successful structured READ: its chunks answer every byte exactly once."""
        covered = p.covered or []
        if len(covered) == 1:
            start, n = covered[0]
            if start == 0 and n == p.length:
                return
        pos = 0
        for start, n in sorted(covered):
            if start != pos:
                raise RemoteProtocolError("read reply chunks overlap or leave a gap")
            pos = start + n
        if pos != p.length:
            raise RemoteProtocolError("read reply does not cover the request")
