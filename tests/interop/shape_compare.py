"""Side-by-side helpers for the shape filters' interop tests (offset, partition, truncate...).

Built on tests/side_by_side.py, with what these filters need on top:

- each server gets its own copy of the disk image files named in ``copies`` (writes through
  one must not show through the other), and the copies are compared byte for byte after;
- extents are compared as what they say about the bytes asked for: clipped to the request
  and with neighbours of the same type joined. nbdkit's server passes on a final extent
  reaching past the request and does not join extents whose types differ only in bits the
  protocol does not define; pynbd's clips and joins. Both are valid replies (the NBD spec
  lets the last extent run past the request) and say the same about every byte asked for;
- :func:`bad_params` runs many command lines that must fail, under both servers, and
  checks that pynbd prints nbdkit's message (one line) and exits 1;
- :func:`nbdinfo` for what the probe does not show (block sizes, export description).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pynbd.errors import CommandError
from pynbd.server.backend import Chain
from pynbd.server.main import apply_params, load_filter, load_plugin
from tests import side_by_side
from tests.helpers import PYNBD, ROOT, Server, peer_env, require, run_libnbd, run_peer
from tests.side_by_side import assert_views_equal, probe

__all__ = ["Factory", "assert_same_many", "assert_same_open", "assert_same_shape", "bad_params",
           "clip_extents", "infos", "nbdinfo", "pynbd_main_exit", "views"]

Factory = Callable[..., Server]


def clip_extents(view: dict[str, Any], ops: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """``view`` with every extents result clipped to its request and joined by type."""
    for op, res in zip(ops, view.get("results", ()), strict=False):
        if op[0] != "extents" or res[0] != "extents":
            continue
        want, flat = op[1], res[1]
        out: list[int] = []
        total = 0
        for length, typ in zip(flat[0::2], flat[1::2], strict=True):
            length = min(length, want - total)
            if length <= 0:
                break
            total += length
            typ &= 3  # base:allocation defines HOLE (1) and ZERO (2)
            if out and out[-1] == typ:
                out[-2] += length
            else:
                out += [length, typ]
        res[1] = out
    return view


_copy_number = itertools.count()


def _per_server(args: Sequence[str | os.PathLike[str]], copies: Sequence[Path],
                tag: str) -> tuple[list[str], list[Path]]:
    """``args`` with each path of ``copies`` replaced by a fresh copy for one server."""
    made: dict[str, Path] = {}
    for src in copies:
        dst = src.with_name(f"{src.name}.{tag}.{next(_copy_number)}")
        shutil.copyfile(src, dst)
        made[os.fspath(src)] = dst
    out = []
    for arg in args:
        text = os.fspath(arg)
        for name, copy in made.items():
            text = text.replace(name, os.fspath(copy))
        out.append(text)
    return out, list(made.values())


def _probe(uri: str, ops: Sequence[Sequence[Any]], export: str | None, no_sr: bool,
           strict: bool) -> dict[str, Any]:
    """side_by_side.probe; with ``strict`` False libnbd sends what it is told (no checks of
    alignment or bounds before the wire), to see what the server does with it."""
    if strict:
        return probe(uri, ops, export=export, no_sr=no_sr)
    script = side_by_side._PROBE.replace(
        'h.add_meta_context("base:allocation")\n',
        'h.add_meta_context("base:allocation")\nh.set_strict_mode(0)\n', 1)
    assert "set_strict_mode" in script
    opts = {"export": export, "no_sr": no_sr}
    cp = run_libnbd(script, uri, side_by_side._encode(ops), json.dumps(opts))
    result: dict[str, Any] = json.loads(cp.stdout)
    for r in result.get("results", ()):
        if r[0] == "data":
            r[1] = bytes.fromhex(r[1])
    return result


def views(pynbd_server: Factory, nbdkit_server: Factory,
          args: Sequence[str | os.PathLike[str]], ops: Sequence[Sequence[Any]] = (), *,
          copies: Sequence[Path] = (), export: str | None = None, no_sr: bool = False,
          strict: bool = True) -> tuple[dict[str, Any], dict[str, Any], list[bytes]]:
    """Serve ``args`` under both servers (each on its own copies), probe both with ``ops``:
    (pynbd's view, nbdkit's view, the copies' contents afterwards, pynbd's then nbdkit's).
    The two run at the same time (they share nothing)."""

    def one(factory: Factory, tag: str) -> tuple[dict[str, Any], list[bytes]]:
        a, made = _per_server(args, copies, tag)
        srv = factory(*a)
        try:
            seen = clip_extents(_probe(srv.uri, ops, export, no_sr, strict), ops)
        finally:
            srv.stop()
        return seen, [p.read_bytes() for p in made]

    with ThreadPoolExecutor(2) as pool:
        mine = pool.submit(one, pynbd_server, "pynbd")
        theirs = pool.submit(one, nbdkit_server, "nbdkit")
        (got, got_files), (want, want_files) = mine.result(), theirs.result()
    return got, want, got_files + want_files


def assert_same_shape(pynbd_server: Factory, nbdkit_server: Factory,
                      args: Sequence[str | os.PathLike[str]],
                      ops: Sequence[Sequence[Any]] = (), *, copies: Sequence[Path] = (),
                      export: str | None = None, no_sr: bool = False,
                      strict: bool = True) -> dict[str, Any]:
    """Both servers give the client the same size, flags, data, errors and extents, and
    leave the same bytes in the image files. Returns pynbd's view. ``strict=False`` turns
    libnbd's own checks off (see :func:`_probe`)."""
    got, want, files = views(pynbd_server, nbdkit_server, args, ops, copies=copies,
                             export=export, no_sr=no_sr, strict=strict)
    what = " ".join(os.fspath(a) for a in args)
    assert_views_equal(got, want, what)
    n = len(files) // 2
    for i, (mine, theirs) in enumerate(zip(files[:n], files[n:], strict=True)):
        assert mine == theirs, f"{what}: {copies[i].name} differs after the operations"
    return got


def assert_same_many(pynbd_server: Factory, nbdkit_server: Factory,
                     cases: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """:func:`assert_same_shape` for each (args, ops[, copies or keyword arguments]) of
    ``cases``, several at a time (the time goes into starting servers). Returns pynbd's
    views, in order."""
    def one(case: tuple[Any, ...]) -> dict[str, Any]:
        extra = case[2] if len(case) > 2 else {}
        kw = extra if isinstance(extra, dict) else {"copies": extra}
        return assert_same_shape(pynbd_server, nbdkit_server, case[0], case[1], **kw)

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, cases))


def infos(pynbd_server: Factory, nbdkit_server: Factory,
          cases: Sequence[Sequence[str | os.PathLike[str]]]) -> list[tuple[dict[str, Any],
                                                                          dict[str, Any]]]:
    """nbdinfo --json of each command line under pynbd and nbdkit, several at a time:
    [(pynbd's, nbdkit's), ...] in order."""
    def one(factory: Factory, args: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
        srv = factory(*args)
        try:
            return nbdinfo(srv.uri)
        finally:
            srv.stop()

    with ThreadPoolExecutor(4) as pool:
        mine = [pool.submit(one, pynbd_server, a) for a in cases]
        theirs = [pool.submit(one, nbdkit_server, a) for a in cases]
        return [(m.result(), t.result()) for m, t in zip(mine, theirs, strict=True)]


def _nbdkit_open(nbdkit: str, args: Sequence[str]) -> tuple[int | None, str | None]:
    cp = subprocess.run([nbdkit, "-U", "-", *args, "--run", "nbdinfo --size $uri"],
                        capture_output=True, text=True, timeout=60, env=peer_env(),
                        stdin=subprocess.DEVNULL, check=False)
    if cp.returncode == 0:
        return int(cp.stdout), None
    m = re.search(r"^nbdkit: [^:]+: error: (.*)$", cp.stderr, re.MULTILINE)
    assert m, f"nbdkit {' '.join(args)}: exit {cp.returncode} {cp.stderr!r}"
    return None, m.group(1)


def _pynbd_open(args: Sequence[str]) -> tuple[int | None, str | None]:
    filters = [a.removeprefix("--filter=") for a in args if a.startswith("--filter=")]
    plugin, *params = [a for a in args if not a.startswith("--filter=")]
    plugin_cls = load_plugin(plugin)
    chain = Chain(plugin_cls(), [load_filter(f)() for f in filters])
    try:
        apply_params(chain, plugin_cls, params)
        chain.config_complete()
        chain.get_ready()
        try:
            ctx = chain.open(False, "", False)
        except CommandError as e:
            return None, e.message
        try:
            size = ctx.get_size()
            ctx.block_size()  # asked by the server too, before it answers the client
            return size, None
        except CommandError as e:
            return None, e.message
        finally:
            ctx.close()
    finally:
        chain.cleanup()


def assert_same_open(cases: Sequence[Sequence[str | os.PathLike[str]]]) -> list[int | None]:
    """For each command line (filters, plugin, parameters) of ``cases``: a client that
    connects gets the same size, or the connection fails with the same message (nbdkit's
    ``nbdkit: PLUGIN[1]: error: MESSAGE``). nbdkit runs with nbdinfo; pynbd's chain is opened
    in this process as its server would (open, prepare, get_size), which is what the errors
    of a filter's open depend on, and costs no server start-up. Returns the sizes."""
    nbdkit = require("nbdkit")
    require("nbdinfo")
    argvs = [[os.fspath(a) for a in c] for c in cases]
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda a: _nbdkit_open(nbdkit, a), argvs))
    sizes = []
    for argv, want in zip(argvs, theirs, strict=True):
        got = _pynbd_open(argv)
        assert got == want, f"{' '.join(argv)}: pynbd {got}, nbdkit {want}"
        sizes.append(got[0])
    return sizes


def nbdinfo(uri: str) -> dict[str, Any]:
    """nbdinfo --json's description of the (only) export."""
    out = run_peer("nbdinfo", "--json", uri).stdout
    export: dict[str, Any] = json.loads(out)["exports"][0]
    return export


_RUNNER = r'''
import contextlib, io, json, sys
from pynbd.server.main import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
'''


def bad_params(cases: Sequence[Sequence[str]], cwd: str | os.PathLike[str] | None = None) -> None:
    """Each command line in ``cases`` (``--run true`` is added, so one that does not fail
    cannot hang) exits 1 under nbdkit and pynbd, and pynbd's one line of error is nbdkit's
    last one (``nbdkit: error: M`` against ``pynbd serve: error: M``).

    pynbd's cases run in one interpreter (one ``main()`` call each): a process per case
    would cost a Python start-up each.
    """
    nbdkit = require("nbdkit")
    argvs = [["-U", "-", *c, "--run", "true"] for c in cases]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cp = subprocess.run([*PYNBD[:1], "-c", _RUNNER, json.dumps(argvs)], capture_output=True,
                        text=True, timeout=120, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                        check=False)
    assert cp.returncode == 0, cp.stderr
    mine = json.loads(cp.stdout)
    for case, argv, (rc, err) in zip(cases, argvs, mine, strict=True):
        n = subprocess.run([nbdkit, *argv], capture_output=True, text=True, timeout=60,
                           cwd=cwd, stdin=subprocess.DEVNULL, check=False)
        theirs = [ln for ln in n.stderr.splitlines() if ln.startswith("nbdkit: error: ")]
        what = " ".join(case)
        assert n.returncode == 1 and theirs, f"nbdkit {what}: {n.returncode} {n.stderr!r}"
        assert rc == 1, f"pynbd serve {what}: exit {rc}, stderr {err!r}"
        lines = err.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"pynbd serve {what}: {err!r}"
        assert lines[0].removeprefix("pynbd serve: error: ") == \
            theirs[-1].removeprefix("nbdkit: error: "), f"{what}: {lines[0]!r} vs {theirs!r}"


def pynbd_main_exit(args: Sequence[str]) -> tuple[int, str]:
    """Run ``pynbd serve ARGS`` as its own process: (exit status, stderr)."""
    cp = subprocess.run([*PYNBD, "serve", *args], capture_output=True, text=True, timeout=60,
                        stdin=subprocess.DEVNULL, check=False)
    return cp.returncode, cp.stderr

