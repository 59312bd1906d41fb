"""Serve the same command line under nbdkit and pynbd, and compare what a client sees.

The client is libnbd's own Python bindings (the reference client, run under the system
interpreter), so a comparison never depends on pynbd's client. One probe connects, reads the
export's size and flags, runs a list of operations and reports each one's outcome: data (as
bytes, hex-encoded) or the errno it failed with; extents as lists of (length, flags).

    def test_offset(pynbd_server, nbdkit_server):
        assert_same(pynbd_server, nbdkit_server, ["--filter=offset", "pattern", "1M",
                    "offset=4096", "range=65536"],
                    ops=[("pread", 512, 0), ("extents", 65536, 0)])

Operations (tuples): ``("pread", count, offset)``, ``("pread", count, offset, flags)``,
``("pwrite", data_bytes, offset[, flags])``, ``("zero", count, offset[, flags])``,
``("trim", count, offset[, flags])``, ``("cache", count, offset)``, ``("flush",)``,
``("extents", count, offset[, flags])`` (base:allocation), ``("size",)``.
Flags are libnbd's (``nbd.CMD_FLAG_FUA`` = 1, ``NO_HOLE`` = 2, ``DF`` = 4, ``REQ_ONE`` = 8,
``FAST_ZERO`` = 16).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from tests.helpers import Server, run_libnbd

__all__ = ["FLAG_NAMES", "assert_same", "probe", "serve_both", "with_export"]

#: What the probe reports about an export, besides size (libnbd's getters).
FLAG_NAMES = ("is_read_only", "can_flush", "can_fua", "is_rotational", "can_trim", "can_zero",
              "can_fast_zero", "can_df", "can_multi_conn", "can_cache")

_PROBE = r'''
import json, sys, nbd
uri, ops, opts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
h = nbd.NBD()
if opts.get("export") is not None:
    h.set_export_name(opts["export"])
h.add_meta_context("base:allocation")
if opts.get("no_sr"):
    h.set_request_structured_replies(False)
out = {}
try:
    h.connect_uri(uri)
except nbd.Error as e:
    print(json.dumps({"connect_error": e.errnum, "connect_message": e.string})); sys.exit(0)
out["size"] = h.get_size()
out["flags"] = {}
for f in FLAGS:
    try:
        out["flags"][f] = getattr(h, f)()
    except nbd.Error as e:
        out["flags"][f] = "error %s" % e.errnum
out["structured"] = h.get_structured_replies_negotiated()
try:
    out["base_allocation"] = h.can_meta_context("base:allocation")
except nbd.Error:
    out["base_allocation"] = None
res = []
for op in ops:
    kind, args = op[0], op[1:]
    try:
        if kind == "pread":
            res.append(["data", h.pread(*args).hex()])
        elif kind == "pwrite":
            data = bytes.fromhex(args[0])
            h.pwrite(data, *args[1:]); res.append(["ok"])
        elif kind == "zero":
            h.zero(*args); res.append(["ok"])
        elif kind == "trim":
            h.trim(*args); res.append(["ok"])
        elif kind == "cache":
            h.cache(*args); res.append(["ok"])
        elif kind == "flush":
            h.flush(*args); res.append(["ok"])
        elif kind == "size":
            res.append(["size", h.get_size()])
        elif kind == "extents":
            got = []
            def cb(meta, offset, entries, err):
                if meta == "base:allocation":
                    got.extend(entries)
                return 0
            h.block_status(args[0], args[1], cb, *args[2:])
            res.append(["extents", got])
        else:
            raise SystemExit("unknown op %r" % kind)
    except nbd.Error as e:
        res.append(["error", e.errnum])
out["results"] = res
try:
    h.shutdown()
except nbd.Error:
    pass
print(json.dumps(out))
'''.replace("FLAGS", repr(FLAG_NAMES))


def _encode(ops: Sequence[Sequence[Any]]) -> str:
    enc = []
    for op in ops:
        op = list(op)
        if op[0] == "pwrite":
            op[1] = bytes(op[1]).hex()
        enc.append(op)
    return json.dumps(enc)


def with_export(uri: str, export: str) -> str:
    """``uri`` naming ``export`` instead (libnbd's connect_uri takes the export name from the
    URI's path, whatever set_export_name said)."""
    parts = urllib.parse.urlsplit(uri)
    path = "/" + urllib.parse.quote(export, safe="")
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


def probe(uri: str, ops: Sequence[Sequence[Any]] = (), *, export: str | None = None,
          no_sr: bool = False, timeout: float = 60) -> dict[str, Any]:
    """Connect to ``uri`` (for ``export`` if given) with libnbd, run ``ops``, return what was
    seen (a dict)."""
    if export is not None:
        uri = with_export(uri, export)
    opts = {"export": None, "no_sr": no_sr}
    cp = run_libnbd(_PROBE, uri, _encode(ops), json.dumps(opts), timeout=timeout)
    result: dict[str, Any] = json.loads(cp.stdout)
    for r in result.get("results", ()):
        if r[0] == "data":
            r[1] = bytes.fromhex(r[1])
    return result


def serve_both(pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server],
               args: Sequence[str | os.PathLike[str]], **kw: Any) -> tuple[Server, Server]:
    """Start ``pynbd serve -f -U SOCK ARGS`` and ``nbdkit -f -U SOCK ARGS``."""
    return pynbd_server(*args, **kw), nbdkit_server(*args, **kw)


def assert_same(pynbd_server: Callable[..., Server], nbdkit_server: Callable[..., Server],
                args: Sequence[str | os.PathLike[str]], ops: Sequence[Sequence[Any]] = (),
                *, export: str | None = None, no_sr: bool = False,
                fresh: bool = True) -> dict[str, Any]:
    """Serve ``args`` under both servers, probe both with ``ops``, assert the same view.

    With ``fresh`` (the default) each server is started for this comparison only, so writes
    in ``ops`` start from the same state. Returns pynbd's view for further checks.
    """
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    try:
        got = probe(p.uri, ops, export=export, no_sr=no_sr)
        want = probe(n.uri, ops, export=export, no_sr=no_sr)
    finally:
        if fresh:
            p.stop()
            n.stop()
    assert_views_equal(got, want, " ".join(map(str, args)))
    return got


def assert_views_equal(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Compare two probe results key by key, with a readable message for the first difference."""
    for key in ("connect_error", "size", "flags", "structured", "base_allocation"):
        assert got.get(key) == want.get(key), (
            f"{what}: {key}: pynbd {got.get(key)!r}, nbdkit {want.get(key)!r}")
    g, w = got.get("results", []), want.get("results", [])
    assert len(g) == len(w)
    for i, (a, b) in enumerate(zip(g, w, strict=True)):
        if a != b:
            raise AssertionError(f"{what}: operation {i}: {_difference(a, b)}")


def _difference(a: Any, b: Any) -> str:
    """Where two results differ: for two reads, the first differing offset and the bytes
    around it; otherwise both results, shortened."""
    da = a[1] if isinstance(a, list) and len(a) == 2 and a[0] == "data" else None
    db = b[1] if isinstance(b, list) and len(b) == 2 and b[0] == "data" else None
    if isinstance(da, bytes | bytearray) and isinstance(db, bytes | bytearray):
        at = next((k for k, (x, y) in enumerate(zip(da, db)) if x != y), min(len(da), len(db)))
        lo = max(0, at - 8)
        return (f"reads of {len(da)} (pynbd) and {len(db)} (nbdkit) bytes differ first at "
                f"byte {at}: pynbd {bytes(da[lo:at + 24])!r}, nbdkit {bytes(db[lo:at + 24])!r}")
    sa, sb = repr(a), repr(b)
    return f"pynbd {sa[:300]}, nbdkit {sb[:300]}"
