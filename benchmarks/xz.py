#!/usr/bin/env python3
"""Benchmark the xz filter: `pynbd serve --filter=xz` against `nbdkit --filter=xz`, in ONE run.

The image is 1 GiB compressed with ``xz --block-size=1MiB`` (1024 blocks), made once and kept
in the work directory (default ~/.cache/pynbd-bench). Its content is compressible on purpose,
as disk images are: every 1 MiB holds 256 KiB of random bytes from a 16-letter alphabet (4
bits of entropy a byte) followed by zeroes; it compresses to about 1/8. Jobs, each against a
fresh server over a Unix socket, alternating which server goes first:

- randread: fio's nbd engine, 4k random reads at queue depth 16 (one connection) for
  ``--runtime`` seconds: nearly every read falls in a block no longer cached, so this
  measures decompressing blocks (pynbd decompresses several at a time);
- copy: ``nbdcopy URI null:`` of the whole disk, timed (nbdcopy reads 256 KiB at a time
  with many requests in flight: each block is read by 4 requests and decompressed once).

    python benchmarks/xz.py                  # both jobs, 20 s of fio each
    python benchmarks/xz.py --runtime 10 --markdown
    python benchmarks/xz.py --job copy       # only the copy

The bar is pynbd/nbdkit >= 1.0 for each job (same liblzma underneath); the goal 1.5.
Exit status 0 when both bars pass, 1 when one fails, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fio_server import ServerProcess, _busy_seconds, cpu_seconds

MiB = 1 << 20
SIZE = 1024 * MiB
BAR, GOAL = 1.0, 1.5


def make_image(workdir: Path) -> Path:
    """The compressed test image (made once, then reused)."""
    out = workdir / "xz-bench-1g-1m.img.xz"
    if out.exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "xz-bench-1g.img"
    alphabet = bytes(range(ord("a"), ord("a") + 16)) * 16
    table = bytes.maketrans(bytes(range(256)), alphabet)
    with open(raw, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(os.urandom(256 * 1024).translate(table))
            f.write(bytes(768 * 1024))
    subprocess.run(["xz", "-T0", "-1", "--block-size=1MiB", "-f", str(raw)], check=True)
    (workdir / "xz-bench-1g.img.xz").rename(out)
    return out


def serve(name: str, job: str, image: Path, tmp: Path) -> ServerProcess:
    sock = str(tmp / f"{name}-{job}.sock")
    cmd = [sys.executable, "-m", "pynbd", "serve"] if name == "pynbd" else ["nbdkit"]
    srv = ServerProcess(f"{name}-{job}", [*cmd, "-f", "-U", sock, "--filter=xz", "file",
                                          str(image)], sock, tmp)
    srv.wait_listening()
    return srv


def randread(srv: ServerProcess, runtime: int, tmp: Path) -> tuple[float, float]:
    """(IOPS, server CPUs busy)."""
    out = tmp / f"{srv.name}.json"
    argv = ["fio", "--name=xz", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randread",
            "--bs=4k", "--iodepth=16", f"--size={SIZE}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=2", "--output-format=json", f"--output={out}"]
    cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    cpu = (cpu_seconds(srv.proc.pid) - cpu0) / (time.monotonic() - t0)
    text = out.read_text()
    return float(json.loads(text[text.index("{"):])["jobs"][0]["read"]["iops"]), cpu


def copy(srv: ServerProcess) -> tuple[float, float]:
    """(MiB/s, server CPUs busy) of nbdcopy to null:."""
    cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
    subprocess.run(["nbdcopy", srv.uri, "null:"], check=True, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    return SIZE / MiB / wall, (cpu_seconds(srv.proc.pid) - cpu0) / wall


def run(image: Path, runtime: int,
        jobs: tuple[str, ...] = ("randread", "copy")) -> dict[str, dict[str, tuple[float, float]]]:
    results: dict[str, dict[str, tuple[float, float]]] = {job: {} for job in jobs}
    with tempfile.TemporaryDirectory(prefix="pynbd-xzb-") as d:
        tmp = Path(d)
        for job, order in (("randread", ("nbdkit", "pynbd")), ("copy", ("pynbd", "nbdkit"))):
            if job not in jobs:
                continue
            for name in order:
                srv = serve(name, job, image, tmp)
                try:
                    results[job][name] = (randread(srv, runtime, tmp) if job == "randread"
                                          else copy(srv))
                finally:
                    problem = srv.stop()
                    if problem:
                        raise RuntimeError(problem)
    return results


def report(results: dict[str, dict[str, tuple[float, float]]], markdown: bool,
           busy: float) -> bool:
    ok = True
    rows = []
    for job, unit in (("randread", "IOPS"), ("copy", "MiB/s")):
        if job not in results:
            continue
        p, n = results[job]["pynbd"], results[job]["nbdkit"]
        ratio = p[0] / n[0]
        ok &= ratio >= BAR
        rows.append((f"xz {job}" + (" 4k qd16" if job == "randread" else " (nbdcopy)"),
                     f"{p[0]:.0f} {unit}", f"{n[0]:.0f} {unit}", f"{ratio:.2f}",
                     f"{p[1]:.2f} / {n[1]:.2f}", "pass" if ratio >= BAR else "FAIL"))
    head = ("job", "pynbd", "nbdkit", "pynbd/nbdkit", "server CPUs (pynbd / nbdkit)",
            f">= {BAR}")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in (head, *rows):
            print("  ".join(f"{c:<18}" for c in r))
    if "copy" in results:  # the server's CPU seconds for the 1 GiB copy
        per_gib = [results["copy"][k][1] * (SIZE / MiB) / results["copy"][k][0]
                   for k in ("pynbd", "nbdkit")]
        print(f"(copy: server CPU per GiB {per_gib[0]:.2f} s pynbd / {per_gib[1]:.2f} s nbdkit)")
    print(f"(whole machine busy on average: {busy:.2f} CPUs of {os.cpu_count()})")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=20, help="seconds of fio per server")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/pynbd-bench"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--job", choices=("randread", "copy"), action="append",
                    help="run only this job (repeatable; default both)")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "fio", "nbdcopy", "xz"):
        if shutil.which(tool) is None:
            print(f"ERROR: {tool} not found", file=sys.stderr)
            return 2
    image = make_image(Path(args.workdir))
    busy0, t0 = _busy_seconds(), time.monotonic()
    try:
        results = run(image, args.runtime, tuple(args.job or ("randread", "copy")))
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    busy = (_busy_seconds() - busy0) / (time.monotonic() - t0)
    return 0 if report(results, args.markdown, busy) else 1


if __name__ == "__main__":
    sys.exit(main())
