"""`pynbd serve` as users type it: nbdkit's command line, exit codes, messages, modes.

Every server here is a real subprocess; the checks that it serves use a tiny raw NBD
client (oldstyle-free fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) so this file
needs no peer. Interop with libnbd's tools is in tests/interop/.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    PYNBD,
    free_tcp_port,
    peer_env,
    run_pynbd,
    start_daemon_server,
    wait_listening,
)

# ---------------------------------------------------------------------------- a raw client

NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_FLAG_READ_ONLY = 1 << 1
NBD_EPERM, NBD_EINVAL, NBD_ENOSPC = 1, 22, 28
TIMEOUT = 30.0


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed the connection ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


class RawClient:
    """Fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies: enough to prove a server serves."""

    def __init__(self, sock: socket.socket, export: str = "") -> None:
        self.s = sock
        sock.settimeout(TIMEOUT)
        assert _recv(sock, 8) == b"NBDMAGIC"
        assert _recv(sock, 8) == b"IHAVEOPT"
        (hflags,) = struct.unpack(">H", _recv(sock, 2))
        assert hflags & 1, "server is not fixed newstyle"
        no_zeroes = bool(hflags & 2)
        sock.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        name = export.encode()
        sock.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
        self.size, self.eflags = struct.unpack(">QH", _recv(sock, 10))
        if not no_zeroes:
            _recv(sock, 124)
        self.cookie = 0

    @classmethod
    def unix(cls, path: str, export: str = "") -> RawClient:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(path)
        return cls(s, export)

    @classmethod
    def tcp(cls, host: str, port: int, export: str = "") -> RawClient:
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        return cls(s, export)

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> int:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, self.cookie, offset,
                                   length) + data)
        return self.cookie

    def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", _recv(self.s, 16))
        assert magic == 0x67446698
        data = _recv(self.s, read_len) if read_len and not err else b""
        return cookie, err, data

    def pread(self, count: int, offset: int) -> bytes:
        self.send(NBD_CMD_READ, offset, count)
        _, err, data = self.reply(count)
        if err:
            raise OSError(err, os.strerror(err))
        return data

    def pwrite(self, data: bytes, offset: int) -> int:
        """Returns the NBD error (0 on success)."""
        self.send(NBD_CMD_WRITE, offset, len(data), data)
        return self.reply()[1]

    def close(self) -> None:
        try:
            self.send(NBD_CMD_DISC, 0, 0)
        except OSError:
            pass
        self.s.close()


def pynbd_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [*PYNBD, "serve", *(os.fspath(a) for a in args)]


def run_serve(*args: str | os.PathLike[str], timeout: float = 60,
              cwd: str | os.PathLike[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pynbd_cmd(*args), check=False, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=peer_env(env))


def assert_clean_error(cp: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, one line on stderr, no traceback, nothing on stdout; return the line."""
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert cp.stdout == ""
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


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


# ---------------------------------------------------------------------------- modes


def test_pidfile_written(pynbd_server, sockdir: Path) -> None:
    pidfile = sockdir / "server.pid"
    srv = pynbd_server("-P", pidfile, "memory", "1M")
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pidfile.read_text() == f"{srv.pid}\n"


def test_relative_pidfile_made_absolute(pynbd_server, sockdir: Path) -> None:
    srv = pynbd_server("-P", "rel.pid", "memory", "1M", cwd=sockdir)
    deadline = time.monotonic() + 10
    while not (sockdir / "rel.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (sockdir / "rel.pid").read_text().strip() == str(srv.pid)


def test_background_by_default(sockdir: Path) -> None:
    """Without -f the parent exits 0 once listening and the daemon keeps serving."""
    pidfile = sockdir / "daemon.pid"
    sock = sockdir / "daemon.sock"
    srv = start_daemon_server(
        pynbd_cmd("-P", pidfile, "-U", sock, "memory", "1M"),
        pidfile=pidfile, logdir=sockdir / "daemon.log", sock=sock)
    try:
        assert _pid_alive(srv.pid)
        for _ in range(2):  # and more than one client, one after the other
            c = RawClient.unix(str(sock))
            assert c.size == 1 << 20
            assert c.pwrite(b"daemon", 0) == 0
            assert c.pread(6, 0) == b"daemon"
            c.close()
        # The daemon is in its own session, not the test's.
        assert os.getsid(srv.pid) == srv.pid
    finally:
        srv.stop()
    assert _wait_gone(srv.pid)


def test_background_print_uri(sockdir: Path) -> None:
    pidfile = sockdir / "p.pid"
    sock = sockdir / "p.sock"
    cp = run_serve("--print-uri", "-P", pidfile, "-U", sock, "memory", "1M")
    try:
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.strip() == f"nbd+unix:///?socket={sock}"
    finally:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid)


def _popen_serve(*args: str | os.PathLike[str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(pynbd_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=peer_env(),
                            start_new_session=True, **kw)  # type: ignore[call-overload]


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"server did not exit on SIGTERM\n{err}")
    assert proc.returncode in (0, -signal.SIGTERM), err
    return out, err


def test_print_uri_tcp() -> None:
    proc = _popen_serve("-f", "--print-uri", "-p", "0", "-i", "127.0.0.1", "memory", "1M")
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        m = re.fullmatch(r"nbd://127\.0\.0\.1:(\d+)", uri)
        assert m, uri
        c = RawClient.tcp("127.0.0.1", int(m.group(1)))
        assert c.size == 1 << 20
        c.close()
    finally:
        _stop(proc)


def test_tcp_port_and_address(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M", tcp=True)
    assert srv.port is not None
    c = RawClient.tcp("127.0.0.1", srv.port)
    assert c.size == 1 << 20
    assert c.pwrite(b"tcp!", 512) == 0
    assert c.pread(4, 512) == b"tcp!"
    c.close()
    # -i 127.0.0.1 binds that address only.
    with socket.socket(socket.AF_INET6) as s6:
        try:
            s6.settimeout(2)
            assert s6.connect_ex(("::1", srv.port)) != 0
        except OSError:
            pass


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_tcp_ipv6() -> None:
    if not _have_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    port = free_tcp_port("::1")
    proc = _popen_serve("-f", "--print-uri", "-p", str(port), "-i", "::1", "memory", "1M")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"nbd://[::1]:{port}"
        s = socket.create_connection(("::1", port), timeout=TIMEOUT)
        c = RawClient(s)
        assert c.size == 1 << 20
        c.close()
    finally:
        _stop(proc)


def test_private_unix_socket_removed_at_exit() -> None:
    cp = run_serve("-U", "-", "memory", "1M", "--run",
                   'echo "$unixsocket"; echo "$uri"; test -S "$unixsocket"')
    assert cp.returncode == 0, cp.stderr
    path, uri = cp.stdout.splitlines()
    assert path.endswith("/socket")
    assert uri == f"nbd+unix:///?socket={path}"
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))


def test_private_unix_socket_removed_after_sigterm() -> None:
    proc = _popen_serve("-f", "--print-uri", "-U", "-", "memory", "1M")
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        path = uri.split("socket=", 1)[1]
        c = RawClient.unix(path)
        assert c.size == 1 << 20
        c.close()
    finally:
        _stop(proc)
    assert not os.path.exists(os.path.dirname(path))


def test_vsock_fails_cleanly_or_listens() -> None:
    """No vsock loopback here: binding may work or not; either way no hang, no traceback."""
    port = str(20000 + os.getpid() % 20000)
    cp = run_serve("--vsock", "-p", port, "memory", "1M", "--run", 'echo "$uri"', timeout=60)
    assert "Traceback" not in cp.stderr
    if cp.returncode == 0:
        assert cp.stdout.strip() == f"nbd+vsock://1:{port}"
    else:
        assert_clean_error(cp)


def test_readonly_write_is_eperm(pynbd_server) -> None:
    srv = pynbd_server("-r", "memory", "1M")
    c = RawClient.unix(srv.sock)
    assert c.eflags & NBD_FLAG_READ_ONLY
    assert c.pwrite(b"nope", 0) == NBD_EPERM
    assert c.pread(4, 0) == bytes(4)  # the connection lives
    c.close()
    srv2 = pynbd_server("memory", "1M")
    c = RawClient.unix(srv2.sock)
    assert not c.eflags & NBD_FLAG_READ_ONLY
    c.close()


def test_export_name_in_uri() -> None:
    cp = run_serve("-e", "foo", "-U", "-", "memory", "1M", "--run",
                   'echo "$uri"; echo "$exportname"')
    assert cp.returncode == 0, cp.stderr
    uri, name = cp.stdout.splitlines()
    assert re.fullmatch(r"nbd\+unix:///foo\?socket=/.*/socket", uri), uri
    assert name == "foo"


def test_run_exit_status_and_variables() -> None:
    cp = run_serve("-U", "-", "memory", "1M", "--run", "exit 3")
    assert cp.returncode == 3, cp.stderr
    cp = run_serve("-U", "-", "memory", "1M", "--run", "kill -9 $$")
    assert cp.returncode == 128 + 9
    port = free_tcp_port()
    cp = run_serve("-p", str(port), "memory", "1M", "--run",
                   'echo "$port"; echo "$uri"; echo "[$unixsocket]"')
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == [str(port), f"nbd://localhost:{port}", "[]"]
    # Without -U or -p, --run uses a private Unix socket (nbdkit >= 1.36).
    cp = run_serve("memory", "1M", "--run", 'echo "$uri"')
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("nbd+unix:///?socket=")


def test_run_serves_and_exits(tmp_path: Path) -> None:
    """The command talks to the server; the server is gone when run returns."""
    client = tmp_path / "client.py"
    client.write_text(
        "import socket, struct, sys, os\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from test_cli import RawClient\n"
        "c = RawClient.unix(sys.argv[1])\n"
        "assert c.pwrite(b'captive', 100) == 0\n"
        "print(c.size, c.pread(7, 100).decode(), os.getppid())\n"
        "c.close()\n")
    cp = run_serve("-U", "-", "memory", "1M", "--run",
                   f'{sys.executable} {client} "$unixsocket"; echo $$')
    assert cp.returncode == 0, cp.stderr
    first, _shell_pid = cp.stdout.splitlines()
    size, data, _ = first.split()
    assert (size, data) == ("1048576", "captive")
    # Nothing of the captive server remains (the server is our direct child).
    assert "Traceback" not in cp.stderr


def test_exit_with_parent(sockdir: Path) -> None:
    sock = sockdir / "ewp.sock"
    # An intermediate parent starts the server, prints its pid, then waits forever.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         ("import subprocess, sys, time\n"
          "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)\n"
          "print(p.pid, flush=True)\n"
          "time.sleep(600)\n"),
         *pynbd_cmd("--exit-with-parent", "-U", sock, "memory", "1M")],
        stdout=subprocess.PIPE, text=True, env=peer_env(), start_new_session=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        wait_listening(sock=sock, describe="pynbd serve --exit-with-parent")
        # --exit-with-parent implies -f: the pid we started is the server.
        assert _pid_alive(pid)
        c = RawClient.unix(str(sock))
        assert c.size == 1 << 20
        c.close()
        parent.kill()
        parent.wait()
        assert _wait_gone(pid), "server outlived its parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


def test_threads_one_in_order(pynbd_server) -> None:
    srv = pynbd_server("-t", "1", "memory", "1M")
    c = RawClient.unix(srv.sock)
    for i in range(32):
        c.send(NBD_CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096)
    for i in range(32):
        c.send(NBD_CMD_READ, i * 4096, 4096)
    for i in range(32):
        cookie, err, _ = c.reply()
        assert (cookie, err) == (i + 1, 0)
    for i in range(32):
        cookie, err, data = c.reply(4096)
        assert (cookie, err) == (33 + i, 0)
        assert data == bytes([i]) * 4096
    c.close()


def test_single_stdin_socket() -> None:
    """-s serves one connection on stdin/stdout (a socket here) and exits at its end."""
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(pynbd_cmd("-s", "memory", "1M"), stdin=theirs, stdout=theirs,
                                stderr=subprocess.PIPE, text=True, env=peer_env())
    try:
        c = RawClient(ours)
        assert c.size == 1 << 20
        assert c.pwrite(b"stdin", 0) == 0
        assert c.pread(5, 0) == b"stdin"
        c.close()
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_single_stdin_pipes() -> None:
    """-s on two pipes (what `connect_command` gives a server)."""
    proc = subprocess.Popen(pynbd_cmd("-s", "memory", "1M"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=peer_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = proc.stdout
        def recv(n: int) -> bytes:
            b = out.read(n)
            assert b is not None and len(b) == n
            return b
        assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
        proc.stdin.write(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0))
        proc.stdin.flush()
        size, _ = struct.unpack(">QH", recv(10))
        assert size == 1 << 20
        proc.stdin.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 8))
        proc.stdin.flush()
        magic, err, cookie = struct.unpack(">IIQ", recv(16))
        assert (magic, err, cookie) == (0x67446698, 0, 7)
        assert recv(8) == bytes(8)
        proc.stdin.close()  # EOF: the connection ends, so does the server
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _activate(lsock: socket.socket | list[socket.socket], listen_pid: str | None,
              *args: str) -> subprocess.Popen[str]:
    """Start `pynbd serve ARGS` with the sockets as fds 3, 4... and LISTEN_FDS (systemd's
    protocol: LISTEN_PID must be the server's own pid, hence the exec from a shell)."""
    socks = lsock if isinstance(lsock, list) else [lsock]
    import fcntl

    # Copies on high fds first, so no socket sits on a target fd when dup2 fills 3, 4...
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for s in socks]
    targets = list(range(3, 3 + len(socks)))

    def to_fds() -> None:
        for src, dst in zip(high, targets):
            os.dup2(src, dst)  # dup2 clears FD_CLOEXEC on the copy

    pid_expr = '"$$"' if listen_pid is None else listen_pid
    script = f'LISTEN_PID={pid_expr} LISTEN_FDS={len(socks)} exec "$@"'
    try:
        return subprocess.Popen(["/bin/sh", "-c", script, "sh", *pynbd_cmd(*args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=peer_env(),
                                preexec_fn=to_fds, pass_fds=tuple(targets),  # noqa: PLW1509
                                start_new_session=True)
    finally:
        for fd in high:
            os.close(fd)


def test_socket_activation(sockdir: Path) -> None:
    path = str(sockdir / "act.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(8)
    try:
        proc = _activate(lsock, None, "memory", "1M")
    finally:
        lsock.close()
    try:
        for _ in range(2):
            c = RawClient.unix(path)
            assert c.size == 1 << 20
            c.close()
    finally:
        _stop(proc)


def test_socket_activation_two_sockets(sockdir: Path) -> None:
    path = str(sockdir / "act-two.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(8)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    port = tcp.getsockname()[1]
    try:
        proc = _activate([unix, tcp], None, "memory", "1M")
    finally:
        unix.close()
        tcp.close()
    try:
        a = RawClient.unix(path)
        b = RawClient.tcp("127.0.0.1", port)
        assert a.pwrite(b"shared", 0) == 0
        assert b.pread(6, 0) == b"shared"  # one server, one disk
        a.close()
        b.close()
    finally:
        _stop(proc)


def test_socket_activation_forbids_listeners(sockdir: Path) -> None:
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(sockdir / "act2.sock"))
    lsock.listen(8)
    try:
        proc = _activate(lsock, None, "-p", "0", "memory", "1M")
    finally:
        lsock.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "socket activation" in err


def test_listen_pid_not_for_us_is_ignored(sockdir: Path) -> None:
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(sockdir / "act3.sock"))
    lsock.listen(8)
    try:
        # LISTEN_PID of another process: serve normally with --run instead.
        proc = _activate(lsock, "1", "-U", "-", "memory", "1M", "--run", 'echo "$uri"')
    finally:
        lsock.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("nbd+unix:///?socket=")


def test_sigterm_and_sigint_clean_exit(pynbd_server) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv = pynbd_server("memory", "1M")
        c = RawClient.unix(srv.sock)  # a client that stays connected
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=15) in (0, -sig)
        c.s.close()
        srv.stop()
        assert "Traceback" not in srv.stderr


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


NOISY_PLUGIN = '''
from pynbd.plugin import Plugin

class Noisy(Plugin):
    """NAME
    noisy - prints on stdout when a client connects
    """

    name = "noisy"
    nonblocking = True

    def open(self, readonly, export_name, is_tls):
        print("NOISE from open", flush=True)

    def get_size(self, h):
        return 4096

    def pread(self, h, count, offset, flags):
        print("NOISE from pread", flush=True)
        return bytes(count)
'''


def test_server_stdout_is_detached(tmp_path: Path) -> None:
    """After start-up the server's stdout is /dev/null (nbdkit): plugin output goes nowhere
    and a reader of the server's stdout gets EOF right after the URI."""
    plugin = tmp_path / "noisy.py"
    plugin.write_text(NOISY_PLUGIN)
    proc = _popen_serve("-f", "--print-uri", "-U", "-", plugin)
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()  # EOF while the server still runs
        assert proc.poll() is None
        uri = out.strip()
        c = RawClient.unix(uri.split("socket=", 1)[1])
        assert c.pread(16, 0) == bytes(16)
        c.close()
    finally:
        rest, err = _stop(proc)
    assert rest == ""
    assert "NOISE" not in err


def test_run_command_keeps_stdout(tmp_path: Path) -> None:
    plugin = tmp_path / "noisy.py"
    plugin.write_text(NOISY_PLUGIN)
    client = tmp_path / "client.py"
    client.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from test_cli import RawClient\n"
        "c = RawClient.unix(sys.argv[1]); c.pread(8, 0); c.close()\n"
        "print('client done')\n")
    cp = run_serve("-U", "-", plugin, "--run", f'{sys.executable} {client} "$unixsocket"')
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "client done\n"


def test_fd_exhaustion_does_not_spin(tmp_path: Path, sockdir: Path) -> None:
    """accept() failing with EMFILE must not busy-loop; the server recovers afterwards."""
    import resource

    sock = str(sockdir / "emfile.sock")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    errlog = tmp_path / "stderr"
    with open(errlog, "w") as err:
        proc = subprocess.Popen(pynbd_cmd("-f", "-U", sock, "memory", "1M"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, text=True, env=peer_env(),
                                preexec_fn=limit, start_new_session=True)  # noqa: PLW1509
    clients: list[socket.socket] = []
    try:
        wait_listening(sock=sock, proc=proc)  # type: ignore[arg-type]
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(sock)
            except OSError:
                s.close()
                break
            clients.append(s)
        time.sleep(0.5)

        def cpu() -> float:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        time.sleep(1.0)
        used = cpu() - before
        assert used < 0.5, f"server used {used:.2f}s of CPU in 1s while out of fds"
        # ... and does not flood its log (one line per retry, not per loop iteration).
        assert errlog.read_text().count("accept") < 100
        for s in clients:
            s.close()
        clients.clear()
        deadline = time.monotonic() + 15
        while True:  # the queued connections drain, then a new client is served
            try:
                c = RawClient.unix(sock)
                break
            except (ConnectionError, OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert c.size == 1 << 20
        c.close()
    finally:
        for s in clients:
            s.close()
        _stop(proc)


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


def _client_script(tmp_path: Path, body: str) -> Path:
    client = tmp_path / "client.py"
    client.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from test_cli import RawClient\n" + body)
    return client


@pytest.mark.parametrize("who", [("nobody", "nogroup"), ("65534", "65534")])
def test_user_and_group(tmp_path: Path, who: tuple[str, str]) -> None:
    """-u/-g change user after binding (as nbdkit); the private socket dir follows."""
    if os.geteuid() != 0:
        cp = run_serve("-f", "-u", "0", "-U", "-", "memory", "1M", "--run", "true")
        assert_clean_error(cp, "-u")
        return
    import pwd

    try:
        pwd.getpwuid(65534)
    except KeyError:
        pytest.skip("no user 65534 here")
    client = _client_script(tmp_path, "c = RawClient.unix(sys.argv[1]); print(c.size); c.close()\n")
    user, group = who
    if not user.isdigit():
        try:
            import grp

            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            pytest.skip(f"no user {user} / group {group} here")
    cp = run_serve("-u", user, "-g", group, "-U", "-", "memory", "1M", "--run",
                   f'{sys.executable} {client} "$unixsocket" && '
                   'grep -E "^(Uid|Gid):" /proc/$PPID/status && echo "$unixsocket"')
    assert cp.returncode == 0, cp.stderr
    size, uid, gid, sock = cp.stdout.splitlines()
    assert size == "1048576"
    assert uid.split()[1:] == ["65534"] * 4
    assert gid.split()[1:] == ["65534"] * 4
    assert not os.path.exists(os.path.dirname(sock))  # removed by the unprivileged server


def test_bad_user_stops_run_command(tmp_path: Path) -> None:
    """If the server cannot start after CMD did, CMD is stopped rather than left waiting."""
    marker = tmp_path / "marker"
    cp = run_serve("-u", "no-such-user-here", "-U", "-", "memory", "1M", "--run",
                   f"sleep 1; touch {marker}")
    assert_clean_error(cp, "no-such-user-here")
    time.sleep(1.5)
    assert not marker.exists()


def test_background_with_relative_paths(sockdir: Path) -> None:
    """The daemon does chdir("/"): relative -U, -P and file paths still work."""
    data = os.urandom(8192)
    (sockdir / "rel.img").write_bytes(data)
    cp = subprocess.run(pynbd_cmd("-P", "rel.pid", "-U", "rel.sock", "file", "rel.img"),
                        check=False, capture_output=True, text=True, timeout=60, cwd=sockdir,
                        stdin=subprocess.DEVNULL, env=peer_env())
    assert cp.returncode == 0, cp.stderr
    deadline = time.monotonic() + 20
    while not (sockdir / "rel.pid").exists():
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.02)
    pid = int((sockdir / "rel.pid").read_text())
    try:
        wait_listening(sock=sockdir / "rel.sock")
        c = RawClient.unix(str(sockdir / "rel.sock"))
        assert c.size == 8192
        assert c.pread(8192, 0) == data
        c.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid)


def test_run_command_gets_stdin() -> None:
    cp = subprocess.run(pynbd_cmd("-U", "-", "memory", "1M", "--run", "cat; echo done"),
                        check=False, input="from the caller\n", capture_output=True,
                        text=True, timeout=60, env=peer_env())
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "from the caller\ndone\n"


@pytest.mark.parametrize("text, seconds", [("1", 1.0), ("1.5", 1.5), ("1.5s", 1.5),
                                           ("100ms", 0.1), ("20us", 20e-6),
                                           ("20\u03bcs", 20e-6), ("5ns", 5e-9)])
def test_parse_delay(text: str, seconds: float) -> None:
    from pynbd.server.main import parse_delay

    assert parse_delay(text, "--timeout") == pytest.approx(seconds)


def test_timeout_drops_idle_handshake(pynbd_server) -> None:
    srv = pynbd_server("--timeout=300ms", "memory", "1M")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(srv.sock)
    t0 = time.monotonic()
    assert _recv(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
    assert s.recv(1) == b""  # we never answered: dropped
    assert 0.2 < time.monotonic() - t0 < 5
    s.close()
    c = RawClient.unix(srv.sock)  # a prompt client is served as usual
    assert c.size == 1 << 20
    c.close()


def test_keepalive(pynbd_server) -> None:
    import shutil

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to see socket timers")
    for opts, want in ((["--keepalive"], True), ([], False)):
        srv = pynbd_server(*opts, "memory", "1M", tcp=True)
        c = RawClient.tcp("127.0.0.1", srv.port)
        deadline = time.monotonic() + 5
        while True:
            # ss shows one timer: wait until no retransmission timer ("on") hides it.
            out = subprocess.run(
                ["ss", "-tno", "state", "established", f"( sport = :{srv.port} )"],
                check=True, capture_output=True, text=True).stdout
            if "timer:(on" not in out or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ("keepalive" in out) is want, out
        c.close()


def _idle_client(sock: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    _recv(s, 18)
    assert s.recv(1) == b""  # dropped by --timeout: an error is logged
    s.close()


@pytest.mark.parametrize("log", [None, "stderr", "null", "syslog"])
def test_log_destination(pynbd_server, log: str | None) -> None:
    """Errors look like nbdkit's (`pynbd: error: ...`) on stderr; --log=null drops them;
    --log=syslog sends them to syslog (or stderr when there is no /dev/log)."""
    opts = [f"--log={log}"] if log else []
    srv = pynbd_server(*opts, "--timeout=200ms", "memory", "1M")
    _idle_client(srv.sock)
    deadline = time.monotonic() + 5
    want = "pynbd: error: client 1: handshake timed out"
    while log != "null" and want not in srv.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.stop()
    if log == "null":
        assert srv.stderr == ""
    elif log == "syslog" and os.path.exists("/dev/log"):
        assert "Traceback" not in srv.stderr
    else:
        assert want in srv.stderr.splitlines()


SLOW_START_PLUGIN = '''
import time
from pynbd.plugin import Plugin

class SlowStart(Plugin):
    """NAME
    slowstart - sleeps in after_fork; writes a marker in cleanup
    """

    name = "slowstart"
    nonblocking = True

    def config(self, key, value):
        if key == "marker":
            self.marker = value
        else:
            super().config(key, value)

    def after_fork(self):
        print("READY", flush=True)  # stdout is /dev/null by now: the test watches stderr
        import sys
        print("READY", file=sys.stderr, flush=True)
        time.sleep(30)

    def cleanup(self):
        open(self.marker, "w").close()

    def get_size(self, h):
        return 512

    def pread(self, h, count, offset, flags):
        return bytes(count)
'''


def test_sigterm_before_serving_cleans_up(tmp_path: Path) -> None:
    """SIGTERM while the server is still starting (bound, not yet serving): exit 0, the
    private socket directory removed, the plugin's cleanup run."""
    plugin = tmp_path / "slowstart.py"
    plugin.write_text(SLOW_START_PLUGIN)
    marker = tmp_path / "cleaned"
    proc = _popen_serve("-f", "--print-uri", "-U", "-", plugin, f"marker={marker}")
    try:
        assert proc.stdout is not None and proc.stderr is not None
        uri = proc.stdout.readline().strip()
        sockdir = os.path.dirname(uri.split("socket=", 1)[1])
        assert os.path.isdir(sockdir)
        assert proc.stderr.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not os.path.exists(sockdir)
    assert marker.exists()


def test_swap_locks_memory(sockdir: Path) -> None:
    """--swap: mlockall in the serving process (the daemon after forking), or a clean error
    where locking is not allowed."""
    pidfile = sockdir / "swap.pid"
    sock = sockdir / "swap.sock"
    cp = run_serve("--swap", "-P", pidfile, "-U", sock, "memory", "1M")
    if cp.returncode != 0:
        assert_clean_error(cp, "mlockall")
        return
    deadline = time.monotonic() + 20
    while not pidfile.exists():
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    try:
        wait_listening(sock=sock)
        try:
            c = RawClient.unix(str(sock))  # served: the daemon is past mlockall
        except (ConnectionError, OSError):
            # The daemon could not lock (RLIMIT_MEMLOCK): it logged that and exited.
            assert _wait_gone(pid)
            return
        assert c.size == 1 << 20
        c.close()
        with open(f"/proc/{pid}/status") as f:
            locked = next(int(x.split()[1]) for x in f if x.startswith("VmLck:"))
        assert locked > 0
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            assert _wait_gone(pid)
