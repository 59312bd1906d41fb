#!/usr/bin/env python3
"""Benchmark the rbd and S3 plugins against the C peers on one throwaway Ceph cluster.

rbd: `pynbd serve rbd` against qemu-nbd with qemu's rbd driver (Debian's qemu-block-extra),
on the same image, in one run: fio's nbd engine at 4k random reads qd32, 256k sequential
reads and 256k sequential writes (qd8). Bar pynbd/qemu-nbd >= 1.0 (goal 1.5).

S3: nbdcopy of 256 MiB out of one object through `pynbd serve S3` and `nbdkit S3` (nbdkit's
S3 plugin, Python and boto3 under nbdkit), and into a disk of 64K objects (nbdkit 1.32
accepts no larger object size). Bar pynbd/nbdkit >= 1.0.

    python benchmarks/ceph.py                  # starts a cluster (scripts/ceph-cluster)
    python benchmarks/ceph.py --runtime 5 --repeat 2
    python benchmarks/ceph.py --jobs write --qd 16 --cluster DIR   # a running cluster

Servers alternate which goes first; each number is the best of --repeat runs. The machine is
shared: only ratios from one run mean anything. For each rbd job and server it also prints
the CPU time per MiB moved of the server (all its threads, librbd's included; and its main
thread alone, which reads the requests, starts them and answers them), of the OSD and of
fio, in the best run: on a machine whose few cores run the OSD, the server and fio at
once, throughput follows their sum, and these numbers are less disturbed by other work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fio_server import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SCRIPT = ROOT / "scripts" / "ceph-cluster"
PYNBD = [sys.executable, "-m", "pynbd", "serve", "-f"]
MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
FIO_JOBS = (("randread", "4k", 32, "iops"), ("read", "256k", 8, "bw"),
            ("write", "256k", 8, "bw"))


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.args}")
        time.sleep(0.05)


def serve(argv: list[str], sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()




def main_thread_seconds(pid: int) -> float:
    """User+system CPU time of process `pid`'s main thread, in seconds."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def fio(uri: str, rw: str, bs: str, qd: int, runtime: int, out: Path,
        pids: dict[str, int]) -> dict[str, float]:
    """One fio job: IOPS, MiB/s, and CPU ms per MiB moved of each process in `pids`
    (the server, the OSD), of the server's main thread, and of fio itself."""
    server = pids.get("server")
    main0 = main_thread_seconds(server) if server else 0.0
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                    f"--bs={bs}", f"--iodepth={qd}", f"--size={IMAGE_SIZE}",
                    f"--runtime={runtime}", "--time_based", "--output-format=json",
                    f"--output={out}"], check=True, capture_output=True)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    if server:  # the thread that reads the requests and answers them
        cpu["server main thread"] = main_thread_seconds(server) - main0
    j = json.loads(out.read_text())["jobs"][0]
    job = j["write" if rw == "write" else "read"]
    mib = job["io_bytes"] / MiB or float("nan")
    cpu["fio"] = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["elapsed"]
    return {"iops": job["iops"], "bw": job["bw"] / 1024,
            **{f"{name} ms/MiB": 1000 * sec / mib for name, sec in cpu.items()}}


def bench_rbd(info: dict, d: Path, a: argparse.Namespace) -> list[tuple[str, float, float]]:
    conf = info["conf"]
    image = f"rbd/bench{os.getpid()}"
    subprocess.run(["rbd", "-c", conf, "create", "--size", f"{IMAGE_SIZE}B", image],
                   check=True)
    osd_pid = int((Path(info["dir"]) / "run" / "osd.0.pid").read_text())
    sock = d / "rbd.sock"
    servers = {
        "pynbd": [*PYNBD, "-U", str(sock), "rbd", f"conf={conf}", image],
        "qemu-nbd": ["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "--cache=writeback",
                     f"rbd:{image}:conf={conf}"],
    }
    uri = f"nbd+unix:///?socket={sock}"
    # Fill the image once so reads hit data, not missing objects.
    p = serve(servers["pynbd"], sock)
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                    "--bs=1M", "--iodepth=8", f"--size={IMAGE_SIZE}"], check=True,
                   capture_output=True)
    stop(p)
    rows = []
    jobs = [(rw, bs, a.qd or qd, metric) for rw, bs, qd, metric in FIO_JOBS
            if a.jobs is None or rw in a.jobs]
    for i, (rw, bs, qd, metric) in enumerate(jobs):
        best: dict[str, dict[str, float]] = {"pynbd": {}, "qemu-nbd": {}}
        for r in range(a.repeat):
            order = list(servers) if (i + r) % 2 == 0 else list(reversed(servers))
            for name in order:
                p = serve(servers[name], sock)
                try:
                    m = fio(uri, rw, bs, qd, a.runtime, d / "fio.json",
                            {"server": p.pid, "osd": osd_pid})
                finally:
                    stop(p)
                if m[metric] > best[name].get(metric, 0.0):
                    best[name] = m
        unit = "IOPS" if metric == "iops" else "MiB/s"
        title = f"rbd {bs} {rw} qd{qd} ({unit})"
        rows.append((title, best["pynbd"][metric], best["qemu-nbd"][metric]))
        for name, m in best.items():
            print(f"  {title} {name}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in m.items() if "ms/MiB" in k), flush=True)
    subprocess.run(["rbd", "-c", conf, "rm", "--no-progress", image], check=False,
                   capture_output=True)
    return rows


def bench_s3(info: dict, d: Path, repeat: int) -> list[tuple[str, float, float]]:
    import boto3

    s3i = info["s3"]
    s3 = boto3.client("s3", endpoint_url=s3i["endpoint"], aws_access_key_id=s3i["access_key"],
                      aws_secret_access_key=s3i["secret_key"])
    s3.create_bucket(Bucket="bench")
    data = d / "data"
    rnd = random.Random(0)  # randbytes of 256 MiB at once overflows: 16 MiB at a time
    with open(data, "wb") as f:
        f.writelines(rnd.randbytes(16 << 20) for _ in range(0, IMAGE_SIZE, 16 << 20))
    s3.upload_file(str(data), "bench", "disk.img")
    creds = [f"endpoint-url={s3i['endpoint']}", f"access-key={s3i['access_key']}",
             f"secret-key={s3i['secret_key']}", "bucket=bench"]
    sock = d / "s3.sock"
    uri = f"nbd+unix:///?socket={sock}"
    cases = {
        "S3 nbdcopy 256M out of one object (MiB/s)": (["key=disk.img"], [uri, str(d / "out")]),
        "S3 nbdcopy 256M into 64K objects (MiB/s)": (
            ["key=objs", f"size={IMAGE_SIZE}", "object-size=64k"], [str(data), uri]),
    }
    rows = []
    for title, (params, copy) in cases.items():
        best = {"pynbd": 0.0, "nbdkit": 0.0}
        for r in range(repeat):
            order = ["pynbd", "nbdkit"] if r % 2 == 0 else ["nbdkit", "pynbd"]
            for name in order:
                cmd = [*PYNBD, "-U", str(sock)] if name == "pynbd" else \
                    ["nbdkit", "-f", "-U", str(sock)]
                p = serve([*cmd, "S3", *creds, *params], sock)
                try:
                    t = time.monotonic()
                    subprocess.run(["nbdcopy", *copy], check=True, capture_output=True)
                    best[name] = max(best[name], IMAGE_SIZE / MiB / (time.monotonic() - t))
                finally:
                    stop(p)
        if "out of" in title and (d / "out").read_bytes() != data.read_bytes():
            raise SystemExit("S3: the copy read back different data")
        rows.append((title, best["pynbd"], best["nbdkit"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    ap.add_argument("--repeat", type=int, default=2, help="runs per job and server")
    ap.add_argument("--jobs", nargs="+", choices=[j[0] for j in FIO_JOBS],
                    help="only these rbd jobs, and no S3")
    ap.add_argument("--qd", type=int, help="this queue depth for every rbd job")
    ap.add_argument("--cluster", metavar="DIR",
                    help="use this running cluster (scripts/ceph-cluster start DIR)")
    a = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdkit", "nbdcopy", "rbd", "ceph-osd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (see .ci/run for the Debian packages)")
    d = Path(tempfile.mkdtemp(prefix="pynbd-bench-ceph-"))
    cluster = Path(a.cluster) if a.cluster else d / "cluster"
    if a.cluster:
        info = json.loads((cluster / "cluster.json").read_text())
    else:
        out = subprocess.run([sys.executable, str(SCRIPT), "start", "--osd-size", "3G",
                              str(cluster)], check=True, capture_output=True, text=True).stdout
        info = json.loads(out)
        print(f"cluster up in {info['start_seconds']} s", flush=True)
    try:
        print(f"load average {os.getloadavg()}", flush=True)
        rows = bench_rbd(info, d, a)
        if a.jobs is None:
            rows += bench_s3(info, d, a.repeat)
    finally:
        if not a.cluster:
            subprocess.run([sys.executable, str(SCRIPT), "stop", str(cluster)], check=False)
        shutil.rmtree(d, ignore_errors=True)
    print("\n| job | pynbd | peer | pynbd/peer |\n|---|---|---|---|")
    failed = False
    for title, ours, theirs in rows:
        ratio = ours / theirs if theirs else float("nan")
        failed |= not ratio >= 1.0
        print(f"| {title} | {ours:.0f} | {theirs:.0f} | {ratio:.2f} |")
    print(f"load average after: {os.getloadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
