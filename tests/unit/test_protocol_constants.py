"""Wire constants against the spec's tables (docs: /work/shared/reference/nbd-protocol.md)."""

from __future__ import annotations

import errno
from enum import Enum

import pytest

from pynbd.protocol import constants as C
from pynbd.protocol.constants import (
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    State,
    TxFlag,
    errno_to_nbd,
    name_of,
    nbd_to_errno,
)

ERR_BASE = 2**31


def _members(enum: type[Enum]) -> dict[str, int]:
    return {m.name: int(m.value) for m in enum}


def test_magics() -> None:
    assert C.NBDMAGIC == int.from_bytes(b"NBDMAGIC", "big") == 0x4E42444D41474943
    assert C.IHAVEOPT == int.from_bytes(b"IHAVEOPT", "big") == 0x49484156454F5054
    assert C.OLDSTYLE_MAGIC == 0x00420281861253
    assert C.REPLY_MAGIC_OPT == 0x3E889045565A9
    assert C.REQUEST_MAGIC == 0x25609513
    assert C.EXT_REQUEST_MAGIC == 0x21E41C71
    assert C.SIMPLE_REPLY_MAGIC == 0x67446698
    assert C.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert C.EXT_REPLY_MAGIC == 0x6E8A278C


def test_reserved_magics_are_not_used() -> None:
    used = {C.REQUEST_MAGIC, C.EXT_REQUEST_MAGIC, C.SIMPLE_REPLY_MAGIC,
            C.STRUCTURED_REPLY_MAGIC, C.EXT_REPLY_MAGIC}
    assert used.isdisjoint({0x12560953, 0x96744668, 0x25609514})


def test_handshake_flags() -> None:
    assert _members(HandshakeFlag) == {"FIXED_NEWSTYLE": 1, "NO_ZEROES": 2}
    assert _members(ClientFlag) == {"C_FIXED_NEWSTYLE": 1, "C_NO_ZEROES": 2}


def test_option_numbers() -> None:
    assert _members(Opt) == {
        "EXPORT_NAME": 1, "ABORT": 2, "LIST": 3, "PEEK_EXPORT": 4, "STARTTLS": 5, "INFO": 6,
        "GO": 7, "STRUCTURED_REPLY": 8, "LIST_META_CONTEXT": 9, "SET_META_CONTEXT": 10,
        "EXTENDED_HEADERS": 11,
    }


def test_option_reply_types() -> None:
    assert _members(Rep) == {
        "ACK": 1, "SERVER": 2, "INFO": 3, "META_CONTEXT": 4,
        "ERR_UNSUP": ERR_BASE + 1, "ERR_POLICY": ERR_BASE + 2, "ERR_INVALID": ERR_BASE + 3,
        "ERR_PLATFORM": ERR_BASE + 4, "ERR_TLS_REQD": ERR_BASE + 5, "ERR_UNKNOWN": ERR_BASE + 6,
        "ERR_SHUTDOWN": ERR_BASE + 7, "ERR_BLOCK_SIZE_REQD": ERR_BASE + 8,
        "ERR_TOO_BIG": ERR_BASE + 9, "ERR_EXT_HEADER_REQD": ERR_BASE + 10,
    }
    # a client treats any reply type with bit 31 set as an error
    for rep in Rep:
        assert bool(rep & ERR_BASE) == rep.name.startswith("ERR_")
        assert rep < 2**32


def test_info_types() -> None:
    assert _members(Info) == {"EXPORT": 0, "NAME": 1, "DESCRIPTION": 2, "BLOCK_SIZE": 3}


def test_transmission_flags() -> None:
    assert _members(TxFlag) == {
        "HAS_FLAGS": 1 << 0, "READ_ONLY": 1 << 1, "SEND_FLUSH": 1 << 2, "SEND_FUA": 1 << 3,
        "ROTATIONAL": 1 << 4, "SEND_TRIM": 1 << 5, "SEND_WRITE_ZEROES": 1 << 6,
        "SEND_DF": 1 << 7, "CAN_MULTI_CONN": 1 << 8, "SEND_RESIZE": 1 << 9,
        "SEND_CACHE": 1 << 10, "SEND_FAST_ZERO": 1 << 11, "BLOCK_STATUS_PAYLOAD": 1 << 12,
    }
    # all fit the 16-bit field
    assert max(int(f) for f in TxFlag) < 1 << 16


def test_commands() -> None:
    assert _members(Cmd) == {
        "READ": 0, "WRITE": 1, "DISC": 2, "FLUSH": 3, "TRIM": 4, "CACHE": 5,
        "WRITE_ZEROES": 6, "BLOCK_STATUS": 7, "RESIZE": 8,
    }


def test_command_flags() -> None:
    assert _members(CmdFlag) == {
        "FUA": 1 << 0, "NO_HOLE": 1 << 1, "DF": 1 << 2, "REQ_ONE": 1 << 3,
        "FAST_ZERO": 1 << 4, "PAYLOAD_LEN": 1 << 5,
    }


def test_reply_flags_and_types() -> None:
    assert _members(ReplyFlag) == {"DONE": 1}
    assert _members(ReplyType) == {
        "NONE": 0, "OFFSET_DATA": 1, "OFFSET_HOLE": 2,
        # the spec's 5, not the stale 3 of the NBD project's nbd.h
        "BLOCK_STATUS": 5, "BLOCK_STATUS_EXT": 6,
        "ERROR": 0x8001, "ERROR_OFFSET": 0x8002,
    }
    for t in ReplyType:
        assert bool(t & 0x8000) == t.name.startswith("ERROR")


def test_errors() -> None:
    assert _members(Err) == {
        "OK": 0, "EPERM": 1, "EIO": 5, "ENOMEM": 12, "EINVAL": 22, "ENOSPC": 28,
        "EOVERFLOW": 75, "ENOTSUP": 95, "ESHUTDOWN": 108,
    }


def test_base_allocation() -> None:
    assert _members(State) == {"HOLE": 1, "ZERO": 2}
    assert C.CONTEXT_BASE_ALLOCATION == "base:allocation"


@pytest.mark.parametrize(("struct_name", "size", "fmt"), [
    ("GREETING", 18, ">QQH"),
    ("OLDSTYLE_GREETING", 152, None),
    ("OPT_HEADER", 16, ">QII"),
    ("OPT_REPLY_HEADER", 20, ">QIII"),
    ("EXPORT_NAME_REPLY", 10, ">QH"),
    ("REQUEST", 28, ">IHHQQI"),
    ("EXT_REQUEST", 32, ">IHHQQQ"),
    ("SIMPLE_REPLY", 16, ">IIQ"),
    ("STRUCTURED_REPLY", 20, ">IHHQI"),
    ("EXT_REPLY", 32, ">IHHQQQ"),
])
def test_struct_sizes(struct_name: str, size: int, fmt: str | None) -> None:
    s = getattr(C, struct_name)
    assert s.size == size
    assert s.format.startswith(">")  # big-endian, no padding
    if fmt is not None:
        assert s.format == fmt


def test_oldstyle_greeting_layout() -> None:
    raw = C.OLDSTYLE_GREETING.pack(C.NBDMAGIC, C.OLDSTYLE_MAGIC, 0x0102030405060708, 0x0A0B0C0D)
    assert raw[:8] == b"NBDMAGIC"
    assert raw[8:16] == bytes.fromhex("0000420281861253")
    assert raw[16:24] == bytes.fromhex("0102030405060708")
    assert raw[24:28] == bytes.fromhex("0a0b0c0d")
    assert raw[28:] == bytes(124)


def test_request_flags_and_type_as_one_u32() -> None:
    # Linux's nbd.h reads flags and type as one u32 = (flags << 16) | type
    raw = C.REQUEST.pack(C.REQUEST_MAGIC, CmdFlag.FUA | CmdFlag.DF, Cmd.WRITE_ZEROES, 1, 2, 3)
    assert int.from_bytes(raw[4:8], "big") == ((CmdFlag.FUA | CmdFlag.DF) << 16) | Cmd.WRITE_ZEROES


# errno mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(("local", "wire"), [
    (0, Err.OK),
    (errno.EPERM, Err.EPERM),
    (errno.EROFS, Err.EPERM),
    (errno.EIO, Err.EIO),
    (errno.ENOMEM, Err.ENOMEM),
    (errno.EINVAL, Err.EINVAL),
    (errno.ENOSPC, Err.ENOSPC),
    (errno.EDQUOT, Err.ENOSPC),
    (errno.EFBIG, Err.ENOSPC),
    (errno.ESHUTDOWN, Err.ESHUTDOWN),
    # unknown errnos become EINVAL
    (errno.EBADF, Err.EINVAL),
    (errno.ENOENT, Err.EINVAL),
    (errno.EAGAIN, Err.EINVAL),
    (99999, Err.EINVAL),
])
def test_errno_to_nbd(local: int, wire: int) -> None:
    for fast_zero in (False, True):
        for df in (False, True):
            assert errno_to_nbd(local, fast_zero=fast_zero, df=df) == wire


@pytest.mark.parametrize("local", [errno.ENOTSUP, errno.EOPNOTSUPP])
def test_enotsup_only_for_fast_zero(local: int) -> None:
    assert errno_to_nbd(local) == Err.EINVAL
    assert errno_to_nbd(local, df=True) == Err.EINVAL
    assert errno_to_nbd(local, fast_zero=True) == Err.ENOTSUP


def test_eoverflow_only_for_df() -> None:
    assert errno_to_nbd(errno.EOVERFLOW) == Err.EINVAL
    assert errno_to_nbd(errno.EOVERFLOW, fast_zero=True) == Err.EINVAL
    assert errno_to_nbd(errno.EOVERFLOW, df=True) == Err.EOVERFLOW


def test_errno_to_nbd_only_puts_spec_values_on_the_wire() -> None:
    allowed = {int(e) for e in Err}
    for local in range(200):
        for fz in (False, True):
            for df in (False, True):
                assert errno_to_nbd(local, fast_zero=fz, df=df) in allowed


@pytest.mark.parametrize(("wire", "local"), [
    (Err.OK, 0),
    (Err.EPERM, errno.EPERM),
    (Err.EIO, errno.EIO),
    (Err.ENOMEM, errno.ENOMEM),
    (Err.EINVAL, errno.EINVAL),
    (Err.ENOSPC, errno.ENOSPC),
    (Err.EOVERFLOW, errno.EOVERFLOW),
    (Err.ENOTSUP, errno.ENOTSUP),
    (Err.ESHUTDOWN, errno.ESHUTDOWN),
    # unknown wire values are treated as EINVAL, not a disconnect
    (2, errno.EINVAL),
    (13, errno.EINVAL),
    (0xFFFFFFFF, errno.EINVAL),
])
def test_nbd_to_errno(wire: int, local: int) -> None:
    assert nbd_to_errno(int(wire)) == local


def test_round_trip_of_every_wire_error() -> None:
    for e in Err:
        assert errno_to_nbd(nbd_to_errno(e), fast_zero=True, df=True) == e


def test_name_of() -> None:
    assert name_of(Opt, 7) == "GO"
    assert name_of(Rep, ERR_BASE + 3) == "ERR_INVALID"
    assert name_of(Opt, 4242) == "4242"
    assert name_of(ReplyType, 0x8003) == str(0x8003)
