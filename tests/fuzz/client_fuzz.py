"""The hostile-server fuzzer against pynbd's clients.

Each input is one connection from one client face (the asyncio engine, the blocking
connection or pynbd.libnbd, :mod:`client_faces`) to the hostile server (:mod:`hostile`),
which negotiates and answers with mutated but plausible bytes. Oracles, per input:

- no hang: the face finishes within its deadline (the server always hangs up by itself);
- no exception but the documented ones: :class:`pynbd.errors.NBDError` and
  ``ConnectionError`` (the engine, the blocking connection), ``pynbd.libnbd.Error``;
- no data the server did not send: a successful read equals the bytes of the chunks the
  server sent for it (and holds no sentinel byte); block status equals what was sent;
- an export of 2^63 bytes or more is refused (libnbd >= 1.16.5, CVE-2023-5215);
- the client sends valid requests (magic, unique cookies);
- bounded memory: the process's peak RSS grows by at most :data:`MEMORY_BOUND_KIB` per input.

The faces run in a worker process (``python -m fuzz client-worker``) that reports one JSON
line per input; a worker that stops reporting is hung (or dead), is killed and replaced, and
the input it was on is a finding.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz.client_faces import FACES, READ, STATUS, Op, Outcome
from fuzz.findings import Finding, Totals
from fuzz.hostile import HostileServer, Record, Setup, make_setup
from fuzz.hostile_replies import Sent
from fuzz.mutate import SENTINEL
from fuzz.procs import rss_kib

__all__ = ["ClientFuzzer", "judge", "worker"]

#: Peak RSS growth allowed during one input (the engine may buffer a 64 MiB chunk).
MEMORY_BOUND_KIB = 256 * 1024
#: Errors a server may send (libnbd's errnum for a failed command).
_COMMAND_ERRNOS = {1, 5, 12, 22, 28, 75, 95, 108}
#: What a client must never print while the fuzzer drives it.
_LOG_PROBLEMS = ("Traceback (most recent call last)", "exception was never retrieved",
                 "Exception in callback", "Exception ignored in")
#: A worker silent this long is hung.
WORKER_SILENCE = 60.0


# --------------------------------------------------------------------------- oracles


def _allowed(face: str) -> tuple[type[BaseException], ...]:
    from pynbd.errors import NBDError

    if face == "libnbd":
        import pynbd.libnbd as nbd

        return (nbd.Error,)
    return (NBDError, ConnectionError)


def judge(out: Outcome, rec: Record, sane: bool = False) -> list[tuple[str, str]]:
    """Every oracle on one input: a list of (kind, detail). ``sane``: the server's setup
    was a plausible export (no absurd size, flags or block size)."""
    problems: list[tuple[str, str]] = []
    if out.hang:
        when = "" if rec.closed_at is None else \
            f" (the server had hung up {time.monotonic() - rec.closed_at:.1f} s before)"
        problems.append(("hang", out.hang + when))
    if out.leftovers:
        problems.append(("leak", out.leftovers))
    allowed = _allowed(out.face)
    excs = [out.connect_error, *(r for r in out.results if isinstance(r, BaseException))]
    for e in excs:
        if e is not None and not isinstance(e, allowed):
            tb = out.tracebacks.get(id(e), "")
            problems.append(("exception", f"{type(e).__name__}: {e}\n{tb}"))
    if out.connected and (out.size or 0) >= 1 << 63:
        problems.append(("accepted", f"connected to an export of {out.size} bytes (>= 2^63)"))
    for op, res in zip(out.ops, out.results, strict=False):
        if res is None or isinstance(res, BaseException):
            continue
        sent = rec.sent.get(op.key)
        if op.kind == READ:
            p = _check_read(op, res, sent, rec.raw_sentinel)
        elif op.kind == STATUS:
            # after random bytes in the handshake the names the client got are not ours
            sure = not {"handshake:bytes", "handshake:greeting"} & set(rec.how)
            p = _check_status(op, res, sent, rec.contexts if sure else None)
        else:
            p = None
        if p:
            how = ", ".join(sent.how) if sent and sent.how else "correct"
            problems.append(("data", (f"{out.face} {op.kind} {op.length} at {op.offset}: {p} "
                             f"(replies: {how})")))
    problems += [("request", f"{out.face} sent {e}") for e in rec.client_errors]
    if not rec.how and sane and rec.close_reason in ("disc", "eof", "quiet"):
        problems += _false_alarms(out, rec.close_reason == "quiet")
    return problems


def _false_alarms(out: Outcome, quiet: bool) -> list[tuple[str, str]]:
    """The server broke nothing: no command may fail but with the error the server sent.
    If the server hung up because the client went quiet (a slow client, or one waiting for
    nothing), failures for the hang-up are fine, but not a protocol error."""
    from pynbd.errors import CommandError, ProtocolError

    bad = []
    for e in [out.connect_error, *out.results]:
        if not isinstance(e, BaseException) or isinstance(e, CommandError) or (
                out.face == "libnbd" and getattr(e, "errnum", None) in _COMMAND_ERRNOS):
            continue
        if quiet and not (isinstance(e, ProtocolError) or "server sent" in str(e)
                          or getattr(e, "errnum", None) == 71):
            continue
        tb = out.tracebacks.get(id(e), "")
        bad.append(("false-alarm", (f"{out.face}: {type(e).__name__}: {e} against a server that "
                    f"broke nothing\n{tb}")))
    return bad[:1]


def _check_read(op: Op, res: bytes, sent: Sent | None, raw_sentinel: bool) -> str | None:
    n, off = op.length, op.offset
    if len(res) != n:
        return f"returned {len(res)} bytes"
    k = res.find(SENTINEL)
    if sent is None:
        return "succeeded, but the server sent no reply for it"
    if sent.desync:
        if k >= 0 and not raw_sentinel:
            return f"byte {k} was never written (it still holds the sentinel)"
        return None
    exp, cov = bytearray(n), bytearray(n)
    alts: list[tuple[int, int, bytes]] = []
    for o, length, data in sent.data:
        a, b = max(o, off) - off, min(o + length, off + n) - off
        if b <= a:
            continue
        seg = data[a + off - o:b + off - o] if data is not None else bytes(b - a)
        if cov[a:b].count(0) == b - a:
            exp[a:b] = seg
            cov[a:b] = b"\1" * (b - a)
        else:  # overlapping chunks (a broken server): either value may be the one kept
            alts.append((a, b, seg))
            for x in range(a, b):
                if not cov[x]:
                    exp[x], cov[x] = seg[x - a], 1
    if cov.count(0):
        return f"succeeded, but no chunk sent covers byte {cov.index(0)}"
    if res == exp:
        return None
    for i in range(0, n, 4096):
        if res[i:i + 4096] != exp[i:i + 4096]:
            j = next(x for x in range(i, min(n, i + 4096)) if res[x] != exp[x])
            if not any(a <= j < b and seg[j - a] == res[j] for a, b, seg in alts):
                return f"byte {j} is {res[j]:#x}, the server sent {exp[j]:#x}"
    return None


def _check_status(op: Op, res: dict[str, list[tuple[int, int]]], sent: Sent | None,
                  contexts: dict[int, str] | None) -> str | None:
    """Each context's extents are one status chunk's (``contexts``: the names the server
    gave its ids; None: unknown, any chunk will do)."""
    if sent is None:
        return "succeeded, but the server sent no reply for it"
    if sent.desync:
        return None
    for name, ext in res.items():
        sent_lists = [e for i, lists in sent.status.items() for e in lists
                      if contexts is None or contexts.get(i) == name]
        if not sent_lists:
            return f"extents for {name!r}, which the server never answered"
        if any(n == 0 for n, _ in ext):
            return f"accepted a descriptor of length 0: {ext[:4]}"
        if not any(_same_extents(ext, want) for want in sent_lists):
            return f"extents {ext[:4]}, the server sent {[w[:4] for w in sent_lists]}"
    return None


def _same_extents(ext: list[tuple[int, int]], want: list[tuple[int, int]]) -> bool:
    """``ext`` is what one status chunk said: the same descriptors, or fewer, the last
    possibly clipped."""
    if not ext or len(ext) > len(want) or ext[:-1] != want[:len(ext) - 1]:
        return False
    last, sent = ext[-1], want[len(ext) - 1]
    return last[1] == sent[1] and last[0] <= sent[0]


def sane_setup(s: Setup) -> bool:
    """Whether a correct client must get along with this export."""
    return (s.style == "fixed" and s.hs_break is None and s.stall_after < 0 and s.go
            and 4096 <= s.size < 1 << 40 and s.eflags & 1 and not s.eflags & 2
            and (s.block_size is None or s.block_size[0] in (1, 512, 4096)))


# --------------------------------------------------------------------------- the worker


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def one_input(server: HostileServer, seed: str, i: int,
              loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    rng_s = random.Random(f"{seed}/client/{i}/server")
    rng_c = random.Random(f"{seed}/client/{i}/client")
    face = rng_c.choice(list(FACES))
    setup = make_setup(rng_s)
    before = rss_kib(os.getpid())
    _reset_peak()
    rec = server.serve(setup, rng_s)
    if face == "async":
        out = FACES[face](server.path, rng_c, loop)
    else:
        out = FACES[face](server.path, rng_c)
    if not server.join(30):
        raise RuntimeError(f"input {i}: the hostile server thread is stuck")
    if rec.crashed:
        raise RuntimeError(f"input {i}: the hostile server failed:\n{rec.crashed}")
    problems = judge(out, rec, sane_setup(setup))
    peak = rss_kib(os.getpid(), "VmHWM")
    if peak - before > MEMORY_BOUND_KIB:
        grew = peak - before
        problems.append(("memory", (f"{face}: peak RSS grew by {grew} KiB "
                                   f"(bound {MEMORY_BOUND_KIB} KiB)")))
    return {"i": i, "face": face, "requests": rec.requests, "rss": rss_kib(os.getpid()),
            "problems": problems, "how": sorted(set(rec.how))[:12]}


def worker(seed: str, first: int, count: int, emit: Callable[[str], None]) -> None:
    """Run inputs first .. first+count-1, emitting one JSON line each."""
    d = tempfile.mkdtemp(prefix="pynbd-hostile-", dir="/tmp")
    server = HostileServer(os.path.join(d, "s.sock"))
    loop = asyncio.new_event_loop()
    try:
        for i in range(first, first + count):
            emit(json.dumps(one_input(server, seed, i, loop)))
    finally:
        server.close()
        loop.close()
        os.unlink(os.path.join(d, "s.sock"))
        os.rmdir(d)


# --------------------------------------------------------------------------- the parent


class _Worker:
    """One worker process running inputs first .. end-1."""

    def __init__(self, seed: str, first: int, end: int) -> None:
        here = Path(__file__).resolve().parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
        self.err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "fuzz", "client-worker",
             "--seed", seed, "--first", str(first), "--count", str(end - first)],
            stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL, text=True,
            env=env, start_new_session=True)
        assert self.p.stdout is not None
        self.out = self.p.stdout
        self.next, self.end, self.count = first, end, end - first
        self.last = time.monotonic()

    def stop(self, dump: bool = False) -> str:
        """End the process (with every thread's stack on stderr if ``dump``); its stderr."""
        if self.p.poll() is None:
            if dump:
                self.p.send_signal(signal.SIGABRT)  # faulthandler prints the stacks
            try:
                self.p.wait(5 if dump else 0.01)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.p.wait()
        self.err.seek(0)
        text = self.err.read()
        self.err.close()
        self.out.close()
        return text


class ClientFuzzer:
    """Runs the inputs in ``jobs`` worker processes (blocks of :data:`BLOCK` inputs each);
    a hung or dead worker is a finding, and the rest of its block goes to a new one."""

    BLOCK = 2000

    def __init__(self, seed: str, log: Callable[[str], None] = print, jobs: int = 2) -> None:
        self.seed = seed
        self.log = log
        self.jobs = jobs
        self.totals = Totals("client")

    def run(self, inputs: int | None = None, seconds: float | None = None,
            only: int | None = None) -> Totals:
        t0 = time.monotonic()
        first, end = (only, only + 1) if only is not None else (0, inputs or 1 << 62)
        blocks: list[tuple[int, int]] = []  # the rest of a failed worker's block
        active: list[_Worker] = []
        try:
            while first < end or blocks or active:
                if seconds is not None and time.monotonic() - t0 > seconds:
                    break
                while len(active) < self.jobs and (blocks or first < end):
                    if blocks:
                        active.append(_Worker(self.seed, *blocks.pop()))
                    else:
                        active.append(_Worker(self.seed, first, min(end, first + self.BLOCK)))
                        first = min(end, first + self.BLOCK)
                self._step(active, blocks)
        finally:
            for w in active:
                w.stop()
            self.totals.seconds = time.monotonic() - t0
        return self.totals

    def _step(self, active: list[_Worker], blocks: list[tuple[int, int]]) -> None:
        ready, _, _ = select.select([w.out for w in active], [], [], 1.0)
        now = time.monotonic()
        for w in list(active):
            if w.out in ready:
                line = w.out.readline()
                if line:
                    w.next = self._record(json.loads(line)) + 1
                    w.last = now
                    continue
                how = "exited"
            elif now - w.last > WORKER_SILENCE:
                how = "silent"
            else:
                continue
            active.remove(w)
            if w.next < w.end:
                self._worker_failed(w, how)
                if w.next + 1 < w.end:
                    blocks.append((w.next + 1, w.end))
            else:
                self._scan_log(w, w.stop())

    def _scan_log(self, w: _Worker, err: str) -> None:
        """A client logs nothing of its own (asyncio's "exception was never retrieved",
        a traceback from a thread...) while it fails commands cleanly."""
        n = sum(err.count(s) for s in _LOG_PROBLEMS)
        if n:
            self.totals.tracebacks += n
            self.totals.add(Finding("client", "worker", w.end - 1, self.seed, "traceback",
                                    f"inputs {w.end - w.count} to {w.end - 1} logged:\n"
                                    f"{err[-4000:]}"), self.log)

    def _record(self, rep: dict[str, Any]) -> int:
        t = self.totals
        t.inputs += 1
        t.requests += rep["requests"]
        t.count(rep["face"])
        key = "client-worker"
        t.memory_kib[key] = rep["rss"]
        t.peak_kib[key] = max(t.peak_kib.get(key, 0), rep["rss"])
        for kind, detail in rep["problems"]:
            t.add(Finding("client", rep["face"], rep["i"], self.seed, kind, detail), self.log)
        return int(rep["i"])

    def _worker_failed(self, w: _Worker, how: str) -> None:
        err = w.stop(dump=how == "silent")
        self.totals.crashes += 1
        self.totals.inputs += 1
        kind = "hang" if how == "silent" else "died"
        self.totals.add(Finding(
            "client", "worker", w.next, self.seed, kind,
            f"the worker {how} on input {w.next} (exit {w.p.returncode}):\n{err[-4000:]}"),
            self.log)
