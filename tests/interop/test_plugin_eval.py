"""The eval plugin beside nbdkit 1.32's: the man page's examples and eval's own rules (methods
as keys, missing=, the can_* that follow from the methods given, config for other keys)
served by both, compared in the same test."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
from helpers import PYNBD, Server, require, run_peer

from tests.side_by_side import assert_views_equal, probe

EIO, ENOSPC = 5, 28
FUA = 1
ZEROES_64M = ["get_size= echo 64M ", "pread= dd if=/dev/zero count=$3 iflag=count_bytes "]
READ_ZEROES = "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none"


def errors_logged(srv: Server) -> list[str]:
    """Error lines without the server's prefix, the private directory written $tmpdir."""
    out = []
    for line in srv.stderr.splitlines():
        m = re.match(r"^(?:nbdkit: (?:eval\[\d+\]: |eval\.\d+: )?|pynbd: )error: (.*)", line)
        if m and not re.match(r"client \d+: ", m.group(1)):
            out.append(re.sub(r"/tmp/(?:nbdkit|pynbdeval)\w+", "$tmpdir", m.group(1)))
    return out


def side_by_side(pynbd_server: Any, nbdkit_server: Any, args: Sequence[str],
                 ops: Sequence[Sequence[Any]] = (), logs: bool = True) -> dict[str, Any]:
    """Serve ``eval ARGS`` under both, probe both: same view, same error lines (unless
    ``logs`` is false)."""
    p, n = pynbd_server("eval", *args), nbdkit_server("eval", *args)
    try:
        got, want = probe(p.uri, ops), probe(n.uri, ops)
    finally:
        p.stop()
        n.stop()
    assert_views_equal(got, want, " ".join(args))
    if logs:
        assert errors_logged(p) == errors_logged(n)
    return got


def test_man_page_zeroes(pynbd_server, nbdkit_server) -> None:
    got = side_by_side(pynbd_server, nbdkit_server, ZEROES_64M,
                       [("pread", 4096, 0), ("pread", 512, (64 << 20) - 512),
                        ("pwrite", b"x" * 512, 0), ("extents", 1 << 20, 0)])
    assert got["size"] == 64 << 20 and got["flags"]["is_read_only"]
    assert got["results"][0] == ["data", bytes(4096)]


def test_man_page_zeroes_through_the_tools(pynbd_server, nbdkit_server, tmp_path) -> None:
    seen = []
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        srv = factory("eval", "get_size=echo 1M", READ_ZEROES)
        info = json.loads(run_peer("nbdinfo", "--json", srv.uri).stdout)
        for e in info["exports"]:
            for key in ("uri", "block_size_minimum", "block_size_preferred",
                        "block_size_maximum"):
                e.pop(key, None)
        out = tmp_path / name
        run_peer("nbdcopy", srv.uri, str(out))
        qemu = json.loads(run_peer("qemu-img", "info", "--output=json", srv.uri).stdout)
        seen.append((info, out.read_bytes() == bytes(1 << 20), qemu["virtual-size"]))
        srv.stop()
    assert seen[0] == seen[1]
    assert seen[0][1:] == (True, 1 << 20)


def test_man_page_file_equivalent(pynbd_server, nbdkit_server, tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 256)  # 64K
    args = ['config=ln -sf "$(realpath "$3")" $tmpdir/file',
            "get_size=stat -Lc %s $tmpdir/file",
            "pread=dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes",
            "pwrite=dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes",
            f"file={disk}"]
    # Both serve the same file: write, then read what was written.
    got = side_by_side(pynbd_server, nbdkit_server, args,
                       [("pread", 1024, 0), ("pwrite", b"W" * 1024, 4096),
                        ("pwrite", b"F" * 512, 8192), ("pread", 2048, 4096 - 512),
                        ("zero", 512, 16384), ("pread", 1024, 16384 - 256),
                        ("flush",), ("trim", 512, 0)])
    assert not got["flags"]["is_read_only"] and not got["flags"]["can_flush"]
    data = disk.read_bytes()
    assert data[4096:5120] == b"W" * 1024 and data[8192:8704] == b"F" * 512
    assert data[16384:16896] == bytes(512)


@pytest.mark.parametrize("methods", [
    ["pwrite=cat >/dev/null"],
    ["pwrite=cat >/dev/null", "flush=exit 0", "trim=exit 0", "zero=exit 0",
     "extents=echo 0 1M hole,zero", "cache=exit 0"],
    ["pwrite=cat >/dev/null", "flush=exit 0", "can_flush=exit 3", "zero=exit 0",
     "can_zero=exit 3", "cache=exit 0", "can_cache=echo none"],
    ["can_write=exit 0", "can_trim=exit 0", "can_extents=exit 0", "can_cache=echo emulate"],
], ids=["pwrite", "everything", "explicit-can-wins", "can-only"])
def test_can_methods_follow_from_methods_given(pynbd_server, nbdkit_server, methods) -> None:
    ops = [("pwrite", b"z" * 512, 0), ("pwrite", b"z" * 512, 0, FUA), ("zero", 512, 0),
           ("trim", 512, 0), ("flush",), ("cache", 4096, 0), ("extents", 1 << 20, 0)]
    # A pwrite that reaches "exit 2" (which does not read its stdin) is logged by nbdkit
    # 1.32 either as "pwrite not implemented" or as a broken pipe, as the race goes; pynbd
    # ignores the broken pipe (as nbdkit >= 1.36). The client gets EIO from both.
    side_by_side(pynbd_server, nbdkit_server, ["get_size=echo 1M", READ_ZEROES, *methods], ops,
                 logs=any(m.startswith("pwrite=") for m in methods))


def test_missing_runs_for_every_method_not_given(pynbd_server, nbdkit_server, tmp_path) -> None:
    """missing= answers for the methods not on the command line (with $1 the method)."""
    logs = []
    for i, factory in enumerate((pynbd_server, nbdkit_server)):
        log = tmp_path / f"missing{i}"
        missing = (f'echo "$1" >> {log}; case "$1" in can_write|can_zero) exit 0;; '
                   'pwrite) cat >/dev/null;; *) exit 2;; esac')
        srv = factory("eval", "get_size=echo 1M", READ_ZEROES, f"missing={missing}")
        view = probe(srv.uri, [("pwrite", b"m" * 512, 0), ("zero", 512, 0)])
        srv.stop()
        logs.append((view, sorted(set(log.read_text().split()))))
    assert_views_equal(logs[0][0], logs[1][0], "missing=")
    assert logs[0][0]["results"] == [["ok"], ["ok"]]
    # pynbd asks some questions nbdkit leaves out (and the other way round): the methods
    # that reached missing= include the essential ones in both.
    for method in ("config_complete", "thread_model", "get_ready", "open", "can_write",
                   "pwrite", "zero", "close", "unload"):
        assert method in logs[0][1] and method in logs[1][1], method


def test_errors_name_the_method_script(pynbd_server, nbdkit_server) -> None:
    got = side_by_side(pynbd_server, nbdkit_server,
                       ["get_size=echo 1M", "pread=echo ENOSPC no room >&2; exit 1"],
                       [("pread", 512, 0)])
    assert got["results"] == [["error", ENOSPC]]


CONFIG_CASES = [
    ["foo=bar"], ["bare"], ["script=x"], ["load=exit 0"],
    ["get_size=echo 1", "get_size=echo 2"], ["missing=exit 2", "missing=exit 2"],
    ["config=exit 2", "k=v"], ["config=echo EINVAL bad $2 >&2; exit 1", "k=v"],
    ["config=exit 3", "k=v"], ["k=v", "config=exit 0"],
    ["config_complete=echo EPERM not now >&2; exit 1", READ_ZEROES, "get_size=echo 1M"],
    ["thread_model=exit 3", "get_size=echo 1M", READ_ZEROES],
    ["get_ready=exit 1", "get_size=echo 1M", READ_ZEROES],
]


@pytest.fixture(scope="module")
def config_failures() -> dict[str, list[tuple[int, list[str]]]]:
    """Every CONFIG_CASES command line under pynbd and nbdkit at once (each must refuse
    it): exit status and error lines, by case."""
    cmds = ([*PYNBD, "serve"], [require("nbdkit")])
    argvs = [[*cmd, "-f", "-U", "/nonexistent/never.sock", "eval", *args]
             for args in CONFIG_CASES for cmd in cmds]
    out: list[tuple[int, list[str]]] = []
    for i in range(0, len(argvs), 6):  # six at a time: most of each is a start-up
        procs = [subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for a in argvs[i:i + 6]]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            out.append((proc.returncode, [
                re.sub(r"/tmp/(?:nbdkit|pynbdeval)\w+", "$tmpdir", line.split("error: ", 1)[1])
                for line in err.splitlines() if "error: " in line]))
    return {" ".join(args): out[2 * i:2 * i + 2] for i, args in enumerate(CONFIG_CASES)}


@pytest.mark.parametrize("args", CONFIG_CASES, ids=" ".join)
def test_config_errors_same_as_nbdkit(config_failures, args) -> None:
    ours, theirs = config_failures[" ".join(args)]
    assert ours == theirs
    assert ours[0] == 1 and ours[1]


def test_dump_plugin_same_as_nbdkit() -> None:
    def dump(cmd: list[str], *args: str) -> dict[str, str]:
        cp = subprocess.run([*cmd, "--dump-plugin", "eval", *args], capture_output=True,
                            text=True, check=True, timeout=60)
        return dict(line.split("=", 1) for line in cp.stdout.splitlines())

    for args in ([], ["dump_plugin=echo eval_x=1; echo eval_y=2", "thread_model=echo parallel"],
                 ["missing=exit 2", "thread_model=echo serialize_connections"]):
        ours, theirs = dump([*PYNBD, "serve"], *args), dump([require("nbdkit")], *args)
        for key in ("name", "max_thread_model", "thread_model", "max_known_status", "eval_x",
                    "eval_y"):
            assert ours.get(key) == theirs.get(key), (args, key)
        assert "magic_config_key" not in ours


@pytest.mark.parametrize("name", ["sh", "eval"])
def test_callbacks_are_nbdkits_has_lines(name) -> None:
    """What --dump-plugin's has_X=1 lines will say once main.py asks callbacks()."""
    from pynbd.plugins import find_plugin

    cp = subprocess.run([require("nbdkit"), "--dump-plugin", name], capture_output=True,
                        text=True, check=True, timeout=60)
    theirs = {line[4:-2] for line in cp.stdout.splitlines() if line.startswith("has_")}
    assert find_plugin(name)().callbacks() == theirs
