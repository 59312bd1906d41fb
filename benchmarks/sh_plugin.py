#!/usr/bin/env python3
"""The same shell-script plugin under `pynbd serve sh` and `nbdkit sh`, with fio's nbd engine.

Both servers run one script (a disk kept in a file of $tmpdir, read with dd) and fio sends
4k random reads at queue depth 16 over a Unix socket. Every read forks a shell and a dd, so
neither server is fast: this measures what the calling convention costs around the fork
(spawning, pipes, threads), not the network path. Each job alternates which server goes
first; the table shows both and pynbd/nbdkit. There is no bar.

    python benchmarks/sh_plugin.py                     # both jobs, 5 s each
    python benchmarks/sh_plugin.py --runtime 10 --repeat 3

Jobs: "serialized" (no thread_model method: serialize_all_requests, one script at a time)
and "parallel" (thread_model prints parallel: up to -t scripts at once).

Needs fio with the nbd engine (Debian's fio) and nbdkit with its sh plugin. Exit status 0,
or 2 when a server or fio failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
SERVERS = ("pynbd", "nbdkit")

SCRIPT = """#!/bin/sh
disk=$tmpdir/disk
case "$1" in
    get_ready) truncate -s 64M "$disk" ;;
    get_size) stat -L -c %s "$disk" ;;
    pread) dd if="$disk" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
    @THREAD_MODEL@
    *) exit 2 ;;
esac
"""
JOBS = {
    "serialized": "",
    "parallel": "thread_model) echo parallel ;;",
}


def write_script(d: Path, job: str) -> Path:
    p = d / f"{job}.sh"
    p.write_text(SCRIPT.replace("@THREAD_MODEL@", JOBS[job]))
    p.chmod(0o755)
    return p


def start(argv: list[str], sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{shlex.join(argv)} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def fio(args: argparse.Namespace, sock: Path, out: Path) -> float:
    """4k random reads for args.runtime seconds; returns IOPS."""
    cmd = [args.fio, "--name=sh", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
           "--rw=randread", "--bs=4k", f"--iodepth={args.iodepth}", "--numjobs=1",
           "--size=64M", "--time_based", f"--runtime={args.runtime}", "--ramp_time=1",
           "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   timeout=args.runtime + 60)
    return float(json.loads(out.read_text())["jobs"][0]["read"]["iops"])


def measure(args: argparse.Namespace, d: Path, job: str, server: str, n: int) -> float:
    script = write_script(d, job)
    sock = d / f"{server}-{job}-{n}.sock"
    cmd = args.pynbd_cmd if server == "pynbd" else args.nbdkit_cmd
    argv = [*shlex.split(cmd), "-f", "-U", str(sock), "-t", str(args.threads), "sh",
            str(script)]
    proc = start(argv, sock, d / f"{server}-{job}-{n}.log")
    try:
        return fio(args, sock, d / f"{server}-{job}-{n}.json")
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per job and server (median)")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--threads", type=int, default=16, help="server -t (default 16)")
    ap.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=list(JOBS))
    ap.add_argument("--pynbd-cmd", default=f"{shlex.quote(sys.executable)} -m pynbd serve")
    ap.add_argument("--nbdkit-cmd", default="nbdkit")
    ap.add_argument("--fio", default="fio")
    args = ap.parse_args()
    for tool in (args.fio, shlex.split(args.nbdkit_cmd)[0]):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    os.environ["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    print(f"fio 4k randread qd{args.iodepth}, {args.runtime:g} s per run, "
          f"{args.repeat} run(s) each, -t {args.threads}; load average "
          f"{os.getloadavg()[0]:.2f} at start")
    print(f"{'job':<12}{'pynbd IOPS':>12}{'nbdkit IOPS':>13}{'pynbd/nbdkit':>14}")
    with tempfile.TemporaryDirectory(prefix="sh-bench-") as tmp:
        d = Path(tmp)
        for i, job in enumerate(args.jobs):
            runs: dict[str, list[float]] = {s: [] for s in SERVERS}
            for n in range(args.repeat):
                order = SERVERS if (i + n) % 2 == 0 else SERVERS[::-1]
                for server in order:
                    try:
                        runs[server].append(measure(args, d, job, server, n))
                    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                        print(f"{job}: {server}: {e}", file=sys.stderr)
                        return 2
            p, k = (statistics.median(runs[s]) for s in SERVERS)
            print(f"{job:<12}{p:>12.0f}{k:>13.0f}{p / k:>14.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
