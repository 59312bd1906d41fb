"""The sh plugin beside nbdkit 1.32's: the same scripts served by both, what clients see and
what the logs say compared in the same test.

The scripts are in tests/data/sh/: disk.sh (a writable disk), errors.sh (every way a read
can fail), answers.sh (each method runs the code a test wrote in $SH_ANSWERS/<method> or put
in the environment variable SH_<method>, so a test states a script's answers inline).

Most cases share one pair of servers running answers.sh (``live``): a case writes the
script's answers, then connects to both (each connection asks its questions afresh).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PYNBD,
    Server,
    require,
    run_libnbd,
    run_peer,
    short_tmpdir,
    start_server,
    wait_listening,
)

from tests.side_by_side import assert_views_equal, probe

DATA = Path(__file__).resolve().parents[1] / "data" / "sh"
DISK, ANSWERS, ERRORS = (str(DATA / n) for n in ("disk.sh", "answers.sh", "errors.sh"))
EPERM, EIO, ENOMEM, ENOENT, ENOSPC, EINVAL, ESHUTDOWN = 1, 5, 12, 2, 28, 22, 108
FUA, FAST_ZERO, REQ_ONE = 1, 16, 8
ZERO_512 = bytes(512)

#: Reads of a 512-byte block of errors.sh, and what the client and the log get.
ERROR_CASES = [
    # block, client errno, logged message (after "SCRIPT: ")
    (0, ENOSPC, "custom message"),
    (1, EPERM, ""),
    (2, EIO, "EPIPE"),
    (3, EIO, "EINVALID foo"),
    (4, EIO, "script exited with error, but did not print an error message on stderr"),
    (5, ESHUTDOWN, "line1"),
    (6, EPERM, "read-only"),           # EROFS goes to the client as EPERM
    (7, ENOSPC, "quota"),              # EDQUOT as ENOSPC
    (8, ENOSPC, "too big"),            # EFBIG as ENOSPC
    (9, EINVAL, "not supported"),      # ENOTSUP outside a fast zero: EINVAL
    (10, EINVAL, "not supported"),
    (11, EINVAL, "overflow"),          # EOVERFLOW outside a DF read: EINVAL
    (12, EIO, "pread method returned unexpected code (3/false)"),
    (13, ENOMEM, ""),                  # status 4 is an error like 1 (nbdkit 1.32)
    (14, EINVAL, "tab"),
    (15, ENOSPC, ""),
    (16, EIO, ""),
    (17, EIO, "ENOENT"),               # not a name nbdkit knows
    (18, EIO, "lower"),                # "Eio": names are read in any case
    (19, EIO, "script exited with error, but did not print an error message on stderr"),
]


def side_by_side(pynbd_server: Any, nbdkit_server: Any, args: Sequence[str],
                 ops: Sequence[Sequence[Any]] = (), env: Mapping[str, str] | None = None,
                 export: str | None = None) -> tuple[dict[str, Any], Server, Server]:
    """Serve ``args`` under both servers (with ``env``), probe both with ``ops``, assert the
    client saw the same; return pynbd's view and the two (stopped) servers."""
    p = pynbd_server(*args, env=env)
    n = nbdkit_server(*args, env=env)
    try:
        got = probe(p.uri, ops, export=export)
        want = probe(n.uri, ops, export=export)
    finally:
        p.stop()
        n.stop()
    assert_views_equal(got, want, " ".join(args))
    return got, p, n


_PREFIX = re.compile(r"^(?:nbdkit: (?:\w+\[\d+\]: |\w+\.\d+: )?|pynbd: )error: ")


def errors_logged(srv: Server | str) -> list[str]:
    """The error lines a server logged, without the server's prefix; the script's private
    directory written $tmpdir; pynbd's own per-client lines (which nbdkit has not) left out."""
    out = []
    text = srv if isinstance(srv, str) else srv.stderr
    for line in text.splitlines():
        m = _PREFIX.match(line)
        if m is None:
            continue
        msg = re.sub(r"/tmp/(?:nbdkit|pynbdsh|pynbdeval)\w+", "$tmpdir", line[m.end():])
        if not re.match(r"client \d+: ", msg):
            out.append(msg)
    return out


def answers(**methods: str) -> dict[str, str]:
    return {f"SH_{k}": v for k, v in methods.items()}


class Live:
    """pynbd and nbdkit serving answers.sh with answers read from files of one directory."""

    def __init__(self, d: Path) -> None:
        self.dir = d / "answers"
        self.dir.mkdir()
        env = {"SH_ANSWERS": str(self.dir)}
        self.servers = [
            start_server([*cmd, "-f", "-U", str(d / f"{i}.sock"), "sh", ANSWERS],
                         logdir=d / f"{i}.log", sock=d / f"{i}.sock", env=env)
            for i, cmd in enumerate(([*PYNBD, "serve"], [require("nbdkit")]))]

    def answer(self, **methods: str) -> None:
        """Set the script's answers (get_size and pread read zeroes unless given)."""
        for f in self.dir.iterdir():
            f.unlink()
        for method, code in {"get_size": "echo 1M", "pread": READ_ZEROES, **methods}.items():
            (self.dir / method).write_text(code + "\n")

    def each(self, client: Any) -> list[tuple[Any, list[str]]]:
        """``client(uri)`` against both servers: what it returned, what each server logged."""
        out = []
        for srv in self.servers:
            mark = len(srv.stderr)
            got = client(srv.uri)
            out.append((got, errors_logged(srv.stderr[mark:])))
        return out

    def same(self, ops: Sequence[Sequence[Any]] = (), **methods: str) -> dict[str, Any]:
        """Answer with ``methods``, probe both with ``ops``: the same view and the same log."""
        self.answer(**methods)
        (got, elog), (want, nlog) = self.each(lambda uri: probe(uri, ops))
        assert_views_equal(got, want, repr(methods))
        assert elog == nlog
        return got

    def same_libnbd(self, script: str, **methods: str) -> str:
        """Answer with ``methods``, run a libnbd ``script`` on both: same output, same log."""
        self.answer(**methods)
        (got, elog), (want, nlog) = self.each(lambda uri: run_libnbd(script, uri).stdout)
        assert (got, elog) == (want, nlog)
        return got  # type: ignore[no-any-return]

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()


@pytest.fixture(scope="module")
def live() -> Any:
    d = short_tmpdir()
    pair = Live(d)
    try:
        yield pair
    finally:
        pair.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


# ---- a writable disk, through every kind of client -----------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * 256)  # 64K: every request forks a dd
    return p


def test_disk_requests_same_as_nbdkit(pynbd_server, nbdkit_server, image) -> None:
    ops = [("pread", 4096, 0), ("pread", 512, 60_000), ("pwrite", b"A" * 1024, 512),
           ("pwrite", b"B" * 512, 8192, FUA), ("pread", 4096, 0), ("zero", 4096, 32768),
           ("zero", 512, 1024, FUA), ("trim", 512, 0), ("flush",), ("pread", 4096, 61440),
           ("cache", 4096, 0), ("extents", 65536, 0), ("extents", 4096, 4096, REQ_ONE),
           ("pread", 512, 65536 - 512), ("pread", 1024, 65536 - 512)]
    got, _, _ = side_by_side(pynbd_server, nbdkit_server, ["sh", DISK, str(image)], ops)
    assert got["flags"]["can_fua"] and got["flags"]["can_cache"]
    assert got["results"][4][1][512:1536] == b"A" * 1024
    assert got["results"][11] == ["extents", [32768, 0, 32768, 2]]
    assert got["results"][-1][0] == "error"  # beyond the end


def test_disk_nbdinfo_same_as_nbdkit(pynbd_server, nbdkit_server, image) -> None:
    views = []
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("sh", DISK, str(image))
        out = json.loads(run_peer("nbdinfo", "--json", srv.uri).stdout)
        for e in out["exports"]:
            e.pop("uri", None)
            e.pop("block_size_preferred", None)  # pynbd advertises block sizes (allowed)
            e.pop("block_size_minimum", None)
            e.pop("block_size_maximum", None)
        views.append(out)
        srv.stop()
    assert views[0] == views[1]
    assert views[0]["exports"][0]["description"] == "a copy of an image"


def test_disk_nbdcopy_and_qemu_img(pynbd_server, nbdkit_server, image, tmp_path) -> None:
    want = image.read_bytes()
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        srv = factory("sh", DISK, str(image))
        out = tmp_path / f"{name}.img"
        run_peer("nbdcopy", srv.uri, str(out))
        assert out.read_bytes() == want, name
        run_peer("qemu-img", "compare", "-f", "raw", str(image), srv.uri)
        info = json.loads(run_peer("qemu-img", "info", "--output=json", srv.uri).stdout)
        assert info["virtual-size"] == len(want), name
        # Write through qemu-img, read back through nbdcopy.
        src = tmp_path / f"{name}.src"
        src.write_bytes(b"\x5a" * 16384)
        run_peer("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri)
        run_peer("nbdcopy", srv.uri, str(out))
        assert out.read_bytes()[:16384] == b"\x5a" * 16384, name
        srv.stop()


def test_dump_plugin_same_as_nbdkit(image) -> None:
    def dump(cmd: list[str]) -> dict[str, str]:
        cp = subprocess.run([*cmd, "--dump-plugin", "sh", DISK, str(image)],
                            capture_output=True, text=True, check=True, timeout=60)
        return dict(line.split("=", 1) for line in cp.stdout.splitlines())

    ours, theirs = dump([*PYNBD, "serve"]), dump([require("nbdkit")])
    for key in ("name", "max_thread_model", "thread_model", "magic_config_key",
                "max_known_status", "disk_sh"):
        assert ours.get(key) == theirs.get(key), key
    assert ours["thread_model"] == "serialize_requests"


# ---- how a script fails ---------------------------------------------------------------------


def test_every_error_path_same_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    ops = [("pread", 512, block * 512) for block, _, _ in ERROR_CASES]
    got, p, n = side_by_side(pynbd_server, nbdkit_server, ["sh", ERRORS], ops)
    assert [r for r in got["results"]] == [["error", e] for _, e, _ in ERROR_CASES]
    want = [f"{ERRORS}: {msg}" for _, _, msg in ERROR_CASES]
    assert errors_logged(p) == errors_logged(n) == want


def test_stderr_is_ignored_on_success_and_multiline_goes_to_debug(pynbd_server) -> None:
    srv = pynbd_server("-v", "sh", ERRORS)
    r = probe(srv.uri, [("pread", 512, 21 * 512), ("pread", 512, 5 * 512)])["results"]
    srv.stop()
    assert r == [["data", ZERO_512], ["error", ESHUTDOWN]]
    assert "EPERM stderr is ignored" not in srv.stderr
    assert f"debug: {ERRORS}: ESHUTDOWN line1\nline2" in srv.stderr


def test_errors_nbdkit_leaves_errno_to_chance(pynbd_server, nbdkit_server) -> None:
    """nbdkit 1.32 logs these but sets no errno of its own: the client gets whatever errno
    was last left in that thread. pynbd sends EIO (the signal case keeps stderr's errno, as
    nbdkit does). The log lines are the same."""
    cases = [(20, ENOSPC, "script terminated by signal 9"),
             (22, EIO, "the pread method is required"),
             (23, EIO, ("incorrect amount of data read: expecting 512 bytes but received 21 "
                       "bytes from the script"))]
    ops = [("pread", 512, block * 512) for block, _, _ in cases]
    p, n = pynbd_server("sh", ERRORS), nbdkit_server("sh", ERRORS)
    got = probe(p.uri, ops)["results"]
    probe(n.uri, ops)
    p.stop()
    n.stop()
    assert got == [["error", err] for _, err, _ in cases]
    # After a signal, stderr is read as for any error (its errno goes to the client).
    assert errors_logged(p) == [f"{ERRORS}: {msg}" for msg in (
        cases[0][2], "before the signal", cases[1][2], cases[2][2])]
    assert errors_logged(p) == errors_logged(n)


# ---- what "missing" (exit 2) and "false" (exit 3) mean for each method ------------------------


READ_ZEROES = "dd if=/dev/zero count=$3 iflag=count_bytes status=none"
ALL_OPS = [("pread", 512, 0), ("pwrite", b"x" * 512, 0), ("pwrite", b"x" * 512, 0, FUA),
           ("zero", 512, 0), ("zero", 512, 0, FAST_ZERO), ("trim", 512, 0), ("flush",),
           ("cache", 512, 0), ("extents", 1 << 20, 0)]


@pytest.mark.parametrize("case", [
    # only the required methods: a read-only disk, every can_* false
    {},
    # writable, with nothing behind the can_* answers
    {"can_write": "exit 0", "can_flush": "exit 0", "can_trim": "exit 0", "can_zero": "exit 0",
         "can_extents": "exit 0", "can_cache": "echo native", "can_fua": "echo native"},
    # writable with pwrite: zero falls back to pwrite, FUA is emulated by flush
    {"can_write": "exit 0", "pwrite": "cat >/dev/null", "can_zero": "exit 0", "can_flush": "exit 0",
         "flush": "exit 0"},
    # every boolean false (exit 3); can_fua/can_cache print their modes
    {"can_write": "exit 3", "can_flush": "exit 3", "is_rotational": "exit 3", "can_trim": "exit 3",
         "can_zero": "exit 3", "can_extents": "exit 3", "can_multi_conn": "exit 3",
         "can_fast_zero": "exit 3", "can_fua": "echo none", "can_cache": "echo none"},
    # every boolean true
    {"can_write": "exit 0", "can_flush": "exit 0", "is_rotational": "exit 0", "can_trim": "exit 0",
         "can_zero": "exit 0", "can_extents": "exit 0", "can_multi_conn": "exit 0",
         "can_fast_zero": "exit 0", "can_fua": "echo emulate", "can_cache": "echo emulate",
         "pwrite": "cat >/dev/null", "zero": "echo ENOTSUP no >&2; exit 1", "trim": "exit 0",
         "flush": "exit 0", "extents": "echo 0 1M hole,zero"},
    # exit 3 from methods that are not booleans
    {"can_write": "exit 0", "can_zero": "exit 0", "can_flush": "exit 0", "can_trim": "exit 0",
         "can_extents": "exit 0", "can_cache": "echo native", "pwrite": "exit 3", "zero": "exit 3",
         "trim": "exit 3", "flush": "exit 3", "cache": "exit 3", "extents": "exit 3"},
    # errors from the data methods, with the errno names nbdkit knows
    {"can_write": "exit 0", "can_zero": "exit 0", "can_flush": "exit 0", "can_trim": "exit 0",
         "can_extents": "exit 0", "can_cache": "echo native", "can_fua": "echo native",
         "pread": "echo EIO read >&2; exit 1", "pwrite": "echo ENOSPC full >&2; exit 1",
         "zero": "echo EROFS ro >&2; exit 1", "trim": "echo EPERM no >&2; exit 1",
         "flush": "echo ENOMEM flush >&2; exit 1", "cache": "echo EINVAL cache >&2; exit 1",
         "extents": "echo ESHUTDOWN bye >&2; exit 1"},
], ids=["required-only", "can-without-methods", "zero-by-pwrite", "all-false", "all-true",
        "false-from-data-methods", "errors-from-data-methods"])
def test_missing_and_false_same_as_nbdkit(live, case) -> None:
    ops = ALL_OPS
    if "can_zero" in case and "zero" not in case and "pwrite" not in case:
        # nbdkit 1.32.5 aborts here (backend_zero's assertion: the pwrite fallback fails
        # with the zero's stale EOPNOTSUPP); see test_zero_without_zero_or_pwrite.
        ops = [op for op in ALL_OPS if op[0] != "zero"]
    live.same(ops, **case)


def test_zero_without_zero_or_pwrite(pynbd_server) -> None:
    """can_write and can_zero true, zero and pwrite missing: the zero falls back to pwrite,
    which is not implemented (EIO). A fast zero fails at once with ENOTSUP."""
    env = answers(get_size="echo 1M", pread=READ_ZEROES, can_write="exit 0",
                  can_zero="exit 0", can_fast_zero="exit 0")
    srv = pynbd_server("sh", ANSWERS, env=env)
    got = probe(srv.uri, [("zero", 512, 0), ("zero", 512, 0, FAST_ZERO)])
    srv.stop()
    assert got["results"] == [["error", EIO], ["error", 95]]
    assert errors_logged(srv) == ["pwrite not implemented"]


def test_can_fast_zero_false_without_zero(live) -> None:
    live.same([("zero", 512, 0)], can_write="exit 0", pwrite="cat >/dev/null",
              can_fast_zero="exit 3")


# ---- what scripts print -------------------------------------------------------------------


@pytest.mark.parametrize("out", [
    "echo 1M", "echo 4096", "echo 2s", "echo '  1K'", "echo +2k", "echo 08",
    "echo 9223372036854775807", "echo abc", "printf '1M\\n\\n'", "echo -1", "echo 1x",
    "echo 1MB", "echo 99999999999E", "echo 1.5M", "printf ''", "echo 0x10",
    "echo 9223372036854775808", "printf '1M \\n'", "echo 1M; exit 3", "exit 2",
])
def test_get_size_output_same_as_nbdkit(live, out) -> None:
    live.same([("pread", 512, 0)], get_size=out)


_BLOCK_SIZE = """import nbd,sys
h=nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    print([h.get_block_size(i) for i in range(3)])
except nbd.Error as e:
    print('error')
"""


@pytest.mark.parametrize("out", [
    "echo 1 4K 1M", "printf '  1\\t512\\n1M\\n'", "echo 1 512 1M extra", "echo a b c", "echo 1 512", "exit 3",
])
def test_block_size_output_same_as_nbdkit(live, out) -> None:
    live.same_libnbd(_BLOCK_SIZE, block_size=out)


def test_block_size_maximum_advertised_is_at_most_32m(live) -> None:
    """A plugin's maximum over 32M: nbdkit 1.32 advertises it as it is, although it refuses
    data requests over 64M (its MAX_REQUEST_SIZE; a bug of nbdkit 1.32: the advertisement
    promises what the server does not accept); pynbd advertises at most 32M
    (MAX_PAYLOAD_ADVERTISED, docs/limits.md), the spec's default maximum, and accepts up
    to 64M."""
    live.answer(block_size="echo 512 4096 4294967295")
    (got, elog), (want, nlog) = live.each(lambda uri: run_libnbd(_BLOCK_SIZE, uri).stdout)
    assert want.strip() == "[512, 4096, 4294967295]"
    assert got.strip() == "[512, 4096, 33554432]"
    assert elog == nlog


#: Extents a plugin gets wrong (a gap, a first extent after the offset, none at all) are
#: checked by the core (server/backend.py) as nbdkit_add_extent checks them: EINVAL, and
#: nbdkit's message in the log.
@pytest.mark.parametrize("out", [
    "echo 0 64K; echo 64K 64K hole; echo 128K 128K hole,zero; echo 256K 768K 3",
    "printf '0 512K 2\\n512K 512K zero'", "echo '0 1M' ", "printf '0\\t1M\\t1\\n'",
    "echo 0", "echo; echo 0 1M", "echo 0 1M 3abc", "echo 0 1M -1", "echo 0 abc",
    "echo 0 1M; exit 3", "echo 0 2K; echo 2K 2K; echo 4K 1M hole",
    "echo 0 512K; echo 0 0",
    "echo 0 4K; echo 8K 4K",
    "echo 4K 4K",
    "true",
])
def test_extents_output_same_as_nbdkit(live, out) -> None:
    # Whole-disk requests: how far past a request the reply may reach is the core's business.
    ops = [("extents", 1 << 20, 0), ("extents", 1 << 20, 0, REQ_ONE)]
    live.same(ops, can_extents="exit 0", extents=out)


@pytest.mark.parametrize("method", ["can_fua", "can_cache"])
@pytest.mark.parametrize("out", ["echo none", "echo emulate", "echo native", "echo NATIVE",
                                 "printf native", "echo garbage", "exit 3"])
def test_fua_and_cache_modes_same_as_nbdkit(live, method, out) -> None:
    ops = [("pwrite", b"y" * 512, 0, FUA), ("cache", 4096, 0)]
    live.same(ops, can_write="exit 0", pwrite="cat >/dev/null", can_flush="exit 0",
              flush="exit 0", cache="exit 0", **{method: out})


_LIST = r'''
import json, sys, nbd
h = nbd.NBD(); h.set_opt_mode(True)
try:
    h.connect_uri(sys.argv[1])
    got = []
    h.opt_list(lambda n, d: got.append([n, d]) or 0)
except nbd.Error as e:
    got = "error"
print(json.dumps(got))
'''


@pytest.mark.parametrize("out", [
    "echo NAMES; echo a; echo b", "echo INTERLEAVED; echo a; echo da; echo b",
    r"printf 'NAMES+DESCRIPTIONS\na\nb\nc\nda\ndb\n'", "echo foo; echo bar", "true",
    r"printf 'NAMES\na\nb'", "printf foo", r"printf 'INTERLEAVED\na\nda'",
    r"printf 'NAMES+DESCRIPTIONS\na\nb\nda\ndb'", r"printf 'names\na\n'", "echo NAMES",
    r"printf 'NAMES\r\na\n'", "exit 3", "echo EINVAL bad >&2; exit 1", "exit 2",
    r"printf '\na\n'", r"printf 'INTERLEAVED\n\nthe default\nb\n\n'",  # "" is the default
])
def test_list_exports_output_same_as_nbdkit(live, out) -> None:
    live.same_libnbd(_LIST, list_exports=out, default_export="echo dflt")


_DESCRIPTION = """import nbd,sys
h=nbd.NBD(); h.set_full_info(True)
try:
    h.connect_uri(sys.argv[1]); print(repr(h.get_export_description()))
except nbd.Error as e:
    print('error')
"""


@pytest.mark.parametrize("out", [
    "echo foo", "printf foo", r"printf 'foo\nbar'", "echo NAMES; echo x",
    r"printf 'INTERLEAVED\n'", r"printf 'NAMES+DESCRIPTIONS\na\nb\n'", "true", "echo; echo x",
    r"printf 'NAMES\nx'", "printf INTERLEAVED", "exit 2",
])
def test_default_export_output_same_as_nbdkit(live, out) -> None:
    # open prints the name it was given as the handle; export_description prints the handle.
    live.same_libnbd(_DESCRIPTION, default_export=out, open='printf %s "$3"',
                     export_description='echo "name=[$2]"')


def test_default_export_failing_same_as_nbdkit(live) -> None:
    live.answer(default_export="exit 3")
    (got, elog), (want, nlog) = live.each(lambda uri: run_libnbd(_DESCRIPTION, uri).stdout)
    assert got == want == "error\n"
    # nbdkit's core adds a line of its own ('default export ("") not permitted').
    assert elog == nlog[:1] == [(f"{ANSWERS}: default_export method returned unexpected "
                                "code (3/false)")]


@pytest.mark.parametrize("out", ["echo h1", "printf 'two\\nlines\\n'", r"printf 'x\n\n'",
                                 "exit 3", "echo EPERM no >&2; exit 1", "exit 2"])
def test_open_output_same_as_nbdkit(live, out) -> None:
    live.same_libnbd(_DESCRIPTION, open=out, export_description='echo "[$2]"')


@pytest.mark.parametrize("out", ["echo a description", "printf 'no newline'",
                                 r"printf 'two\nlines\n\n'", "exit 2", "exit 3",
                                 "echo EIO >&2; exit 1"])
def test_export_description_output_same_as_nbdkit(live, out) -> None:
    live.same_libnbd(_DESCRIPTION, export_description=out)


# ---- bad scripts and bad command lines --------------------------------------------------------


def run_all(argvs: Sequence[Sequence[str]], cwd: Any = None,
            at_once: int = 6) -> list[tuple[int, str]]:
    """Run commands (``at_once`` at a time: most of each one's time is a start-up) with
    stdin /dev/null; each one's exit status and stderr."""
    out: list[tuple[int, str]] = []
    for i in range(0, len(argvs), at_once):
        procs = [subprocess.Popen(list(a), cwd=cwd, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for a in argvs[i:i + at_once]]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            out.append((proc.returncode, err))
    return out


CONFIG_CASES = [
    ["noexec.sh"], ["nonexistent.sh"], ["answers.sh", "a=b"], ["answers.sh", "bare"],
    [], ["a=b"], ["script=answers.sh", "script=answers.sh"], ["failing-load.sh"],
    ["false-load.sh"], ["magic.sh", "v1", "k=v"],
]


@pytest.fixture(scope="module")
def config_failures(tmp_path_factory: Any) -> tuple[Path, dict[str, list[tuple[int, str]]]]:
    """Every CONFIG_CASES command line under pynbd and nbdkit (which must refuse each):
    exit status and error lines, by case."""
    d = tmp_path_factory.mktemp("config")
    (d / "noexec.sh").write_text("#!/bin/sh\nexit 2\n")
    for name, body in (("answers.sh", Path(ANSWERS).read_text()),
                       ("failing-load.sh", '#!/bin/sh\necho "EIO load failed" >&2\nexit 1\n'),
                       ("false-load.sh", '#!/bin/sh\n[ "$1" = load ] && exit 3\nexit 2\n'),
                       ("magic.sh", ('#!/bin/sh\ncase "$1" in magic_config_key) echo mykey;;\n'
                                    'config) echo "EINVAL no $2" >&2; exit 1;; *) exit 2;; esac\n'))):
        (d / name).write_text(body)
        (d / name).chmod(0o755)
    cmds = ([*PYNBD, "serve"], [require("nbdkit")])
    argvs = [[*cmd, "-f", "-U", "/nonexistent/never.sock", "sh", *args]
             for args in CONFIG_CASES for cmd in cmds]
    results = run_all(argvs, cwd=d)
    by_case: dict[str, list[tuple[int, str]]] = {}
    for i, args in enumerate(CONFIG_CASES):
        by_case[" ".join(args)] = [
            (rc, "\n".join(re.sub(r"^(nbdkit|pynbd serve): error: ", "", line)
                           for line in err.splitlines() if "error:" in line))
            for rc, err in results[2 * i:2 * i + 2]]
    return d, by_case


@pytest.mark.parametrize("args", CONFIG_CASES, ids=lambda a: " ".join(a) or "no-script")
def test_config_errors_same_as_nbdkit(config_failures, args) -> None:
    d, by_case = config_failures
    ours, theirs = by_case[" ".join(args)]
    assert ours[0] == theirs[0] == 1
    assert ours[1].replace(str(d), "DIR") == theirs[1].replace(str(d), "DIR")
    assert ours[1]


def test_inline_script_same_as_nbdkit(pynbd_server, nbdkit_server, tmp_path) -> None:
    script = tmp_path / "inline"
    script.write_text('case "$1" in\n  get_size) echo 1M ;;\n'
                      '  pread) echo "ENOSPC this is a message" >&2; exit 1 ;;\n'
                      '  *) exit 2 ;;\nesac\n')
    # The factories give servers /dev/null as stdin: run these two by hand.
    logs = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        sock = str(tmp_path / f"{len(logs)}.sock")
        with open(script) as stdin:
            proc = subprocess.Popen([*cmd, "-f", "-U", sock, "sh", "-"], stdin=stdin,
                                    stderr=subprocess.PIPE, text=True)
        try:
            wait_listening(sock=sock, proc=proc)  # type: ignore[arg-type]
            assert probe(f"nbd+unix:///?socket={sock}", [("pread", 512, 0)])["results"] == \
                [["error", ENOSPC]]
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        logs.append([re.sub(r"/tmp/(nbdkit|pynbdsh)\w+", "$tmpdir", line.split("error: ")[1])
                     for line in err.splitlines() if "error: " in line])
    assert logs[0] == logs[1] == ["$tmpdir/inline-script.sh: this is a message"]


def test_inline_script_refused_under_single(tmp_path) -> None:
    script = tmp_path / "inline"
    script.write_text("exit 2\n")
    results = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        with open(script) as stdin:
            cp = subprocess.run([*cmd, "-s", "sh", "-"], stdin=stdin, capture_output=True,
                                text=True, timeout=60, check=False)
        results.append((cp.returncode, cp.stderr.split("error: ")[-1].strip()))
    assert results[0] == results[1] == (1, "inline script is incompatible with -s")


def test_connect_command_single_mode(tmp_path) -> None:
    """libnbd's usual way to start a plugin: ``connect_command([... "-s", "sh", SCRIPT])``."""
    script = "import nbd,sys\nh=nbd.NBD()\nh.connect_command(sys.argv[1:])\n" \
             "print(h.get_size(), h.pread(16, 32768).hex())\n"
    outs = [run_libnbd(script, *cmd, "-s", "--exit-with-parent", "sh", ERRORS).stdout
            for cmd in ([sys.executable, "-m", "pynbd", "serve"], [require("nbdkit")])]
    assert outs[0] == outs[1] == f"65536 {'00' * 16}\n"


def test_environment_is_nbdkits(pynbd_server, nbdkit_server, tmp_path) -> None:
    """The script sees the server's environment plus $tmpdir (a private, existing, empty
    directory), and nothing else is added."""
    seen = []
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        out = tmp_path / f"env{i}"
        env = answers(get_size="echo 1M", pread=READ_ZEROES,
                      get_ready='env -0 > "$OUT"; ls -A "$tmpdir" >> "$OUT.ls"; '
                                'stat -c %a "$tmpdir" >> "$OUT.ls"')
        env["OUT"] = str(out)
        factory("sh", ANSWERS, env=env).stop()
        pairs = dict(kv.split("=", 1) for kv in out.read_text().split("\0") if kv)
        assert os.path.isabs(pairs.pop("tmpdir"))
        assert pairs.pop("OUT") == str(out)
        for var in ("_", "OLDPWD", "SHLVL", "PWD"):
            pairs.pop(var, None)
        seen.append((pairs, Path(f"{out}.ls").read_text()))
    assert seen[0] == seen[1]
    assert seen[0][1] == "700\n"


@pytest.mark.parametrize("out", ["exit 0", "exit 2", "exit 3", "echo EPERM go away >&2; exit 1",
                                 'echo "$1 $2" >&2; [ "$2" = false ]'])
def test_preconnect_same_as_nbdkit(live, out) -> None:
    refused = out not in ("exit 0", "exit 2") and "[" not in out
    if not refused:
        view = live.same([("pread", 512, 0)], preconnect=out)
        assert "connect_error" not in view
        return
    # A refused connection is closed before the handshake: libnbd reports that as a failed
    # read or a reset depending on timing, so the words of the error are not compared, only
    # that both servers refused (and the same calls reached the script).
    live.answer(preconnect=out)
    (got, elog), (want, nlog) = live.each(lambda uri: probe(uri, [("pread", 512, 0)]))
    assert "connect_error" in got and "connect_error" in want, (got, want)
    assert elog == nlog
