"""``python -m fuzz`` (what ``scripts/fuzz`` runs): see docs/fuzzing.md.

    python -m fuzz [--server] [--client] [--inputs N] [--seconds S] [--seed SEED]
                   [--only I] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fuzz.findings import Totals


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/fuzz", description=(
        "Fuzz pynbd: a stateful fuzzer against `pynbd serve` (memory and file plugins) and a "
        "hostile server against the clients (asyncio engine, blocking connection, "
        "pynbd.libnbd). Without --server or --client, both run side by side."))
    p.add_argument("--server", action="store_true", help="run the server fuzzer")
    p.add_argument("--client", action="store_true", help="run the client fuzzer")
    p.add_argument("--inputs", type=int, help="inputs in all (split between the fuzzers)")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("--seed", default=None, help="the run's seed (default: a random one)")
    p.add_argument("--only", type=int, help="replay this one input (with --seed)")
    p.add_argument("--plugins", default="memory,file", help="server fuzzer's plugins")
    p.add_argument("--no-probes", action="store_true", help="skip the server memory probes")
    p.add_argument("--jobs", type=int, default=2, help="client fuzzer worker processes")
    p.add_argument("--json", help="write the totals and findings here")
    return p.parse_args(argv)


def _client_worker(argv: list[str]) -> int:
    from fuzz.client_fuzz import worker

    p = argparse.ArgumentParser(prog="fuzz client-worker")
    p.add_argument("--seed", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args(argv)

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    worker(a.seed, a.first, a.count, emit)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["client-worker"]:
        return _client_worker(argv[1:])
    a = _args(argv)
    from fuzz.client_fuzz import ClientFuzzer
    from fuzz.server_fuzz import ServerFuzzer

    both = not (a.server or a.client)
    seed = a.seed or secrets.token_hex(4)
    started = datetime.datetime.now(datetime.UTC)
    print(f"fuzz: seed {seed} (replay with --seed {seed}); started {started:%Y-%m-%d %H:%M} UTC; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(line, flush=True)

    n = a.inputs
    share = None if n is None else (n // 2 if both else n)
    results: list[Totals] = []
    workdir = Path(tempfile.mkdtemp(prefix="pynbd-fuzz-", dir="/tmp"))
    threads = []
    try:
        if a.client or both:
            cf = ClientFuzzer(seed, log, a.jobs)
            th = threading.Thread(target=lambda: results.append(
                cf.run(share if share is None else (n - share if both else share), a.seconds,
                       a.only)))
            th.start()
            threads.append(th)
        if a.server or both:
            sf = ServerFuzzer(seed, workdir, tuple(a.plugins.split(",")), log)
            results.append(sf.run(share, a.seconds, a.only, probes=not a.no_probes))
        for th in threads:
            th.join()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"fuzz: seed {seed}; ended {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; "
          f"load {os.getloadavg()[0]:.2f}")
    for t in results:
        print(t.summary())
    if a.json:
        Path(a.json).write_text(json.dumps({
            "seed": seed, "started": started.isoformat(),
            "totals": [{**{k: v for k, v in vars(t).items() if k not in ("findings", "_logged")},
                        "findings": [f.as_dict() for f in t.findings]} for t in results]},
            indent=1))
    return 1 if any(t.unknown() or t.crashes for t in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
