#!/usr/bin/env python3
"""What watching costs: fio 4k random writes at queue depth 64 against a memory export,
without the view filter, through it with nobody watching, and through it with one live
viewer (``pynbd view`` reading and drawing every event). One run, servers alternating;
prints IOPS and the ratios to the run without the filter. Bar (live viewer) >= 0.9,
goal 0.97.

    python benchmarks/view.py                    # 10 s a run, best of 2
    python benchmarks/view.py --runtime 5 --repeat 1

The machine is shared: only ratios from one run mean anything (note ``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYNBD = [sys.executable, "-m", "pynbd"]
SIZE = "256M"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC))


def wait_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"did not start: {proc.args}")
        time.sleep(0.05)


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def fio(sock: Path, runtime: int, out: Path) -> float:
    subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                    "--rw=randwrite", "--bs=4k", "--iodepth=64", f"--size={SIZE}",
                    f"--runtime={runtime}", "--time_based", "--output-format=json",
                    f"--output={out}"], check=True, capture_output=True)
    return float(json.loads(out.read_text())["jobs"][0]["write"]["iops"])


def run(mode: str, d: Path, runtime: int) -> float:
    """One fio run: mode "plain" (no filter), "idle" (the filter, no viewer) or "live"."""
    sock, vsock = d / f"{mode}.sock", d / f"{mode}-view.sock"
    filt = [] if mode == "plain" else ["--filter=view"]
    params = [] if mode == "plain" else [f"view-socket={vsock}"]
    server = subprocess.Popen([*PYNBD, "serve", "-f", "-U", str(sock), *filt, "memory", SIZE,
                               *params], env=_env(), stdin=subprocess.DEVNULL)
    viewer = None
    try:
        wait_path(sock, server)
        if mode == "live":
            err = d / "viewer.err"
            with open(err, "wb") as f:
                viewer = subprocess.Popen([*PYNBD, "view", str(vsock), "--snapshot",
                                           str(d / "live.png")], env=_env(), stderr=f,
                                          stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while b"watching" not in err.read_bytes():
                if viewer.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"viewer did not start: {err.read_text()}")
                time.sleep(0.05)
        return fio(sock, runtime, d / f"{mode}.json")
    finally:
        stop(server)
        if viewer is not None:
            viewer.wait(60)  # it draws its picture once the stream ends: all events read
            print(f"  live viewer: {(d / 'viewer.err').read_text().splitlines()[-2]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    modes = ["plain", "idle", "live"]
    best = dict.fromkeys(modes, 0.0)
    with tempfile.TemporaryDirectory(prefix="view-bench-") as tmp:
        for r in range(a.repeat):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                best[mode] = max(best[mode], run(mode, Path(tmp), a.runtime))
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    print(f"fio randwrite 4k qd64, memory {SIZE}, {a.runtime} s, best of {a.repeat}; "
          f"load: {load.strip()}")
    for mode, label in (("plain", "no filter"), ("idle", "--filter=view, no viewer"),
                        ("live", "--filter=view, one live viewer")):
        print(f"  {label:32s} {best[mode]:10.0f} IOPS  ratio {best[mode] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
