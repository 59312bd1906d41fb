"""Transmission replies: the bytes of every answer, and what a plugin's failure becomes.

Each function appends the buffers of one reply to ``out`` (a batch later written with one
``writev``) and returns what they cost in memory until sent: their bytes plus
:data:`~pynbd.stream.BUFFER_COST` per buffer, the unit the connection's bounds count in.
``style`` is :data:`~pynbd.server.export.SIMPLE`, ``STRUCTURED`` or ``EXTENDED``.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Any

from pynbd.errors import CommandError
from pynbd.protocol.constants import (
    EXT_REPLY_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyFlag,
    ReplyType,
    errno_to_nbd,
    name_of,
)
from pynbd.protocol.transmission import block_status_chunk, error_chunk, none_chunk
from pynbd.server.export import BLOCK_STATUS, EXTENDED, F_DF, F_FAST_ZERO, READ, SIMPLE
from pynbd.stream import BUFFER_COST

__all__ = ["block_status", "data", "error", "failure", "ok", "short_read"]

log = logging.getLogger("pynbd.server")

_simple = SIMPLE_REPLY.pack
_offset_data = struct.Struct(">IHHQIQ").pack  # structured header + data offset
_ext_offset_data = struct.Struct(">IHHQQQQ").pack  # extended header + data offset
_DONE, _OFFSET_DATA = int(ReplyFlag.DONE), int(ReplyType.OFFSET_DATA)
_HEADER_COST = 16 + BUFFER_COST  # a simple reply, or a chunk header without payload
_EIO = errno.EIO


def ok(out: list[Any], style: int, cookie: int, offset: int) -> int:
    """Success without data (every command but READ and BLOCK_STATUS)."""
    if style == EXTENDED:
        out.append(none_chunk(cookie, True, offset))
        return 32 + BUFFER_COST
    out.append(_simple(SIMPLE_REPLY_MAGIC, 0, cookie))
    return _HEADER_COST


def data(out: list[Any], style: int, cookie: int, offset: int, buf: Any, n: int) -> int:
    """A READ's ``n`` bytes ``buf`` (already checked to be ``n`` long), in one chunk."""
    if style == SIMPLE:
        out.append(_simple(SIMPLE_REPLY_MAGIC, 0, cookie))
        if not n:
            return _HEADER_COST
        out.append(buf)
        return n + 16 + 2 * BUFFER_COST
    if not n:
        out.append(none_chunk(cookie, style == EXTENDED, offset))
        return 32 + BUFFER_COST
    if style == EXTENDED:
        out.append(_ext_offset_data(EXT_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, offset,
                                    n + 8, offset))
    else:
        out.append(_offset_data(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, n + 8,
                                offset))
    out.append(buf)
    return n + 40 + 2 * BUFFER_COST


def error(out: list[Any], style: int, cmd: int, cookie: int, offset: int, err: int,
          msg: str = "") -> int:
    """An error reply: a chunk with the message where the reply style allows one."""
    if style == EXTENDED or (style != SIMPLE and (cmd == READ or cmd == BLOCK_STATUS)):
        chunk = error_chunk(cookie, err, msg, style == EXTENDED, offset)
        out.append(chunk)
        return len(chunk) + BUFFER_COST
    out.append(_simple(SIMPLE_REPLY_MAGIC, err, cookie))
    return _HEADER_COST


def block_status(out: list[Any], style: int, cookie: int, offset: int,
                 result: list[tuple[int, list[tuple[int, int]]]]) -> int:
    """One BLOCK_STATUS chunk per meta context; the last one ends the reply."""
    chunks = [block_status_chunk(cookie, ctx_id, ext, i == len(result) - 1,
                                 style == EXTENDED, offset)
              for i, (ctx_id, ext) in enumerate(result)]
    out += chunks
    return sum(len(c) for c in chunks) + len(chunks) * BUFFER_COST


def short_read(plugin: str, conn_id: int, length: int, result: Any) -> tuple[int, str]:
    """A READ whose result is not ``length`` bytes: one log line; the reply is EIO."""
    try:
        got = f"{len(result)} bytes"
    except TypeError:
        got = type(result).__name__
    log.error("client %d: %s: pread returned %s for a read of %d bytes", conn_id, plugin,
              got, length)
    return _EIO, "short read from plugin"


def failure(plugin: str, conn_id: int, cmd: int, flags: int,
            e: BaseException) -> tuple[int, str]:
    """What a plugin's exception becomes: (NBD error, message for the client).

    An error with an errno (CommandError, OSError) is the plugin's answer: mapped as nbdkit
    maps errnos, logged at debug level only. Anything else is a plugin bug: one line with
    the plugin, the command and the error, EIO to the client, and the traceback only when
    the server logs at debug level (-v).
    """
    if isinstance(e, CommandError | OSError) and e.errno:
        err = errno_to_nbd(e.errno, fast_zero=bool(flags & F_FAST_ZERO), df=bool(flags & F_DF))
        msg = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        if not (isinstance(e, CommandError) and e.errno == errno.ENOTSUP):
            log.debug("client %d: %s: %s: %s", conn_id, plugin, name_of(Cmd, cmd).lower(), msg)
        return err, msg
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    log.error("client %d: %s: %s: %s", conn_id, plugin, name_of(Cmd, cmd).lower(), msg,
              exc_info=e if log.isEnabledFor(logging.DEBUG) else None)
    return _EIO, msg
