"""`pynbd serve`'s serving modes: TCP, Unix (also private, -U -), vsock, --run, -s on
stdin/stdout, socket activation, -r, -e, -t.

Every server here is a real subprocess spoken to with a raw NBD client (cli_helpers.py).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EPERM,
    NBD_FLAG_READ_ONLY,
    TIMEOUT,
    RawClient,
    assert_clean_error,
    popen_serve,
    pynbd_cmd,
    run_serve,
    stop_proc,
)
from helpers import (
    free_tcp_port,
    peer_env,
)


def test_print_uri_tcp() -> None:
    proc = popen_serve("-f", "--print-uri", "-p", "0", "-i", "127.0.0.1", "memory", "1M")
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        m = re.fullmatch(r"nbd://127\.0\.0\.1:(\d+)", uri)
        assert m, uri
        c = RawClient.tcp("127.0.0.1", int(m.group(1)))
        assert c.size == 1 << 20
        c.close()
    finally:
        stop_proc(proc)


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
    proc = popen_serve("-f", "--print-uri", "-p", str(port), "-i", "::1", "memory", "1M")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"nbd://[::1]:{port}"
        s = socket.create_connection(("::1", port), timeout=TIMEOUT)
        c = RawClient(s)
        assert c.size == 1 << 20
        c.close()
    finally:
        stop_proc(proc)


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
    proc = popen_serve("-f", "--print-uri", "-U", "-", "memory", "1M")
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        path = uri.split("socket=", 1)[1]
        c = RawClient.unix(path)
        assert c.size == 1 << 20
        c.close()
    finally:
        stop_proc(proc)
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
        "from cli_helpers import RawClient\n"
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
        stop_proc(proc)


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
        stop_proc(proc)


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
