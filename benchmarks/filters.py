#!/usr/bin/env python3
"""Benchmark the caching filters against nbdkit's, over a slow plugin, in ONE run.

Each job serves the same stack under nbdkit and pynbd: a RAM disk whose every read waits
1 ms (nbdkit's ``--filter=delay rdelay=1ms memory SIZE``), under

    cache       --filter=cache ... cache-on-read=true
    readahead   --filter=readahead --filter=cache ...

and times two sequential reads of the whole disk with ``nbdcopy --no-extents URI null:`` (a
fresh server per job; the first pass reads through the slow plugin, the second finds what
the first left in the cache). The table shows seconds and pynbd's speed relative to
nbdkit's (nbdkit seconds / pynbd seconds); the bar is 1.0 for each pass. After the timed
passes the disk is read once more, untimed, and checked to be zeroes.

Until pynbd has its own delay filter, pynbd runs benchmarks/slow_memory.py (pynbd's memory
plugin, each read 1 ms late, in a worker thread) where nbdkit runs its delay filter over
its memory plugin; the output says which was used.

    python benchmarks/filters.py                     # both jobs, 512M
    python benchmarks/filters.py --size 1G --repeat 3 --jobs cache
    python benchmarks/filters.py --pynbd-cmd nbdkit  # A/A run: how noisy is this machine?

Needs nbdkit (with its delay, cache and readahead filters) and nbdcopy. Exit status: 0 when
every bar passes, 1 when one fails, 2 on an error.
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
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fio_server import ServerProcess, _competing_cpu_hint, parse_size, server_env, tool_version

HERE = Path(__file__).resolve().parent
SLOW_PLUGIN = HERE / "slow_memory.py"
#: job -> (filters, their parameters)
JOBS: dict[str, tuple[list[str], list[str]]] = {
    "cache": (["--filter=cache"], ["cache-on-read=true"]),
    "readahead": (["--filter=readahead", "--filter=cache"], []),
}
PASSES = ("first", "second")
BAR = 1.0


def pynbd_has_delay(python: str) -> bool:
    code = "from pynbd.filters import find_filter; find_filter('delay')"
    cp = subprocess.run([python, "-c", code], env=server_env(), check=False,
                        capture_output=True)
    return cp.returncode == 0


def command(server: str, args: argparse.Namespace, job: str, sock: str,
            pynbd_delay: bool) -> list[str]:
    filters, params = JOBS[job]
    delay = f"rdelay={args.delay_ms}ms"
    if server == "nbdkit":
        return [args.nbdkit, "-f", "-U", sock, *filters, "--filter=delay", "memory",
                args.size, delay, *params]
    serve = shlex.split(args.pynbd_cmd) if args.pynbd_cmd else [args.python, "-m", "pynbd",
                                                                "serve"]
    if pynbd_delay or args.pynbd_cmd:
        return [*serve, "-f", "-U", sock, *filters, "--filter=delay", "memory", args.size,
                delay, *params]
    return [*serve, "-f", "-U", sock, *filters, str(SLOW_PLUGIN), args.size, delay, *params]


def copy_seconds(args: argparse.Namespace, uri: str) -> float:
    t = time.monotonic()
    subprocess.run([args.nbdcopy, "--no-extents", *args.nbdcopy_opts, uri, "null:"],
                   check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - t


def check_zeroes(args: argparse.Namespace, uri: str, size: int) -> None:
    """The whole disk reads as zeroes (a fast wrong answer must not pass)."""
    copy = subprocess.Popen([args.nbdcopy, "--no-extents", uri, "-"], stdout=subprocess.PIPE)
    assert copy.stdout is not None
    cmp = subprocess.run(["cmp", "-n", str(size), "-", "/dev/zero"], stdin=copy.stdout,
                         check=False, capture_output=True, text=True)
    copy.stdout.close()
    if copy.wait() != 0 or cmp.returncode != 0:
        raise RuntimeError(f"data check failed on {uri}: {cmp.stdout.strip()}")


def run_job(args: argparse.Namespace, job: str, server: str, workdir: Path,
            pynbd_delay: bool) -> list[float]:
    sock = str(workdir / f"{server}.sock")
    argv = command(server, args, job, sock, pynbd_delay)
    srv = ServerProcess(server, argv, sock, workdir)
    try:
        srv.wait_listening()
        times = [copy_seconds(args, srv.uri) for _ in PASSES]
        check_zeroes(args, srv.uri, parse_size(args.size))
    finally:
        complaint = srv.stop()
        if os.path.exists(sock):
            os.unlink(sock)
    if complaint:
        raise RuntimeError(complaint)
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated: " + ", ".join(JOBS))
    p.add_argument("--size", default="512M", help="disk size (default 512M)")
    p.add_argument("--delay-ms", type=int, default=1, help="each plugin read's delay (1)")
    p.add_argument("--repeat", type=int, default=1, help="runs per job and server (median)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs pynbd")
    p.add_argument("--pynbd-cmd", default="", help="another command in place of pynbd serve")
    p.add_argument("--nbdkit", default=shutil.which("nbdkit") or "nbdkit")
    p.add_argument("--nbdcopy", default=shutil.which("nbdcopy") or "nbdcopy")
    p.add_argument("--nbdcopy-opts", default="", help="extra nbdcopy options, e.g. "
                   "'--request-size=1M --connections=1'")
    args = p.parse_args(argv)
    args.nbdcopy_opts = shlex.split(args.nbdcopy_opts)
    return args


def report(args: argparse.Namespace, results: dict[tuple[str, str], list[list[float]]],
           pynbd_delay: bool) -> bool:
    print(f"\n{'job':<10} {'pass':<7} {'nbdkit s':>9} {'pynbd s':>9} {'pynbd/nbdkit':>13}"
          f"  bar {BAR}")
    ok = True
    for job in args.jobs:
        for i, name in enumerate(PASSES):
            k = statistics.median(r[i] for r in results[job, "nbdkit"])
            p = statistics.median(r[i] for r in results[job, "pynbd"])
            ratio = k / p
            ok = ok and ratio >= BAR
            print(f"{job:<10} {name:<7} {k:>9.2f} {p:>9.2f} {ratio:>13.2f}  "
                  f"{'PASS' if ratio >= BAR else 'FAIL'}")
    slow = (f"{args.pynbd_cmd!r} with --filter=delay" if args.pynbd_cmd else
            "pynbd's delay filter" if pynbd_delay else
            f"{SLOW_PLUGIN.name} (pynbd's memory plugin, each read {args.delay_ms} ms late: "
            "pynbd has no delay filter yet)")
    print(f"\nslow plugin: nbdkit --filter=delay rdelay={args.delay_ms}ms memory; pynbd {slow}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.jobs = [j for j in args.jobs.split(",") if j]
    for j in args.jobs:
        if j not in JOBS:
            print(f"unknown job {j!r} (jobs: {', '.join(JOBS)})", file=sys.stderr)
            return 2
    for tool in (args.nbdkit, args.nbdcopy):
        if not shutil.which(tool):
            print(f"{tool} not found", file=sys.stderr)
            return 2
    pynbd_delay = pynbd_has_delay(args.python)
    print(f"pynbd vs nbdkit, caching filters over a slow RAM disk ({args.size}, reads "
          f"{args.delay_ms} ms late), nbdcopy --no-extents {shlex.join(args.nbdcopy_opts)}")
    print(f"{tool_version([args.nbdkit, '--version'])}; "
          f"{tool_version([args.nbdcopy, '--version'])}; Python {sys.version.split()[0]}; "
          f"{_competing_cpu_hint()}")
    results: dict[tuple[str, str], list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pynbd-bench-") as d:
        workdir = Path(d)
        try:
            for n, job in enumerate(args.jobs * args.repeat):
                order = ("nbdkit", "pynbd") if n % 2 == 0 else ("pynbd", "nbdkit")
                for server in order:
                    if n < len(args.jobs):
                        print("  " + shlex.join(command(server, args, job, "SOCK",
                                                        pynbd_delay)))
                    times = run_job(args, job, server, workdir, pynbd_delay)
                    results.setdefault((job, server), []).append(times)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
    ok = report(args, results, pynbd_delay)
    print(_competing_cpu_hint().replace("at start", "at the end"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
