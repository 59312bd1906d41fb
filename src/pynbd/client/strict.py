"""Strict mode: what a client checks before a command goes on the wire, decided here for
every client (the asyncio engine, and so the blocking facade and the tools; and
:mod:`pynbd.libnbd`'s ``set_strict_mode``), in libnbd's order, errnos and words (lib/rw.c).

The mask's bits are libnbd's ``STRICT_*`` values. The engine checks with :data:`STRICT_ALL`
unless told otherwise; pynbd.libnbd with libnbd 1.14's default, :data:`STRICT_LIBNBD_DEFAULT`.
Whatever the mask, a READ or WRITE over 64 MiB and any other command over 4 GiB - 1 is
refused (libnbd's hard limits).
"""

from __future__ import annotations

import errno as E

from pynbd.errors import CommandError
from pynbd.protocol.constants import Cmd, CmdFlag, TxFlag

__all__ = [
    "CMD_FLAGS",
    "MAX_REQUEST_SIZE",
    "STRICT_ALIGN",
    "STRICT_ALL",
    "STRICT_BOUNDS",
    "STRICT_COMMANDS",
    "STRICT_FLAGS",
    "STRICT_LIBNBD_DEFAULT",
    "STRICT_PAYLOAD",
    "STRICT_ZERO_SIZE",
    "StrictRules",
]

STRICT_COMMANDS = 1
STRICT_FLAGS = 2
STRICT_BOUNDS = 4
STRICT_ZERO_SIZE = 8
STRICT_ALIGN = 16
STRICT_PAYLOAD = 32
STRICT_ALL = 63
#: libnbd 1.14's default (and its whole mask: STRICT_PAYLOAD came with 1.16).
STRICT_LIBNBD_DEFAULT = 31

#: libnbd refuses a READ or WRITE larger than this whatever the mask (lib/internal.h).
MAX_REQUEST_SIZE = 64 * 1024 * 1024
_U32 = (1 << 32) - 1

_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _ZERO, _BS = (
    int(Cmd.READ), int(Cmd.WRITE), int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.CACHE),
    int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS))
_FUA, _DF, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.FAST_ZERO)

#: The flags each command takes (libnbd's STRICT_FLAGS table; a libnbd call may allow fewer:
#: ``nbd_pread`` takes no DF).
CMD_FLAGS: dict[int, int] = {
    _READ: _DF,
    _WRITE: _FUA,
    _FLUSH: 0,
    _TRIM: _FUA,
    _CACHE: 0,
    _ZERO: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    _BS: int(CmdFlag.REQ_ONE),
}
#: Commands whose range is written: out of bounds is ENOSPC for them, EINVAL for the rest.
_WRITES = frozenset({_WRITE, _TRIM, _ZERO})


class StrictRules:
    """The checks for one export, as negotiated: its flags (DF only with structured
    replies, FAST_ZERO only with WRITE_ZEROES, as libnbd reads them), size, block sizes and
    whether meta contexts were agreed."""

    __slots__ = ("_supported", "align_mask", "contexts", "eflags", "minimum", "payload", "size",
                 "structured")

    def __init__(self, eflags: int, size: int, block_size: tuple[int, int, int] | None,
                 structured: bool, contexts: bool) -> None:
        if not structured:
            eflags &= ~int(TxFlag.SEND_DF)
        if not eflags & TxFlag.SEND_WRITE_ZEROES:
            eflags &= ~int(TxFlag.SEND_FAST_ZERO)
        self.eflags = eflags
        self.size = size
        self.minimum = block_size[0] if block_size else 0
        #: ``offset | count`` must have none of these bits (STRICT_ALIGN; 0: any alignment)
        self.align_mask = self.minimum - 1 if self.minimum > 1 else 0
        self.payload = min(block_size[2], MAX_REQUEST_SIZE) if block_size else MAX_REQUEST_SIZE
        self.structured = structured
        self.contexts = contexts
        #: (command, flags) that STRICT_COMMANDS found supported (the export never changes)
        self._supported: set[tuple[int, int]] = set()

    def read_ok(self, offset: int, count: int) -> bool:
        """Whether a READ of ``count`` bytes at ``offset`` without flags passes every check
        whatever the mask: the clients' hot paths skip :meth:`check` then (one call
        instead of several; benchmarks/client_read.py)."""
        return (0 < count <= MAX_REQUEST_SIZE and 0 <= offset and offset + count <= self.size
                and not (offset | count) & self.align_mask)

    def check(self, cmd: int, offset: int, count: int, flags: int, allowed: int, mask: int,
              disconnecting: bool = False) -> None:
        """Raise :class:`~pynbd.errors.CommandError` (errno, libnbd's message) if the
        command must not be sent. ``allowed``: the flags the call takes; ``mask``: the
        STRICT_* bits; ``disconnecting``: NBD_CMD_DISC was sent already."""
        if flags & ~allowed and (mask & STRICT_FLAGS or flags > 0xFFFF):
            raise CommandError(E.EINVAL, f"flags: invalid value for flag: 0x{flags:x}")
        if mask & STRICT_COMMANDS and (cmd, flags) not in self._supported:
            self._command(cmd, flags)
            self._supported.add((cmd, flags))
        if disconnecting:
            raise CommandError(E.EINVAL, "cannot request more commands after NBD_CMD_DISC")
        if cmd != _FLUSH:
            if mask & STRICT_ZERO_SIZE and count == 0:
                raise CommandError(E.EINVAL, "count cannot be 0")
            if mask & STRICT_BOUNDS and (offset > self.size or count > self.size - offset):
                raise CommandError(E.ENOSPC if cmd in _WRITES else E.EINVAL,
                                   "request out of bounds")
            mn = self.minimum
            if mn > 1 and mask & STRICT_ALIGN and (offset | count) & (mn - 1):
                raise CommandError(E.EINVAL, "request is unaligned")
        if cmd == _WRITE and mask & STRICT_PAYLOAD and count > self.payload:
            raise CommandError(E.ERANGE,
                               f"request too large: maximum payload size is {self.payload}")
        if cmd == _READ or cmd == _WRITE:
            if count > MAX_REQUEST_SIZE:
                raise CommandError(E.ERANGE, "request too large: maximum request size is "
                                   f"{MAX_REQUEST_SIZE}")
        elif count > _U32:
            raise CommandError(E.ERANGE, f"request too large: maximum request size is {_U32}")

    def _command(self, cmd: int, flags: int) -> None:
        """STRICT_COMMANDS: the server must support the command and its flags."""
        fl = self.eflags
        if cmd in _WRITES:
            if cmd == _TRIM and not fl & TxFlag.SEND_TRIM:
                raise CommandError(E.EINVAL, "server does not support trim operations")
            if cmd == _ZERO and not fl & TxFlag.SEND_WRITE_ZEROES:
                raise CommandError(E.EINVAL, "server does not support zero operations")
            if fl & TxFlag.READ_ONLY:
                raise CommandError(E.EPERM, "server does not support write operations")
            if flags & _FUA and not fl & TxFlag.SEND_FUA:
                raise CommandError(E.EINVAL, "server does not support the FUA flag")
            if cmd == _ZERO and flags & _FAST_ZERO and not fl & TxFlag.SEND_FAST_ZERO:
                raise CommandError(E.EINVAL, "server does not support the fast zero flag")
        elif cmd == _FLUSH and not fl & TxFlag.SEND_FLUSH:
            raise CommandError(E.EINVAL, "server does not support flush operations")
        elif cmd == _CACHE and not fl & TxFlag.SEND_CACHE:
            raise CommandError(E.EINVAL, "server does not support cache operations")
        elif cmd == _READ and flags & _DF and not fl & TxFlag.SEND_DF:
            raise CommandError(E.EINVAL, "server does not support the DF flag")
        elif cmd == _BS:
            if not self.structured:
                raise CommandError(E.ENOTSUP, "server does not support structured replies")
            if not self.contexts:
                raise CommandError(E.ENOTSUP, "did not negotiate any metadata contexts, "
                                   "either you did not call nbd_add_meta_context before "
                                   "connecting or the server does not support it")
