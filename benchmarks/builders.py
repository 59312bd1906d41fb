#!/usr/bin/env python3
"""random and sparse-random under `pynbd serve` and `nbdkit`: the time to read a whole disk.

Each job runs `SERVER -U - PLUGIN ARGS --run 'nbdcopy "$uri" -'` (output to /dev/null) for both
servers, alternating which goes first, and prints the best of --repeat runs and the ratio
pynbd/nbdkit of the times (lower is better for pynbd). The time includes starting the server
(sparse-random draws its map of data and holes at start). There is no bar.

    python benchmarks/builders.py               # every job, best of 3
    python benchmarks/builders.py --repeat 5 --job random-64M

Needs nbdkit (with its random and sparse-random plugins), nbdcopy and numpy. Exit status 0,
or 2 when a run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "random-64M": ["random", "size=64M", "seed=1"],
    "sparse-random-4G": ["sparse-random", "size=4G", "seed=1"],
    "sparse-random-4G-50%": ["sparse-random", "size=4G", "seed=1", "percent=50"],
    # the map of a 1 TiB disk (268 million blocks) drawn at start, then one request
    "sparse-random-1T-start": ["sparse-random", "size=1T", "seed=1"],
}
RUN = 'nbdcopy "$uri" - > /dev/null'
#: Jobs that only start the server and ask for the size (a whole copy would take too long).
START_ONLY = {"sparse-random-1T-start"}


def command(server: str, job: str) -> list[str]:
    run = 'nbdinfo --size "$uri"' if job in START_ONLY else RUN
    args = JOBS[job]
    if server == "nbdkit":
        return ["nbdkit", "-U", "-", *args, "--run", run]
    return [sys.executable, "-m", "pynbd", "serve", "-U", "-", *args, "--run", run]


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--job", action="append", choices=sorted(JOBS))
    opts = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"{'job':24} {'pynbd s':>9} {'nbdkit s':>9} {'ratio':>7}")
    for job in opts.job or JOBS:
        best = {"pynbd": float("inf"), "nbdkit": float("inf")}
        try:
            for i in range(opts.repeat):
                order = ("pynbd", "nbdkit") if i % 2 == 0 else ("nbdkit", "pynbd")
                for server in order:
                    best[server] = min(best[server], timed(command(server, job)))
        except (subprocess.SubprocessError, OSError) as e:
            print(f"{job}: failed: {e}", file=sys.stderr)
            return 2
        print(f"{job:24} {best['pynbd']:9.2f} {best['nbdkit']:9.2f} "
              f"{best['pynbd'] / best['nbdkit']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
