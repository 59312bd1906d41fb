#!/usr/bin/env python3
"""The network plugins against nbdkit's, side by side in ONE run.

    python benchmarks/network.py                 # all three, 1 GiB
    python benchmarks/network.py --only curl --size 256M

- curl: nbdcopy of a file from one nginx (started here on loopback) through
  `pynbd serve -r curl URL` and `nbdkit -r curl URL`; bar pynbd/nbdkit throughput >= 1.2.
- ssh: the same through one sshd (started here on a loopback port with generated keys);
  bar >= 1.0.
- nbd: fio 4k randread qd64 through `pynbd serve nbd` in front of `nbdkit memory`, against
  `pynbd serve memory` alone; bar >= 0.8.

Each pair runs alternately (pynbd first, then nbdkit first) --repeat times, after one
untimed copy through each (the first copies after start-up were the slowest, whichever server
made them); the medians are compared. Every copy is checked byte for byte against the source. Needs nginx, sshd,
ssh-keygen, nbdkit, nbdcopy, fio. Exit 0 when every bar passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PYNBD = [sys.executable, "-m", "pynbd", "serve"]
BARS = {"curl": 1.2, "ssh": 1.0, "nbd": 0.8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path | None = None, port: int | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path is not None and path.exists():
            return
        if port is not None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {path or port}")


def serve(argv: list[str], sock: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    p = subprocess.Popen([*argv[:1], *argv[1:]], env=env, stdin=subprocess.DEVNULL)
    wait_for(path=sock)
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


CLK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (all its threads); with children, also those of the
    children it has reaped (sshd's per-connection processes, once they are gone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK


def wait_no_children(pid: int, timeout: float = 10) -> None:
    """Wait until the process has no children left (sshd reaps each connection's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            kids.append(entry)
                except (OSError, ValueError, IndexError):
                    continue
        if not kids:
            return
        time.sleep(0.05)


def copy_time(uri: str, src: Path, out: Path) -> tuple[float, float]:
    """Seconds the copy took and nbdcopy's CPU seconds."""
    t = time.monotonic()
    p = subprocess.Popen(["nbdcopy", uri, str(out)])
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    took = time.monotonic() - t
    if p.returncode != 0:
        raise RuntimeError(f"nbdcopy from {uri} failed ({p.returncode})")
    if subprocess.run(["cmp", "-s", str(src), str(out)], check=False).returncode != 0:
        raise RuntimeError(f"copy from {uri} differs from {src}")
    out.unlink()
    return took, usage.ru_utime + usage.ru_stime


#: CPU seconds per run of every process taking part: {who: {process: [seconds, ...]}}.
CPU: dict[str, dict[str, list[float]]] = {}


def copy_pair(d: Path, src: Path, plugin_args: list[str], repeat: int,
              peer: int | None = None) -> dict[str, list[float]]:
    """Copies through each server; peer: the pid of the remote server (sshd) whose CPU,
    with its reaped children's, is counted for each copy too."""
    times: dict[str, list[float]] = {"pynbd": [], "nbdkit": []}
    for i in range(-1, repeat):  # run -1: one untimed copy through each, to warm up
        order = ("pynbd", "nbdkit") if i % 2 == 0 else ("nbdkit", "pynbd")
        for who in order:
            sock = d / f"{who}.sock"
            cmd = PYNBD if who == "pynbd" else ["nbdkit"]
            p = serve([*cmd, "-f", "-r", "-U", str(sock), *plugin_args], sock)
            try:
                peer0 = cpu_of(peer, children=True) if peer else 0.0
                server0 = cpu_of(p.pid)
                took, client = copy_time(f"nbd+unix:///?socket={sock}", src, d / "out")
                server = cpu_of(p.pid) - server0
            finally:
                stop(p)
            sock.unlink(missing_ok=True)
            cpu = {"server": server, "nbdcopy": client}
            if peer:
                wait_no_children(peer)
                cpu["sshd"] = cpu_of(peer, children=True) - peer0
            shown = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            print(f"  [{plugin_args[0]} run {i + 1 or 'warm-up'}] {who}: {took:.2f} s "
                  f"(CPU s: {shown})", flush=True)
            if i >= 0:
                times[who].append(took)
                for k, v in cpu.items():
                    CPU.setdefault(f"{plugin_args[0]} {who}", {}).setdefault(k, []).append(v)
    return times


def bench_curl(d: Path, src: Path, repeat: int) -> tuple[float, float, str]:
    (d / "www").mkdir()
    os.link(src, d / "www" / "disk.img")
    port = free_port()
    (d / "nginx.conf").write_text(
        f"daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log; events {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; client_body_temp_path {d}/t; proxy_temp_path {d}/t2;\n"
        f"fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n"
        f"keepalive_requests 100000; sendfile on;\n"
        f"server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}\n")
    ngx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)],
                           stdin=subprocess.DEVNULL)
    try:
        wait_for(port=port)
        url = f"http://127.0.0.1:{port}/disk.img"
        t = copy_pair(d, src, ["curl", url], repeat)
    finally:
        stop(ngx)
    return statistics.median(t["pynbd"]), statistics.median(t["nbdkit"]), \
        f"nbdcopy nbd+unix:///?socket=SOCK out  # -r curl {url}"


def bench_ssh(d: Path, src: Path, repeat: int) -> tuple[float, float, str]:
    for k in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / k)],
                       check=True)
    port = free_port()
    (d / "ak").write_text((d / "user.pub").read_text())
    (d / "kh").write_text(f"[127.0.0.1]:{port} "
                          + " ".join((d / "host.pub").read_text().split()[:2]) + "\n")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/ak\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(port=port)
        args = ["ssh", "host=127.0.0.1", f"port={port}", "config=", f"identity={d}/user",
                f"known-hosts={d}/kh", str(src)]
        t = copy_pair(d, src, args, repeat, peer=sshd.pid)
    finally:
        stop(sshd)
    return statistics.median(t["pynbd"]), statistics.median(t["nbdkit"]), \
        "nbdcopy nbd+unix:///?socket=SOCK out  # -r " + " ".join(args)


def fio_iops(uri: str, out: Path, runtime: int) -> float:
    subprocess.run(["fio", "--name=x", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
                    "--bs=4k", "--iodepth=64", "--size=1G", "--time_based",
                    f"--runtime={runtime}", "--output-format=json", f"--output={out}"],
                   check=True, stdout=subprocess.DEVNULL)
    text = out.read_text()
    return float(json.loads(text[text.index("{"):])["jobs"][0]["read"]["iops"])


#: The nbd runs: (name, server, plugin arguments); no server: fio straight to the backend.
NBD_RUNS: tuple[tuple[str, list[str], list[str]], ...] = (
    ("proxy", PYNBD, ["nbd", "socket={back}"]),
    ("memory", PYNBD, ["memory", "1G"]),
    ("nbdkit-proxy", ["nbdkit"], ["nbd", "socket={back}"]),
    ("backend", [], []),
)


def bench_nbd(d: Path, repeat: int, runtime: int) -> tuple[float, float, str]:
    """fio through `pynbd serve nbd` in front of `nbdkit memory`, against `pynbd serve
    memory` (the bar); also through `nbdkit nbd` in front of the same backend, and
    straight to the backend, for what the backend itself allows on this machine."""
    got: dict[str, list[float]] = {name: [] for name, _, _ in NBD_RUNS}
    back_sock = d / "back.sock"
    back = serve(["nbdkit", "-f", "-U", str(back_sock), "memory", "1G"], back_sock)
    try:
        for i in range(repeat):
            runs = NBD_RUNS if i % 2 == 0 else tuple(reversed(NBD_RUNS))
            for who, server, args in runs:
                if not server:
                    got[who].append(fio_iops(f"nbd+unix:///?socket={back_sock}",
                                             d / "fio.json", runtime))
                    continue
                sock = d / f"{who}.sock"
                args = [a.format(back=back_sock) for a in args]
                p = serve([*server, "-f", "-U", str(sock), *args], sock)
                try:
                    got[who].append(fio_iops(f"nbd+unix:///?socket={sock}", d / "fio.json",
                                             runtime))
                finally:
                    stop(p)
                sock.unlink(missing_ok=True)
    finally:
        stop(back)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"nbd: nbdkit nbd in front of the same backend {med['nbdkit-proxy']:,.0f} IOPS; "
          f"fio straight to the backend (nbdkit memory) {med['backend']:,.0f} IOPS; "
          f"pynbd proxy/nbdkit proxy {med['proxy'] / med['nbdkit-proxy']:.2f}, "
          f"pynbd proxy/backend alone {med['proxy'] / med['backend']:.2f}")
    # A ratio of throughputs: higher is better for the proxy, as for the copies (time ratio
    # inverted below).
    return 1 / med["proxy"], 1 / med["memory"], (
        "fio --ioengine=nbd --rw=randread --bs=4k --iodepth=64 --size=1G  # pynbd serve nbd "
        "socket=NBDKIT_MEMORY_SOCK, against pynbd serve memory 1G")


def print_cpu(name: str, size: int) -> None:
    """Median CPU seconds per GiB copied of every process, for each server."""
    for who in ("pynbd", "nbdkit"):
        got = CPU.get(f"{name} {who}", {})
        if not got:
            continue
        per = {k: statistics.median(v) * (1 << 30) / size for k, v in got.items()}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        print(f"  CPU s per GiB through {who}: {shown}, all {sum(per.values()):.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(BARS), action="append")
    ap.add_argument("--size", default="1G", help="file size for the copies (default 1G)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=8, help="fio seconds (nbd)")
    args = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy", "fio", "nginx", "ssh-keygen"):
        if shutil.which(tool) is None:
            print(f"ERROR: {tool} not found", file=sys.stderr)
            return 2
    failed = False
    with tempfile.TemporaryDirectory(prefix="pynbd-net-") as tmp:
        d = Path(tmp)
        src = d / "source.img"
        subprocess.run(["fio", "--name=mk", "--rw=write", "--bs=1M", f"--size={args.size}",
                        f"--filename={src}", "--refill_buffers", "--output=/dev/null"],
                       check=True)
        os.sync()  # no write-back of the fresh file during the first timed copies
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        for name in args.only or ("curl", "ssh", "nbd"):
            sub = d / name
            sub.mkdir()
            if name == "curl":
                p, n, cmd = bench_curl(sub, src, args.repeat)
            elif name == "ssh":
                p, n, cmd = bench_ssh(sub, src, args.repeat)
            else:
                p, n, cmd = bench_nbd(sub, args.repeat, args.runtime)
            ratio = n / p
            ok = ratio >= BARS[name]
            failed |= not ok
            if name == "nbd":
                print(f"{name}: proxy {1 / p:,.0f} IOPS, memory alone {1 / n:,.0f} IOPS, "
                      f"ratio {ratio:.2f} (bar >= {BARS[name]}) {'PASS' if ok else 'FAIL'}")
            else:
                size = src.stat().st_size / (1 << 20)
                print(f"{name}: pynbd {p:.2f} s ({size / p:.0f} MiB/s), nbdkit {n:.2f} s "
                      f"({size / n:.0f} MiB/s), pynbd/nbdkit {ratio:.2f} (bar >= "
                      f"{BARS[name]}) {'PASS' if ok else 'FAIL'}")
                print_cpu(name, src.stat().st_size)
            print(f"  command: {cmd}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
