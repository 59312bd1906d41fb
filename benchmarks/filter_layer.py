#!/usr/bin/env python3
"""What one pass-through filter layer costs: `pynbd serve --filter=nofilter memory` against
`pynbd serve memory`, in ONE run, with fio's nbd engine.

    python benchmarks/filter_layer.py                   # 8 s per job, 3 runs each
    python benchmarks/filter_layer.py --runtime 5 --repeat 1

Jobs: 4k random reads and 4k random writes at queue depth 64 on a 1 GiB RAM disk, each
against a fresh server of each kind over a Unix socket, alternating which goes first. The
same pair under nbdkit is measured too, for context. The bar (randread): with the filter
/ without >= 0.9. After the timed jobs, fio writes and verifies (crc32c) 64 MiB through the
filter layer: a fast wrong answer fails the run.

Exit status: 0 when the bar passes, 1 when it fails, 2 on an error.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fio_server import Job, Measurement, ServerProcess, _competing_cpu_hint, run_fio

JOBS = (Job("randread-4k", "memory", "randread", "4k", 64, "iops", 0.9),
        Job("randwrite-4k", "memory", "randwrite", "4k", 64, "iops", 0.0))
#: (label, which server, its arguments after the listener options)
STACKS = (("pynbd", "pynbd", ["memory", "1G"]),
          ("pynbd+nofilter", "pynbd", ["--filter=nofilter", "memory", "1G"]),
          ("nbdkit", "nbdkit", ["memory", "1G"]),
          ("nbdkit+nofilter", "nbdkit", ["--filter=nofilter", "memory", "1G"]))


def measure(args: argparse.Namespace, cmds: dict[str, list[str]], work: Path,
            ) -> dict[tuple[str, str], list[Measurement]]:
    runs: dict[tuple[str, str], list[Measurement]] = {}
    for i, job in enumerate(JOBS):
        for rep in range(args.repeat):
            order = STACKS if (i + rep) % 2 == 0 else tuple(reversed(STACKS))
            for label, kind, rest in order:
                sock = str(work / "bench.sock")
                srv = ServerProcess(label, [*cmds[kind], "-f", "-U", sock, *rest], sock, work)
                try:
                    srv.wait_listening()
                    m = run_fio(args, job, srv.uri, work / "fio.json", srv.proc.pid)
                finally:
                    srv.stop()
                    Path(sock).unlink(missing_ok=True)
                runs.setdefault((job.name, label), []).append(m)
                print(f"{job.name:13} {label:16} {m.iops:>9.0f} IOPS", flush=True)
    return runs


def verify(args: argparse.Namespace, cmds: dict[str, list[str]], work: Path) -> None:
    """Write and read back 64 MiB through the filter layer, checked by fio (crc32c)."""
    sock = str(work / "verify.sock")
    srv = ServerProcess("verify", [*cmds["pynbd"], "-f", "-U", sock, "--filter=nofilter",
                                   "memory", "1G"], sock, work)
    try:
        srv.wait_listening()
        cp = subprocess.run([args.fio, "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}",
                             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M",
                             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"],
                            capture_output=True, text=True, check=False, timeout=300,
                            cwd=work)  # fio leaves its verify state file in its cwd
    finally:
        srv.stop()
    if cp.returncode != 0 or "verify" in cp.stderr.lower():
        raise RuntimeError(f"fio verify through the filter failed:\n{cp.stdout}{cp.stderr}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=8)
    ap.add_argument("--ramp", type=float, default=1)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pynbd-cmd", default=shlex.join([sys.executable, "-m", "pynbd", "serve"]))
    ap.add_argument("--nbdkit-cmd", default="nbdkit")
    ap.add_argument("--fio", default="fio")
    args = ap.parse_args(argv)
    cmds = {"pynbd": shlex.split(args.pynbd_cmd), "nbdkit": shlex.split(args.nbdkit_cmd)}
    print(f"# {_competing_cpu_hint()}")
    work = Path(tempfile.mkdtemp(prefix="pynbd-layer-"))
    try:
        runs = measure(args, cmds, work)
        verify(args, cmds, work)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = True
    print(f"\n{'job':13} {'pynbd':>9} {'+nofilter':>10} {'ratio':>6}   "
          f"{'nbdkit':>9} {'+nofilter':>10} {'ratio':>6}   bar")
    for job in JOBS:
        med = {label: statistics.median(m.iops for m in runs[(job.name, label)])
               for label, _, _ in STACKS}
        r = med["pynbd+nofilter"] / med["pynbd"]
        rn = med["nbdkit+nofilter"] / med["nbdkit"]
        verdict = "" if not job.bar else f">= {job.bar:g} {'PASS' if r >= job.bar else 'FAIL'}"
        ok = ok and (not job.bar or r >= job.bar)
        print(f"{job.name:13} {med['pynbd']:>9.0f} {med['pynbd+nofilter']:>10.0f} {r:>6.2f}   "
              f"{med['nbdkit']:>9.0f} {med['nbdkit+nofilter']:>10.0f} {rn:>6.2f}   {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
