"""`pynbd serve` as users type it: nbdkit's command line, help, versions, parameters, and
one clear line for every bad command line.

Every server here is a real subprocess (tests/e2e/cli_helpers.py has the raw client that
checks it serves). The serving modes are in test_serve_modes.py, the process side (daemon,
pid file, users, signals, logging) in test_serve_process.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cli_helpers import (
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    RawClient,
    assert_clean_error,
    run_serve,
)
from helpers import (
    run_pynbd,
)

# ---------------------------------------------------------------------------- help, version


def test_pynbd_help_and_unknown_command() -> None:
    cp = run_pynbd("--help")
    assert b"serve" in cp.stdout
    cp = run_pynbd(check=False)
    assert cp.returncode == 1
    assert cp.stdout == b""
    assert b"serve" in cp.stderr
    cp = run_pynbd("frobnicate", check=False)
    assert cp.returncode == 1
    assert b"Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1


def test_serve_help() -> None:
    cp = run_serve("--help")
    assert cp.returncode == 0, cp.stderr
    assert "PLUGIN" in cp.stdout
    assert "--run" in cp.stdout
    assert cp.stderr == ""


@pytest.mark.parametrize("plugin", ["memory", "null", "pattern", "file", "full", "zero"])
def test_plugin_help_prints_docstring(plugin: str) -> None:
    import inspect

    from pynbd.server.main import load_plugin

    doc = inspect.getdoc(load_plugin(plugin))
    assert doc, f"plugin {plugin} has no docstring (its manual page)"
    for argv in (("memory", "--help"), ("--help", "memory")):
        cp = run_serve(*(plugin if a == "memory" else a for a in argv))
        assert cp.returncode == 0, cp.stderr
        assert doc.strip() in cp.stdout


def test_version() -> None:
    from pynbd import __version__

    assert run_pynbd("--version").stdout.decode().strip() == f"pynbd {__version__}"
    cp = run_serve("--version")
    assert cp.returncode == 0
    assert cp.stdout.strip() == f"pynbd {__version__}"
    # With a plugin: one more line per backend, and exit 0 means "the plugin loads".
    cp = run_serve("memory", "--version")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == f"pynbd {__version__}"
    assert lines[1].startswith("memory ")


def test_dump_plugin() -> None:
    cp = run_serve("memory", "--dump-plugin")
    assert cp.returncode == 0, cp.stderr
    kv = dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)
    assert kv["name"] == "memory"
    assert kv["has_pread"] == "1"
    assert kv["has_pwrite"] == "1"
    assert kv["thread_model"] in {"serialize_connections", "serialize_all_requests",
                                  "serialize_requests", "parallel"}
    assert kv["max_thread_model"]
    assert kv["api_version"] == "2"
    assert kv["magic_config_key"] == "size"
    assert os.path.isabs(kv["path"])
    # Order: path, name first (nbdkit's order; scripts rely on it loosely).
    assert cp.stdout.splitlines()[0].startswith("path=")
    assert cp.stdout.splitlines()[1] == "name=memory"


def test_dump_plugin_with_params_and_file_plugin(tmp_path: Path) -> None:
    # Parameters go to config (not config_complete) — a size is accepted, not required.
    cp = run_serve("--dump-plugin", "memory", "size=1M")
    assert cp.returncode == 0, cp.stderr
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(MY_PLUGIN)
    cp = run_serve(plugin, "--dump-plugin")
    assert cp.returncode == 0, cp.stderr
    kv = dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)
    assert kv["name"] == "my"
    assert kv["path"] == str(plugin)
    assert kv["has_pread"] == "1"
    assert "magic_config_key" not in kv


def test_dump_config() -> None:
    from pynbd import __version__

    cp = run_serve("--dump-config")
    assert cp.returncode == 0, cp.stderr
    kv = dict(line.split("=", 1) for line in cp.stdout.splitlines())
    assert kv["version"] == __version__
    assert kv["name"] == "pynbd"
    assert "linux" in kv["host_os"]
    assert kv["version_major"].isdigit() and kv["version_minor"].isdigit()
    assert kv["run_default_socket"] == "Unix"


def test_long_and_short_options() -> None:
    cp = run_serve("--long-options")
    assert cp.returncode == 0
    assert "--run" in cp.stdout.split()
    cp = run_serve("--short-options")
    assert cp.returncode == 0
    assert "-U" in cp.stdout.split()


# ---------------------------------------------------------------------------- bad command lines

MY_PLUGIN = '''
from pynbd.plugin import Plugin

class MyPlugin(Plugin):
    """NAME
    my - a plugin without a magic config key (like nbdkit's python plugin)
    """

    name = "my"
    nonblocking = True

    def config(self, key, value):
        if key not in ("script", "x"):
            super().config(key, value)

    def get_size(self, h):
        return 4096

    def pread(self, h, count, offset, flags):
        return bytes(count)
'''


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--bogus", "memory", "1M"], ["bogus"]),
        (["memory", "1M", "--bogus"], ["bogus"]),
        (["memory", "1Q"], ["1Q"]),
        (["memory", "size=1Q"], ["1Q"]),
        (["memory", "size=-1"], []),
        (["memory", "9223372036854775808"], []),
        (["-p", "10809", "-U", "/tmp/x.sock", "memory", "1M"], ["cannot be used in this combination"]),
        (["-s", "-U", "/tmp/x.sock", "memory", "1M"], ["cannot be used in this combination"]),
        (["-s", "--run", "true", "memory", "1M"], ["cannot be used in this combination"]),
        (["--vsock", "-U", "/tmp/x.sock", "memory", "1M"], ["cannot be used in this combination"]),
        (["-s", "--dump-plugin", "memory"], ["cannot be used in this combination"]),
        (["--filter=nonexistent", "memory", "1M"], ["nonexistent"]),
        (["nonexistent-plugin"], ["nonexistent-plugin"]),
        (["/nonexistent/plugin.py"], ["/nonexistent/plugin.py"]),
        ([], ["plugin"]),
        (["-t", "x", "memory", "1M"], ["threads"]),
        (["-D", "foo", "memory", "1M"], ["-D"]),
        (["-p", "notaport", "memory", "1M"], ["notaport"]),
        (["memory", "1M", "--run"], ["--run"]),
        (["memory", "1M", "frob=1"], ["frob"]),
        (["--tls=require", "memory", "1M"], ["tls"]),
        (["--tls=maybe", "memory", "1M"], ["maybe"]),
        (["--mask-handshake=x", "memory", "1M"], ["mask-handshake"]),
        (["--log=elsewhere", "memory", "1M"], ["elsewhere"]),
        (["--selinux-label=system_u:object_r:svirt_t:s0", "memory", "1M"], ["selinux"]),
        (["memory"], ["size"]),
        (["zero", "a", "b"], []),
        (["file"], ["file"]),
        (["file", "/nonexistent/disk.img"], ["/nonexistent/disk.img"]),
        (["-P", "/nonexistent/dir/pid", "-U", "-", "memory", "1M"], ["/nonexistent/dir"]),
        (["-U", "/nonexistent/dir/sock", "-f", "memory", "1M"], []),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else "",
)
def test_bad_command_line(args: list[str], needles: list[str]) -> None:
    # -f: should a bad line ever be accepted, the server stays our child (killed at the
    # timeout) instead of leaking a daemon.
    cp = run_serve("-f", *args, timeout=30)
    assert_clean_error(cp, *needles)


def test_bad_pidfile_dir_caught_before_forking() -> None:
    cp = run_serve("-P", "/nonexistent/dir/pid", "-U", "-", "memory", "1M", timeout=30)
    assert_clean_error(cp, "/nonexistent/dir")


def test_conflict_message_is_nbdkits() -> None:
    cp = run_serve("-p", "10809", "-U", "/tmp/x.sock", "memory", "1M")
    line = assert_clean_error(cp)
    assert line.endswith(
        "--dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination")


def test_bare_second_argument_without_magic_key(tmp_path: Path) -> None:
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(MY_PLUGIN)
    # The first bare value is script=VALUE (nbdkit python foo.py); a second one is an error.
    cp = run_serve(plugin, "first", "second", "--dump-plugin")
    line = assert_clean_error(cp)
    assert "expecting key=value on the command line but got: second" in line
    cp = run_serve(plugin, "first", "x=1", "--dump-plugin")
    assert cp.returncode == 0, cp.stderr


def test_broken_plugin_file_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("this is not python(\n")
    assert_clean_error(run_serve(bad, "--dump-plugin"), "bad.py")
    raising = tmp_path / "raising.py"
    raising.write_text(MY_PLUGIN + "\n    def config_complete(self):\n"
                       "        raise RuntimeError('kaboom')\n")
    line = assert_clean_error(run_serve("-U", "-", raising, "--run", "true"))
    assert "kaboom" in line


# ---------------------------------------------------------------------------- parameters


def test_size_key_and_magic_key(pynbd_server) -> None:
    for args in (("memory", "size=1M"), ("memory", "1M"), ("memory", "1048576"),
                 ("memory", "2048s")):
        srv = pynbd_server(*args)
        c = RawClient.unix(srv.sock)
        assert c.size == 1 << 20, args
        c.close()


def test_dot_slash_keeps_a_literal_equals_sign(pynbd_server, tmp_path: Path) -> None:
    # `./a=b` is a bare value (the key would contain '/'): the file named "a=b".
    (tmp_path / "a=b").write_bytes(b"\x42" * 8192)
    srv = pynbd_server("file", "./a=b", cwd=tmp_path)
    c = RawClient.unix(srv.sock)
    assert c.size == 8192
    assert c.pread(16, 4096) == b"\x42" * 16
    c.close()


def test_options_after_plugin_permutation(sockdir: Path) -> None:
    sock = sockdir / "perm.sock"
    cp = run_serve("memory", "1M", "-U", sock, "-r", "--run", "echo $unixsocket")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == str(sock)


def test_errno_names() -> None:
    assert (NBD_EPERM, NBD_EINVAL, NBD_ENOSPC) == (errno.EPERM, errno.EINVAL, errno.ENOSPC)


def test_uri_always_has_port() -> None:
    from pynbd.server.main import Options, make_uri

    o = Options()
    assert make_uri(o, None, 10809, None) == "nbd://localhost:10809"
    o.export = "a b/c"
    assert make_uri(o, None, 10900, None) == "nbd://localhost:10900/a%20b/c"
    o.ip_addr = "::1"
    assert make_uri(o, None, 10900, None) == "nbd://[::1]:10900/a%20b/c"
    assert make_uri(o, "/tmp/s", None, None) == "nbd+unix:///a%20b/c?socket=/tmp/s"
    assert make_uri(o, None, None, 10809) == "nbd+vsock://1:10809/a%20b/c"


@pytest.mark.parametrize(
    "opts, expect",
    [
        (["--read"], "ro"),  # --read-only / --readonly: one option, so not ambiguous
        (["--readon"], "ro"),
        (["--exp=foo"], "foo"),  # --export / --export-name / --exportname
        (["--exportn", "bar"], "bar"),
        (["-e", "--read"], "--read"),  # an option's value is never parsed as an option
        (["--fore"], ""),
        (["-fr"], "ro"),
        (["--run=true", "--"], ""),  # `--` ends options; the rest are positional
    ],
)
def test_long_option_abbreviations(opts: list[str], expect: str) -> None:
    """GNU getopt_long: a unique prefix, or a prefix of several spellings of one option."""
    run = ['--run', 'echo "$exportname"; test -n "$unixsocket"']
    if "--" in opts:
        args = [*opts[:-1], *run, "-U", "-", "--", "memory", "1M"]
    else:
        args = [*opts, "-U", "-", "memory", "1M", *run]
    if expect == "ro":
        args = [a.replace('echo "$exportname"', "echo ro") for a in args]
    cp = run_serve(*args)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == expect


@pytest.mark.parametrize("opt", ["--no", "--ip=127.0.0.1", "--ex"])
def test_ambiguous_abbreviations(opt: str) -> None:
    # --no: --no-fork or --no-sr; --ip: --ip-addr or --ipv4-only...; --ex: --export or --exit...
    line = assert_clean_error(run_serve(opt, "-U", "-", "memory", "1M", "--run", "true"))
    assert "prefix" in line or "ambiguous" in line


FILTER_TEMPLATE = '''
from pynbd.plugin import Filter

class {cls}(Filter):
    """NAME
    {name} - {doc}
    """

    name = "{name}"
    {attr} = {default}

    def config(self, next_config, key, value):
        if key == "{name}-arg":
            self.{attr} = int(value)
        else:
            next_config(key, value)

    def pread(self, next, h, count, offset, flags):
        data = bytes(next.pread(count, offset, flags))
        return bytes(({expr}) & 255 for b in data)
'''

THREES_PLUGIN = '''
from pynbd.plugin import Plugin

class Threes(Plugin):
    """NAME
    threes - every byte is 3
    """

    name = "threes"
    nonblocking = True

    def config(self, key, value):
        super().config(key, value)

    def get_size(self, h):
        return 4096

    def pread(self, h, count, offset, flags):
        return b"\\x03" * count
'''


def test_filters_from_files_stack_in_command_line_order(pynbd_server, tmp_path: Path) -> None:
    """The first --filter is the outermost; filter keys are consumed, others reach the plugin."""
    inc = tmp_path / "inc.py"
    inc.write_text(FILTER_TEMPLATE.format(cls="Inc", name="inc", doc="adds", attr="add",
                                          default=1, expr="b + self.add"))
    dbl = tmp_path / "dbl.py"
    dbl.write_text(FILTER_TEMPLATE.format(cls="Dbl", name="dbl", doc="multiplies", attr="mul",
                                          default=2, expr="b * self.mul"))
    plugin = tmp_path / "threes.py"
    plugin.write_text(THREES_PLUGIN)
    for filters, params, want in (
        ([f"--filter={inc}", f"--filter={dbl}"], [], 3 * 2 + 1),
        ([f"--filter={dbl}", f"--filter={inc}"], [], (3 + 1) * 2),
        ([f"--filter={inc}", f"--filter={dbl}"], ["inc-arg=10", "dbl-arg=5"], 3 * 5 + 10),
        (["--filter", str(inc), "--filter", str(inc)], [], 5),
    ):
        srv = pynbd_server(*filters, plugin, *params)
        c = RawClient.unix(srv.sock)
        assert c.pread(4, 0) == bytes([want]) * 4, (filters, params)
        c.close()
    # A key no layer wants is an error from the plugin, not silently dropped.
    cp = run_serve("-f", f"--filter={inc}", plugin, "bogus=1")
    assert_clean_error(cp, "bogus")
    # --help prints each filter's manual page before the plugin's.
    cp = run_serve(f"--filter={inc}", plugin, "--help")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.index("inc - adds") < cp.stdout.index("threes - every byte is 3")
    cp = run_serve(f"--filter={dbl}", plugin, "--version")
    assert cp.returncode == 0, cp.stderr
    assert [x.split()[0] for x in cp.stdout.splitlines()[1:]] == ["threes", "dbl"]


@pytest.mark.parametrize("text, seconds", [("1", 1.0), ("1.5", 1.5), ("1.5s", 1.5),
                                           ("100ms", 0.1), ("20us", 20e-6),
                                           ("20\u03bcs", 20e-6), ("5ns", 5e-9)])
def test_parse_delay(text: str, seconds: float) -> None:
    from pynbd.server.main import parse_delay

    assert parse_delay(text, "--timeout") == pytest.approx(seconds)
