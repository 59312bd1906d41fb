#!/usr/bin/env python3
"""The TLS server's CPU per GiB with a client that costs almost nothing: a replay.

`benchmarks/tls.py` runs real clients (fio, nbdcopy) that encrypt on the same CPUs as the
server, so the server's CPU per GiB moves by 20% or more from run to run. Here the client
does the NBD handshake and STARTTLS itself, encrypts all of its requests BEFORE the clock
starts (1 GiB of 256 KiB WRITEs, or 256 KiB READs), and then only sends the ciphertext
with sendfile and reads the replies without decrypting them. The figure is the server's
CPU (from /proc) over the transfer, per GiB.

  --pace US   sleep-free pause after each TLS record sent (16 KiB of WRITE payload): a
              client that sends record by record, as fio and nbdcopy do, at ~16 KiB/US
              (the server then reads a record or two per wake-up, as with real clients)

The server is `pynbd serve --tls=require null 1G` on a Unix socket, from this checkout's
src/ or from the source trees given (`--src A,B`: runs alternate, for before/after). nbdkit
is not replayed: it does not end the connection after this client's NBD_CMD_DISC.

    python benchmarks/tls_replay.py [--mode write|read] [--size 1G] [--pace 12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fio_server import cpu_seconds, minor_faults, parse_size
from tool_copy import stop_process, wait_for_socket

ROOT = Path(__file__).resolve().parent.parent
REQ = 256 * 1024
MAGIC, OPTS = 0x25609513, b"IHAVEOPT"


def recvn(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise EOFError("the server closed the connection")
        b += x
    return b


def handshake(s: socket.socket, certs: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    """Fixed newstyle, STARTTLS, the TLS handshake, then OPT_GO of the default export."""
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3) + OPTS + struct.pack(">II", 5, 0))
    _, _, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    recvn(s, ln)
    if typ != 1:
        raise RuntimeError(f"STARTTLS refused ({typ:#x})")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs / "ca-cert.pem"))
    ctx.check_hostname = False
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = ctx.wrap_bio(inc, out)
    while True:
        try:
            c.do_handshake()
            break
        except ssl.SSLWantReadError:
            s.sendall(out.read())
            inc.write(s.recv(65536))
    c.write(OPTS + struct.pack(">IIIH", 7, 6, 0, 0))
    s.sendall(out.read())
    got = b""
    while True:  # replies to GO until its ACK
        try:
            got += c.read(65536)
        except ssl.SSLWantReadError:
            inc.write(s.recv(65536))
        while len(got) >= 20:
            _, _, typ, ln = struct.unpack(">QIII", got[:20])
            if len(got) < 20 + ln:
                break
            got = got[20 + ln:]
            if typ == 1:
                return c, out


def encrypt(c: ssl.SSLObject, out: ssl.MemoryBIO, path: Path, mode: str, size: int) -> None:
    """All the requests, then NBD_CMD_DISC, encrypted into ``path``."""
    payload = os.urandom(REQ)
    n = size // REQ
    with open(path, "wb") as f:
        for i in range(n):
            off = i * REQ
            if mode == "write":
                c.write(struct.pack(">IHHQQI", MAGIC, 0, 1, i, off, REQ))
                c.write(payload)
            else:
                c.write(struct.pack(">IHHQQI", MAGIC, 0, 0, i, off, REQ))
            if mode == "write" or i % 16 == 15:
                f.write(out.read())
        c.write(struct.pack(">IHHQQI", MAGIC, 0, 2, n, 0, 0))
        f.write(out.read())


def send(s: socket.socket, path: Path, pace_us: float) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        chunk = 16384 + 22 if pace_us else 1 << 20
        while off < size:
            off += os.sendfile(s.fileno(), fd, off, min(chunk, size - off))
            if pace_us:
                until = time.perf_counter() + pace_us / 1e6
                while time.perf_counter() < until:
                    pass
    finally:
        os.close(fd)


def one(src: Path, d: Path, certs: Path, args: argparse.Namespace) -> tuple[float, float]:
    """The server's CPU seconds and minor page faults per GiB for one replay."""
    sock = d / "pynbd.sock"
    sock.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pynbd", "serve"]
    proc = subprocess.Popen([*cmd, "-f", "-U", str(sock), "--tls=require",
                             f"--tls-certificates={certs}", "null", "1G"],
                            env=dict(os.environ, PYTHONPATH=str(src)), stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(proc, str(sock), "pynbd")
        size = parse_size(args.size)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            c, out = handshake(s, certs)
            encrypt(c, out, d / "requests.bin", args.mode, size)

            def drain() -> None:
                while s.recv(1 << 20):
                    pass
            t = threading.Thread(target=drain)
            cpu0, flt0 = cpu_seconds(proc.pid), minor_faults(proc.pid)
            t.start()
            send(s, d / "requests.bin", args.pace)
            t.join()
            cpu = cpu_seconds(proc.pid) - cpu0
            flt = minor_faults(proc.pid) - flt0
        gib = size / (1 << 30)
        return cpu / gib, flt / gib
    finally:
        stop_process(proc)
        (d / "requests.bin").unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="pynbd source trees (comma)")
    ap.add_argument("--mode", default="write", choices=("write", "read"))
    ap.add_argument("--size", default="1G")
    ap.add_argument("--pace", type=float, default=0.0, help="µs after each record sent")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tls_certs import make_x509  # the test extra's cryptography package

    servers = args.src.split(",")
    with tempfile.TemporaryDirectory(prefix="pynbd-replay-") as tmp:
        d = Path(tmp)
        certs = make_x509(d / "x509")
        runs: dict[str, list[float]] = {s: [] for s in servers}
        faults: dict[str, list[float]] = {s: [] for s in servers}
        for r in range(args.repeat):
            for server in servers if r % 2 == 0 else servers[::-1]:
                cpu, flt = one(Path(server), d, certs, args)
                runs[server].append(cpu)
                faults[server].append(flt)
    for server, v in runs.items():
        print(f"{server} {args.mode} pace={args.pace:g}: server CPU s/GiB "
              f"{' '.join(f'{x:.3f}' for x in v)}  (median {statistics.median(v):.3f}, "
              f"min {min(v):.3f}); minor page faults/GiB "
              f"{' '.join(f'{x:.0f}' for x in faults[server])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
