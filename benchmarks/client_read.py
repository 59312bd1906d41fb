#!/usr/bin/env python3
"""Benchmark pynbd's client against libnbd's Python bindings, in ONE run.

Against the same `nbdkit -U SOCK memory 1G` (written once with nbdkit's pattern, the offset
of every 8-byte word written in it, so reads carry data that says where it came from), each
client program:

  bulk:  reads the whole disk with 16 x 256 KiB requests in flight;
  rand:  4 KiB random reads at depth 64 for a fixed count.

Clients: (a) Debian's libnbd bindings (`import nbd` under /usr/bin/python3),
(b) `pynbd.AsyncClient`, (c) `pynbd.libnbd` running the very program of (a).
Each program runs REPEAT times, alternating, and the median is kept. Ratios are
libnbd time / pynbd time (higher is better for pynbd). Each program also reports the CPU it
spent in the timed part, shown per GiB (bulk) and per request (rand) beside the server's:
on a loaded or 2-core machine the wall-clock ratio is bounded by the CPU both sides share.

Every read's first and last 8 bytes are kept (outside the timing's concern: a list append)
and checked against the pattern after the timed part: a run that read wrong data, or the
wrong amount, fails, as does a run that fails; the exit status is then 1.

    python benchmarks/client_read.py [--repeat 3] [--size 1G] [--markdown]
                                     [--pynbd-python PYTHON]

All three programs run under ONE interpreter: Debian's /usr/bin/python3, the only one
libnbd's bindings (python3-libnbd) are built for. A program written for libnbd that switches
to pynbd.libnbd keeps the interpreter it ran under, so this compares the libraries and not
two builds of Python: a default source build with a shared libpython (pyenv's) runs the same
Python code on more CPU than Debian's (libpython linked into the executable).
`--pynbd-python PATH` runs pynbd's two clients under another interpreter (e.g. the one
running the benchmark: `--pynbd-python "$(command -v python)"`) to see what that costs.

Bars (issue 14): (c) >= 1.0x (a) on both jobs; (b) >= 1.0x (a) on bulk and >= 1.2x on rand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The interpreter libnbd's bindings are installed for (Debian's python3-libnbd).
LIBNBD_PYTHON = "/usr/bin/python3"

#: The check each program makes after its timed part (prepended to both programs).
CHECK_CODE = r'''
def CHECK(got, size, bs, n, mode):
    """"ok" if the job's reads were all made and each carried nbdkit's pattern for its
    offset (every 8-byte word is its own offset, big-endian); else what was wrong."""
    want = -(-size // bs) if mode == "bulk" else n
    if len(got) != want:
        return f"reads={len(got)}/{want}"
    for off, head, tail in got:
        end = min(bs, size - off)
        if int.from_bytes(head, "big") != off or int.from_bytes(tail, "big") != off + end - 8:
            return f"bad-data@{off}"
    if mode == "bulk" and sorted(o for o, _, _ in got) != list(range(0, size, bs)):
        return "offsets"
    return "ok"
'''

LIBNBD_PROGRAM = r'''
import os, sys, time, random
import nbd
uri, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
got = []
c = os.times()
t = time.perf_counter()
if mode == "bulk":
    bs, depth = 256 * 1024, 16
    free = [nbd.Buffer(bs) for _ in range(depth)]
    offset = 0
    def done(buf, off, err):
        b = buf.to_buffer()
        got.append((off, bytes(b[:8]), bytes(b[-8:])))
        free.append(buf)
        return 1
    while offset < size or h.aio_in_flight() > 0:
        while free and offset < size:
            buf = free.pop()
            h.aio_pread(buf, offset, lambda err, buf=buf, off=offset: done(buf, off, err))
            offset += bs
        h.poll(-1)
    total = size
else:
    bs, depth = 4096, 64
    rnd = random.Random(1)
    free = [nbd.Buffer(bs) for _ in range(depth)]
    issued = 0
    def done(buf, off, err):
        b = buf.to_buffer()
        got.append((off, bytes(b[:8]), bytes(b[-8:])))
        free.append(buf)
        return 1
    while issued < n or h.aio_in_flight() > 0:
        while free and issued < n:
            buf = free.pop()
            off = rnd.randrange(size // bs) * bs
            h.aio_pread(buf, off, lambda err, buf=buf, off=off: done(buf, off, err))
            issued += 1
        h.poll(-1)
    total = n * bs
el, c2 = time.perf_counter() - t, os.times()
print(el, total, c2.user - c.user, c2.system - c.system, CHECK(got, size, bs, n, mode))
h.shutdown()
'''

ASYNC_PROGRAM = r'''
import asyncio, os, sys, time, random
from pynbd.client import AsyncClient
uri, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    c = await AsyncClient.connect(uri)
    size = c.size
    got = []
    c0 = os.times()
    t = time.perf_counter()
    if mode == "bulk":
        bs, depth = 256 * 1024, 16
        offsets = iter(range(0, size, bs))
        async def worker():
            buf = bytearray(bs)
            for off in offsets:
                b = memoryview(buf)[:min(bs, size - off)]
                await c.pread_into(b, off)
                got.append((off, bytes(b[:8]), bytes(b[-8:])))
        await asyncio.gather(*(worker() for _ in range(depth)))
        total = size
    else:
        bs, depth = 4096, 64
        rnd = random.Random(1)
        offs = iter([rnd.randrange(size // bs) * bs for _ in range(n)])
        async def worker():
            buf = bytearray(bs)
            for off in offs:
                await c.pread_into(buf, off)
                got.append((off, bytes(buf[:8]), bytes(buf[-8:])))
        await asyncio.gather(*(worker() for _ in range(depth)))
        total = n * bs
    el, c2 = time.perf_counter() - t, os.times()
    print(el, total, c2.user - c0.user, c2.system - c0.system, CHECK(got, size, bs, n, mode))
    await c.close()
asyncio.run(main())
'''


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Failed(Exception):
    """A client run failed or read wrong data."""


def run(argv: list[str], env: dict[str, str] | None, srv_pid: int) -> tuple[float, float, float]:
    """(seconds, client CPU seconds in the timed part, server CPU seconds during the run);
    Failed if the program failed or its reads were wrong."""
    s0 = server_cpu(srv_pid)
    cp = subprocess.run(argv, check=False, capture_output=True, text=True, env=env,
                        timeout=900)
    s1 = server_cpu(srv_pid)
    if cp.returncode != 0:
        raise Failed(f"exit status {cp.returncode}:\n{cp.stderr}")
    fields = cp.stdout.split()
    if len(fields) < 5 or fields[4] != "ok":
        raise Failed(f"wrong result: {cp.stdout.strip()!r}\n{cp.stderr}")
    el, _total, usr, sys_ = fields[:4]
    return float(el), float(usr) + float(sys_), s1 - s0


def setup(d: str, size: str, python: str) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """The server (written with the pattern) and the three client programs (pynbd's under
    the interpreter ``python``)."""
    sock = os.path.join(d, "sock")
    srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", size])
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    uri = f"nbd+unix:///?socket={sock}"
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "pattern", size, "]", uri], check=True)
    d_prog = Path(d)
    (d_prog / "libnbd_prog.py").write_text(CHECK_CODE + LIBNBD_PROGRAM)
    (d_prog / "async_prog.py").write_text(CHECK_CODE + ASYNC_PROGRAM)
    # (c): the libnbd program, unchanged, with `nbd` being pynbd.libnbd
    shim = d_prog / "shim"
    shim.mkdir()
    (shim / "nbd.py").write_text("from pynbd.libnbd import *  # noqa\n"
                                 "from pynbd.libnbd import Buffer, NBD, Error\n")
    env_c = dict(os.environ, PYTHONPATH=f"{shim}:{ROOT / 'src'}")
    env_b = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    clients = {
        "libnbd": ([LIBNBD_PYTHON, str(d_prog / "libnbd_prog.py")], None),
        "pynbd.AsyncClient": ([python, str(d_prog / "async_prog.py")], env_b),
        "pynbd.libnbd": ([python, str(d_prog / "libnbd_prog.py")], env_c),
    }
    return srv, uri, clients


def measure(srv: subprocess.Popen[bytes], uri: str, clients: dict[str, Any], repeat: int,
            rand_count: int, verbose: bool) -> tuple[dict[Any, tuple[float, float, float]],
                                                      list[str]]:
    """{(client, job): (median seconds, client CPU, server CPU)}, and the failures."""
    results: dict[Any, tuple[float, float, float]] = {}
    failures: list[str] = []
    for mode in ("bulk", "rand"):
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in clients}
        for r in range(repeat):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                argv, env = clients[name]
                try:
                    one = run([*argv, uri, mode, str(rand_count)], env, srv.pid)
                except Failed as e:
                    failures.append(f"{name} {mode}: {e}")
                    print(f"{name} {mode} FAILED: {e}", file=sys.stderr)
                    continue
                runs[name].append(one)
                if verbose:
                    print(f"  {mode:5} {name:20} {one[0]:7.3f} s  client CPU {one[1]:6.3f} s  "
                          f"server CPU {one[2]:6.3f} s", flush=True)
        for name, rs in runs.items():
            if rs:
                results[(name, mode)] = (statistics.median(r[0] for r in rs),
                                         statistics.median(r[1] for r in rs),
                                         statistics.median(r[2] for r in rs))
    return results, failures


BARS = {("pynbd.libnbd", "bulk"): 1.0, ("pynbd.libnbd", "rand"): 1.0,
        ("pynbd.AsyncClient", "bulk"): 1.0, ("pynbd.AsyncClient", "rand"): 1.2}


def report(results: dict[Any, tuple[float, float, float]], size: int, rand_count: int,
           markdown: bool) -> bool:
    """Print the table; whether every bar is met."""
    ok = True
    rows = []
    for (name, mode), (t, cc, sc) in results.items():
        base = results.get(("libnbd", mode))
        ratio = base[0] / t if base else float("nan")
        bar = BARS.get((name, mode))
        verdict = "" if bar is None else ("PASS" if ratio >= bar else "FAIL")
        ok = ok and verdict != "FAIL"
        if mode == "bulk":  # CPU per GiB read
            per, unit = (cc / (size / 2**30), sc / (size / 2**30)), "s/GiB"
        else:  # CPU per request
            per, unit = (cc / rand_count * 1e6, sc / rand_count * 1e6), "us/req"
        rows.append((mode, name, t, per, unit, ratio, f">= {bar}" if bar else "", verdict))
    if markdown:
        print("| job | client | seconds (median) | client CPU | server CPU | libnbd/this "
              "| bar | |")
        print("|---|---|---:|---:|---:|---:|---|---|")
        for mode, name, t, (c, s_), unit, ratio, bar, v in rows:
            print(f"| {mode} | {name} | {t:.3f} | {c:.2f} {unit} | {s_:.2f} {unit} | "
                  f"{ratio:.2f} | {bar} | {v} |")
    else:
        for mode, name, t, (c, s_), unit, ratio, bar, v in rows:
            print(f"{mode:5} {name:20} {t:8.3f}s  client CPU {c:7.2f} {unit:6}  server CPU "
                  f"{s_:7.2f} {unit:6}  x{ratio:5.2f} {bar:8} {v}")
    return ok


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rand-count", type=int, default=200000)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--pynbd-python", default=LIBNBD_PYTHON, metavar="PYTHON",
                    help="the interpreter of pynbd's two clients (default: libnbd's own, "
                         f"{LIBNBD_PYTHON}, so all three programs run on one)")
    args = ap.parse_args()
    if not shutil.which("nbdkit") or not os.path.exists(LIBNBD_PYTHON):
        print("needs nbdkit and Debian's python3-libnbd", file=sys.stderr)
        return 2
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; libnbd under "
          f"{LIBNBD_PYTHON}, pynbd under {args.pynbd_python}", file=sys.stderr)
    d = tempfile.mkdtemp(prefix="pynbd-cbench-")
    srv = None
    try:
        srv, uri, clients = setup(d, args.size, args.pynbd_python)
        results, failures = measure(srv, uri, clients, args.repeat, args.rand_count,
                                    not args.markdown)
    finally:
        if srv is not None:
            srv.terminate()
            srv.wait()
        shutil.rmtree(d, ignore_errors=True)
    ok = report(results, parse_size(args.size), args.rand_count, args.markdown)
    if failures:
        print(f"{len(failures)} failed run(s): the benchmark fails", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
