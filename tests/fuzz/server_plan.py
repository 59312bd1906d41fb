"""What one fuzzing connection to the server does: a *plan*, drawn from a seed.

A plan is a handshake (client flags, then options) and a transmission phase (batches of
requests, each sent in one go). The same plan is either run as it is, with every reply
checked (:mod:`server_fuzz`), or turned into one byte stream that :func:`mutate.mutate`
breaks. Requests are mostly valid, with the invalid ones a client may send (out of bounds,
unknown flags and commands, zero lengths) mixed in, because those have answers too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fuzz import wire as W
from fuzz.mutate import SENTINEL, Stream

__all__ = ["Op", "Plan", "Request", "make_plan", "pattern", "plan_stream"]

#: Largest WRITE a plan makes (the receive paths for inline and large payloads both run).
MAX_WRITE = 2 << 20
#: Largest READ a plan makes.
MAX_READ = 4 << 20
#: Pages of the memory plugin, where holes begin and end.
PAGE = 32768


@dataclass
class Op:
    """One option request."""

    opt: int
    data: bytes = b""


@dataclass
class Request:
    cmd: int
    flags: int
    offset: int
    length: int
    cookie: int = 0
    payload: bytes = b""


@dataclass
class Plan:
    client_flags: int
    options: list[Op]
    batches: list[list[Request]] = field(default_factory=list)
    end: str = "disc"  # disc | disc-pipelined | close | abort (ABORT, in negotiation)

    @property
    def go(self) -> Op | None:
        last = self.options[-1] if self.options else None
        return last if last and last.opt in (W.OPT.GO, W.OPT.EXPORT_NAME) else None

    @property
    def structured(self) -> bool:
        return any(o.opt in (W.OPT.STRUCTURED_REPLY, W.OPT.EXTENDED_HEADERS) and not o.data
                   for o in self.options)

    @property
    def extended(self) -> bool:
        return any(o.opt == W.OPT.EXTENDED_HEADERS and not o.data for o in self.options)


def pattern(rng: random.Random, n: int) -> bytes:
    """``n`` bytes of write data: never the sentinel byte, sometimes zeroes."""
    if rng.random() < 0.1:
        return bytes(n)
    seed = rng.randbytes(min(n, 64)) or b"\x01"
    data = (seed * (n // len(seed) + 1))[:n]
    return data.replace(bytes([SENTINEL]), b"\x5a")


# --------------------------------------------------------------------------- handshake


def _options(rng: random.Random, structured: bool, extended: bool) -> list[Op]:
    ops: list[Op] = []
    extras = [
        lambda: Op(W.OPT.LIST),
        lambda: Op(W.OPT.INFO, W.info_request("", _infos(rng))),
        lambda: Op(W.OPT.STARTTLS),
        lambda: Op(rng.choice((0, 4, 12, 13, 99, 1 << 31, 0xFFFFFFFF)), rng.randbytes(
            rng.choice((0, 0, 3, 16)))),
        lambda: Op(W.OPT.LIST_META_CONTEXT, W.meta_request("", _queries(rng))),
        lambda: Op(rng.choice((W.OPT.LIST, W.OPT.STRUCTURED_REPLY, W.OPT.STARTTLS)), b"xx"),
    ]
    for _ in range(rng.choice((0, 0, 1, 2, 4))):
        ops.append(rng.choice(extras)())
    if extended:
        ops.insert(rng.randint(0, len(ops)), Op(W.OPT.EXTENDED_HEADERS))
    elif structured:
        ops.insert(rng.randint(0, len(ops)), Op(W.OPT.STRUCTURED_REPLY))
    if structured and rng.random() < 0.7:
        ops.append(Op(W.OPT.SET_META_CONTEXT, W.meta_request("", _queries(rng, set_=True))))
    return ops


def _infos(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.sample((0, 1, 2, 3, 77), rng.randint(0, 3)))


def _queries(rng: random.Random, set_: bool = False) -> list[str]:
    pool = ["base:allocation", "base:", "qemu:allocation-depth", "x-junk:thing", "base:nope",
            "nonamespace", "", "a:" + "b" * 300]
    qs = rng.sample(pool, rng.randint(0, 3))
    if set_ and rng.random() < 0.8 and "base:allocation" not in qs:
        qs.insert(rng.randint(0, len(qs)), "base:allocation")
    return qs


# --------------------------------------------------------------------------- transmission


def _offset_length(rng: random.Random, size: int, max_len: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.03:
        length = 0
    elif r < 0.6:
        length = rng.choice((1, 7, 512, 4096, 4096, 8192, 65536, rng.randint(1, 16384)))
    elif r < 0.95:
        length = rng.randint(1, min(max_len, 1 << 18))
    else:
        length = rng.randint(1, max_len)
    r = rng.random()
    if r < 0.4:
        offset = rng.randrange(0, size, 512)
    elif r < 0.6:
        offset = rng.randrange(0, size)
    elif r < 0.8:
        offset = max(0, rng.randrange(0, size, PAGE) + rng.choice((-1, 0, 1, -512, 511)))
    elif r < 0.95:
        offset = max(0, size - length - rng.choice((0, 0, 1, 512, 4096)))
    else:
        offset = size - rng.choice((0, 1, 512, -1, -4096))  # at or past the end
    if offset + length > size and rng.random() < 0.6:
        offset = max(0, size - length)
    return offset, length


_CMDS = [(W.CMD.READ, 30), (W.CMD.WRITE, 26), (W.CMD.WRITE_ZEROES, 8), (W.CMD.TRIM, 7),
         (W.CMD.FLUSH, 5), (W.CMD.CACHE, 4), (W.CMD.BLOCK_STATUS, 12), (-1, 3)]


def _flags(rng: random.Random, cmd: int, extended: bool) -> int:
    f = 0
    if rng.random() < 0.2:
        f |= W.CMD.FUA
    if cmd == W.CMD.READ and rng.random() < 0.15:
        f |= W.CMD.DF
    if cmd == W.CMD.WRITE_ZEROES:
        f |= rng.choice((0, 0, W.CMD.NO_HOLE, W.CMD.FAST_ZERO))
    if cmd == W.CMD.BLOCK_STATUS and rng.random() < 0.3:
        f |= W.CMD.REQ_ONE
    if extended and cmd == W.CMD.WRITE:
        f |= W.CMD.PAYLOAD_LEN
    if rng.random() < 0.04:
        f ^= 1 << rng.randrange(16)  # an unknown or inapplicable flag (or a missing one)
    return f


def _request(rng: random.Random, size: int, extended: bool) -> Request:
    cmd = rng.choices([c for c, _ in _CMDS], [w for _, w in _CMDS])[0]
    if cmd == -1:
        cmd = rng.choice((8, 9, 15, 100, 0xFFFF))
    if cmd == W.CMD.FLUSH:
        off, n = (0, 0) if rng.random() < 0.95 else (512, 512)
    else:
        off, n = _offset_length(rng, size, MAX_WRITE if cmd == W.CMD.WRITE else MAX_READ)
    if extended and cmd in (W.CMD.TRIM, W.CMD.WRITE_ZEROES, W.CMD.BLOCK_STATUS) and \
            rng.random() < 0.05:
        n = rng.choice((1 << 32, (1 << 33) + 512, 1 << 62))  # 64-bit effect lengths
    flags = _flags(rng, cmd, extended)
    payload = b""
    if cmd == W.CMD.WRITE and (not extended or flags & W.CMD.PAYLOAD_LEN):
        payload = pattern(rng, n)
    elif extended and flags & W.CMD.PAYLOAD_LEN:
        n = min(n, 4096)
        payload = rng.randbytes(n)  # a payload where none belongs: consumed, then EINVAL
    return Request(cmd, flags, off, n, payload=payload)


_WRITERS = (W.CMD.WRITE, W.CMD.WRITE_ZEROES, W.CMD.TRIM)


def _conflicts(a: Request, b: Request) -> bool:
    """Whether two requests in flight together could see each other's effects."""
    if a.cmd not in _WRITERS and b.cmd not in _WRITERS:
        return False
    return a.offset < b.offset + max(b.length, 1) and b.offset < a.offset + max(a.length, 1)


def _batches(rng: random.Random, size: int, extended: bool, n: int) -> list[list[Request]]:
    batches: list[list[Request]] = []
    cookies = iter(range(1, 1 << 30))
    while n > 0:
        want = rng.choice((1, 1, 2, 4, 8, 16, 32))
        batch: list[Request] = []
        while len(batch) < want and n > 0:
            r = _request(rng, size, extended)
            if any(_conflicts(r, b) for b in batch):
                break
            r.cookie = rng.choice((next(cookies), next(cookies), (1 << 64) - len(batch) - 1))
            batch.append(r)
            n -= 1
        if batch:
            batches.append(batch)
    return batches


def make_plan(rng: random.Random, size: int) -> Plan:
    """A plan for one connection to an export of ``size`` bytes."""
    extended = rng.random() < 0.2
    structured = extended or rng.random() < 0.65
    options = _options(rng, structured, extended)
    flags = 3 if rng.random() < 0.9 else rng.choice((1, 0b11, 1 | 4))
    r = rng.random()
    if r < 0.02:
        return Plan(flags, options, [], "abort")
    name = ""
    if not extended and rng.random() < 0.15:
        options.append(Op(W.OPT.EXPORT_NAME, name.encode()))
    else:
        options.append(Op(W.OPT.GO, W.info_request(name, _infos(rng))))
    nreq = rng.choice((0, 1, 2, 3, 5, 8, 16, 40))
    plan = Plan(flags, options, _batches(rng, size, extended, nreq))
    plan.end = rng.choices(("disc", "disc-pipelined", "close"), (6, 2, 2))[0]
    return plan


def plan_stream(plan: Plan) -> Stream:
    """The client's whole side of the connection, as fields (for the mutator)."""
    s = Stream().int(4, plan.client_flags, "flags")
    for op in plan.options:
        s.int(8, W.IHAVEOPT, "magic").int(4, op.opt, "type").int(4, len(op.data), "len")
        s.raw(op.data, "name")
    if plan.end == "abort":
        return s.int(8, W.IHAVEOPT, "magic").int(4, W.OPT.ABORT, "type").int(4, 0, "len")
    ext = plan.extended
    for batch in plan.batches:
        for r in batch:
            s.int(4, W.EXT_REQUEST_MAGIC if ext else W.REQUEST_MAGIC, "magic")
            s.int(2, r.flags, "flags").int(2, r.cmd, "type").int(8, r.cookie, "cookie")
            s.int(8, r.offset, "offset").int(8 if ext else 4, r.length, "len")
            s.raw(r.payload)
    if plan.end != "close":
        s.int(4, W.EXT_REQUEST_MAGIC if ext else W.REQUEST_MAGIC, "magic")
        s.int(2, 0, "flags").int(2, W.CMD.DISC, "type").int(8, 1 << 40, "cookie")
        s.int(8, 0, "offset").int(8 if ext else 4, 0, "len")
    return s
