#!/usr/bin/env python3
"""Benchmark `pynbd copy` against nbdcopy, in ONE run.

Cases (SIZE defaults to 1 GiB):

  mem-null:  nbdkit memory SIZE            -> null:
  mem-mem:   nbdkit memory SIZE            -> nbdkit memory SIZE
  file-mem:  a local file of SIZE          -> nbdkit memory SIZE

The source disk is filled with data first: a file of SIZE bytes from os.urandom (no zero
block, nothing compresses or is skipped) is written to a temporary directory, and copied
once into the source `nbdkit memory` server with nbdcopy. (An empty memory disk is all holes:
both tools would copy nothing.) The destination servers are fresh for every run, so each
run writes into an empty disk. Each tool runs REPEAT times per case, alternating which goes
first; the medians are compared. The ratio is nbdcopy time / pynbd time (higher is better
for pynbd; the bar is >= 1.0). Times are wall-clock times of the whole command, start-up
included, as a user sees them.

    python benchmarks/tool_copy.py [--repeat 3] [--size 1G] [--cases mem-null,mem-mem] [--markdown]

`pynbd copy` runs as `.venv/bin/pynbd copy` (or --pynbd CMD) with its bytecode cached in a
temporary PYTHONPYCACHEPREFIX after one warm-up, as an installed package would have it.
Needs nbdkit and nbdcopy (Debian: nbdkit, libnbd-bin). Exit status 0 when every ratio
reaches the bar, 1 when one does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fio_server import parse_size

ROOT = Path(__file__).resolve().parent.parent
CASES = ("mem-null", "mem-mem", "file-mem")
BAR = 1.0
#: How long a server may take from exec to listening.
START_TIMEOUT = 15.0




def wait_for_socket(proc: subprocess.Popen[bytes], sock: str, what: str) -> None:
    """Wait until server ``proc`` listens on ``sock`` (or fail if it exits or is slow)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (rc {proc.poll()})")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Nbdkit:
    """`nbdkit -f -U SOCK memory SIZE` in a private directory; with ``pki``, over TLS
    (`--tls=require --tls-certificates=PKI`)."""

    def __init__(self, d: str, name: str, size: int, pki: Path | None = None) -> None:
        self.sock = os.path.join(d, f"{name}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        tls = [] if pki is None else ["--tls=require", f"--tls-certificates={pki}"]
        self.proc = subprocess.Popen(["nbdkit", "-f", *tls, "-U", self.sock, "memory",
                                      str(size)], stdin=subprocess.DEVNULL)
        wait_for_socket(self.proc, self.sock, "nbdkit")
        self.uri = (f"nbd+unix:///?socket={self.sock}" if pki is None else
                    f"nbds+unix:///?socket={self.sock}&tls-certificates={pki}")

    def stop(self) -> None:
        stop_process(self.proc)


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    cp = subprocess.run(argv, check=False, env=env, stdin=subprocess.DEVNULL,
                        capture_output=True,
                        timeout=600)
    dt = time.perf_counter() - t
    if cp.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {cp.returncode}:\n"
                           f"{cp.stderr.decode(errors='replace')}")
    return dt


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and case (median)")
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--pynbd", default=str(ROOT / ".venv" / "bin" / "pynbd"),
                    help="the pynbd command (default: this checkout's .venv/bin/pynbd)")
    ap.add_argument("--pynbd-args", default="",
                    help="extra options for pynbd copy (e.g. '--request-size=262144')")
    ap.add_argument("--nbdcopy-args", default="", help="extra options for nbdcopy")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return ap


def write_random(path: str, size: int) -> None:
    """A file of ``size`` random bytes (no zero block, nothing compresses)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def run_once(args: argparse.Namespace, case: str, tool: str, d: str, src: Nbdkit, data: str,
             size: int, envs: dict[str, dict[str, str]], servers: list[Nbdkit]) -> float:
    """One timed run of ``tool`` for ``case``, into a fresh destination server."""
    cmd = (["nbdcopy", *shlex.split(args.nbdcopy_args)] if tool == "nbdcopy"
           else [*shlex.split(args.pynbd), "copy", *shlex.split(args.pynbd_args)])
    dst = None
    if case == "mem-null":
        argv_ = [*cmd, src.uri, "null:"]
    else:
        dst = Nbdkit(d, "dst", size)
        servers.append(dst)
        argv_ = [*cmd, src.uri if case == "mem-mem" else data, dst.uri]
    try:
        return timed(argv_, envs[tool])
    finally:
        if dst is not None:
            dst.stop()
            servers.remove(dst)


def measure(args: argparse.Namespace, cases: list[str],
            size: int) -> dict[tuple[str, str], list[float]]:
    """Time both tools REPEAT times per case, alternating which goes first."""
    d = tempfile.mkdtemp(prefix="pynbd-copybench-")
    envs = {"nbdcopy": dict(os.environ),
            "pynbd": dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(d, "pycache"))}
    envs["pynbd"].pop("PYTHONDONTWRITEBYTECODE", None)
    servers: list[Nbdkit] = []
    times: dict[tuple[str, str], list[float]] = {}
    try:
        data = os.path.join(d, "data.img")
        write_random(data, size)
        src = Nbdkit(d, "src", size)
        servers.append(src)
        subprocess.run(["nbdcopy", data, src.uri], check=True)
        subprocess.run([*shlex.split(args.pynbd), "copy", "--version"], env=envs["pynbd"],
                       check=True, capture_output=True)
        tools = ("nbdcopy", "pynbd")
        for case in cases:
            for r in range(args.repeat):
                for tool in (tools if r % 2 == 0 else tools[::-1]):
                    dt = run_once(args, case, tool, d, src, data, size, envs, servers)
                    times.setdefault((case, tool), []).append(dt)
                    print(f"[{case}] {tool:8} {dt:7.3f} s", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(d, ignore_errors=True)
    return times


def report(args: argparse.Namespace, argv: list[str] | None,
           rows: list[tuple[str, float, float, float, str]]) -> None:
    """Print the table (and with --markdown, the Markdown table and how it was made)."""
    print(f"{'case':9} {'nbdcopy s':>10} {'pynbd s':>10} {'nbdcopy/pynbd':>14}  bar")
    for case, tn, tp, ratio, verdict in rows:
        print(f"{case:9} {tn:10.3f} {tp:10.3f} {ratio:14.2f}  >= {BAR} {verdict}")
    if not args.markdown:
        return
    load = os.getloadavg()
    print()
    print(f"Measured {datetime.date.today()} on {platform.machine()} Linux "
          f"{platform.release()}, {os.cpu_count()} CPUs (load average {load[0]:.2f} at the "
          f"end), Python {platform.python_version()}; {args.size} disk of random data; "
          f"median of {args.repeat} run(s) per tool, alternating.")
    print()
    print("| case | nbdcopy (s) | pynbd copy (s) | nbdcopy/pynbd | bar | |")
    print("|---|---:|---:|---:|---:|---|")
    for case, tn, tp, ratio, verdict in rows:
        print(f"| {case} | {tn:.3f} | {tp:.3f} | {ratio:.2f} | >= {BAR} | {verdict} |")
    print()
    print("Produced by:")
    print()
    print("```")
    print(shlex.join(["python", "benchmarks/tool_copy.py", *(argv if argv is not None
                                                         else sys.argv[1:])]))
    print("```")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad or args.repeat < 1:
        print(f"tool_copy.py: unknown case {bad[0]!r}" if bad else "tool_copy.py: --repeat must be >= 1",
              file=sys.stderr)
        return 2
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"tool_copy.py: needs {tool}", file=sys.stderr)
            return 2
    try:
        times = measure(args, cases, parse_size(args.size))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"tool_copy.py: {e}", file=sys.stderr)
        return 2
    rows = []
    ok = True
    for case in cases:
        tn = statistics.median(times[(case, "nbdcopy")])
        tp = statistics.median(times[(case, "pynbd")])
        ratio = tn / tp
        ok = ok and ratio >= BAR
        rows.append((case, tn, tp, ratio, "PASS" if ratio >= BAR else "FAIL"))
    report(args, argv, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
