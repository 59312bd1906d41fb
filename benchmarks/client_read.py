#!/usr/bin/env python3
"""Benchmark pynbd's client against libnbd's Python bindings, in ONE run.

Against the same `nbdkit -U SOCK memory 1G` (written once with a pattern so reads carry
data), each client program:

  bulk:  reads the whole disk with 16 x 256 KiB requests in flight;
  rand:  4 KiB random reads at depth 64 for a fixed count.

Clients: (a) Debian's libnbd bindings (`import nbd` under /usr/bin/python3),
(b) `pynbd.AsyncClient`, (c) `pynbd.libnbd` running the very program of (a).
Each program runs REPEAT times, alternating, and the median is kept. Ratios are
libnbd time / pynbd time (higher is better for pynbd).

    python benchmarks/client_read.py [--repeat 3] [--size 1G] [--markdown]

Bars (issue): (b) >= 1.3x (a) on the bulk read; (c) >= 1.0x (a).
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

ROOT = Path(__file__).resolve().parent.parent

LIBNBD_PROGRAM = r'''
import os, sys, time, random
import nbd
uri, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
c = os.times()
t = time.perf_counter()
if mode == "bulk":
    bs, depth = 256 * 1024, 16
    free = [nbd.Buffer(bs) for _ in range(depth)]
    offset = 0
    def done(buf, err):
        free.append(buf)
        return 1
    while offset < size or h.aio_in_flight() > 0:
        while free and offset < size:
            buf = free.pop()
            h.aio_pread(buf, offset, lambda err, buf=buf: done(buf, err))
            offset += bs
        h.poll(-1)
    total = size
else:
    bs, depth = 4096, 64
    rnd = random.Random(1)
    free = [nbd.Buffer(bs) for _ in range(depth)]
    issued = 0
    def done(buf, err):
        free.append(buf)
        return 1
    while issued < n or h.aio_in_flight() > 0:
        while free and issued < n:
            buf = free.pop()
            h.aio_pread(buf, rnd.randrange(size // bs) * bs, lambda err, buf=buf: done(buf, err))
            issued += 1
        h.poll(-1)
    total = n * bs
el, c2 = time.perf_counter() - t, os.times()
print(el, total, c2.user - c.user, c2.system - c.system)
h.shutdown()
'''

ASYNC_PROGRAM = r'''
import asyncio, os, sys, time, random
from pynbd.client import AsyncClient
uri, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    c = await AsyncClient.connect(uri)
    size = c.size
    c0 = os.times()
    t = time.perf_counter()
    if mode == "bulk":
        bs, depth = 256 * 1024, 16
        offsets = iter(range(0, size, bs))
        async def worker():
            buf = bytearray(bs)
            for off in offsets:
                await c.pread_into(memoryview(buf)[:min(bs, size - off)], off)
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
        await asyncio.gather(*(worker() for _ in range(depth)))
        total = n * bs
    el, c2 = time.perf_counter() - t, os.times()
    print(el, total, c2.user - c0.user, c2.system - c0.system)
    await c.close()
asyncio.run(main())
'''


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(argv: list[str], env: dict[str, str] | None, srv_pid: int) -> tuple[float, float, float]:
    """(seconds, client CPU seconds in the timed part, server CPU seconds during the run)."""
    s0 = server_cpu(srv_pid)
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env,
                         timeout=600).stdout
    s1 = server_cpu(srv_pid)
    el, _total, usr, sys_ = out.split()[:4]
    return float(el), float(usr) + float(sys_), s1 - s0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rand-count", type=int, default=200000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if not shutil.which("nbdkit") or not os.path.exists("/usr/bin/python3"):
        print("needs nbdkit and Debian's python3-libnbd", file=sys.stderr)
        return 2
    d = tempfile.mkdtemp(prefix="pynbd-cbench-")
    sock = os.path.join(d, "sock")
    srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", args.size])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run(["nbdcopy", "--", "[", "nbdkit", "pattern", args.size, "]", uri],
                       check=True)
        d_prog = Path(d)
        (d_prog / "libnbd_prog.py").write_text(LIBNBD_PROGRAM)
        (d_prog / "async_prog.py").write_text(ASYNC_PROGRAM)
        # (c): the libnbd program, unchanged, with `nbd` being pynbd.libnbd
        shim = d_prog / "shim"
        shim.mkdir()
        (shim / "nbd.py").write_text("from pynbd.libnbd import *  # noqa\n"
                                     "from pynbd.libnbd import Buffer, NBD, Error\n")
        env_c = dict(os.environ, PYTHONPATH=f"{shim}:{ROOT / 'src'}")
        env_b = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        clients = {
            "libnbd": (["/usr/bin/python3", str(d_prog / "libnbd_prog.py")], None),
            "pynbd.AsyncClient": ([sys.executable, str(d_prog / "async_prog.py")], env_b),
            "pynbd.libnbd": ([sys.executable, str(d_prog / "libnbd_prog.py")], env_c),
        }
        results: dict[tuple[str, str], float] = {}
        cpus: dict[tuple[str, str], tuple[float, float]] = {}
        for mode in ("bulk", "rand"):
            times: dict[str, list[float]] = {k: [] for k in clients}
            ccpu: dict[str, list[float]] = {k: [] for k in clients}
            scpu: dict[str, list[float]] = {k: [] for k in clients}
            for r in range(args.repeat):
                order = list(clients) if r % 2 == 0 else list(reversed(clients))
                for name in order:
                    argv, env = clients[name]
                    try:
                        el, cc, sc = run([*argv, uri, mode, str(args.rand_count)], env, srv.pid)
                    except subprocess.CalledProcessError as e:
                        print(f"{name} {mode} failed:\n{e.stderr}", file=sys.stderr)
                        continue
                    times[name].append(el)
                    ccpu[name].append(cc)
                    scpu[name].append(sc)
                    if not args.markdown:
                        print(f"  {mode:5} {name:20} {el:7.3f} s  client CPU {cc:6.3f} s  "
                              f"server CPU {sc:6.3f} s", flush=True)
            for name, ts in times.items():
                if ts:
                    results[(name, mode)] = statistics.median(ts)
                    cpus[(name, mode)] = (statistics.median(ccpu[name]),
                                          statistics.median(scpu[name]))
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)

    base = {m: results.get(("libnbd", m)) for m in ("bulk", "rand")}
    bars = {("pynbd.AsyncClient", "bulk"): 1.3, ("pynbd.libnbd", "bulk"): 1.0}
    rows = []
    ok = True
    for (name, mode), t in results.items():
        b = base[mode]
        ratio = b / t if b else float("nan")
        bar = bars.get((name, mode))
        verdict = "" if bar is None else ("PASS" if ratio >= bar else "FAIL")
        if verdict == "FAIL":
            ok = False
        cc, sc = cpus[(name, mode)]
        rows.append((mode, name, t, cc, sc, ratio, f">= {bar}" if bar else "", verdict))
    if args.markdown:
        print("| job | client | seconds (median) | client CPU s | server CPU s | libnbd/this "
              "| bar | |")
        print("|---|---|---:|---:|---:|---:|---|---|")
        for mode, name, t, cc, sc, ratio, bar, v in rows:
            print(f"| {mode} | {name} | {t:.3f} | {cc:.3f} | {sc:.3f} | {ratio:.2f} | {bar} "
                  f"| {v} |")
    else:
        for mode, name, t, cc, sc, ratio, bar, v in rows:
            print(f"{mode:5} {name:20} {t:8.3f}s  client CPU {cc:6.3f}s  server CPU "
                  f"{sc:6.3f}s  x{ratio:5.2f} {bar:8} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
