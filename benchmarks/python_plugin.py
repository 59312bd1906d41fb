#!/usr/bin/env python3
"""Benchmark nbdkit's Python plugin API: the same script under nbdkit and pynbd, in ONE run.

The script (written to a temporary directory, its text is RAMDISK below) is an nbdkit-API
RAM disk -- ``API_VERSION = 2``, a ``bytearray`` store, thread model PARALLEL -- served by
``nbdkit -f -U SOCK python SCRIPT size=SIZE`` and ``pynbd serve -f -U SOCK python SCRIPT
size=SIZE``. fio's nbd engine runs 4k random reads and writes at queue depth 64 against each
(fresh server per run, alternating which goes first), and the table shows IOPS and the
pynbd/nbdkit ratio. The bar is 2.0 on both (the goal 3.0).

    python benchmarks/python_plugin.py                  # both jobs, 8 s each
    python benchmarks/python_plugin.py --runtime 5 --repeat 3
    python benchmarks/python_plugin.py --pynbd-cmd nbdkit   # A/A run: how noisy is this?

Reuses benchmarks/fio_server.py's server and fio helpers. Exit status: 0 when both bars pass,
1 when one fails, 2 on an error (a server or fio failed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fio_server import (
    Job,
    Measurement,
    ServerProcess,
    _competing_cpu_hint,
    _fmt_cpu,
    run_fio,
    tool_version,
)

#: The plugin both servers run, byte for byte.
RAMDISK = '''\
# An nbdkit Python plugin: a RAM disk of size=SIZE bytes (default 64M).
import nbdkit

API_VERSION = 2

size = 64 * 1024 * 1024
disk = None


def config(key, value):
    global size
    if key == "size":
        size = nbdkit.parse_size(value)
    else:
        raise RuntimeError("unknown parameter: " + key)


def config_complete():
    global disk
    disk = bytearray(size)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf
'''

JOBS = (
    Job("py-randread-4k", "python", "randread", "4k", 64, "iops", 2.0),
    Job("py-randwrite-4k", "python", "randwrite", "4k", 64, "iops", 2.0),
)
GOAL = 3.0
SERVERS = ("pynbd", "nbdkit")


def cpu_per_request(m: Measurement) -> float:
    """Server CPU microseconds per request: what a loaded machine disturbs least (IOPS
    drop when other processes take the CPUs; the work per request hardly changes)."""
    return m.server_cpu / m.iops * 1e6 if m.iops else float("nan")


Runs = dict[tuple[str, str], list[Measurement]]


def run_jobs(args: argparse.Namespace, commands: dict[str, list[str]], workdir: Path,
             script: Path) -> tuple[Runs, bool]:
    """Every job against a fresh server of each kind (alternating who goes first).
    Returns the measurements and whether anything failed to run."""
    runs: Runs = {}
    errors = False
    for i, job in enumerate(JOBS):
        for rep in range(args.repeat):
            order = list(SERVERS) if (i + rep) % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                sock = str(workdir / f"{name}.sock")
                server = ServerProcess(name, [*commands[name], "-f", "-U", sock, "python",
                                              str(script), f"size={args.size}"], sock, workdir)
                try:
                    server.wait_listening()
                    m = run_fio(args, job, server.uri, workdir / "fio.json", server.proc.pid)
                except (RuntimeError, OSError) as e:
                    print(f"{job.name} {name}: ERROR: {e}", file=sys.stderr)
                    errors = True
                    continue
                finally:
                    complaint = server.stop()
                    if os.path.exists(sock):
                        os.unlink(sock)
                    if complaint:
                        print(f"warning: {complaint}", file=sys.stderr)
                runs.setdefault((job.name, name), []).append(m)
                print(f"{job.name:16} {name:6} {m.iops:>9.0f} IOPS  lat {m.lat_us:>7.1f} us"
                      f"  server CPU {_fmt_cpu(m.server_cpu)} = {cpu_per_request(m):5.1f} "
                      f"us/request  fio CPU {_fmt_cpu(m.fio_cpu)}  others "
                      f"{_fmt_cpu(m.other_cpu)}", flush=True)
    return runs, errors


def report(runs: Runs) -> bool:
    """Print the table (medians); True when every bar passed."""
    ok = True
    print()
    print(f"{'job':16} {'pynbd IOPS':>11} {'nbdkit IOPS':>12} {'pynbd/nbdkit':>13}  bar"
          f"{'':22}CPU per request: pynbd, nbdkit, nbdkit/pynbd")
    for job in JOBS:
        p, n = runs.get((job.name, "pynbd")), runs.get((job.name, "nbdkit"))
        if not p or not n:
            print(f"{job.name:16} {'-':>11} {'-':>12} {'-':>13}  >= {job.bar:g}  ERROR")
            ok = False
            continue
        pi, ni = statistics.median(m.iops for m in p), statistics.median(m.iops for m in n)
        ratio = pi / ni
        verdict = "PASS" if ratio >= job.bar else "FAIL"
        if ratio >= GOAL:
            verdict += f" (goal {GOAL:g} reached)"
        pc = statistics.median(cpu_per_request(m) for m in p)
        nc = statistics.median(cpu_per_request(m) for m in n)
        print(f"{job.name:16} {pi:>11.0f} {ni:>12.0f} {ratio:>13.2f}  >= {job.bar:g}  "
              f"{verdict:24}{pc:6.1f} us {nc:6.1f} us {nc / pc:5.2f}")
        ok = ok and ratio >= job.bar
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=8, help="seconds per fio job (default 8)")
    ap.add_argument("--ramp", type=float, default=1, help="fio ramp-up seconds (default 1)")
    ap.add_argument("--size", default="64M", help="disk size (default 64M)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per job and server (median)")
    ap.add_argument("--pynbd-cmd", default=shlex.join([sys.executable, "-m", "pynbd", "serve"]))
    ap.add_argument("--nbdkit-cmd", default="nbdkit")
    ap.add_argument("--fio", default="fio")
    args = ap.parse_args(argv)
    commands = {"pynbd": shlex.split(args.pynbd_cmd), "nbdkit": shlex.split(args.nbdkit_cmd)}
    for exe in (commands["pynbd"][0], commands["nbdkit"][0], args.fio):
        if shutil.which(exe) is None:
            print(f"error: {exe} not found", file=sys.stderr)
            return 2
    print(f"# {_competing_cpu_hint()}; {tool_version([args.fio, '--version'])}; "
          f"{tool_version([commands['nbdkit'][0], '--version'])}")
    workdir = Path(tempfile.mkdtemp(prefix="pynbd-pybench-"))
    script = workdir / "ramdisk.py"
    script.write_text(RAMDISK)
    try:
        runs, errors = run_jobs(args, commands, workdir, script)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    passed = report(runs)
    return 2 if errors else 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
