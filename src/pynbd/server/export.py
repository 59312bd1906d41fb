"""What negotiation settled for one connection, and the one validation of every request.

:class:`Export` is the hand-off from negotiation to transmission (DESIGN.md convention 2):
the opened context, size, transmission flags, reply style and meta contexts. :func:`validate`
is the single check every request passes before any plugin code runs (convention 7).

The command and flag numbers are plain ints here: enum arithmetic on the hot path costs
microseconds per request.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pynbd.limits import MAX_PAYLOAD_ACCEPTED
from pynbd.plugin import Flag
from pynbd.protocol.constants import Cmd, CmdFlag, TxFlag

if TYPE_CHECKING:
    from pynbd.server.backend import Context

__all__ = ["Export", "validate"]

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = (int(c) for c in (
    Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS))
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, F_PAYLOAD_LEN = (int(f) for f in (
    CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO,
    CmdFlag.PAYLOAD_LEN))
P_FUA, P_MAY_TRIM, P_FAST_ZERO = int(Flag.FUA), int(Flag.MAY_TRIM), int(Flag.FAST_ZERO)

_EINVAL, _EPERM, _ENOSPC = errno.EINVAL, errno.EPERM, errno.ENOSPC
_MAX_PAYLOAD = MAX_PAYLOAD_ACCEPTED

#: Reply styles, decided by negotiation.
SIMPLE, STRUCTURED, EXTENDED = 0, 1, 2

# Flags each command accepts in principle (FUA is valid on every command if advertised).
_CMD_FLAGS = {
    READ: F_FUA | F_DF,
    WRITE: F_FUA,
    FLUSH: F_FUA,
    TRIM: F_FUA,
    CACHE: F_FUA,
    WRITE_ZEROES: F_FUA | F_NO_HOLE | F_FAST_ZERO,
    BLOCK_STATUS: F_FUA | F_REQ_ONE,
}


class Export:
    """What negotiation settled for the transmission phase."""

    __slots__ = (
        "contexts",
        "ctx",
        "eflags",
        "extended",
        "minimum",
        "name",
        "readonly",
        "rules",
        "size",
        "structured",
    )

    def __init__(self, ctx: Context, name: str, size: int, eflags: int, minimum: int,
                 structured: bool, extended: bool, contexts: dict[int, str]) -> None:
        self.ctx = ctx
        self.name = name
        self.size = size
        self.eflags = eflags
        self.minimum = minimum
        self.structured = structured
        self.extended = extended
        self.contexts = contexts
        self.readonly = bool(eflags & TxFlag.READ_ONLY)
        self.rules: dict[int, tuple[int, int, int]] = {}

    @property
    def style(self) -> int:
        """SIMPLE, STRUCTURED or EXTENDED replies."""
        return EXTENDED if self.extended else STRUCTURED if self.structured else SIMPLE

    def build_rules(self) -> None:
        """Per command: (mask, need, err). The flags are valid iff ``(flags ^ need) & mask``
        is 0: every bit of ``need`` is set and no bit outside the allowed flags is. ``err`` is
        the error for the command itself, or 0.

        With extended headers a WRITE must carry PAYLOAD_LEN (no payload means no data to
        write) and no other command may (BLOCK_STATUS_PAYLOAD is not advertised): such a
        payload is consumed, then refused with EINVAL.
        """
        ef = self.eflags
        rules = {}
        for cmd, allowed in _CMD_FLAGS.items():
            if not ef & TxFlag.SEND_FUA:
                allowed &= ~F_FUA
            if not self.structured:
                allowed &= ~F_DF
            if not ef & TxFlag.SEND_FAST_ZERO:
                allowed &= ~F_FAST_ZERO
            err = 0
            if cmd in (WRITE, TRIM, WRITE_ZEROES) and self.readonly:
                err = _EPERM
            elif (cmd == TRIM and not ef & TxFlag.SEND_TRIM) or \
                    (cmd == WRITE_ZEROES and not ef & TxFlag.SEND_WRITE_ZEROES) or \
                    (cmd == FLUSH and not ef & TxFlag.SEND_FLUSH) or \
                    (cmd == CACHE and not ef & TxFlag.SEND_CACHE) or \
                    (cmd == BLOCK_STATUS and not (self.structured and self.contexts)):
                err = _EINVAL
            need = F_PAYLOAD_LEN if self.extended and cmd == WRITE else 0
            rules[cmd] = ((~allowed & 0xFFFF) | need, need, err)
        self.rules = rules


def validate(ex: Export, cmd: int, flags: int, offset: int, length: int) -> int:
    """The one validation step before any plugin code: 0, or the NBD error to send.

    In order: unknown command; read-only export (EPERM); command not advertised; unknown or
    inapplicable flag; FLUSH with a range; READ over the accepted maximum; BLOCK_STATUS of
    length 0; out of bounds (ENOSPC for WRITE and WRITE_ZEROES, else EINVAL); misaligned to
    the advertised minimum block size (EINVAL).

    Zero-length policy (docs/protocol.md): READ, WRITE, TRIM, WRITE_ZEROES and CACHE of length
    0 inside the export succeed and do nothing; BLOCK_STATUS of length 0 is EINVAL (it cannot
    return a non-empty extent).
    """
    rule = ex.rules.get(cmd)
    if rule is None:
        return _EINVAL
    mask, need, err = rule
    if err:
        return err
    if (flags ^ need) & mask:
        return _EINVAL
    if cmd == FLUSH:
        return _EINVAL if offset or length else 0
    if cmd == READ:
        if length > _MAX_PAYLOAD:
            return _EINVAL
    elif cmd == BLOCK_STATUS and length == 0:
        return _EINVAL
    if offset + length > ex.size:
        return _ENOSPC if cmd == WRITE or cmd == WRITE_ZEROES else _EINVAL
    m = ex.minimum
    if m > 1 and (offset % m or length % m):
        return _EINVAL
    return 0
