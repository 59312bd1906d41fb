#!/usr/bin/env python3
"""Benchmark `pynbd copy` against nbdcopy over TLS, in ONE run.

Source: `nbdkit --tls=require --tls-certificates=DIR memory SIZE` (SIZE defaults to 1 GiB)
over a Unix socket, filled with random data first (nbdcopy from a file of os.urandom bytes:
no hole, no zero block). Both tools copy it from the same `nbds+unix://` URI (X.509, test
certificates made by tests/tls_certs.py) to:

  null:   the copy's own reading and decrypting alone
  mem:    a second `nbdkit --tls=require memory SIZE` (fresh for every run): encrypting too

Each tool runs REPEAT times per case, alternating which goes first; the medians are
compared. The ratio is nbdcopy time / pynbd time (higher is better for pynbd; the bar is
>= 1.0). Times are wall-clock times of the whole command, start-up included.

    python benchmarks/tls_client.py [--repeat 3] [--size 1G] [--cases null,mem]

Needs nbdkit (with GnuTLS), nbdcopy and the test extra (cryptography, for the certificates).
Exit status 0 when every ratio reaches the bar, 1 when one does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fio_server import children_cpu, cpu_seconds, parse_size
from tool_copy import Nbdkit, timed, write_random

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CASES = ("null", "mem")
BAR = 1.0




def run_cases(d: str, args: argparse.Namespace, cases: list[str], size: int
              ) -> tuple[dict[tuple[str, str], list[float]],
                         dict[tuple[str, str], list[tuple[float, float]]]]:
    from tls_certs import make_x509

    pki = make_x509(Path(d) / "pki")
    env_n = dict(os.environ)
    env_p = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(d, "pycache"))
    env_p.pop("PYTHONDONTWRITEBYTECODE", None)
    pynbd = [*shlex.split(args.pynbd), "copy"]
    times: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[tuple[float, float]]] = {}
    data = os.path.join(d, "data.img")
    write_random(data, size)
    src = Nbdkit(d, "src", size, pki)
    try:
        subprocess.run(["nbdcopy", data, src.uri], check=True)
        os.unlink(data)
        subprocess.run([*pynbd, "--version"], env=env_p, check=True, capture_output=True)
        tools = ("nbdcopy", "pynbd")
        for case in cases:
            for r in range(args.repeat):
                for tool in (tools if r % 2 == 0 else tools[::-1]):
                    cmd = ["nbdcopy"] if tool == "nbdcopy" else pynbd
                    dst = Nbdkit(d, "dst", size, pki) if case == "mem" else None
                    c0, s0 = children_cpu(), cpu_seconds(src.proc.pid)
                    try:
                        dt = timed([*cmd, src.uri, dst.uri if dst else "null:"],
                                   env_n if tool == "nbdcopy" else env_p)
                        c1, s1 = children_cpu(), cpu_seconds(src.proc.pid)
                    finally:
                        if dst is not None:
                            dst.stop()
                    times.setdefault((case, tool), []).append(dt)
                    cpus.setdefault((case, tool), []).append((c1 - c0, s1 - s0))
                    print(f"[{case}] {tool:8} {dt:7.3f} s, CPU: the copy {c1 - c0:.2f} s, "
                          f"the source nbdkit {s1 - s0:.2f} s", file=sys.stderr)
    finally:
        src.stop()
    return times, cpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and case (median)")
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: null, mem")
    ap.add_argument("--pynbd", default=f"{ROOT / '.venv' / 'bin' / 'python'} -m pynbd",
                    help="the pynbd command (default: this checkout's .venv python -m pynbd)")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases) or args.repeat < 1:
        print("tls_client.py: bad --cases or --repeat", file=sys.stderr)
        return 2
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"tls_client.py: needs {tool}", file=sys.stderr)
            return 2
    d = tempfile.mkdtemp(prefix="pynbd-tlsbench-")
    try:
        times, cpus = run_cases(d, args, cases, parse_size(args.size))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"tls_client.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ok = True
    load = os.getloadavg()
    print(f"{'case':6} {'nbdcopy s':>10} {'pynbd s':>10} {'nbdcopy/pynbd':>14}  bar"
          f"{'':11}copy CPU s nbdcopy pynbd, source nbdkit CPU s with nbdcopy pynbd")
    for case in cases:
        tn = statistics.median(times[(case, "nbdcopy")])
        tp = statistics.median(times[(case, "pynbd")])
        cpu = [statistics.median(c[side] for c in cpus[(case, tool)])
               for side in (0, 1) for tool in ("nbdcopy", "pynbd")]
        ok = ok and tn / tp >= BAR
        print(f"{case:6} {tn:10.3f} {tp:10.3f} {tn / tp:14.2f}  >= {BAR} "
              f"{'PASS' if tn / tp >= BAR else 'FAIL'}   {cpu[0]:6.2f} {cpu[1]:6.2f}"
              f"   {cpu[2]:6.2f} {cpu[3]:6.2f}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
