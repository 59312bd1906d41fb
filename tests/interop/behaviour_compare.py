"""Helpers for the behaviour filters' side-by-side tests (nozero, fua, nocache, noparallel,
nofilter, multi-conn, exportname, retry, retry-request, scan, limit, ip, exitlast, exitwhen).

- :func:`bad_params`: a command line with a bad parameter exits 1 under both servers with
  nbdkit's message (pynbd's one line against nbdkit's last ``nbdkit: error:`` line).
- :func:`record`: what tests/data/python/calls.py was asked (every data call with its
  flags), read back through the server.
- :func:`list_exports`: what a client listing the exports (NBD_OPT_LIST) is told.
- :func:`wait_until`: poll a condition with a deadline (never a bare sleep).
- :func:`assert_same_many`: several side-by-side comparisons at once (threads: each
  comparison waits mostly on two server processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from helpers import PYNBD, peer_env, require, run_libnbd, unix_uri
from side_by_side import assert_same, probe

__all__ = [
    "CALLS",
    "DATA",
    "EXPORTS",
    "MIB",
    "assert_same_many",
    "bad_params",
    "calls_log",
    "describe",
    "list_exports",
    "record",
    "wait_until",
]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "python"
#: Records every data call; reading at MIB returns the record (see the script).
CALLS = str(DATA / "calls.py")
#: Several exports with descriptions, a default export named "described".
EXPORTS = str(DATA / "exports.py")
MIB = 1 << 20

_RUNNER = r'''
import contextlib, io, json, sys
from pynbd.server.main import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out.append([rc, err.getvalue()])
print(json.dumps(out))
'''


def bad_params(cases: Sequence[Sequence[str]]) -> None:
    """Each command line of ``cases`` exits 1 under nbdkit and pynbd (``-U - ... --run
    true``: one that wrongly succeeds cannot hang), pynbd with exactly one line, nbdkit's
    last error line. pynbd's cases run in one interpreter (one ``main()`` each)."""
    nbdkit = require("nbdkit")
    argvs = [["-U", "-", *c, "--run", "true"] for c in cases]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cp = subprocess.run([PYNBD[0], "-c", _RUNNER, json.dumps(argvs)], capture_output=True,
                        text=True, timeout=120, env=env, stdin=subprocess.DEVNULL, check=False)
    assert cp.returncode == 0, cp.stderr
    mine = json.loads(cp.stdout)
    for case, argv, (rc, err) in zip(cases, argvs, mine, strict=True):
        n = subprocess.run([nbdkit, *argv], capture_output=True, text=True, timeout=60,
                           env=peer_env(), stdin=subprocess.DEVNULL, check=False)
        theirs = [ln for ln in n.stderr.splitlines() if ln.startswith("nbdkit: error: ")]
        what = " ".join(case)
        assert n.returncode == 1 and theirs, f"nbdkit {what}: {n.returncode} {n.stderr!r}"
        assert rc == 1, f"pynbd serve {what}: exit {rc}, stderr {err!r}"
        lines = err.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"pynbd serve {what}: {err!r}"
        assert lines[0].removeprefix("pynbd serve: error: ") == \
            theirs[-1].removeprefix("nbdkit: error: "), f"{what}: {lines[0]!r} vs {theirs!r}"


def calls_log(view: dict[str, Any]) -> list[str]:
    """The record calls.py returned as the last result of a probe (its lines)."""
    kind, data = view["results"][-1]
    assert kind == "data", view["results"][-1]
    return bytes(data).rstrip(b"\0").decode().splitlines()


def record(uri: str, export: str | None = None) -> list[str]:
    """What calls.py was asked so far (one line per call), read through ``uri``."""
    return calls_log(probe(uri, [("pread", 4096, MIB)], export=export))


_LIST = r'''
import json, sys, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
got = []
try:
    h.opt_list(lambda name, desc: got.append([name, desc]) or 0)
except nbd.Error as e:
    print(json.dumps({"error": e.errnum}))
else:
    print(json.dumps({"exports": got}))
h.opt_abort()
'''


def list_exports(uri: str) -> dict[str, Any]:
    """``{"exports": [[name, description], ...]}`` or ``{"error": errno}``: NBD_OPT_LIST."""
    result: dict[str, Any] = json.loads(run_libnbd(_LIST, uri).stdout)
    return result


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30,
               step: float = 0.02) -> Any:
    """Poll ``check`` until it returns something true (returned), failing after
    ``timeout`` seconds with ``what`` in the message."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def assert_same_many(pynbd_server: Callable[..., Any], nbdkit_server: Callable[..., Any],
                     cases: Sequence[tuple[Sequence[str], Sequence[Sequence[Any]]]],
                     **kw: Any) -> list[dict[str, Any]]:
    """:func:`side_by_side.assert_same` for each (args, ops) of ``cases``, four at a time;
    pynbd's views, in order."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(assert_same, pynbd_server, nbdkit_server, args, ops, **kw)
                   for args, ops in cases]
        return [f.result() for f in futures]


_DESCRIBE = r'''
import json, sys, nbd
h = nbd.NBD()
h.set_full_info(True)
try:
    h.connect_uri(sys.argv[1])
except nbd.Error as e:
    print(json.dumps({"error": e.errnum})); sys.exit(0)
out = {"canonical": h.get_canonical_export_name(), "data": h.pread(16, 0).decode()}
try:
    out["description"] = h.get_export_description()
except nbd.Error:
    out["description"] = None
h.shutdown()
print(json.dumps(out))
'''


def describe(sock: str, export: str) -> dict[str, Any]:
    """Connect to ``export`` of the server on Unix socket ``sock`` asking for full
    information: its canonical name, description and first 16 bytes (``{"error": errno}``
    if the connection fails)."""
    uri = unix_uri(sock, export)
    result: dict[str, Any] = json.loads(run_libnbd(_DESCRIBE, uri).stdout)
    return result
