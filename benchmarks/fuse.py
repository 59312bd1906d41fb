#!/usr/bin/env python3
"""Benchmark `pynbd fuse` against nbdfuse, in ONE run, on the same `nbdkit memory` export.

One nbdkit (`memory SIZE`, filled with nbdkit's `pattern` data first) serves both. Each round
mounts the export with `pynbd fuse` and with nbdfuse in turn (alternating which goes first:
machines are noisy; only two numbers measured in the same minute compare) and measures:

- seq-read: `dd if=MOUNT/nbd of=/dev/null bs=1M` of the whole file (seconds, MB/s);
- randread-4k: `fio --ioengine=psync --rw=randread --bs=4k --numjobs=4 --direct=1` (IOPS).

The table shows medians over --repeat rounds and pynbd/nbdfuse; the bar is >= 1.0x on both.

    python benchmarks/fuse.py                          # one round, 1 GiB, fio 5 s
    python benchmarks/fuse.py --repeat 3 --markdown    # for docs/fuse.md
    python benchmarks/fuse.py --pynbd-opt=-o --pynbd-opt=direct_io   # extra pynbd fuse options

Needs root or fusermount3, /dev/fuse, nbdkit, nbdcopy, nbdfuse and fio (Debian: nbdkit
libnbd-bin fuse3 fio). Exit status: 0 when both bars pass, 1 when one fails, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: How long a mount may take to show its file.
MOUNT_TIMEOUT = 20.0
TOOLS = ("pynbd", "nbdfuse")
METRICS = (("seq-read", "MB/s"), ("randread-4k", "IOPS"))


def pynbd_cmd() -> list[str]:
    exe = shutil.which("pynbd")
    if exe:
        return [exe]
    return [sys.executable, "-m", "pynbd"]


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


class Mount:
    def __init__(self, tool: str, uri: str, size: int, extra: list[str], tmp: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=tmp))
        self.file = self.dir / "nbd"
        argv = (pynbd_cmd() + ["fuse", *extra] if tool == "pynbd" else ["nbdfuse"])
        argv += [str(self.dir), uri]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: self.proc.poll() is not None or (
                os.path.ismount(self.dir) and self.file.exists()
                and self.file.stat().st_size == size), MOUNT_TIMEOUT, f"{tool} to mount")
        except BaseException:
            self.close()
            raise
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"{tool} exited {self.proc.returncode}: {err.strip()}")

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-q", str(self.dir)], check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", str(self.dir)], check=False,
                           stderr=subprocess.DEVNULL)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def seq_read(path: Path, size: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return size / (time.perf_counter() - t) / 1e6


def randread(path: Path, runtime: int) -> float:
    p = subprocess.run(["fio", "--name=randread", f"--filename={path}", "--ioengine=psync",
                        "--rw=randread", "--bs=4k", "--numjobs=4", "--direct=1",
                        f"--runtime={runtime}", "--time_based", "--group_reporting",
                        "--output-format=json"], check=True, capture_output=True, text=True)
    j = json.loads(p.stdout[p.stdout.index("{"):])
    return float(j["jobs"][0]["read"]["iops"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="nbdkit memory size (default 1G)")
    ap.add_argument("--runtime", type=int, default=5, help="fio seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--pynbd-opt", action="append", default=[],
                    help="an extra `pynbd fuse` argument (repeatable)")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "nbdcopy", "nbdfuse", "fio", "fusermount3", "dd"):
        if shutil.which(tool) is None:
            print(f"benchmarks/fuse.py: {tool} not found", file=sys.stderr)
            return 2
    size = _parse_size(args.size)
    results: dict[str, dict[str, list[float]]] = {t: {m: [] for m, _ in METRICS}
                                                  for t in TOOLS}
    with tempfile.TemporaryDirectory(prefix="pynbd-fuse-bench-") as td:
        tmp = Path(td)
        sock = tmp / "nbdkit.sock"
        pidf = tmp / "nbdkit.pid"
        subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pidf), "memory", args.size],
                       check=True)
        uri = f"nbd+unix:///?socket={sock}"
        try:
            wait_for(pidf.exists, 10, "nbdkit")
            subprocess.run(["nbdcopy", "--", "[", "nbdkit", "pattern", args.size, "]", uri],
                           check=True)
            for r in range(args.repeat):
                order = TOOLS if r % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    m = Mount(tool, uri, size, args.pynbd_opt if tool == "pynbd" else [], tmp)
                    try:
                        results[tool]["seq-read"].append(seq_read(m.file, size))
                        results[tool]["randread-4k"].append(randread(m.file, args.runtime))
                    finally:
                        m.close()
                    print(f"round {r + 1} {tool}: "
                          f"{results[tool]['seq-read'][-1]:.0f} MB/s, "
                          f"{results[tool]['randread-4k'][-1]:.0f} IOPS", file=sys.stderr)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"benchmarks/fuse.py: {e}", file=sys.stderr)
            return 2
        finally:
            if pidf.exists():
                try:
                    os.kill(int(pidf.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass
    rows = []
    ok = True
    for metric, unit in METRICS:
        p = statistics.median(results["pynbd"][metric])
        n = statistics.median(results["nbdfuse"][metric])
        ratio = p / n if n else float("nan")
        ok = ok and ratio >= 1.0
        secs = f" ({size / p / 1e6:.2f} s vs {size / n / 1e6:.2f} s)" if unit == "MB/s" else ""
        rows.append((metric, f"{p:,.0f} {unit}", f"{n:,.0f} {unit}",
                     f"{ratio:.2f}x{secs}", "pass" if ratio >= 1.0 else "FAIL"))
    opts = " ".join(args.pynbd_opt) or "(defaults)"
    if args.markdown:
        print(f"`pynbd fuse` {opts} vs nbdfuse 1.14 on `nbdkit memory {args.size}` (Unix "
              f"socket); median of {args.repeat}; fio {args.runtime} s.\n")
        print("| test | pynbd fuse | nbdfuse | pynbd/nbdfuse | bar >= 1.0 |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(f"pynbd fuse options: {opts}; median of {args.repeat}")
        print(f"{'test':<12} {'pynbd fuse':>16} {'nbdfuse':>16}  ratio")
        for row in rows:
            print(f"{row[0]:<12} {row[1]:>16} {row[2]:>16}  {row[3]} {row[4]}")
    return 0 if ok else 1


def _parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower()
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)


if __name__ == "__main__":
    sys.exit(main())
