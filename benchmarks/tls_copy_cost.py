#!/usr/bin/env python3
"""What one nbdcopy over TLS costs each server: CPU, page faults and waiting for a CPU.

`benchmarks/tls.py` compares wall-clock times; this says where they come from. Each run
starts a fresh server (`pynbd serve` from a source tree, or nbdkit) with `--tls=require
null 1G` on a Unix socket, and copies 1 GiB with nbdcopy, down (server -> null:) or up (a
file of random data -> server). Around the copy it reads the server's /proc: CPU (user +
system), minor page faults, and the time its threads were runnable but waited for a CPU
(schedstat, summed over its threads, sampled every 10 ms: threads that end before the
copy does lose their last 10 ms). Runs alternate between the servers; per server it prints
every run and the mean ± standard error of the CPU.

    python benchmarks/tls_copy_cost.py [--jobs down,up] [--repeat 6] [--src A/src,B/src] [--nbdkit]

`--src` takes pynbd source trees (default: this checkout's src/), e.g. the code before a
change and after; `--nbdkit` adds nbdkit. Needs nbdcopy, nbdkit (for --nbdkit) and the
cryptography package (the test extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fio_server import cpu_seconds, minor_faults
from tool_copy import stop_process, wait_for_socket

ROOT = Path(__file__).resolve().parent.parent


class Waits:
    """Run-queue wait of every thread of ``pid`` (schedstat), sampled until :meth:`end`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last: dict[str, int] = {}
        self._stop = False
        self.sample()
        self.start = sum(self.last.values())
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def sample(self) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for t in tids:
            try:
                with open(f"/proc/{self.pid}/task/{t}/schedstat") as f:
                    self.last[t] = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass

    def _run(self) -> None:
        while not self._stop:
            self.sample()
            time.sleep(0.01)

    def end(self) -> float:
        self.sample()
        self._stop = True
        self._t.join()
        return (sum(self.last.values()) - self.start) / 1e9


def one(server: str, job: str, d: Path, certs: Path, data: Path) -> tuple[float, ...]:
    """Wall s, server CPU s, minor faults, server wait s, client wait s for one copy."""
    sock = d / "server.sock"
    sock.unlink(missing_ok=True)
    env = dict(os.environ)
    if server == "nbdkit":
        cmd = ["nbdkit"]
    else:
        cmd = [sys.executable, "-m", "pynbd", "serve"]
        env["PYTHONPATH"] = server
    proc = subprocess.Popen([*cmd, "-f", "-U", str(sock), "--tls=require",
                             f"--tls-certificates={certs}", "null", "1G"],
                            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(proc, str(sock), server)
        uri = f"nbds+unix:///?socket={sock}&tls-certificates={certs}"
        argv = (["nbdcopy", "--no-extents", uri, "null:"] if job == "down"
                else ["nbdcopy", str(data), uri])
        waits, cpu0, flt0 = Waits(proc.pid), cpu_seconds(proc.pid), minor_faults(proc.pid)
        t = time.perf_counter()
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        cwaits = Waits(client.pid)
        if client.wait() != 0:
            raise RuntimeError(f"nbdcopy exited {client.returncode}")
        wall = time.perf_counter() - t
        cwait = cwaits.end()
        return (wall, cpu_seconds(proc.pid) - cpu0, minor_faults(proc.pid) - flt0,
                waits.end(), cwait)
    finally:
        stop_process(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="pynbd source trees (comma)")
    ap.add_argument("--nbdkit", action="store_true", help="nbdkit too")
    ap.add_argument("--jobs", default="down,up")
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tls_certs import make_x509  # the test extra's cryptography package

    servers = args.src.split(",") + (["nbdkit"] if args.nbdkit else [])
    with tempfile.TemporaryDirectory(prefix="pynbd-tlscost-") as tmp:
        d = Path(tmp)
        certs = make_x509(d / "x509")
        data = d / "data.bin"
        if "up" in args.jobs:
            with open(data, "wb") as f:
                f.writelines(os.urandom(16 << 20) for _ in range(64))
        for job in args.jobs.split(","):
            runs: dict[str, list[tuple[float, ...]]] = {s: [] for s in servers}
            for r in range(args.repeat):
                for s in servers if r % 2 == 0 else servers[::-1]:
                    runs[s].append(one(s, job, d, certs, data))
            for s, v in runs.items():
                cpu = [x[1] for x in v]
                se = statistics.stdev(cpu) / len(cpu) ** 0.5 if len(cpu) > 1 else 0.0
                print(f"{job} {s}:\n  wall s {' '.join(f'{x[0]:.2f}' for x in v)}\n"
                      f"  server CPU s {' '.join(f'{x:.2f}' for x in cpu)} "
                      f"(mean {statistics.mean(cpu):.3f} ± {se:.3f})\n"
                      f"  server minor faults {' '.join(str(x[2]) for x in v)}\n"
                      f"  server waited for a CPU s {' '.join(f'{x[3]:.2f}' for x in v)}\n"
                      f"  nbdcopy waited for a CPU s {' '.join(f'{x[4]:.2f}' for x in v)}",
                      flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
