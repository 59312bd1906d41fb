"""Run a plan against the server as a well-behaved client and judge every reply.

Each reply is compared with what the specification says the server must answer, and the
data with :class:`model.Disk`. Anything else raises :class:`Wrong` (a finding).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fuzz import wire as W
from fuzz.model import Disk
from fuzz.server_plan import Op, Plan, Request

__all__ = ["Conn", "Hangup", "Session", "Wrong", "expected"]

#: How long the server may take to answer anything before it counts as hung.
REPLY_TIMEOUT = 20.0
_INFO_EXPORT, _INFO_BLOCK_SIZE = 0, 3


class Wrong(Exception):
    """The server answered something it must not (the message says what and where)."""


class Hangup(Exception):
    """The server closed the connection."""


class Conn:
    """A blocking Unix-socket connection with a receive buffer."""

    def __init__(self, path: str, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()
        self.received = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Hangup(f"send: {e}") from None

    def fill(self) -> None:
        try:
            d = self.sock.recv(1 << 20)
        except TimeoutError:
            raise Wrong(f"no answer within {self.sock.gettimeout()} s (hang)") from None
        except ConnectionResetError:
            d = b""
        if not d:
            raise Hangup("the server closed the connection")
        self.received += len(d)
        self.buf += d

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def expect_eof(self) -> None:
        """The server must close the connection, sending nothing more."""
        try:
            self.fill()
        except Hangup:
            if self.buf:
                raise Wrong(f"{len(self.buf)} stray bytes before the hang-up") from None
            return
        raise Wrong(f"sent {bytes(self.buf[:32])!r} where it should hang up")


@dataclass
class State:
    size: int = 0
    eflags: int = 0
    minimum: int = 1
    structured: bool = False
    extended: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    pending_meta: dict[int, str] = field(default_factory=dict)


def expected(req: Request, st: State) -> tuple[bool, set[int]]:
    """Whether success is allowed, and the errors allowed, for one request."""
    cmd, f, off, n = req.cmd, req.flags, req.offset, req.length
    if cmd not in range(8) or cmd == W.CMD.DISC:
        return False, {W.EINVAL}
    ef = st.eflags
    allowed = {W.CMD.READ: W.CMD.FUA | W.CMD.DF, W.CMD.WRITE_ZEROES: W.CMD.FUA | W.CMD.NO_HOLE
               | W.CMD.FAST_ZERO, W.CMD.BLOCK_STATUS: W.CMD.FUA | W.CMD.REQ_ONE}.get(cmd,
                                                                                  W.CMD.FUA)
    if not ef & W.TX.SEND_FUA:
        allowed &= ~W.CMD.FUA
    if not (st.structured and ef & W.TX.SEND_DF):
        allowed &= ~W.CMD.DF
    if not ef & W.TX.SEND_FAST_ZERO:
        allowed &= ~W.CMD.FAST_ZERO
    errs: set[int] = set()
    if st.extended and cmd == W.CMD.WRITE:
        allowed |= W.CMD.PAYLOAD_LEN
        if not f & W.CMD.PAYLOAD_LEN:
            errs.add(W.EINVAL)
    if f & ~allowed:
        errs.add(W.EINVAL)
    advertised = {W.CMD.TRIM: W.TX.SEND_TRIM, W.CMD.WRITE_ZEROES: W.TX.SEND_WRITE_ZEROES,
                  W.CMD.FLUSH: W.TX.SEND_FLUSH, W.CMD.CACHE: W.TX.SEND_CACHE}.get(cmd)
    if advertised is not None and not ef & advertised:
        errs.add(W.EINVAL)
    if cmd == W.CMD.BLOCK_STATUS and not (st.structured and st.contexts):
        errs.add(W.EINVAL)
    if cmd in (W.CMD.WRITE, W.CMD.WRITE_ZEROES, W.CMD.TRIM) and ef & W.TX.READ_ONLY:
        errs.add(W.EPERM)
    if cmd == W.CMD.FLUSH and (off or n):
        errs.add(W.EINVAL)
    if off + n > st.size:
        errs.add(W.ENOSPC if cmd in (W.CMD.WRITE, W.CMD.WRITE_ZEROES) else W.EINVAL)
    if st.minimum > 1 and (off % st.minimum or n % st.minimum):
        errs.add(W.EINVAL)
    if errs:
        return False, errs
    if n == 0 and cmd != W.CMD.FLUSH:
        return True, {W.EINVAL}  # the specification leaves zero lengths open
    if cmd == W.CMD.READ and f & W.CMD.DF and n > 65536:
        return True, {W.EOVERFLOW}
    if cmd == W.CMD.WRITE_ZEROES and f & W.CMD.FAST_ZERO:
        return True, {W.ENOTSUP}
    return True, set()


class Session:
    """One connection run from a plan; raises Wrong for the first wrong answer."""

    def __init__(self, path: str, disk: Disk, plan: Plan) -> None:
        self.path = path
        self.disk = disk
        self.plan = plan
        self.st = State()
        self.requests = 0
        self.c: Conn | None = None

    def run(self) -> None:
        self.c = Conn(self.path)
        try:
            if self._negotiate():
                self._transmit()
        finally:
            self.c.close()

    # ---- negotiation ----------------------------------------------------------------------
    def _negotiate(self) -> bool:
        c, plan = self.c, self.plan
        assert c is not None
        magic, opt_magic, hflags = W.GREETING.unpack(c.recv_exact(W.GREETING.size))
        if (magic, opt_magic) != (W.NBDMAGIC, W.IHAVEOPT):
            raise Wrong(f"greeting magics {magic:#x} {opt_magic:#x}")
        if not hflags & 1:
            raise Wrong(f"handshake flags {hflags:#x} without FIXED_NEWSTYLE")
        c.send(struct.pack(">I", plan.client_flags))
        if plan.client_flags & ~3 or plan.client_flags & ~hflags & 3:
            return self._expect_hangup("unknown client flags")
        self.no_zeroes = bool(plan.client_flags & hflags & 2)
        for op in plan.options:
            if op.opt == W.OPT.EXPORT_NAME:
                return self._export_name(op)
            c.send(W.option(op.opt, op.data))
            if self._option_reply(op):
                return True
        if plan.end == "abort":
            c.send(W.option(W.OPT.ABORT))
            try:
                final = self._read_option(W.OPT.ABORT)
            except Hangup:
                return False  # the server may just close
            if final[0] != W.REP.ACK:
                raise Wrong(f"ABORT answered {final[0]:#x}")
            return self._expect_hangup("after ABORT")
        return False

    def _expect_hangup(self, why: str) -> bool:
        assert self.c is not None
        try:
            self.c.expect_eof()
        except Wrong as e:
            raise Wrong(f"{why}: {e}") from None
        return False

    def _read_option(self, opt: int) -> tuple[int, bytes]:
        assert self.c is not None
        magic, o, rep, n = W.OPT_REPLY.unpack(self.c.recv_exact(W.OPT_REPLY.size))
        if magic != W.OPT_REPLY_MAGIC:
            raise Wrong(f"option reply magic {magic:#x}")
        if o != opt:
            raise Wrong(f"reply for option {o}, sent option {opt}")
        if n > 1 << 24:
            raise Wrong(f"option reply of {n} bytes")
        return rep, self.c.recv_exact(n)

    def _option_reply(self, op: Op) -> bool:
        """Read and judge the replies to one option; True when transmission begins."""
        replies = []
        while True:
            rep, data = self._read_option(op.opt)
            replies.append((rep, data))
            if rep == W.REP.ACK or rep & W.REP.ERR:
                break
            if rep not in (W.REP.SERVER, W.REP.INFO, W.REP.META_CONTEXT):
                raise Wrong(f"option {op.opt}: reply type {rep:#x}")
        return judge_option(self.st, op, replies)

    def _export_name(self, op: Op) -> bool:
        assert self.c is not None
        self.c.send(W.option(op.opt, op.data))
        size, eflags = struct.unpack(">QH", self.c.recv_exact(10))
        if not self.no_zeroes and self.c.recv_exact(124) != bytes(124):
            raise Wrong("EXPORT_NAME reply: 124 bytes that are not zero")
        check_export(self.st, size, eflags)
        self.st.contexts = dict(self.st.pending_meta)
        return True

    # ---- transmission ---------------------------------------------------------------------
    def _transmit(self) -> None:
        c, st = self.c, self.st
        assert c is not None
        reader = W.ReplyReader(st.structured, st.extended)
        disc = W.request(W.CMD.DISC, 1 << 40, 0, 0, 0, st.extended)
        end = self.plan.end
        for i, batch in enumerate(self.plan.batches):
            out = []
            for r in batch:
                reader.expect(r.cookie, r.cmd, r.offset, r.length)
                out.append(W.request(r.cmd, r.cookie, r.offset, r.length, r.flags, st.extended))
                out.append(r.payload)
            if i == len(self.plan.batches) - 1 and end == "disc-pipelined":
                out.append(disc)
                end = "disc-sent"
            c.send(b"".join(out))
            self.requests += len(batch)
            self._replies(reader, batch)
        if end in ("disc", "disc-pipelined"):
            c.send(disc)
        if end != "close":
            self._expect_hangup("after NBD_CMD_DISC")

    def _replies(self, reader: W.ReplyReader, batch: list[Request]) -> None:
        assert self.c is not None
        want = {r.cookie: r for r in batch}
        got: dict[int, W.Reply] = {}
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(got) < len(want):
            try:
                for rep in reader.replies():
                    got[rep.cookie] = rep
                if len(got) == len(want):
                    break
                self.c.fill()
                reader.feed(bytes(self.c.buf))
                self.c.buf.clear()
            except W.Violation as e:
                raise Wrong(f"reply: {e}") from None
            except Hangup:
                raise Wrong(f"hung up with {len(want) - len(got)} of {len(want)} replies "
                            "outstanding") from None
            if time.monotonic() > deadline:
                raise Wrong("replies took too long (hang)")
        effects = [judge_reply(self.st, self.disk, want[k], got[k]) for k in want]
        for eff in effects:
            if eff is not None:
                eff()


# --------------------------------------------------------------------------- judging options


def check_export(st: State, size: int, eflags: int) -> None:
    if not eflags & W.TX.HAS_FLAGS:
        raise Wrong(f"transmission flags {eflags:#x} without HAS_FLAGS")
    if size >= 1 << 63:
        raise Wrong(f"export size {size} >= 2^63")
    st.size, st.eflags = size, eflags


def _judge_info(st: State, op: Op, infos: list[bytes]) -> None:
    seen = set()
    for d in infos:
        if len(d) < 2:
            raise Wrong("INFO reply shorter than its type")
        (t,) = struct.unpack_from(">H", d)
        seen.add(t)
        if t == _INFO_EXPORT:
            if len(d) != 12:
                raise Wrong(f"INFO_EXPORT of {len(d)} bytes")
            size, eflags = struct.unpack_from(">QH", d, 2)
            if op.opt == W.OPT.GO:
                check_export(st, size, eflags)
        elif t == _INFO_BLOCK_SIZE:
            if len(d) != 14:
                raise Wrong(f"INFO_BLOCK_SIZE of {len(d)} bytes")
            mn, pref, mx = struct.unpack_from(">III", d, 2)
            if mn & (mn - 1) or mn > 65536 or pref & (pref - 1) or pref < max(mn, 512) \
                    or mx < pref:
                raise Wrong(f"INFO_BLOCK_SIZE {mn}/{pref}/{mx} breaks the rules")
            if op.opt == W.OPT.GO:
                st.minimum = mn
    if _INFO_EXPORT not in seen:
        raise Wrong(f"option {op.opt} ACKed without INFO_EXPORT")


def judge_option(st: State, op: Op, replies: list[tuple[int, bytes]]) -> bool:
    final, _ = replies[-1]
    o, data = op.opt, op.data
    ok = final == W.REP.ACK
    extra = replies[:-1]
    if o in (W.OPT.STRUCTURED_REPLY, W.OPT.EXTENDED_HEADERS, W.OPT.LIST, W.OPT.STARTTLS) \
            and data:
        want: set[int] = {W.REP.ERR_INVALID}
    elif o == W.OPT.STRUCTURED_REPLY:
        want = {W.REP.ACK} | ({W.REP.ERR_EXT_HEADER_REQD} if st.extended else set())
    elif o == W.OPT.EXTENDED_HEADERS:
        want = {W.REP.ACK}
    elif o == W.OPT.STARTTLS:
        want = {W.REP.ERR_POLICY, W.REP.ERR_UNSUP}
    elif o == W.OPT.LIST:
        want = {W.REP.ACK}
        if any(r != W.REP.SERVER for r, _ in extra):
            raise Wrong("LIST: a reply other than REP_SERVER")
    elif o in (W.OPT.INFO, W.OPT.GO):
        want = {W.REP.ACK}
        if any(r != W.REP.INFO for r, _ in extra):
            raise Wrong(f"option {o}: a reply other than REP_INFO")
        if ok:
            _judge_info(st, op, [d for _, d in extra])
    elif o in (W.OPT.SET_META_CONTEXT, W.OPT.LIST_META_CONTEXT):
        want = _judge_meta(st, op, replies)
    else:
        want = {W.REP.ERR_UNSUP}
    if final not in want:
        raise Wrong(f"option {o} (data {data[:24]!r}) answered {final:#x}, expected one of "
                    + ", ".join(f"{w:#x}" for w in sorted(want)))
    if final & W.REP.ERR and extra:
        raise Wrong(f"option {o}: replies before an error")
    if ok and o == W.OPT.STRUCTURED_REPLY:
        st.structured = True
    if ok and o == W.OPT.EXTENDED_HEADERS:
        st.structured = st.extended = True
    if ok and o == W.OPT.GO:
        st.contexts = dict(st.pending_meta)
        return True
    return False


def _queries(data: bytes) -> list[str]:
    (n,) = struct.unpack_from(">I", data)
    pos = 4 + n
    (k,) = struct.unpack_from(">I", data, pos)
    pos += 4
    out = []
    for _ in range(k):
        (m,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4:pos + 4 + m].decode())
        pos += 4 + m
    return out


def _judge_meta(st: State, op: Op, replies: list[tuple[int, bytes]]) -> set[int]:
    if not st.structured:
        return {W.REP.ERR_INVALID}
    queries = _queries(op.data)
    names = {}
    for rep, d in replies[:-1]:
        if rep != W.REP.META_CONTEXT or len(d) < 5:
            raise Wrong(f"meta context option: reply {rep:#x} of {len(d)} bytes")
        (cid,) = struct.unpack_from(">I", d)
        names[cid] = d[4:].decode("utf-8", "replace")
    if op.opt == W.OPT.SET_META_CONTEXT:
        if 0 in names and replies[-1][0] == W.REP.ACK:
            raise Wrong("SET_META_CONTEXT: context id 0")
        got = sorted(names.values())
        want = sorted({"base:allocation"} & set(queries))
        if got != want and replies[-1][0] == W.REP.ACK:
            raise Wrong(f"SET_META_CONTEXT {queries} selected {got}")
        st.pending_meta = names if replies[-1][0] == W.REP.ACK else {}
    else:
        listed = set(names.values())
        if ("base:allocation" in queries or "base:" in queries or not queries) \
                and "base:allocation" not in listed:
            raise Wrong(f"LIST_META_CONTEXT {queries} did not list base:allocation")
    return {W.REP.ACK, W.REP.ERR_TOO_BIG, W.REP.ERR_INVALID} if any(
        len(q) > 255 or ":" not in q for q in queries) else {W.REP.ACK}


# --------------------------------------------------------------------------- judging replies


def judge_reply(st: State, disk: Disk, req: Request,
                rep: W.Reply) -> Callable[[], None] | None:
    """Check one reply; return the change it makes to the disk (a callable) or None."""
    ok_allowed, errs = expected(req, st)
    what = f"cmd {req.cmd} flags {req.flags:#x} offset {req.offset} length {req.length}"
    if rep.error:
        if rep.error not in errs:
            raise Wrong(f"{what}: error {rep.error}, expected "
                        + (f"one of {sorted(errs)}" if errs else "success"))
        return None
    if not ok_allowed:
        raise Wrong(f"{what}: success, expected error {sorted(errs)}")
    if rep.error_offsets:
        raise Wrong(f"{what}: ERROR_OFFSET chunk in a successful reply")
    cmd = req.cmd
    if cmd == W.CMD.READ:
        _judge_read(st, disk, req, rep, what)
    elif cmd == W.CMD.BLOCK_STATUS:
        _judge_status(st, disk, req, rep, what)
    elif rep.data or rep.status:
        raise Wrong(f"{what}: data in the reply")
    if cmd == W.CMD.WRITE:
        return lambda: disk.write(req.offset, req.payload)
    if cmd == W.CMD.WRITE_ZEROES:
        return lambda: disk.zero(req.offset, req.length)
    if cmd == W.CMD.TRIM:
        return lambda: disk.trim(req.offset, req.length)
    return None


def _judge_read(st: State, disk: Disk, req: Request, rep: W.Reply, what: str) -> None:
    try:
        data = W.read_data(rep, req.length)
    except W.Violation as e:
        raise Wrong(f"{what}: {e}") from None
    if len(data) != req.length:
        raise Wrong(f"{what}: {len(data)} bytes")
    if req.flags & W.CMD.DF and len(rep.data) > 1:
        raise Wrong(f"{what}: {len(rep.data)} content chunks for a DF read")
    bad = disk.first_mismatch(req.offset, data)
    if bad is not None:
        i = bad - req.offset
        raise Wrong(f"{what}: byte at {bad} is {data[i]:#x}, the disk holds "
                    f"{disk.data[bad]:#x}")


def _judge_status(st: State, disk: Disk, req: Request, rep: W.Reply, what: str) -> None:
    if set(rep.status) != set(st.contexts):
        raise Wrong(f"{what}: status for contexts {sorted(rep.status)}, selected "
                    f"{sorted(st.contexts)}")
    for cid, ext in rep.status.items():
        if not ext:
            raise Wrong(f"{what}: no descriptor for context {cid}")
        if req.flags & W.CMD.REQ_ONE and (len(ext) != 1 or ext[0][0] > req.length):
            raise Wrong(f"{what}: REQ_ONE answered {ext[:3]}")
        if sum(n for n, _ in ext[:-1]) >= req.length:
            raise Wrong(f"{what}: descriptors run on past the request")
        pos = req.offset
        for n, flags in ext:
            if n == 0:
                raise Wrong(f"{what}: descriptor of length 0")
            if flags >> 32:
                raise Wrong(f"{what}: status flags {flags:#x} over 32 bits")
            if pos + n > st.size:
                raise Wrong(f"{what}: descriptor ends at {pos + n}, past the export")
            if st.contexts[cid] == "base:allocation" and flags & 2:
                bad = disk.nonzero_in(pos, n)
                if bad is not None:
                    raise Wrong(f"{what}: [{pos}, +{n}) said to read as zero, byte at {bad} is "
                                f"{disk.data[bad]:#x}")
            pos += n
