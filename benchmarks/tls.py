#!/usr/bin/env python3
"""Benchmark `pynbd serve --tls=require` against `nbdkit --tls=require`, in ONE run.

Both servers serve `PLUGIN SIZE` (default `null 1G`) on a Unix socket with the same X.509
certificates (made for the run by tests/tls_certs.py) and are driven by the same clients
over nbds:// URIs:

  fio-read-256k:   fio's nbd engine, 256 KiB sequential reads, iodepth 16, time based
  fio-write-256k:  the same, writes (the server decrypts)
  copy-down:       nbdcopy --no-extents SERVER -> null: (every byte crosses the wire)
  copy-up:         nbdcopy of a local file of random data -> SERVER

The null plugin (zeroes read, writes dropped; the cipher's cost does not depend on the
bytes) keeps the plugins' own costs out: what is measured is the NBD path and TLS. Use
`--plugin memory` to include a store (pynbd's memory plugin reading data written in
pieces costs more than nbdkit's, TLS or not; see docs/performance.md).

Each job runs REPEAT times per server on a fresh server, alternating which goes first; the
medians are compared. The ratio is pynbd/nbdkit for bandwidth (fio) and nbdkit/pynbd for
time (nbdcopy): higher is better for pynbd; the bar is >= 1.0.

    python benchmarks/tls.py [--repeat 3] [--size 1G] [--runtime 8] [--jobs a,b] [--markdown]

fio's nbd engine cannot be given a certificate directory (libnbd refuses tls-certificates=
in URIs unless the program allows it, and fio does not), so fio runs with HOME set to a
directory whose .pki/libnbd is the certificate directory, where libnbd looks by default.
Needs fio, nbdcopy, nbdkit and the cryptography package (the test extra). Exit status 0
when every ratio reaches the bar, 1 when one does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fio_server import children_cpu, cpu_seconds, parse_size
from tool_copy import stop_process, wait_for_socket

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("fio-read-256k", "fio-write-256k", "copy-down", "copy-up")
BAR = 1.0


class TlsServer:
    """``SERVER -f -U SOCK --tls=require --tls-certificates=DIR memory SIZE``."""

    def __init__(self, which: str, d: Path, certs: Path, size: int, plugin: str) -> None:
        self.sock = d / f"{which}.sock"
        self.sock.unlink(missing_ok=True)
        cmd = ["nbdkit"] if which == "nbdkit" else [sys.executable, "-m", "pynbd", "serve"]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(
            [*cmd, "-f", "-U", str(self.sock), "--tls=require",
             f"--tls-certificates={certs}", plugin, str(size)],
            stdin=subprocess.DEVNULL, env=env)
        wait_for_socket(self.proc, str(self.sock), which)
        self.uri = f"nbds+unix:///?socket={self.sock}"
        self.copy_uri = f"{self.uri}&tls-certificates={certs}"

    def stop(self) -> None:
        stop_process(self.proc)


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    cp = subprocess.run(argv, check=False, env=env, stdin=subprocess.DEVNULL,
                        capture_output=True, timeout=900)
    dt = time.perf_counter() - t
    if cp.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {cp.returncode}:\n"
                           f"{cp.stderr.decode(errors='replace')}")
    return dt, cp.stdout.decode(errors="replace")


def fio(srv: TlsServer, rw: str, size: int, runtime: int, home: Path) -> float:
    """MiB/s of one fio job."""
    _, out = run(["fio", "--name=tls", "--ioengine=nbd", f"--uri={srv.uri}", f"--rw={rw}",
                  "--bs=256k", "--iodepth=16", f"--size={size}", "--time_based",
                  f"--runtime={runtime}", "--output-format=json"],
                 env=dict(os.environ, HOME=str(home)))
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"]) / (1 << 20)


def one(job: str, which: str, d: Path, certs: Path, home: Path, data: Path,
        args: argparse.Namespace) -> tuple[float, float, float]:
    """The job's figure (MiB/s or seconds), the server's and the client's CPU seconds
    during it."""
    size = parse_size(args.size)
    srv = TlsServer(which, d, certs, size, args.plugin)
    try:
        if job == "copy-down" and args.plugin == "memory":
            run(["nbdcopy", str(data), srv.copy_uri])  # not timed: data to read
        cpu0, ccpu0 = cpu_seconds(srv.proc.pid), children_cpu()
        if job.startswith("fio-"):
            v = fio(srv, "read" if "read" in job else "write", size, args.runtime, home)
        elif job == "copy-down":
            v = run(["nbdcopy", "--no-extents", srv.copy_uri, "null:"])[0]
        else:
            v = run(["nbdcopy", str(data), srv.copy_uri])[0]
        return v, cpu_seconds(srv.proc.pid) - cpu0, children_cpu() - ccpu0
    finally:
        srv.stop()


def make_certs(d: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tls_certs import make_x509  # the test extra's cryptography package

    certs = make_x509(d / "x509")
    home = d / "home"
    (home / ".pki").mkdir(parents=True)
    (home / ".pki" / "libnbd").symlink_to(certs)
    return certs, home


def report(args: argparse.Namespace, jobs: list[str],
           results: dict[tuple[str, str], list[float]],
           cpus: dict[tuple[str, str], list[tuple[float, float]]], argv: list[str]) -> bool:
    ok = True
    rows = []
    for job in jobs:
        p, n = (statistics.median(results[(job, s)]) for s in ("pynbd", "nbdkit"))
        ratio = p / n if job.startswith("fio-") else n / p
        unit = "MiB/s" if job.startswith("fio-") else "s"
        verdict = "PASS" if ratio >= BAR else "FAIL"
        ok = ok and ratio >= BAR
        # CPU per GiB moved (fio moves bandwidth * runtime, nbdcopy the disk), per run
        size_gib = parse_size(args.size) / (1 << 30)
        cpu = []
        for side in (0, 1):  # the server's, the client's
            for s in ("pynbd", "nbdkit"):
                per = [c[side] / (v * args.runtime / 1024 if job.startswith("fio-") else size_gib)
                       for v, c in zip(results[(job, s)], cpus[(job, s)], strict=True)]
                cpu.append(statistics.median(per))
        rows.append((job, p, n, unit, ratio, verdict, cpu))
    print(f"{'job':15} {'pynbd':>10} {'nbdkit':>10} {'unit':>6} {'ratio':>6}  bar"
          f"{'':12} CPU s/GiB server pynbd nbdkit, client with pynbd nbdkit")
    for job, p, n, unit, ratio, verdict, cpu in rows:
        print(f"{job:15} {p:10.1f} {n:10.1f} {unit:>6} {ratio:6.2f}  >= {BAR} {verdict}"
              f"   {cpu[0]:6.2f} {cpu[1]:6.2f}   {cpu[2]:6.2f} {cpu[3]:6.2f}")
    if args.markdown:
        load = os.getloadavg()
        print(f"\nMeasured {datetime.date.today()} on {platform.machine()} Linux "
              f"{platform.release()}, {os.cpu_count()} CPUs (load average {load[0]:.2f} at the "
              f"end), Python {platform.python_version()}; {args.plugin} {args.size}, Unix socket, "
              f"TLS 1.3 X.509; median of {args.repeat} run(s) per server, alternating.\n")
        print("| job | pynbd | nbdkit | unit | ratio (higher: pynbd better) | bar | |"
              " server CPU s/GiB pynbd / nbdkit | client CPU s/GiB against pynbd / nbdkit |")
        print("|---|---:|---:|---|---:|---:|---|---:|---:|")
        for job, p, n, unit, ratio, verdict, cpu in rows:
            print(f"| {job} | {p:.1f} | {n:.1f} | {unit} | {ratio:.2f} | >= {BAR} | {verdict} "
                  f"| {cpu[0]:.2f} / {cpu[1]:.2f} | {cpu[2]:.2f} / {cpu[3]:.2f} |")
        print(f"\nProduced by:\n\n```\n{shlex.join(['python', 'benchmarks/tls.py', *argv])}\n```")
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--plugin", default="null", choices=("null", "memory"))
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated: " + ", ".join(JOBS))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    if any(j not in JOBS for j in jobs) or args.repeat < 1:
        print("tls.py: unknown job or bad --repeat", file=sys.stderr)
        return 2
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            print(f"tls.py: needs {tool}", file=sys.stderr)
            return 2
    d = Path(tempfile.mkdtemp(prefix="pynbd-tlsbench-"))
    results: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        certs, home = make_certs(d)
        data = d / "data.img"
        with open(data, "wb") as f:
            f.writelines(os.urandom(min(16 << 20, parse_size(args.size))) for _ in range(0, parse_size(args.size), 16 << 20))
        for job in jobs:
            for r in range(args.repeat):
                for which in (("pynbd", "nbdkit") if r % 2 == 0 else ("nbdkit", "pynbd")):
                    v, cpu, ccpu = one(job, which, d, certs, home, data, args)
                    results.setdefault((job, which), []).append(v)
                    cpus.setdefault((job, which), []).append((cpu, ccpu))
                    print(f"[{job}] {which:6} {v:9.2f}  server CPU {cpu:6.2f} s, "
                          f"client CPU {ccpu:6.2f} s", file=sys.stderr)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        print(f"tls.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0 if report(args, jobs, results, cpus, argv) else 1


if __name__ == "__main__":
    sys.exit(main())
