"""The stateful fuzzer against ``pynbd serve``.

Each input is one connection to a real server process, planned from a seed
(:mod:`server_plan`). A third of them run as planned, every reply judged against the
specification and a model of the disk (:mod:`server_check`), on a server only such clients
use; the rest are the same kind of plan turned into bytes and broken (:mod:`mutate`), sent in
pieces to a second server, which must get through them. Oracles, per input:

- the server never dies, and never logs a traceback (its stderr is read after every input);
- a well-formed request gets the specification's reply, and reads return the model's data;
- after a broken stream, once the client has sent EOF, the server finishes and hangs up;
- every few inputs a fresh client writes and reads back a canary (the server still serves);
- its memory (VmRSS) stays under a bound; now and then two probes push on memory: a client
  that pipelines reads of real data and never reads the replies (the per-connection bound),
  and a hundred idle connections (what an idle socket costs).
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.findings import Finding, Totals
from fuzz.model import Disk
from fuzz.mutate import mutate
from fuzz.probes import Client, greedy_probe, idle_probe
from fuzz.procs import ServerProc, log_problems
from fuzz.server_check import Hangup, Session, Wrong
from fuzz.server_plan import make_plan, plan_stream

__all__ = ["ServerFuzzer"]

SIZE = 64 << 20
#: A server past this resident size after an input has finished is a finding.
MEMORY_BOUND_KIB = 512 * 1024
#: Seconds without progress before a server counts as hung.
IDLE_TIMEOUT = 20.0
#: Output of one broken stream read at most (then the client just hangs up).
MAX_OUTPUT = 256 << 20
HEALTH_EVERY = 25
WEIGHTS = {"memory": 3, "file": 1}


@dataclass
class Target:
    plugin: str
    model: ServerProc  # only well-behaved clients: its disk is the model's
    mutant: ServerProc  # broken streams
    disk: Disk
    log_pos: dict[str, int] = field(default_factory=dict)
    inputs: int = 0


def _plugin_args(plugin: str, workdir: Path, role: str) -> list[str]:
    if plugin == "memory":
        return ["memory", str(SIZE)]
    img = workdir / f"{role}.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return ["file", str(img)]


class ServerFuzzer:
    def __init__(self, seed: str, workdir: Path, plugins: tuple[str, ...] = ("memory", "file"),
                 log: Callable[[str], None] = print) -> None:
        self.seed = seed
        self.workdir = workdir
        self.log = log
        self.totals = Totals("server")
        self._reported: dict[str, int] = {}
        self.targets = []
        for p in plugins:
            model = ServerProc(_plugin_args(p, workdir, f"{p}-model"), workdir, f"{p}-model")
            mutant = ServerProc(_plugin_args(p, workdir, f"{p}-mutant"), workdir, f"{p}-mutant")
            self.targets.append(Target(p, model, mutant, Disk(SIZE)))
        #: Inputs go round the targets by weight: the file plugin's requests (threads,
        #: fdatasync) take about five times as long as the memory plugin's.
        self.schedule = [t for t in self.targets for _ in range(WEIGHTS.get(t.plugin, 1))]

    # ---- the run ----------------------------------------------------------------------------
    def run(self, inputs: int | None = None, seconds: float | None = None,
            only: int | None = None, probes: bool = True) -> Totals:
        t0 = time.monotonic()
        for t in self.targets:
            for p in (t.model, t.mutant):
                p.start()
        try:
            todo = range(only, only + 1) if only is not None else range(
                inputs if inputs is not None else 1 << 62)
            for i in todo:
                if seconds is not None and time.monotonic() - t0 > seconds:
                    break
                self.one(i)
            for t in self.targets:
                self._health(t, self.totals.inputs)
            if probes and only is None:
                for t in self.targets:
                    self._probes(t)
        finally:
            self.totals.seconds = time.monotonic() - t0
            self._stop_all()
        return self.totals

    def one(self, i: int) -> None:
        t = self.schedule[i % len(self.schedule)]
        rng = random.Random(f"{self.seed}/server/{i}")
        self.totals.inputs += 1
        t.inputs += 1
        if rng.random() < 0.33:
            self.totals.count("valid")
            self._valid(t, rng, i)
            self._check_proc(t, t.model, i)
        else:
            mode = self._mutated(t, rng, i)
            self.totals.count(mode)
            self._check_proc(t, t.mutant, i)
        if t.inputs % HEALTH_EVERY == 0:
            self._health(t, i)

    def _finding(self, t: Target, i: int, kind: str, detail: str) -> None:
        self.totals.add(Finding("server", t.plugin, i, self.seed, kind, detail), self.log)

    # ---- well-formed inputs -----------------------------------------------------------------
    def _valid(self, t: Target, rng: random.Random, i: int) -> None:
        plan = make_plan(rng, SIZE)
        s = Session(t.model.sock, t.disk, plan)
        try:
            s.run()
        except Wrong as e:
            self._finding(t, i, "reply", str(e))
            self._resync(t)
        except (Hangup, OSError) as e:
            self._finding(t, i, "reply", f"hung up on a well-formed client: {e}")
            self._resync(t)
        self.totals.requests += s.requests

    def _resync(self, t: Target) -> None:
        """After a wrong answer, learn the disk again (so one bug is reported once)."""
        if not t.model.alive():
            return
        try:
            with Client(t.model.sock) as c:
                for off in range(0, SIZE, 1 << 20):
                    t.disk.write(off, c.pread(off, 1 << 20))
        except (OSError, Wrong, Hangup):
            t.disk.trim(0, SIZE)

    # ---- broken inputs ----------------------------------------------------------------------
    def _mutated(self, t: Target, rng: random.Random, i: int) -> str:
        plan = make_plan(rng, SIZE)
        data, _how = mutate(rng, plan_stream(plan))
        ending = rng.choices(("eof", "reset", "bytewise"), (85, 10, 5))[0]
        self.totals.requests += sum(len(b) for b in plan.batches)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(t.mutant.sock)
        except OSError as e:
            self._finding(t, i, "died", f"cannot connect: {e}")
            return "mutated"
        try:
            problem = _exchange(sock, data, rng, ending)
        finally:
            sock.close()
        if problem:
            self._finding(t, i, "hang", f"{problem} (stream of {len(data)} bytes)")
        return "mutated"

    # ---- process health ---------------------------------------------------------------------
    def _check_proc(self, t: Target, p: ServerProc, i: int) -> None:
        if not p.alive():
            self.totals.crashes += 1
            self._finding(t, i, "died", f"{p.command()} exited with {p.proc.returncode}: "
                          + p.stderr()[-2000:])
            self._restart(t, p)
            return
        self._scan_log(t, p, i)

    def _scan_log(self, t: Target, p: ServerProc, i: int) -> None:
        text = p.stderr()
        new = text[t.log_pos.get(p.name, 0):]
        t.log_pos[p.name] = len(text)
        if not new:
            return
        tracebacks, odd = log_problems(new)
        if tracebacks:
            self.totals.tracebacks += tracebacks
            self._finding(t, i, "traceback", _last_error(new))
        elif odd:
            self._finding(t, i, "traceback", "a multi-line log message: " + odd[0])

    def _restart(self, t: Target, p: ServerProc) -> None:
        p.kill()
        p.start()
        if p is t.model:
            if t.plugin == "memory":
                t.disk = Disk(SIZE)
            else:
                self._resync(t)

    def _health(self, t: Target, i: int) -> None:
        for p in (t.model, t.mutant):
            self._check_proc(t, p, i)
            rss = p.rss_kib()
            key = f"{t.plugin}-{p.name.split('-')[-1]}"
            self.totals.memory_kib[key] = rss
            self.totals.peak_kib[key] = max(self.totals.peak_kib.get(key, 0), rss)
            if rss > max(MEMORY_BOUND_KIB, self._reported.get(p.name, 0) * 5 // 4):
                self._reported[p.name] = rss  # again only if it grows by another quarter
                self._finding(t, i, "memory", f"{p.name}: VmRSS {rss} KiB after input {i} "
                              f"(bound {MEMORY_BOUND_KIB} KiB)")
        rng = random.Random(f"{self.seed}/health/{i}")
        off = rng.randrange(0, SIZE, 4096)
        canary = rng.randbytes(4096)
        try:
            with Client(t.mutant.sock) as c:
                c.pwrite(off, canary)
                got = c.pread(off, 4096)
        except (OSError, Wrong, Hangup) as e:
            self._finding(t, i, "died", f"a fresh client cannot use the server: {e}")
            return
        if got != canary:
            self._finding(t, i, "reply", f"canary at {off} read back different")

    # ---- memory probes ----------------------------------------------------------------------
    def _probes(self, t: Target) -> None:
        """Each memory probe on a server of its own (a clean baseline, and the fuzzed
        servers' memory stays theirs)."""
        for probe in (idle_probe, greedy_probe):
            self.totals.count("probe")
            name = f"{t.plugin}-{probe.__name__.split('_')[0]}"
            p = ServerProc(_plugin_args(t.plugin, self.workdir, name), self.workdir, name)
            p.start()
            try:
                problem = probe(p.sock, p.pid)
            except (OSError, Wrong, Hangup) as e:
                problem = f"{probe.__name__}: {e}"
            finally:
                self._check_proc(t, p, -1)
                p.stop()
            if problem:
                self._finding(t, -1, "memory", problem)

    def _stop_all(self) -> None:
        for t in self.targets:
            for p in (t.model, t.mutant):
                if p.proc is None:
                    continue
                was_alive = p.alive()
                rc = p.stop()
                if was_alive and rc not in (0, -15):
                    self.totals.crashes += 1
                    self._finding(t, -1, "died", f"{p.name} exited with {rc} on SIGTERM")
                self._scan_log(t, p, -1)


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = [ln for ln in lines if not ln.startswith((" ", "\t", "Traceback"))]
    return (tail[-1] if tail else lines[-1]) + "\n" + text[-3000:]


def _pieces(data: bytes, rng: random.Random, bytewise: bool) -> list[bytes]:
    if bytewise:
        head = [data[k:k + 1] for k in range(min(len(data), 200))]
        return head + ([data[200:]] if len(data) > 200 else [])
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4)))) \
        if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _exchange(sock: socket.socket, data: bytes, rng: random.Random, ending: str) -> str | None:
    """Send ``data`` in pieces while reading what comes back; then EOF and wait for the
    server to hang up (or reset the connection). Returns a problem, or None."""
    sock.setblocking(False)
    pieces = _pieces(data, rng, ending == "bytewise")
    got = 0
    last = time.monotonic()
    closed = False
    while pieces and not closed:
        r, w, _ = select.select([sock], [sock], [], IDLE_TIMEOUT)
        if not r and not w:
            return f"neither reads nor writes for {IDLE_TIMEOUT} s while the client sends"
        if r:
            n, closed = _drain(sock)
            got += n
        if w and not closed:
            try:
                k = sock.send(pieces[0])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            pieces[0] = pieces[0][k:]
            if not pieces[0]:
                pieces.pop(0)
        if got > MAX_OUTPUT:
            return None
        last = time.monotonic()
    if ending == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return None
    if not closed:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return None
    while not closed:
        r, _, _ = select.select([sock], [], [], IDLE_TIMEOUT)
        if not r:
            return f"no hang-up within {IDLE_TIMEOUT} s of the client's EOF ({got} bytes answered)"
        n, closed = _drain(sock)
        got += n
        if got > MAX_OUTPUT:
            return None
        last = time.monotonic()
    del last
    return None


def _drain(sock: socket.socket) -> tuple[int, bool]:
    try:
        d = sock.recv(1 << 20)
    except BlockingIOError:
        return 0, False
    except (ConnectionResetError, BrokenPipeError):
        return 0, True
    return len(d), not d
