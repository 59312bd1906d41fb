"""`pynbd serve` as a process: background by default, pid files, --exit-with-parent, -u/-g,
signals, what it does with stdio, --log, --timeout, --keepalive, --swap.

Every server here is a real subprocess spoken to with a raw NBD client (cli_helpers.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import (
    RawClient,
    assert_clean_error,
    pid_alive,
    popen_serve,
    pynbd_cmd,
    recv_exact,
    run_serve,
    stop_proc,
    wait_gone,
)
from helpers import (
    peer_env,
    start_daemon_server,
    wait_listening,
)

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
        assert pid_alive(srv.pid)
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
    assert wait_gone(srv.pid)


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
        assert wait_gone(pid)


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
        assert pid_alive(pid)
        c = RawClient.unix(str(sock))
        assert c.size == 1 << 20
        c.close()
        parent.kill()
        parent.wait()
        assert wait_gone(pid), "server outlived its parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


def test_sigterm_and_sigint_clean_exit(pynbd_server) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv = pynbd_server("memory", "1M")
        c = RawClient.unix(srv.sock)  # a client that stays connected
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=15) in (0, -sig)
        c.s.close()
        srv.stop()
        assert "Traceback" not in srv.stderr


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
    proc = popen_serve("-f", "--print-uri", "-U", "-", plugin)
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()  # EOF while the server still runs
        assert proc.poll() is None
        uri = out.strip()
        c = RawClient.unix(uri.split("socket=", 1)[1])
        assert c.pread(16, 0) == bytes(16)
        c.close()
    finally:
        rest, err = stop_proc(proc)
    assert rest == ""
    assert "NOISE" not in err


def test_run_command_keeps_stdout(tmp_path: Path) -> None:
    plugin = tmp_path / "noisy.py"
    plugin.write_text(NOISY_PLUGIN)
    client = tmp_path / "client.py"
    client.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from cli_helpers import RawClient\n"
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
        stop_proc(proc)


def _client_script(tmp_path: Path, body: str) -> Path:
    client = tmp_path / "client.py"
    client.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from cli_helpers import RawClient\n" + body)
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
        assert wait_gone(pid)


def test_run_command_gets_stdin() -> None:
    cp = subprocess.run(pynbd_cmd("-U", "-", "memory", "1M", "--run", "cat; echo done"),
                        check=False, input="from the caller\n", capture_output=True,
                        text=True, timeout=60, env=peer_env())
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "from the caller\ndone\n"


def test_timeout_drops_idle_handshake(pynbd_server) -> None:
    srv = pynbd_server("--timeout=300ms", "memory", "1M")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(srv.sock)
    t0 = time.monotonic()
    assert recv_exact(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
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
    recv_exact(s, 18)
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
    proc = popen_serve("-f", "--print-uri", "-U", "-", plugin, f"marker={marker}")
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
            assert wait_gone(pid)
            return
        assert c.size == 1 << 20
        c.close()
        with open(f"/proc/{pid}/status") as f:
            locked = next(int(x.split()[1]) for x in f if x.startswith("VmLck:"))
        assert locked > 0
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            assert wait_gone(pid)
