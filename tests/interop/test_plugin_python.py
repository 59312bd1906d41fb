"""The python plugin side by side with nbdkit's: the same script under both servers, driven
by libnbd's Python bindings, must look the same (size, flags, data, errors, extents).

The scripts are written against nbdkit's Python API: small example plugins
(tests/data/python/ex_*.py: a RAM disk, a file, a disk with injected faults, one whose
module is missing) and test scripts (tests/data/python/calls*.py, errors.py, exports.py). calls*.py record every data callback
with its arguments, readable past the end of the disk, so the comparison covers what each
server asked the script, not only what the client saw.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from helpers import PYNBD, peer_env, require, run_peer, run_pynbd, unix_uri
from side_by_side import assert_same, probe, serve_both

DATA = Path(__file__).resolve().parents[1] / "data" / "python"
KIB4 = 4096
MIB = 1 << 20
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def script(name: str) -> str:
    return str(DATA / name)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def record_op(size: int = MIB) -> tuple[str, int, int]:
    """Read the record of callbacks calls*.py keep past the end of their disk."""
    return ("pread", 4096, size)


# ---- example plugins (tests/data/python/ex_*.py) ---------------------------------------


def test_ramdisk_example(pynbd_server, nbdkit_server):
    got = assert_same(pynbd_server, nbdkit_server,
                      ["python", script("ex_ramdisk.py"), "size=2M"], ops=[
        ("pread", 4096, 0),
        ("pwrite", pattern(12288), 4096),
        ("pread", 16384, 0),
        ("zero", 4096, 4096),               # MAY_TRIM: the script zeroes
        ("zero", 4096, 8192, NO_HOLE),      # set_error(EOPNOTSUPP): pwrite of zeroes
        ("pread", 16384, 0),
        ("trim", 4096, 12288),
        ("pread", 4096, 12288),
        ("pwrite", pattern(512, 3), 2 * MIB - 512),
        ("pread", 1024, 2 * MIB - 1024),
        ("pwrite", pattern(512, 3), 0, FUA),  # no flush, so no FUA: libnbd refuses it
        ("flush",),
        ("extents", MIB, 0),
        ("pread", 512, 2 * MIB - 256),      # beyond the end: EINVAL from the server
    ])
    res = got["results"]
    assert got["size"] == 2 * MIB
    assert res[0] == ["data", bytes(4096)]
    assert res[2] == ["data", bytes(4096) + pattern(12288)]
    assert res[5] == ["data", bytes(12288) + pattern(12288)[8192:]]
    assert res[7] == ["data", bytes(4096)]
    assert res[9] == ["data", bytes(512) + pattern(512, 3)]
    assert res[10][0] == res[11][0] == "error"
    assert res[-1] == ["error", errno.EINVAL]
    flags = got["flags"]
    assert flags["can_zero"] and flags["can_trim"] and not flags["is_read_only"]
    assert not flags["can_flush"] and not flags["can_fua"]


def test_ramdisk_example_debug_message(pynbd_server, nbdkit_server):
    """nbdkit.debug in config_complete: a debug line with -v, nothing without."""
    argv = ["-U", "-", "python", script("ex_ramdisk.py"), "size=64K", "--run", "true"]
    line = "ex_ramdisk: 65536 bytes of RAM"
    for verbose in (True, False):
        v = ["-v"] if verbose else []
        p = run_pynbd("serve", *v, *argv).stderr.decode().splitlines()
        n = run_peer("nbdkit", *v, *argv).stderr.decode().splitlines()
        mine = [ln for ln in p if ln.endswith(line)]
        theirs = [ln for ln in n if ln.endswith(line)]
        if verbose:  # pynbd names the plugin in its debug lines
            assert mine == [f"pynbd: debug: python: {line}"]
            assert theirs == [f"nbdkit: debug: {line}"]
        else:
            assert mine == theirs == []


def test_ramdisk_example_rejects_unknown_parameters(pynbd_server, nbdkit_server):
    p = run_pynbd("serve", "python", script("ex_ramdisk.py"), "colour=red", check=False)
    n = run_peer("nbdkit", "python", script("ex_ramdisk.py"), "colour=red", check=False)
    why = "unknown parameter 'colour' (this disk takes size=SIZE)"
    assert p.returncode == n.returncode == 1
    assert b"config: error:" in n.stderr and why.encode() in n.stderr
    assert p.stderr.decode().splitlines() == [
        f"pynbd serve: error: {script('ex_ramdisk.py')}: config: error: RuntimeError: {why}"]


def test_file_example(pynbd_server, nbdkit_server, tmp_path):
    images = []
    for name in ("pynbd", "nbdkit"):
        img = tmp_path / f"{name}.img"
        img.write_bytes(pattern(3 * MIB + 123))
        images.append(img)
    p = pynbd_server("python", script("ex_file.py"), f"file={images[0]}")
    n = nbdkit_server("python", script("ex_file.py"), f"file={images[1]}")
    ops = [("pread", 65536, 0), ("pread", 123, 3 * MIB), ("pwrite", pattern(4096, 9), 8192),
           ("pread", 12288, 4096), ("zero", 4096, MIB), ("pread", 8192, MIB - 4096),
           ("pwrite", pattern(100, 4), 3 * MIB + 23, FUA), ("extents", MIB, 0), ("flush",),
           ("trim", 4096, 0)]
    got, want = probe(p.uri, ops), probe(n.uri, ops)
    p.stop()
    n.stop()
    assert got == want
    assert got["size"] == 3 * MIB + 123
    res = got["results"]
    assert res[1] == ["data", pattern(3 * MIB + 123)[3 * MIB:]]
    assert res[3] == ["data", pattern(12288)[:4096] + pattern(4096, 9) + pattern(12288)[8192:]]
    assert res[5] == ["data", pattern(MIB)[-4096:] + bytes(4096)]
    assert res[6] == ["ok"] and res[8] == ["ok"]
    flags = got["flags"]
    assert flags["can_fua"] and flags["can_flush"] and flags["can_multi_conn"]
    assert not flags["is_rotational"] and not flags["can_trim"]
    assert images[0].read_bytes() == images[1].read_bytes()
    want_image = bytearray(pattern(3 * MIB + 123))
    want_image[8192:12288] = pattern(4096, 9)
    want_image[MIB:MIB + 4096] = bytes(4096)
    want_image[3 * MIB + 23:] = pattern(100, 4)
    assert images[0].read_bytes() == want_image


def test_file_example_read_only_client(pynbd_server, nbdkit_server, tmp_path):
    """-r: the script opens its file read-only; a write fails in the client (EPERM)."""
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(MIB))
    image.chmod(0o444)
    got = assert_same(pynbd_server, nbdkit_server,
                      ["-r", "python", script("ex_file.py"), f"file={image}"],
                      ops=[("pread", 4096, 4096), ("pwrite", b"x" * 512, 0)])
    assert got["flags"]["is_read_only"]
    assert got["results"] == [["data", pattern(MIB)[4096:8192]], ["error", errno.EPERM]]


@pytest.mark.parametrize("case", ["no file", "missing", "directory", "unknown key"])
def test_file_example_bad_parameters(pynbd_server, nbdkit_server, tmp_path, case):
    """Each refused by config or config_complete, under both, with the script's message."""
    missing = tmp_path / "missing.img"
    params, callback, why = {
        "no file": ([], "config_complete", "missing file=FILENAME: the file to serve"),
        "missing": ([f"file={missing}"], "config_complete",
                    f"{missing}: No such file or directory"),
        "directory": ([f"file={tmp_path}"], "config_complete",
                      f"{tmp_path}: not a regular file"),
        "unknown key": ([f"file={missing}", "size=1M"], "config",
                        "unknown parameter 'size' (this disk takes file=FILENAME)"),
    }[case]
    p = run_pynbd("serve", "python", script("ex_file.py"), *params, check=False)
    n = run_peer("nbdkit", "python", script("ex_file.py"), *params, check=False)
    assert p.returncode == n.returncode == 1
    assert f"{callback}: error:".encode() in n.stderr and why.encode() in n.stderr
    assert p.stderr.decode().splitlines() == [
        f"pynbd serve: error: {script('ex_file.py')}: {callback}: error: RuntimeError: {why}"]


def test_faults_example(pynbd_server, nbdkit_server):
    """ex_faults.py: bad blocks 1 and 3 of 4K, and no space past 64K."""
    ops = [("pread", 4096, 0),
           ("pread", 4096, 4096),                     # bad block 1: raise -> EIO
           ("pread", 8192, 0),                        # touches block 1
           ("pwrite", b"x" * 512, 4096),              # part of a bad block: set_error(EIO)
           ("pwrite", pattern(4096), 4096),           # all of it: healed
           ("pread", 8192, 0),
           ("flush",),                                # block 3 is still bad
           ("pwrite", b"f" * 512, 0, FUA),            # written, but the emulated FUA fails
           ("pread", 512, 0),
           ("pwrite", pattern(4096, 2), 65536 - 2048),  # past 64K: set_error(ENOSPC)
           ("pwrite", pattern(8192, 3), 8192),        # blocks 2 and 3: heals block 3
           ("flush",),
           ("pwrite", b"g" * 512, 0, FUA),
           ("zero", 4096, 61440),                     # no zero callback: pwrite of zeroes
           ("zero", 4096, 65536),                     # ... past 64K: ENOSPC
           ("pread", 16384, 0),
           ("pread", 4096, 61440)]
    got = assert_same(pynbd_server, nbdkit_server,
                      ["python", script("ex_faults.py"), "bad=1,3", "full=64K"], ops=ops)
    res = got["results"]
    assert res[0] == ["data", bytes(4096)]
    assert res[1] == res[2] == res[3] == ["error", errno.EIO]
    assert res[4] == ["ok"] and res[5] == ["data", bytes(4096) + pattern(4096)]
    assert res[6] == res[7] == ["error", errno.EIO]
    assert res[8] == ["data", b"f" * 512]
    assert res[9] == ["error", errno.ENOSPC]
    assert res[10] == res[11] == res[12] == res[13] == ["ok"]
    assert res[14] == ["error", errno.ENOSPC]
    assert res[15] == ["data", b"g" * 512 + bytes(3584) + pattern(4096) + pattern(8192, 3)]
    assert res[16] == ["data", bytes(4096)]
    assert got["flags"]["can_flush"] and got["flags"]["can_fua"]


def test_missing_module_fails_to_load_under_both(pynbd_server, nbdkit_server):
    """ex_missing_module.py imports a module that is not installed: both refuse to start."""
    p = run_pynbd("serve", "python", script("ex_missing_module.py"), check=False)
    n = run_peer("nbdkit", "python", script("ex_missing_module.py"), check=False)
    assert p.returncode == n.returncode == 1
    assert b"No module named 'pynbd_tests_no_such_backend'" in n.stderr
    assert b"error running this script" in n.stderr
    assert p.stderr.decode().splitlines() == [
        (f"pynbd serve: error: {script('ex_missing_module.py')}: error running this script: "
        "ModuleNotFoundError: No module named 'pynbd_tests_no_such_backend'")]


# ---- calling conventions ---------------------------------------------------------------


def test_api_v2_calls_and_flags(pynbd_server, nbdkit_server):
    got = assert_same(pynbd_server, nbdkit_server, ["python", script("calls.py"), "k=v"], ops=[
        ("pread", 512, 0),
        ("pwrite", pattern(1024), 0),
        ("pwrite", pattern(1024), 4096, FUA),
        ("pread", 2048, 0),
        ("zero", 4096, 8192),
        ("zero", 4096, 8192, FUA),
        ("zero", 4096, 12288, NO_HOLE),
        ("zero", 4096, 12288, NO_HOLE | FAST_ZERO),
        ("trim", 4096, 16384),
        ("trim", 4096, 16384, FUA),
        ("flush",),
        ("cache", 4096, 0),
        ("extents", 65536, 0),
        ("extents", 65536, 4096, REQ_ONE),
        ("pread", 4096, 0, DF),
        record_op(),
    ])
    flags = got["flags"]
    assert flags["is_rotational"] and flags["can_fua"] and flags["can_cache"]
    assert flags["can_fast_zero"] and not flags["can_multi_conn"]  # 1 is not True
    record = got["results"][-1][1].rstrip(b"\0").decode().splitlines()
    assert record[0] == "config k v"
    assert "pwrite 1024 4096 2 memoryview True" in record  # FUA passed through (NATIVE)
    assert "zero 4096 12288 8" in record  # the fast zero reached the script, which refused


def test_api_v1_calls(pynbd_server, nbdkit_server):
    got = assert_same(pynbd_server, nbdkit_server, ["python", script("calls_v1.py")], ops=[
        ("pread", 512, 100),
        ("pwrite", pattern(1024), 0),
        ("pwrite", pattern(1024), 4096, FUA),
        ("pread", 8192, 0),
        ("zero", 4096, 0),
        ("zero", 4096, 4096, NO_HOLE),
        ("trim", 4096, 8192),
        ("flush",),
        ("cache", 4096, 0),
        record_op(),
    ])
    record = got["results"][-1][1].rstrip(b"\0").decode().splitlines()
    assert record == ["pread 512 100", "pwrite 1024 0 memoryview True",
                      "pwrite 1024 4096 memoryview True", "flush", "pread 8192 0",
                      "zero 4096 0 True", "zero 4096 4096 False", "trim 4096 8192", "flush",
                      "cache 4096 0 0"]
    assert got["results"][3][1] == pattern(1024) + bytes(3072) + pattern(1024) + bytes(3072)


def test_errors_and_set_error(pynbd_server, nbdkit_server):
    blocks = range(14)
    ops: list[tuple] = []
    for b in blocks:
        ops += [("pread", 512, b * KIB4), ("pwrite", b"w" * 512, b * KIB4),
                ("trim", 512, b * KIB4), ("cache", 512, b * KIB4), ("extents", 512, b * KIB4)]
        if b != 12:
            # block 12: zero falls back to pwrite (set_error(ENOTSUP)), whose ENOTSUP
            # makes nbdkit 1.32 abort (backend.c: assertion failed); pynbd answers EINVAL
            ops.append(("zero", 512, b * KIB4))
    ops += [("pread", 512, 10 * KIB4, DF),        # EOVERFLOW is only sent with DF
            ("zero", 512, 12 * KIB4, FAST_ZERO),  # ENOTSUP is only sent for fast zeroes
            ("pread", 512, 2 * KIB4), ("pread", 512, 1 * KIB4),  # set_error is forgotten
            ("zero", 4096, 20 * KIB4), ("zero", 4096, 21 * KIB4),  # fall back to pwrite
            ("zero", 4096, 20 * KIB4, FAST_ZERO)]
    got = assert_same(pynbd_server, nbdkit_server, ["python", script("errors.py")], ops=ops)
    res = got["results"]
    assert res[6] == ["error", errno.EIO]          # pread of block 1: raise
    assert res[12] == ["error", errno.ENOSPC]      # pread of block 2: set_error(ENOSPC)
    assert res[-5:-3] == [["error", errno.ENOSPC], ["error", errno.EIO]]
    assert res[-3:] == [["ok"], ["ok"], ["error", errno.ENOTSUP]]
    assert res[-6] == ["error", errno.ENOTSUP]


@pytest.mark.parametrize("callback", ["open", "get_size", "can_write", "can_zero",
                                      "can_fua", "can_cache", "flush"])
def test_failing_control_callbacks(pynbd_server, nbdkit_server, callback):
    got = assert_same(pynbd_server, nbdkit_server,
                      ["python", script("errors.py"), f"fail={callback}"],
                      ops=[("pread", 512, 0), ("flush",)])
    if callback == "flush":
        assert got["results"] == [["data", bytes(512)], ["error", errno.EIO]]
    else:
        assert "connect_error" in got


def test_exports(pynbd_server, nbdkit_server):
    p, n = serve_both(pynbd_server, nbdkit_server, ["python", script("exports.py")])
    for export in ("", "plain", "described", "blocky", "other", "missing"):
        ops = [("pread", 512, 0)]
        # the export goes in the URI: connect_uri sets it, so probe(export=) would be lost
        got = probe(unix_uri(p.sock, export), ops)
        want = probe(unix_uri(n.sock, export), ops)
        assert got == want, export
        if export != "missing":
            name = (export or "described").encode()
            assert got["results"] == [["data", name.ljust(512, b".")]]
    listing = [nbdinfo("--list", s.uri, s) for s in (p, n)]
    assert listing[0] == listing[1]
    assert "an export with a description" in listing[0] and "bytes-name" in listing[0]
    for export in ("described", "plain", "blocky"):
        infos = [nbdinfo(unix_uri(s.sock, export), s) for s in (p, n)]
        assert infos[0] == infos[1], export


def nbdinfo(*args: object) -> str:
    """nbdinfo --json ARGS, with the server's socket path written as SOCK."""
    *argv, srv = args
    out = run_peer("nbdinfo", "--json", *map(str, argv)).stdout.decode()
    return out.replace(srv.sock, "SOCK")


def test_lifecycle_calls(tmp_path):
    """The same callbacks in the same order for two clients (one read, one nbdinfo):
    configuration, get_ready, after_fork, then preconnect/open/.../close per client, and
    cleanup at exit. (thread_model is compared by count: pynbd's server asks for it after
    get_ready, nbdkit before.)"""
    log = tmp_path / "calls.log"
    # ... and before --run ends (and the server with it), wait until both closes happened
    client = ('/usr/bin/python3 -c "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]);'
              ' h.pread(512, 0); h.shutdown()" "$uri"; nbdinfo --size "$uri"; '
              f'for i in $(seq 200); do [ "$(grep -cx close {log})" = 2 ] && break; '
              'sleep 0.05; done')
    logs = []
    for argv in ([require("nbdkit")], [*PYNBD, "serve"]):
        log.unlink(missing_ok=True)
        cp = subprocess.run([*argv, "-U", "-", "python", script("lifecycle.py"), f"log={log}",
                             "x=y", "--run", client], capture_output=True, env=peer_env(),
                            timeout=60, check=False)
        assert cp.returncode == 0, cp.stderr
        logs.append(log.read_text().splitlines())
    for calls in logs:
        assert calls.count("thread_model") == 1
        calls.remove("thread_model")
    assert logs[0] == logs[1]
    assert logs[1] == [f"config log {log}", "config x y",
                       "config_complete", "get_ready", "after_fork", "preconnect False",
                       "open False", "pread 512 0", "close", "preconnect False", "open False",
                       "close", "cleanup"]
