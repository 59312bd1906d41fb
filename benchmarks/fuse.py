#!/usr/bin/env python3
"""Benchmark `pynbd fuse` against nbdfuse, in ONE run, on the same `nbdkit memory` export.

One nbdkit (`memory SIZE`, filled with nbdkit's `pattern` data first) serves both. Each round
mounts the export with `pynbd fuse` and with nbdfuse in turn (alternating which goes first:
machines are noisy; only two numbers measured in the same minute compare) and measures:

- seq-read: `dd if=MOUNT/nbd of=/dev/null bs=1M` of the whole file (seconds, MB/s);
- randread-4k: `fio --ioengine=psync --rw=randread --bs=4k --numjobs=4 --direct=1` (IOPS).

The table shows medians over --repeat rounds and pynbd/nbdfuse; the bar is >= 1.0x on both.
After the timed part of each mount, the data is checked once (not timed): the SHA-256 of the
whole file read through the mount must be nbdcopy's of the export, and 256 random 4 KiB
O_DIRECT reads must hold nbdkit's pattern -- a fast wrong answer fails the run.

`pynbd fuse` is this checkout's (src/ of the tree this script is in, run by the Python that
runs the script), never a `pynbd` found on PATH.

    python benchmarks/fuse.py                          # one round, 1 GiB, fio 5 s
    python benchmarks/fuse.py --repeat 3 --markdown    # for docs/fuse.md
    python benchmarks/fuse.py --pynbd-opt=-o --pynbd-opt=direct_io   # extra pynbd fuse options

Needs root or fusermount3, /dev/fuse, nbdkit, nbdcopy, nbdfuse and fio (Debian: nbdkit
libnbd-bin fuse3 fio). Exit status: 0 when both bars pass, 1 when one fails, 2 when a run
failed (a tool exited, dd or fio failed or read short, a data check failed): the last line
says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: How long a mount may take to show its file.
MOUNT_TIMEOUT = 20.0
TOOLS = ("pynbd", "nbdfuse")
METRICS = (("seq-read", "MB/s"), ("randread-4k", "IOPS"))
#: This checkout's sources: `pynbd fuse` runs from here.
SRC = Path(__file__).resolve().parents[1] / "src"
#: Random 4 KiB O_DIRECT reads checked against nbdkit's pattern after each mount's run.
SAMPLES = 256


class RunFailed(Exception):
    """A run that cannot count: the benchmark fails with this message."""


def pynbd_env() -> dict[str, str]:
    """The environment in which ``python -m pynbd`` is this checkout's pynbd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def pynbd_cmd() -> list[str]:
    """This checkout's pynbd, under the Python running this script."""
    return [sys.executable, "-m", "pynbd"]


def check_pynbd() -> str:
    """Where ``python -m pynbd`` loads pynbd from; RunFailed unless it is this checkout."""
    cp = subprocess.run([sys.executable, "-c", "import pynbd; print(pynbd.__file__)"],
                        env=pynbd_env(), capture_output=True, text=True, check=False)
    where = cp.stdout.strip()
    if cp.returncode != 0 or not Path(where).resolve().is_relative_to(SRC):
        raise RunFailed(f"{sys.executable} does not load pynbd from {SRC}: "
                        f"{where or cp.stderr.strip()}")
    return where


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
        self.tool = tool
        argv = (pynbd_cmd() + ["fuse", *extra] if tool == "pynbd" else ["nbdfuse"])
        argv += [str(self.dir), uri]
        self.errpath = tmp / f"{self.dir.name}.stderr"
        with open(self.errpath, "wb") as err:  # a file: a chatty tool never blocks on a pipe
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err,
                                         env=pynbd_env() if tool == "pynbd" else None)
        try:
            wait_for(lambda: self.proc.poll() is not None or (
                os.path.ismount(self.dir) and self.file.exists()
                and self.file.stat().st_size == size), MOUNT_TIMEOUT, f"{tool} to mount")
        except BaseException:
            self.close()
            raise
        if self.proc.poll() is not None:
            raise RunFailed(f"{tool} exited {self.proc.returncode}: {self.stderr()}")

    def stderr(self) -> str:
        return self.errpath.read_text(errors="replace").strip()[-2000:]

    def close(self) -> int:
        """Unmount and wait for the tool: its exit status (killed after 10 s: -9)."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-q", str(self.dir)], check=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.dir):
            subprocess.run(["umount", "-l", str(self.dir)], check=False,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


def seq_read(path: Path, size: int) -> float:
    t = time.perf_counter()
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t
    copied = re.search(r"^(\d+) bytes", p.stderr, re.MULTILINE)
    if p.returncode != 0 or copied is None or int(copied[1]) != size:
        raise RunFailed(f"dd of {path} exited {p.returncode} (read {size} bytes?): "
                        f"{p.stderr.strip()}")
    return size / took / 1e6


def randread(path: Path, runtime: int) -> float:
    p = subprocess.run(["fio", "--name=randread", f"--filename={path}", "--ioengine=psync",
                        "--rw=randread", "--bs=4k", "--numjobs=4", "--direct=1",
                        f"--runtime={runtime}", "--time_based", "--group_reporting",
                        "--output-format=json"], check=False, capture_output=True, text=True)
    try:
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        job = None
    if p.returncode != 0 or job is None or job["error"] or not job["read"]["io_bytes"]:
        raise RunFailed(f"fio on {path} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return float(job["read"]["iops"])


def export_sha256(uri: str) -> str:
    """SHA-256 of the export as nbdcopy reads it straight from nbdkit (the reference)."""
    h = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    if p.returncode != 0:
        raise RunFailed(f"nbdcopy {uri} - exited {p.returncode}")
    return h.hexdigest()


def pattern_at(offset: int, n: int) -> bytes:
    """nbdkit's pattern plugin: each 8-byte big-endian word holds its own offset."""
    return struct.pack(f">{n // 8}Q", *range(offset, offset + n, 8))


def check_data(m: Mount, size: int, want_sha256: str, seed: int) -> None:
    """After the timed part: the whole file through the mount is what nbdcopy read from the
    server, and random 4 KiB O_DIRECT reads (fio's kind) hold the pattern."""
    h = hashlib.sha256()
    with open(m.file, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != want_sha256:
        raise RunFailed(f"{m.tool}: data check failed: the file read through the mount is not "
                        f"the export (sha256 {h.hexdigest()}, nbdcopy {want_sha256})")
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    rng = random.Random(seed)
    fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(SAMPLES):
            off = rng.randrange(size // 4096) * 4096
            if os.preadv(fd, [buf], off) != 4096 or buf[:] != pattern_at(off, 4096):
                raise RunFailed(f"{m.tool}: data check failed: 4 KiB O_DIRECT read at "
                                f"{off} is not nbdkit's pattern")
    finally:
        os.close(fd)


def measure(tool: str, uri: str, size: int, args: argparse.Namespace, tmp: Path,
            want: str, round_no: int) -> tuple[float, float]:
    """One mount: the timed dd and fio, then the (untimed) data check; (MB/s, IOPS)."""
    m = Mount(tool, uri, size, args.pynbd_opt if tool == "pynbd" else [], tmp)
    try:
        mbs = seq_read(m.file, size)
        iops = randread(m.file, args.runtime)
        check_data(m, size, want, seed=round_no)
    finally:
        rc = m.close()
    if rc != 0:
        raise RunFailed(f"{tool} exited {rc} at unmount: {m.stderr()}")
    return mbs, iops


def run_rounds(args: argparse.Namespace, size: int) -> dict[str, dict[str, list[float]]]:
    """Fill one nbdkit with the pattern, then mount it with each tool per round."""
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
            want = export_sha256(uri)
            for r in range(args.repeat):
                for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                    mbs, iops = measure(tool, uri, size, args, tmp, want, r)
                    results[tool]["seq-read"].append(mbs)
                    results[tool]["randread-4k"].append(iops)
                    print(f"round {r + 1} {tool}: {mbs:.0f} MB/s, {iops:.0f} IOPS, "
                          "data checked", file=sys.stderr)
        finally:
            if pidf.exists():
                try:
                    os.kill(int(pidf.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass
    return results


def print_table(results: dict[str, dict[str, list[float]]], size: int,
                args: argparse.Namespace) -> bool:
    """The medians side by side; True when both bars pass."""
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
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="nbdkit memory size (default 1G)")
    ap.add_argument("--runtime", type=int, default=5, help="fio seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--pynbd-opt", action="append", default=[],
                    help="an extra `pynbd fuse` argument (repeatable)")
    args = ap.parse_args(argv)
    try:
        for tool in ("nbdkit", "nbdcopy", "nbdfuse", "fio", "fusermount3", "dd"):
            if shutil.which(tool) is None:
                raise RunFailed(f"{tool} not found")
        print(f"# pynbd: {check_pynbd()} ({sys.executable})", file=sys.stderr)
        size = _parse_size(args.size)
        if size % 4096:
            raise RunFailed("--size must be a multiple of 4 KiB")
        results = run_rounds(args, size)
    except (RunFailed, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"benchmarks/fuse.py: FAIL: {e}", file=sys.stderr)
        return 2
    return 0 if print_table(results, size, args) else 1


def _parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower()
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)


if __name__ == "__main__":
    sys.exit(main())
