"""The sh plugin under ``pynbd serve``: what only pynbd's side can show (a script's argv,
its descriptors and $tmpdir's life, the thread model, the event loop staying free), and its
--dump-plugin answers (callbacks() and dump_plugin(), until main.py asks them).

Side-by-side comparisons with nbdkit's sh plugin are in tests/interop/test_plugin_sh.py.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest
from rawclient import RawClient

import pynbd.libnbd as nbd
from pynbd.errors import ConfigError
from pynbd.plugin import CALLBACKS, ThreadModel
from pynbd.plugins.sh import ShPlugin
from pynbd.protocol.constants import Cmd

DATA = Path(__file__).resolve().parents[1] / "data" / "sh"
ANSWERS = str(DATA / "answers.sh")
READ_ZEROES = "dd if=/dev/zero count=$3 iflag=count_bytes status=none"


def answers(**methods: str) -> dict[str, str]:
    return {f"SH_{k}": v for k, v in methods.items()}


def connect(srv: Any, export: str = "") -> Any:
    """A libnbd-API handle (pynbd's) connected to ``srv`` asking for ``export``."""
    h = nbd.NBD()
    h.set_export_name(export)
    h.add_meta_context("base:allocation")
    h.connect_unix(srv.sock)
    return h


def script(tmp_path: Path, body: str, name: str = "s.sh") -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


# ---- the calling convention ------------------------------------------------------------------


LOGGING = r'''
{ printf '[%s] ' "$@"; echo; } >> "$LOG"
case "$1" in
    magic_config_key) echo size ;;
    config) ;;
    open) echo "h-$3" ;;
    get_size) echo 64K ;;
    can_write|can_flush|can_trim|can_zero|can_extents|can_fast_zero) exit 0 ;;
    can_fua) echo native ;;
    can_cache) echo native ;;
    pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    pwrite) cat > "$LOG.data" ;;
    flush|trim|zero|cache) ;;
    extents) echo "0 64K" ;;
    *) exit 2 ;;
esac
'''


def test_argv_of_every_method(pynbd_server, tmp_path) -> None:
    """Each method is called with nbdkit's arguments; pwrite's data arrives on stdin."""
    log = tmp_path / "calls"
    s = script(tmp_path, LOGGING)
    srv = pynbd_server("sh", s, "1M", "k=v w", env={"LOG": str(log)})
    h = connect(srv, "my export")
    h.pread(512, 4096)
    h.pwrite(b"\x01" * 1024, 2048, nbd.CMD_FLAG_FUA)
    h.zero(512, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(512, 0)
    h.trim(512, 512)
    h.flush()
    h.cache(4096, 0)
    h.block_status(65536, 0, lambda *a: 0)
    h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
    h.shutdown()
    srv.stop()
    calls = [line.strip() for line in log.read_text().splitlines()]
    handle = "[h-my export]"
    for want in ("[load]", "[magic_config_key]", "[config] [size] [1M]",
                 "[config] [k] [v w]", "[config_complete]", "[thread_model]", "[get_ready]",
                 "[after_fork]", "[preconnect] [false]", "[open] [false] [my export] [false]",
                 f"[pread] {handle} [512] [4096]", f"[pwrite] {handle} [1024] [2048] [fua]",
                 f"[zero] {handle} [512] [0] [fua]", f"[zero] {handle} [512] [0] [may_trim,fast]",
                 f"[zero] {handle} [512] [0] [may_trim]", f"[trim] {handle} [512] [512] []",
                 f"[flush] {handle}", f"[cache] {handle} [4096] [0]",
                 f"[extents] {handle} [65536] [0] []", f"[extents] {handle} [65536] [0] [req_one]",
                 f"[close] {handle}", "[unload]"):
        assert want in calls, (want, calls)
    assert calls[0] == "[load]" and calls[-1] == "[unload]"
    assert (tmp_path / "calls.data").read_bytes() == b"\x01" * 1024


def test_debug_lines_quote_arguments(pynbd_server, tmp_path) -> None:
    s = script(tmp_path, 'case "$1" in get_size) echo 1M;; *) exit 2;; esac\n')
    srv = pynbd_server("-v", "sh", s)
    connect(srv, 'a "b" $c').shutdown()
    srv.stop()
    assert f'calling: {s} open false "a \\"b\\" \\$c" false' in srv.stderr
    assert f"completed: {s} open: status 2" in srv.stderr
    # An empty argument (the handle, here) prints as nothing, as in nbdkit's lines.
    assert re.search(rf"calling: {re.escape(s)} get_size $", srv.stderr, re.MULTILINE)


def test_tmpdir_made_private_and_removed(pynbd_server, tmp_path) -> None:
    out = tmp_path / "seen"
    env = answers(get_size="echo 1M", pread=READ_ZEROES,
                  get_ready='echo "$tmpdir" > "$OUT"; stat -c %a "$tmpdir" >> "$OUT"; '
                            'touch "$tmpdir/state"',
                  unload='ls "$tmpdir" >> "$OUT"')
    env["OUT"] = str(out)
    srv = pynbd_server("sh", ANSWERS, env=env)
    tmpdir, mode = out.read_text().split()[:2]
    assert mode == "700" and os.path.isdir(tmpdir)
    assert "tmpdir" not in os.environ
    srv.stop()
    assert out.read_text().split()[2:] == ["state"]  # unload still sees it ...
    assert not os.path.exists(tmpdir)               # ... then it goes


def test_tmpdir_removed_when_configuration_fails(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "seen"
    env = dict(os.environ, OUT=str(out),
               SH_config='echo "$tmpdir" > "$OUT"; echo "EINVAL bad parameter $2" >&2; exit 1')
    cp = subprocess.run([sys.executable, "-m", "pynbd", "serve", "-f", "-U",
                         str(tmp_path / "s.sock"), "sh", ANSWERS, "x=1"], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 1
    assert cp.stderr.strip() == f"pynbd serve: error: {ANSWERS}: bad parameter x"
    tmpdir = out.read_text().strip()
    assert tmpdir and not os.path.exists(tmpdir)


def test_no_server_descriptor_reaches_a_script(pynbd_server, tmp_path) -> None:
    """Only the three pipes: no client socket, listening socket or other pipe, even with
    several clients connected (nbdkit's call.c rule)."""
    fds = tmp_path / "fds"
    env = answers(get_size="echo 1M",
                  pread=f"sh -c 'ls -l /proc/$PPID/fd > \"$0\"' {fds}; {READ_ZEROES}")
    srv = pynbd_server("sh", ANSWERS, env=env)
    others = [connect(srv) for _ in range(3)]
    h = connect(srv)
    h.pread(512, 0)
    for c in [*others, h]:
        c.shutdown()
    # "lr-x------ 1 root root 64 ... 0 -> pipe:[1234]": the shell's own descriptors
    seen = dict(re.findall(r" (\d+) -> (.*)", fds.read_text()))
    assert {fd for fd, what in seen.items() if what.startswith("pipe:")} == {"0", "1", "2"}
    assert not [what for what in seen.values() if what.startswith("socket:")], seen
    assert all(what.startswith(("pipe:", "/")) for what in seen.values()), seen


def test_reading_stdin_outside_pwrite_does_not_hang(pynbd_server) -> None:
    # nbdkit 1.32 leaves the script's stdin open (and hangs) here; pynbd closes it at once.
    env = answers(get_size="cat >/dev/null; echo 1M", pread=f"cat >/dev/null; {READ_ZEROES}")
    srv = pynbd_server("sh", ANSWERS, env=env)
    h = connect(srv)
    assert h.get_size() == 1 << 20 and h.pread(512, 0) == bytes(512)
    h.shutdown()


def test_pwrite_script_may_ignore_its_stdin(pynbd_server) -> None:
    env = answers(get_size="echo 1M", pread=READ_ZEROES, can_write="exit 0", pwrite="exit 0")
    srv = pynbd_server("sh", ANSWERS, env=env)
    h = connect(srv)
    for n in (512, 65536, 1 << 20):
        h.pwrite(b"x" * n, 0)
    h.shutdown()


def test_script_without_shebang_runs_under_bin_sh(pynbd_server, tmp_path) -> None:
    p = tmp_path / "noshebang"
    p.write_text('case "$1" in get_size) echo 2M;; *) exit 2;; esac\n')
    p.chmod(0o755)
    srv = pynbd_server("sh", str(p))
    h = connect(srv)
    assert h.get_size() == 2 << 20
    h.shutdown()


def test_any_executable(pynbd_server, tmp_path) -> None:
    """Not only shell: a Perl script answering the same convention."""
    p = tmp_path / "plugin.pl"
    p.write_text("#!/usr/bin/perl\nmy $m = $ARGV[0];\n"
                 "if ($m eq 'get_size') { print \"4K\\n\"; }\n"
                 "elsif ($m eq 'pread') { print 'P' x $ARGV[2]; }\n"
                 "else { exit 2; }\n")
    p.chmod(0o755)
    srv = pynbd_server("sh", str(p))
    h = connect(srv)
    assert h.get_size() == 4096 and h.pread(8, 0) == b"PPPPPPPP"
    h.shutdown()


# ---- thread models ---------------------------------------------------------------------------


#: A read that records when it ran (start and end, in ns) and takes 0.3 s.
TIMED_READ = ('s=$(date +%s%N); sleep 0.3; echo "$s $(date +%s%N)" >> "$SPANS"; '
              + READ_ZEROES)


def _concurrent_reads(uri_sock: str, clients: int, each: int) -> None:
    conns = []
    for _ in range(clients):
        c = RawClient(uri_sock)
        c.negotiate()
        conns.append(c)
    for c in conns:
        c.send(b"".join(c.request(Cmd.READ, i * 4096, 4096, send=False)[1]
                        for i in range(each)))
    for c in conns:
        for _ in range(each):
            assert c.read_reply().error == 0
        c.close()


def _spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every timed read, in order of start."""
    spans = []
    for line in path.read_text().splitlines():
        start, end = line.split()
        spans.append((int(start), int(end)))
    return sorted(spans)


def _overlaps(spans: list[tuple[int, int]]) -> int:
    return sum(1 for (_, e1), (s2, _) in itertools.pairwise(spans) if s2 < e1)


def test_serialize_all_requests_is_the_default(pynbd_server, tmp_path) -> None:
    """No thread_model method: never two calls at once, across connections too."""
    spans = tmp_path / "spans"
    srv = pynbd_server("-t", "4", "sh", ANSWERS,
                       env={**answers(get_size="echo 1M", pread=TIMED_READ),
                            "SPANS": str(spans)})
    _concurrent_reads(srv.sock, 2, 2)
    got = _spans(spans)
    assert len(got) == 4 and _overlaps(got) == 0, got


def test_parallel_when_the_script_says_so(pynbd_server, tmp_path) -> None:
    spans = tmp_path / "spans"
    srv = pynbd_server("-t", "4", "sh", ANSWERS,
                       env={**answers(get_size="echo 1M", pread=TIMED_READ,
                                      thread_model="echo parallel"), "SPANS": str(spans)})
    _concurrent_reads(srv.sock, 2, 2)
    got = _spans(spans)
    assert len(got) == 4 and _overlaps(got) >= 1, got


def test_event_loop_stays_free_while_a_script_runs(pynbd_server, tmp_path) -> None:
    """A read whose script waits (until the test says go) holds neither another client's
    handshake nor its requests (parallel model): calls run in worker threads, never on the
    event loop."""
    go = tmp_path / "go"
    env = answers(get_size="echo 1M", thread_model="echo parallel",
                  pread=f'[ "$4" = 0 ] && while [ ! -e {go} ]; do sleep 0.02; done; '
                        f'{READ_ZEROES}')
    srv = pynbd_server("sh", ANSWERS, env=env)
    with RawClient(srv.sock) as slow, RawClient(srv.sock) as fast:
        slow.negotiate()
        slow.request(Cmd.READ, 0, 512)
        fast.negotiate()                          # RawClient's timeout: 5 s per receive
        assert fast.pread(4096, 512) == bytes(512)
        go.touch()
        assert slow.read_reply().error == 0


# ---- --dump-plugin, asked directly ----------------------------------------------------------


def test_callbacks_are_every_nbdkit_callback_but_cleanup() -> None:
    assert ShPlugin().callbacks() == frozenset(CALLBACKS) - {"cleanup"}


def _configured(*params: tuple[str, str]) -> ShPlugin:
    p = ShPlugin()
    p.load()
    for k, v in params:
        p.config(k, v)
    return p


def test_dump_plugin_without_a_script() -> None:
    p = _configured()
    try:
        assert p.dump_plugin() == ["max_known_status=3"]
        assert p.get_thread_model() == ThreadModel.PARALLEL
    finally:
        p.unload()


@pytest.mark.parametrize("out,model", [
    ("parallel", ThreadModel.PARALLEL), ("PARALLEL", ThreadModel.PARALLEL),
    ("serialize_requests", ThreadModel.SERIALIZE_REQUESTS),
    ("serialize-requests", ThreadModel.SERIALIZE_REQUESTS),
    ("serialize_all_requests", ThreadModel.SERIALIZE_ALL_REQUESTS),
    ("Serialize-All-Requests", ThreadModel.SERIALIZE_ALL_REQUESTS),
    ("serialize_connections", ThreadModel.SERIALIZE_CONNECTIONS),
    ("serialize-connections", ThreadModel.SERIALIZE_CONNECTIONS),
    ("serialize_all-requests", ThreadModel.SERIALIZE_ALL_REQUESTS),  # not a spelling
    ("threads", ThreadModel.SERIALIZE_ALL_REQUESTS), ("", ThreadModel.SERIALIZE_ALL_REQUESTS),
])
def test_thread_model_answers(tmp_path, out, model) -> None:
    s = script(tmp_path, f'case "$1" in thread_model) echo "{out}";; '
                         'dump_plugin) echo a=1; printf "b=2";; *) exit 2;; esac\n')
    p = _configured(("script", s))
    try:
        assert p.get_thread_model() == model
        assert p.dump_plugin() == ["max_known_status=3", "a=1", "b=2"]
    finally:
        p.unload()


@pytest.mark.parametrize("body,message", [
    ('[ "$1" = thread_model ] && exit 3; exit 2',
     "thread_model method returned unexpected code (3/false)"),
    ('[ "$1" = thread_model ] && { echo "EINVAL nope" >&2; exit 1; }; exit 2', "nope"),
])
def test_thread_model_failing(tmp_path, body, message) -> None:
    s = script(tmp_path, body + "\n")
    p = _configured(("script", s))
    try:
        with pytest.raises(ConfigError, match=re.escape(f"{s}: {message}")):
            p.get_thread_model()
    finally:
        p.unload()


def test_dump_plugin_failing_keeps_the_known_lines(tmp_path, caplog) -> None:
    s = script(tmp_path, '[ "$1" = dump_plugin ] && { echo x=1; echo oops >&2; exit 1; }\n'
                         'exit 2\n')
    p = _configured(("script", s))
    try:
        assert p.dump_plugin() == ["max_known_status=3"]
        assert f"{s}: oops" in caplog.text
    finally:
        p.unload()
