"""Drive one client face through a case: connect, a few commands in flight, close.

The three faces of pynbd's client: the asyncio engine (:class:`pynbd.client.AsyncClient`),
the blocking connection (:class:`pynbd.client.blocking.BlockingConnection`) and libnbd's API
(:mod:`pynbd.libnbd`). Each runs the same list of :class:`Op` and returns an
:class:`Outcome`: what connected, what each command returned or raised, and whether the face
had to be stopped by the deadline (a hang). Reads land in buffers pre-filled with the
sentinel byte.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fuzz.mutate import SENTINEL

__all__ = ["FACES", "Op", "Outcome", "make_ops"]

#: Seconds a face may take for a whole case (the hostile server hangs up within a second
#: of its last request, so anything near this is a hang).
DEADLINE = 15.0
READ, WRITE, FLUSH, TRIM, CACHE, ZERO, STATUS = "read", "write", "flush", "trim", "cache", \
    "zero", "status"
_CMD = {READ: 0, WRITE: 1, FLUSH: 3, TRIM: 4, CACHE: 5, ZERO: 6, STATUS: 7}


@dataclass
class Op:
    kind: str
    offset: int = 0
    length: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """How the server files the request: (command, offset, length)."""
        return _CMD[self.kind], self.offset, self.length


@dataclass
class Outcome:
    face: str
    connected: bool = False
    connect_error: BaseException | None = None
    size: int | None = None
    ops: list[Op] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)  # bytes / dict / None / exception
    hang: str | None = None
    leftovers: str | None = None  # tasks or threads left behind
    tracebacks: dict[int, str] = field(default_factory=dict)  # id(exc) -> text


def make_ops(rng: random.Random, size: int, status: bool) -> list[Op]:
    """Up to 8 distinct commands inside an export of ``size`` bytes."""
    ops: list[Op] = []
    seen: set[tuple[str, int, int]] = set()
    if size <= 0:
        return [Op(FLUSH)] if rng.random() < 0.5 else []
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        kind = rng.choices((READ, WRITE, STATUS, FLUSH, TRIM, ZERO, CACHE),
                           (60, 12, 12 if status else 0, 4, 4, 4, 4))[0]
        if kind == FLUSH:
            op = Op(FLUSH)
        else:
            n = min(size, rng.choice((1, 512, 4096, 4096, 65536, rng.randint(1, 300000),
                                      1 << 20)))
            off = rng.randrange(0, max(1, min(size, 1 << 62) - n + 1))
            op = Op(kind, off, n)
        if (op.kind, op.offset, op.length) in seen:
            continue
        seen.add((op.kind, op.offset, op.length))
        ops.append(op)
    return ops


def _fill(n: int) -> bytearray:
    return bytearray([SENTINEL]) * n


def _payload(op: Op) -> bytes:
    return bytes([(op.offset + op.length) % 251 or 1]) * op.length


# --------------------------------------------------------------------------- asyncio engine


def run_async(path: str, rng: random.Random, loop: asyncio.AbstractEventLoop) -> Outcome:
    from pynbd.client import AsyncClient

    out = Outcome("async")
    structured = rng.random() < 0.9

    async def one(c: Any, op: Op) -> Any:
        if op.kind == READ:
            buf = _fill(op.length)
            await c.pread_into(buf, op.offset)
            return bytes(buf)
        if op.kind == STATUS:
            return await c.block_status(op.length, op.offset)
        if op.kind == WRITE:
            return await c.pwrite(_payload(op), op.offset)
        if op.kind == FLUSH:
            return await c.flush()
        return await getattr(c, op.kind)(op.length, op.offset)

    async def case() -> None:
        try:
            c = await AsyncClient.connect(unix=path, structured=structured)
        except BaseException as e:  # noqa: BLE001 - judged by the caller
            out.connect_error = e
            out.tracebacks[id(e)] = traceback.format_exc()
            return
        out.connected, out.size = True, c.size
        out.ops = make_ops(rng, c.size, bool(c.meta_contexts))
        try:
            out.results = list(await asyncio.gather(*(one(c, op) for op in out.ops),
                                                    return_exceptions=True))
        finally:
            await c.close()

    async def main() -> None:
        try:
            await asyncio.wait_for(case(), DEADLINE)
        except TimeoutError:
            out.hang = f"the asyncio engine did not finish within {DEADLINE} s"
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me]
        if left:
            out.leftovers = f"tasks left behind: {left[:3]}"
            for t in left:
                t.cancel()

    loop.run_until_complete(main())
    return out


# --------------------------------------------------------------------------- blocking connection


def _watchdog(seconds: float, abort: Callable[[], None], out: Outcome, what: str
              ) -> threading.Timer:
    def fire() -> None:
        out.hang = f"{what} did not finish within {seconds} s"
        abort()

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def run_blocking(path: str, rng: random.Random) -> Outcome:
    from pynbd.client.blocking import BlockingConnection

    out = Outcome("blocking")
    structured = rng.random() < 0.9
    holder: list[Any] = []
    dog = _watchdog(DEADLINE, lambda: holder and holder[0].abort(), out, "the blocking connection")
    try:
        try:
            c = BlockingConnection.connect(unix=path, structured=structured)
        except BaseException as e:  # noqa: BLE001 - judged by the caller
            out.connect_error = e
            out.tracebacks[id(e)] = traceback.format_exc()
            return out
        holder.append(c)
        out.connected, out.size = True, c.size
        out.ops = make_ops(rng, c.size, bool(c.meta_contexts))
        try:
            out.results = _blocking_ops(c, out)
        finally:
            c.close()
    finally:
        dog.cancel()
    return out


def _blocking_ops(c: Any, out: Outcome) -> list[Any]:
    """Send every command, then collect each reply (several in flight)."""
    sent: list[tuple[Op, Any, Any]] = []
    results: list[Any] = []
    for op in out.ops:
        try:
            if op.kind == READ:
                buf = _fill(op.length)
                ck = c.send(0, op.offset, op.length, into=memoryview(buf))
                sent.append((op, ck, buf))
            elif op.kind == STATUS:
                sent.append((op, c.send(7, op.offset, op.length), {}))
            elif op.kind == WRITE:
                sent.append((op, c.send(1, op.offset, op.length, payload=_payload(op)), None))
            else:
                sent.append((op, c.send(_CMD[op.kind], op.offset, op.length), None))
        except Exception as e:  # noqa: BLE001 - judged by the caller
            out.tracebacks[id(e)] = traceback.format_exc()
            sent.append((op, e, None))
    for op, ck, dest in sent:
        if isinstance(ck, BaseException):
            results.append(ck)
            continue
        try:
            if op.kind == STATUS:
                c.reply(ck, contexts=dest)
                results.append(dest)
            else:
                c.reply(ck)
                results.append(bytes(dest) if op.kind == READ else None)
        except Exception as e:  # noqa: BLE001 - judged by the caller
            out.tracebacks[id(e)] = traceback.format_exc()
            results.append(e)
    return results


# --------------------------------------------------------------------------- pynbd.libnbd


def run_libnbd(path: str, rng: random.Random) -> Outcome:
    import pynbd.libnbd as nbd

    out = Outcome("libnbd")
    h = nbd.NBD()
    h.set_request_structured_replies(rng.random() < 0.9)
    h.set_pread_initialize(False)
    h.add_meta_context("base:allocation")
    dog = _watchdog(DEADLINE, lambda: None, out, "pynbd.libnbd")
    try:
        try:
            h.connect_unix(path)
            size = h.get_size()
        except Exception as e:  # noqa: BLE001 - judged by the caller
            out.connect_error = e
            out.tracebacks[id(e)] = traceback.format_exc()
            return out
        out.connected, out.size = True, size
        try:
            status = h.can_meta_context("base:allocation")
        except nbd.Error:
            status = False
        out.ops = make_ops(rng, size, status)
        out.results = _libnbd_ops(h, out, nbd.Error)
    finally:
        dog.cancel()
        try:
            h.close()
        except Exception as e:  # noqa: BLE001 - judged by the caller
            out.results.append(e)
            out.tracebacks[id(e)] = traceback.format_exc()
    return out


def _libnbd_start(h: Any, op: Op, slot: list[Any]) -> int:
    if op.kind == READ:
        buf = _fill(op.length)
        slot.append(buf)
        return int(h.aio_pread(buf, op.offset))
    if op.kind == STATUS:
        got: dict[str, list[tuple[int, int]]] = {}
        slot.append(got)

        def extent(ctx: str, offset: int, entries: list[int], err: Any) -> int:
            got[ctx] = list(zip(entries[::2], entries[1::2], strict=False))
            return 0

        return int(h.aio_block_status(op.length, op.offset, extent))
    slot.append(None)
    if op.kind == WRITE:
        return int(h.aio_pwrite(_payload(op), op.offset))
    if op.kind == FLUSH:
        return int(h.aio_flush())
    return int(getattr(h, f"aio_{op.kind}")(op.length, op.offset))


def _libnbd_ops(h: Any, out: Outcome, error: type[BaseException]) -> list[Any]:
    results: list[Any] = [None] * len(out.ops)
    pending: dict[int, tuple[int, list[Any]]] = {}
    for i, op in enumerate(out.ops):
        slot: list[Any] = []
        try:
            pending[_libnbd_start(h, op, slot)] = (i, slot)
        except Exception as e:  # noqa: BLE001 - judged by the caller
            out.tracebacks[id(e)] = traceback.format_exc()
            results[i] = e
    deadline = time.monotonic() + DEADLINE
    while pending and out.hang is None:
        for ck in list(pending):
            i, slot = pending[ck]
            try:
                if not h.aio_command_completed(ck):
                    continue
                v = slot[0]
                results[i] = bytes(v) if isinstance(v, bytearray) else v
            except Exception as e:  # noqa: BLE001 - judged by the caller
                out.tracebacks[id(e)] = traceback.format_exc()
                results[i] = e
            del pending[ck]
        if not pending:
            break
        try:
            h.poll(200)
        except error:  # the connection is gone: each command must complete with its error
            time.sleep(0.01)
        if time.monotonic() > deadline:
            out.hang = (f"pynbd.libnbd: {len(pending)} commands neither completed nor failed "
                        f"after {DEADLINE} s")
    return results


FACES: dict[str, Callable[..., Outcome]] = {"async": run_async, "blocking": run_blocking,
                                            "libnbd": run_libnbd}
