"""Helpers for the caching filters' tests (cache, cow, readahead).

:class:`Disk` is a RAM disk plugin that records every call and can hold a read until the
test lets it go; :func:`open_chain` builds a configured chain of filters over it in this
process, as ``pynbd serve`` does, and opens a connection. :data:`SCRIPT` is an nbdkit-API
Python plugin both servers run (``nbdkit python`` and ``pynbd serve python``): a RAM disk
whose cache requests, reads and writes are appended to a log file, optionally with reads
that wait, for the tests that compare pynbd with nbdkit.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Filter,
    FuaMode,
    Plugin,
    ThreadModel,
)
from pynbd.server.backend import Chain, Context

__all__ = ["SCRIPT", "Disk", "open_chain", "parallel", "served_while_one_waits", "temp_files_of",
           "wait_for", "write_script"]

KiB = 1024


class Disk(Plugin):
    """A RAM disk that records its calls as (name, count, offset, flags).

    ``hold(offset)`` makes the next read starting at ``offset`` wait until
    ``release(offset)``; ``holding(offset)`` waits until that read has started. ``fail_writes`` makes pwrite
    fail with EIO.
    """

    name = "disk"
    thread_model = ThreadModel.PARALLEL

    def __init__(self, size: int = 1 << 20, data: bytes | None = None,
                 cache: CacheMode = CacheMode.NATIVE, fua: FuaMode = FuaMode.NATIVE,
                 flush: bool = True) -> None:
        self.data = bytearray(data if data is not None else bytes(size))
        self.calls: list[tuple[Any, ...]] = []
        self.fail_writes = False
        self._cache = cache
        self._fua = fua
        self._flush = flush
        self._lock = threading.Lock()
        self._gates: dict[int, tuple[threading.Event, threading.Event]] = {}

    def _record(self, *call: Any) -> None:
        with self._lock:
            self.calls.append(call)

    def named(self, *names: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [c for c in self.calls if c[0] in names]

    def forget(self) -> None:
        with self._lock:
            self.calls.clear()

    def hold(self, offset: int) -> None:
        self._gates[offset] = (threading.Event(), threading.Event())

    def holding(self, offset: int, timeout: float = 10) -> None:
        assert self._gates[offset][0].wait(timeout), f"no read at {offset} started"

    def release(self, offset: int) -> None:
        self._gates.pop(offset)[1].set()

    def get_size(self, h: Any) -> int:
        return len(self.data)

    def can_cache(self, h: Any) -> CacheMode:
        return self._cache

    def can_fua(self, h: Any) -> FuaMode:
        return self._fua

    def can_flush(self, h: Any) -> bool:
        return self._flush

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        self._record("pread", count, offset, flags)
        with self._lock:
            gate = self._gates.get(offset)
            if gate is not None and gate[0].is_set():
                gate = None  # held once: later reads there go through
        if gate is not None:
            gate[0].set()
            assert gate[1].wait(30), "a held read was never released"
        return bytes(self.data[offset:offset + count])

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        self._record("pwrite", len(buf), offset, flags)
        if self.fail_writes:
            raise CommandError(errno.EIO, "disk: write failed")
        self.data[offset:offset + len(buf)] = buf

    def flush(self, h: Any, flags: int) -> None:
        self._record("flush", 0, 0, flags)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._record("trim", count, offset, flags)
        self.data[offset:offset + count] = bytes(count)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._record("zero", count, offset, flags)
        self.data[offset:offset + count] = bytes(count)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._record("cache", count, offset, flags)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        """4K pages of zeroes are holes."""
        out: list[Extent] = []
        page = 4 * KiB
        pos = offset - offset % page
        while pos < offset + count:
            typ = EXTENT_HOLE | EXTENT_ZERO if not any(self.data[pos:pos + page]) else 0
            out.append((pos, page, typ))
            pos += page
        return out


def open_chain(plugin: Plugin, *layers: tuple[type[Filter], list[str]],
               readonly: bool = False) -> tuple[Chain, Context]:
    """A chain of ``layers`` (filter class, ["key=value", ...]; outermost first) over
    ``plugin``, configured and made ready as ``pynbd serve`` does, with one connection
    open. The caller calls ``chain.cleanup()`` (it closes the temporary files)."""
    chain = Chain(plugin, [cls() for cls, _ in layers])
    chain.load()
    for _, params in layers:
        for p in params:
            key, _, value = p.partition("=")
            chain.config(key, value)
    chain.config_complete()
    chain.get_ready()
    return chain, chain.open(readonly, "", False)


def wait_for(what: Callable[[], Any], timeout: float = 20, message: str = "") -> Any:
    """Poll ``what()`` until it returns something true (for a state another process or
    thread reaches); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(message or f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def temp_files_of(pid: int, tmpdir: Path) -> list[tuple[str, int]]:
    """The files process ``pid`` holds open in ``tmpdir``: (link target, allocated bytes).
    An unlinked file's target ends with " (deleted)"."""
    out = []
    prefix = os.fspath(tmpdir) + "/"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out.append((target, st.st_blocks * 512))
    return out


#: An nbdkit-API plugin script run by both servers. Parameters: size=BYTES, log=PATH (each
#: cache, pread and pwrite call appended as "NAME OFFSET COUNT"), hold=PATH (a read at
#: offset 0 waits while PATH exists), parallel=0|1 (thread model), prefetch=0|1 (whether it
#: can cache natively).
SCRIPT = r'''
import builtins
import os
import time

import nbdkit

API_VERSION = 2
size = 1 << 20
log = None
hold = None
parallel = True
has_cache = True
disk = None


def config(key, value):
    global size, log, hold, parallel, has_cache
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "log":
        log = value
    elif key == "hold":
        hold = value
    elif key == "parallel":
        parallel = value == "1"
    elif key == "prefetch":
        has_cache = value == "1"
    else:
        raise RuntimeError("unknown parameter " + key)


def config_complete():
    global disk
    disk = bytearray(size)


def thread_model():
    if parallel:
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def _log(*words):
    if log:
        with builtins.open(log, "a") as f:
            f.write(" ".join(str(w) for w in words) + "\n")


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    while hold and offset == 0 and os.path.exists(hold):
        time.sleep(0.01)
    _log("pread", offset, len(buf))
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _log("pwrite", offset, len(buf))
    disk[offset:offset + len(buf)] = buf


def can_cache(h):
    return nbdkit.CACHE_NATIVE if has_cache else nbdkit.CACHE_NONE


def cache(h, count, offset, flags):
    _log("cache", offset, count)
'''


def write_script(d: Path) -> Path:
    path = d / "logdisk.py"
    path.write_text(SCRIPT)
    return path


_TWO_CLIENTS = r"""
import os, sys, threading, time
import nbd
uri, hold = sys.argv[1], sys.argv[2]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
got = []
t = threading.Thread(target=lambda: got.append(a.pread(512, 0)))
t.start()
start = time.monotonic()
b.pwrite(b"z" * 512, 1 << 19)
assert b.pread(512, 1 << 19) == b"z" * 512
seconds = time.monotonic() - start
waiting = t.is_alive()
os.unlink(hold)
t.join()
print(seconds, waiting, got == [bytes(512)])
"""


def served_while_one_waits(uri: str, hold: Path) -> tuple[float, bool, bool]:
    """Client A reads offset 0, held by :data:`SCRIPT` while ``hold`` exists; client B
    writes and reads at 512K meanwhile. Returns (B's seconds, whether A was still waiting
    when B was answered, whether A then got its data); the hold is lifted either way."""
    from tests.helpers import run_libnbd

    try:
        out = run_libnbd(_TWO_CLIENTS, uri, hold, timeout=60).stdout.split()
    finally:
        if hold.exists():
            hold.unlink()
    return float(out[0]), out[1] == "True", out[2] == "True"


# ---- side by side with nbdkit ------------------------------------------------------------


def run_both(args: list[str], env: dict[str, str] | None = None,
             timeout: float = 60) -> dict[str, tuple[int, str]]:
    """``SERVER -U - ARGS --run true`` under pynbd and nbdkit: {name: (exit status, the
    error messages without the server's prefix)}; for configurations that fail, or that
    start and exit at once."""
    import subprocess

    from tests.helpers import PYNBD, peer_env, require

    out = {}
    for name, argv in (("pynbd", [*PYNBD, "serve"]), ("nbdkit", [require("nbdkit")])):
        cp = subprocess.run([*argv, "-U", "-", *args, "--run", "true"], check=False,
                            capture_output=True, text=True, timeout=timeout,
                            env=peer_env(env), stdin=subprocess.DEVNULL)
        errors = [line.split(" error: ", 1)[1] for line in cp.stderr.splitlines()
                  if " error: " in line]
        assert "Traceback" not in cp.stderr, cp.stderr
        out[name] = (cp.returncode, "\n".join(errors))
    return out


def assert_same_errors(filter_args: list[str], cases: list[list[str]],
                       env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Each case (parameters after ``FILTER_ARGS``) gives the same exit status and error
    message under both servers; returns nbdkit's (status, message) per case. The cases run
    a few at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda params: run_both([*filter_args, *params], env), cases))
    for params, both in zip(cases, results, strict=True):
        assert both["pynbd"] == both["nbdkit"], (params, both)
    return [both["nbdkit"] for both in results]


def libnbd_steps(uri: str, steps: str, *args: str) -> list[Any]:
    """Run ``steps`` (Python with ``h``, a connected libnbd handle, ``args`` and ``out``, a
    list to append results to) under libnbd's bindings; returns ``out``."""
    import json

    from tests.helpers import run_libnbd

    code = ("import json, sys, hashlib, os\nimport nbd\n"
            "h = nbd.NBD(); h.add_meta_context('base:allocation'); h.connect_uri(sys.argv[1])\n"
            "args = sys.argv[2:]\nout = []\n" + steps +
            "\nh.shutdown()\nprint(json.dumps(out))\n")
    return json.loads(run_libnbd(code, uri, *args).stdout)  # type: ignore[no-any-return]


def parallel(fn: Callable[..., Any], cases: list[Any], workers: int = 4) -> list[Any]:
    """``[fn(*case) for case in cases]``, a few at a time (each case starts servers: most of
    the time is spent waiting for them)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda case: fn(*case), cases))


def same_on_files(pynbd_server: Any, nbdkit_server: Any, args: list[str], ops: list[Any],
                  image: Path, fix: Callable[[dict[str, Any]], None] | None = None,
                  tag: str = "") -> dict[str, Any]:
    """Like side_by_side.assert_same for a plugin over a file: ``"{disk}"`` in ``args`` is
    replaced by a fresh copy of ``image`` for each server; the views must be the same (after
    ``fix(nbdkit_view)``, for a documented difference), and so must the files afterwards.
    ``tag`` names the copies (for several comparisons at once). Returns pynbd's view."""
    import shutil

    from tests.side_by_side import assert_views_equal, probe

    views, files = {}, {}
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        disk = image.with_name(f"{image.name}.{tag}{name}")
        shutil.copy(image, disk)
        srv = factory(*(str(disk) if a == "{disk}" else a for a in args))
        views[name] = probe(srv.uri, ops)
        srv.stop()
        files[name] = disk.read_bytes()
    if fix is not None:
        fix(views["nbdkit"])
    assert_views_equal(views["pynbd"], views["nbdkit"], " ".join(args))
    assert files["pynbd"] == files["nbdkit"], " ".join(args)
    return views["pynbd"]
