"""The server side of the handshake as a sans-IO state machine.

Bytes go in with :meth:`ServerHandshake.receive_data`; :meth:`ServerHandshake.next_event`
returns the next complete event (or :data:`NEED_DATA`); the methods that answer return the
bytes to send. The legal transitions are the table :data:`TRANSITIONS`; anything else is a
:class:`~pynbd.errors.LocalProtocolError` (our bug) or :class:`RemoteProtocolError` (the peer's).

When the machine reaches ``TRANSMISSION``, :attr:`ServerHandshake.trailing_data` holds the
bytes already received that belong to the transmission phase.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pynbd.errors import LocalProtocolError, RemoteProtocolError
from pynbd.limits import MAX_OPTION_LENGTH
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
    NeedData,
    Opt,
    Rep,
)

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "ClientFlags",
    "HState",
    "OptionRequest",
    "ServerHandshake",
]


class HState(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"  # waiting for the next option request
    OPTION_PENDING = "option-pending"  # an option was received; its reply is being sent
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True)
class ClientFlags:
    flags: int


@dataclass(frozen=True)
class OptionRequest:
    opt: int
    data: bytes


#: (state, input) -> new state. Inputs: events received and replies sent.
TRANSITIONS: dict[tuple[HState, str], HState] = {
    (HState.AWAIT_CLIENT_FLAGS, "client-flags"): HState.OPTIONS,
    (HState.OPTIONS, "option"): HState.OPTION_PENDING,
    (HState.OPTION_PENDING, "reply-partial"): HState.OPTION_PENDING,
    (HState.OPTION_PENDING, "reply-final"): HState.OPTIONS,
    (HState.OPTION_PENDING, "go-ack"): HState.TRANSMISSION,
    (HState.OPTION_PENDING, "export-name-ok"): HState.TRANSMISSION,
    (HState.OPTION_PENDING, "abort-ack"): HState.CLOSED,
    (HState.OPTION_PENDING, "starttls-ack"): HState.TLS_HANDSHAKE,
    (HState.TLS_HANDSHAKE, "tls-done"): HState.OPTIONS,
}


class ServerHandshake:
    """Negotiation, server side. Construct, send :meth:`greeting`, then feed bytes."""

    def __init__(self, handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
                 max_option_length: int = MAX_OPTION_LENGTH) -> None:
        self.handshake_flags = int(handshake_flags)
        self.client_flags = 0
        self.state = HState.AWAIT_CLIENT_FLAGS
        self.max_option_length = max_option_length
        self._buf = bytearray()
        self._pending_opt: int | None = None
        self.trailing_data = b""

    # ---- transitions -------------------------------------------------------------------
    def _go(self, what: str) -> None:
        new = TRANSITIONS.get((self.state, what))
        if new is None:
            raise LocalProtocolError(f"{what} is not allowed in state {self.state.value}")
        self.state = new

    @property
    def fixed_newstyle(self) -> bool:
        return bool(self.client_flags & ClientFlag.C_FIXED_NEWSTYLE)

    @property
    def no_zeroes(self) -> bool:
        return bool(self.client_flags & ClientFlag.C_NO_ZEROES)

    # ---- output ------------------------------------------------------------------------
    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, self.handshake_flags)

    @staticmethod
    def oldstyle_greeting(size: int, eflags: int) -> bytes:
        """The 152-byte oldstyle greeting; the connection is in transmission right after it."""
        return OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, eflags & 0xFFFF)

    def reply(self, rep: int, data: bytes = b"") -> bytes:
        """One option reply for the pending option. ``ACK`` and errors end the option."""
        if self._pending_opt is None or self._pending_opt == Opt.EXPORT_NAME:
            raise LocalProtocolError("no option reply is expected now")
        if not self.fixed_newstyle:
            raise LocalProtocolError("option replies need fixed newstyle")
        opt = self._pending_opt
        final = rep == Rep.ACK or rep >= 1 << 31
        if final:
            if opt == Opt.GO and rep == Rep.ACK:
                self._go("go-ack")
                self._finish()
            elif opt == Opt.ABORT and rep == Rep.ACK:
                self._go("abort-ack")
            elif opt == Opt.STARTTLS and rep == Rep.ACK:
                if self._buf:
                    # the client pipelined bytes after STARTTLS: they would be plaintext
                    raise RemoteProtocolError("client sent data after STARTTLS before TLS")
                self._go("starttls-ack")
            else:
                self._go("reply-final")
            self._pending_opt = None
        else:
            self._go("reply-partial")
        return OPT_REPLY_HEADER.pack(REPLY_MAGIC_OPT, opt, rep, len(data)) + data

    def export_name_reply(self, size: int, eflags: int) -> bytes:
        """Successful EXPORT_NAME: size and flags (+124 zeroes unless NO_ZEROES)."""
        if self._pending_opt != Opt.EXPORT_NAME:
            raise LocalProtocolError("no EXPORT_NAME is pending")
        self._go("export-name-ok")
        self._pending_opt = None
        self._finish()
        out = EXPORT_NAME_REPLY.pack(size, eflags)
        if not (self.no_zeroes and self.handshake_flags & HandshakeFlag.NO_ZEROES):
            out += bytes(124)
        return out

    def tls_done(self) -> None:
        """The TLS handshake after STARTTLS finished: forget all negotiated state."""
        self._go("tls-done")

    def close(self) -> None:
        self.state = HState.CLOSED

    def _finish(self) -> None:
        self.trailing_data = bytes(self._buf)
        self._buf.clear()

    # ---- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state in (HState.TRANSMISSION, HState.CLOSED):
            raise LocalProtocolError("the handshake is over")
        self._buf += data

    def next_event(self) -> ClientFlags | OptionRequest | NeedData:
        buf = self._buf
        if self.state is HState.AWAIT_CLIENT_FLAGS:
            if len(buf) < 4:
                return NEED_DATA
            flags = int.from_bytes(buf[:4], "big")
            del buf[:4]
            known = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
            if flags & ~known & 0xFFFFFFFF:
                raise RemoteProtocolError(f"client sent unknown handshake flags {flags:#x}")
            if flags & ~self.handshake_flags:
                raise RemoteProtocolError(f"client set flags the server did not offer: {flags:#x}")
            self.client_flags = flags
            self._go("client-flags")
            return ClientFlags(flags)
        if self.state is HState.OPTIONS:
            if len(buf) < OPT_HEADER.size:
                return NEED_DATA
            magic, opt, length = OPT_HEADER.unpack_from(buf, 0)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > self.max_option_length:
                raise RemoteProtocolError(f"option length {length} is over the limit")
            if not self.fixed_newstyle and opt != Opt.EXPORT_NAME:
                raise RemoteProtocolError(
                    f"option {opt} without fixed newstyle (only EXPORT_NAME is possible)")
            if len(buf) < OPT_HEADER.size + length:
                return NEED_DATA
            data = bytes(buf[OPT_HEADER.size : OPT_HEADER.size + length])
            del buf[: OPT_HEADER.size + length]
            self._go("option")
            self._pending_opt = opt
            return OptionRequest(opt, data)
        if self.state is HState.OPTION_PENDING:
            # No pipelining: whatever arrived early waits until the reply is sent.
            return NEED_DATA
        return NEED_DATA
