"""The client side of the handshake as a sans-IO state machine.

Feed bytes with :meth:`ClientHandshake.receive_data`, take events with
:meth:`ClientHandshake.next_event`; :meth:`option`, :meth:`export_name` and
:meth:`client_flags` return the bytes to send. Legal transitions are :data:`CLIENT_TRANSITIONS`.
"""

from __future__ import annotations

import enum
import errno as _errno

from pynbd.errors import LocalProtocolError, RemoteProtocolError
from pynbd.limits import MAX_EXPORT_SIZE
from pynbd.protocol.constants import (
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    NEED_DATA,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    OPT_HEADER,
    OPT_REPLY_HEADER,
    REPLY_MAGIC_OPT,
    ClientFlag,
    HandshakeFlag,
    Opt,
    TxFlag,
)

__all__ = [
    "CLIENT_TRANSITIONS",
    "NEED_DATA",
    "CState",
    "ClientHandshake",
    "ExportReply",
    "ExportSizeError",
    "Greeting",
    "OldstyleGreeting",
    "OptionReply",
    "check_export_size",
]

#: Largest option reply payload accepted from a server (a LIST of many exports fits).
MAX_OPTION_REPLY = 16 * 1024 * 1024


class CState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    SEND_FLAGS = "send-flags"
    OPTIONS = "options"
    AWAIT_REPLY = "await-reply"
    AWAIT_EXPORT_NAME = "await-export-name"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ExportSizeError(RemoteProtocolError):
    """The server advertised an export size of 2^63 or more. Every client API hands sizes
    and offsets out as signed 64-bit numbers (libnbd's ``nbd_get_size``, ``off_t``, Python's
    C longs), so such an export is refused at negotiation (CVE-2023-5215). ``errno`` is
    EOVERFLOW, as libnbd >= 1.16.5 sets it."""

    errno = _errno.EOVERFLOW


def check_export_size(size: int) -> int:
    """``size`` if a client can use it; else :class:`ExportSizeError`, in libnbd's words
    (``nbd_get_size`` in libnbd >= 1.16.5). Every way a size arrives (oldstyle greeting,
    NBD_OPT_EXPORT_NAME reply, NBD_INFO_EXPORT) passes here."""
    if size > MAX_EXPORT_SIZE:
        raise ExportSizeError(f"server claims size {size} which does not fit in signed result")
    return size


# The events: plain classes (a tool that negotiates starts without importing dataclasses,
# and inspect with it).
class Greeting:
    __slots__ = ("flags",)

    def __init__(self, flags: int) -> None:
        self.flags = flags


class OldstyleGreeting:
    __slots__ = ("eflags", "size")

    def __init__(self, size: int, eflags: int) -> None:
        self.size = size
        self.eflags = eflags


class OptionReply:
    __slots__ = ("data", "opt", "type")

    def __init__(self, opt: int, type: int, data: bytes) -> None:
        self.opt = opt
        self.type = type
        self.data = data

    @property
    def is_error(self) -> bool:
        return self.type >= 1 << 31


class ExportReply:
    __slots__ = ("eflags", "size")

    def __init__(self, size: int, eflags: int) -> None:
        self.size = size
        self.eflags = eflags


CLIENT_TRANSITIONS: dict[tuple[CState, str], CState] = {
    (CState.AWAIT_GREETING, "greeting"): CState.SEND_FLAGS,
    (CState.AWAIT_GREETING, "oldstyle"): CState.TRANSMISSION,
    (CState.SEND_FLAGS, "client-flags"): CState.OPTIONS,
    (CState.OPTIONS, "option"): CState.AWAIT_REPLY,
    (CState.OPTIONS, "export-name"): CState.AWAIT_EXPORT_NAME,
    (CState.AWAIT_REPLY, "reply-partial"): CState.AWAIT_REPLY,
    (CState.AWAIT_REPLY, "reply-final"): CState.OPTIONS,
    (CState.AWAIT_REPLY, "go-ack"): CState.TRANSMISSION,
    (CState.AWAIT_REPLY, "abort-ack"): CState.CLOSED,
    (CState.AWAIT_EXPORT_NAME, "export-reply"): CState.TRANSMISSION,
}


class ClientHandshake:
    def __init__(self, wanted_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
                 ) -> None:
        self.wanted_flags = int(wanted_flags)
        self.state = CState.AWAIT_GREETING
        self.server_flags = 0
        self.flags_sent = 0
        self._buf = bytearray()
        self._opt: int | None = None
        self.trailing_data = b""

    def _go(self, what: str) -> None:
        new = CLIENT_TRANSITIONS.get((self.state, what))
        if new is None:
            raise LocalProtocolError(f"{what} is not allowed in state {self.state.value}")
        self.state = new

    @property
    def fixed_newstyle(self) -> bool:
        return bool(self.flags_sent & ClientFlag.C_FIXED_NEWSTYLE)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def client_flags(self) -> bytes:
        self._go("client-flags")
        self.flags_sent = self.server_flags & self.wanted_flags & 3
        return self.flags_sent.to_bytes(4, "big")

    def option(self, opt: int, data: bytes = b"") -> bytes:
        if opt == Opt.EXPORT_NAME:
            raise LocalProtocolError("use export_name() for NBD_OPT_EXPORT_NAME")
        if not self.fixed_newstyle:
            raise LocalProtocolError("options other than EXPORT_NAME need fixed newstyle")
        self._go("option")
        self._opt = opt
        return OPT_HEADER.pack(IHAVEOPT, opt, len(data)) + data

    def export_name(self, name: str) -> bytes:
        self._go("export-name")
        self._opt = Opt.EXPORT_NAME
        b = name.encode("utf-8")
        return OPT_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, len(b)) + b

    def next_event(self) -> Greeting | OldstyleGreeting | OptionReply | ExportReply | object:
        """The next event, or NEED_DATA."""
        st = self.state
        if st is CState.AWAIT_GREETING:
            return self._greeting()
        if st is CState.AWAIT_REPLY:
            return self._option_reply()
        if st is CState.AWAIT_EXPORT_NAME:
            return self._export_reply()
        return NEED_DATA

    def _greeting(self) -> Greeting | OldstyleGreeting | object:
        buf = self._buf
        if len(buf) < 16:
            return NEED_DATA
        magic, second = int.from_bytes(buf[:8], "big"), int.from_bytes(buf[8:16], "big")
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"bad server magic {magic:#x}")
        if second == OLDSTYLE_MAGIC:
            if len(buf) < OLDSTYLE_GREETING.size:
                return NEED_DATA
            _, _, size, flags = OLDSTYLE_GREETING.unpack_from(buf)
            del buf[:OLDSTYLE_GREETING.size]
            self._go("oldstyle")
            self.trailing_data = bytes(buf)
            buf.clear()
            if not flags & TxFlag.HAS_FLAGS:
                raise RemoteProtocolError("server sent transmission flags without HAS_FLAGS")
            return OldstyleGreeting(check_export_size(size), flags & 0xFFFF)
        if second != IHAVEOPT:
            raise RemoteProtocolError(f"bad server magic {second:#x}")
        if len(buf) < GREETING.size:
            return NEED_DATA
        _, _, flags = GREETING.unpack_from(buf)
        del buf[:GREETING.size]
        self.server_flags = flags
        self._go("greeting")
        return Greeting(flags)

    def _option_reply(self) -> OptionReply | object:
        buf = self._buf
        if len(buf) < OPT_REPLY_HEADER.size:
            return NEED_DATA
        magic, opt, rtype, length = OPT_REPLY_HEADER.unpack_from(buf)
        if magic != REPLY_MAGIC_OPT:
            raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
        if opt != self._opt:
            raise RemoteProtocolError(f"reply to option {opt} while {self._opt} is pending")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too large")
        if len(buf) < OPT_REPLY_HEADER.size + length:
            return NEED_DATA
        data = bytes(buf[OPT_REPLY_HEADER.size:OPT_REPLY_HEADER.size + length])
        del buf[:OPT_REPLY_HEADER.size + length]
        final = rtype == 1 or rtype >= 1 << 31
        if final and rtype == 1 and opt == Opt.GO:
            self._go("go-ack")
            self.trailing_data = bytes(buf)
            buf.clear()
        elif final and rtype == 1 and opt == Opt.ABORT:
            self._go("abort-ack")
        elif final and rtype == 1 and opt == Opt.STARTTLS and buf:
            # anything after the ACK is to be TLS records, and a server cannot have sent
            # them before the client's first handshake message
            raise RemoteProtocolError("server sent data after accepting NBD_OPT_STARTTLS")
        else:
            self._go("reply-final" if final else "reply-partial")
        if final:
            self._opt = None
        return OptionReply(opt, rtype, data)

    def _export_reply(self) -> ExportReply | object:
        buf = self._buf
        zeroes = not (self.flags_sent & ClientFlag.C_NO_ZEROES)
        need = EXPORT_NAME_REPLY.size + (124 if zeroes else 0)
        if len(buf) < need:
            return NEED_DATA
        size, eflags = EXPORT_NAME_REPLY.unpack_from(buf)
        del buf[:need]
        self._go("export-reply")
        self.trailing_data = bytes(buf)
        buf.clear()
        if not eflags & TxFlag.HAS_FLAGS:
            raise RemoteProtocolError("server sent transmission flags without HAS_FLAGS")
        return ExportReply(check_export_size(size), eflags)
