"""How the tools end: a server a tool started (``[ CMD ]``) is stopped on every way out,
signals included, and ``pynbd copy URI - | head -c16`` dies quietly of SIGPIPE as nbdcopy.

Each case runs the real command in a session of its own, waits until the server it started
is up (and, where the tool writes to a pipe, until data flowed), signals the tool and checks
that the tool ended as the C tool would and that the server process is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PYNBD, Server, peer_env

pytestmark = pytest.mark.timeout(90)

SERVE = [sys.executable, "-m", "pynbd", "serve"]
E2E_PLUGIN = str(Path(__file__).parent / "plugins" / "e2eplug.py")
#: How long a tool may take to end, and its server to go, after the signal.
GONE_WITHIN = 15.0


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that is not init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(pred: Callable[[], bool], timeout: float = GONE_WITHIN) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def server_of(p: subprocess.Popen[bytes]) -> int:
    """The pid of the server the tool started (a `pynbd serve` child), once it runs."""
    found: list[int] = []

    def up() -> bool:
        for c in children(p.pid):
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    if b"serve" in f.read():
                        found.append(c)
                        return True
            except OSError:
                pass
        return p.poll() is not None

    assert wait_for(up, 30), "the tool started no server"
    assert found, f"the tool ended ({p.returncode}) before its server was seen"
    return found[0]


def cleanup(p: subprocess.Popen[bytes], server: int = 0) -> None:
    """Whatever the test found, leave nothing running."""
    if p.poll() is None:
        p.kill()
        p.wait()
    if server and running(server):
        os.kill(server, signal.SIGKILL)


def start(*argv: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*PYNBD, *argv], stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.PIPE, env=peer_env(), start_new_session=True)


def finish(p: subprocess.Popen[bytes], server: int) -> tuple[int, bytes]:
    """Wait for the tool to end and its server to go: (exit status, stderr)."""
    try:
        rc = p.wait(GONE_WITHIN)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail("the tool did not end after the signal")
    assert p.stderr is not None
    err = p.stderr.read()
    assert wait_for(lambda: not running(server)), "the server the tool started is still running"
    return rc, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_copy_killed_stops_its_server(sig: signal.Signals) -> None:
    """Copying to a pipe nobody reads (blocked in a write): the signal kills the copy, as
    nbdcopy, and the server goes too."""
    p = start("copy", "--", "[", *SERVE, "pattern", "1G", "]", "-")
    server = 0
    try:
        server = server_of(p)
        assert p.stdout is not None
        assert len(p.stdout.read(4096)) == 4096  # the copy is under way
        p.send_signal(sig)
        rc, err = finish(p, server)
        assert rc == -sig
        assert b"Traceback" not in err
    finally:
        cleanup(p, server)


def test_dump_killed_stops_its_server() -> None:
    """While a read is held up by the server (30 s), or earlier: nbddump's ending on SIGTERM
    (the line ended, exit status 1), and the server goes."""
    p = start("dump", "--", "[", *SERVE, E2E_PLUGIN, "1M", "sleep=30", "]")
    server = 0
    try:
        server = server_of(p)
        p.send_signal(signal.SIGTERM)
        rc, err = finish(p, server)
        # 1 once the dump has its handlers (after connecting); before, killed by SIGTERM
        assert rc in (1, -signal.SIGTERM) and b"Traceback" not in err
    finally:
        cleanup(p, server)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_info_killed_stops_its_server(sig: signal.Signals) -> None:
    """While a read of the content is held up by the server (30 s), or earlier: the signal
    kills `pynbd info` at once (as nbdinfo), and the server goes too."""
    p = start("info", "--", "[", *SERVE, E2E_PLUGIN, "1M", "sleep=30", "]",
              stdout=subprocess.DEVNULL)
    server = 0
    try:
        server = server_of(p)
        t0 = time.monotonic()
        p.send_signal(sig)
        rc, err = finish(p, server)
        assert rc == -sig and time.monotonic() - t0 < GONE_WITHIN
        assert b"Traceback" not in err
    finally:
        cleanup(p, server)


@pytest.mark.parametrize("command", [False, True], ids=["uri", "cmd"])
def test_copy_to_a_closed_pipe_dies_of_sigpipe(pynbd_server: Callable[..., Server],
                                               command: bool) -> None:
    """`pynbd copy SRC - | head -c16`: killed by SIGPIPE, nothing on stderr (nbdcopy: the
    shell sees 141); a server started for [ CMD ] goes too."""
    server = 0
    if command:
        p = start("copy", "--", "[", *SERVE, "pattern", "64M", "]", "-")
    else:
        p = start("copy", pynbd_server("pattern", "64M").uri, "-")
    try:
        if command:
            server = server_of(p)
        assert p.stdout is not None
        assert len(p.stdout.read(16)) == 16
        p.stdout.close()
        rc = p.wait(GONE_WITHIN)
        assert p.stderr is not None
        assert (rc, p.stderr.read()) == (-signal.SIGPIPE, b"")
        if server:
            assert wait_for(lambda: not running(server)), "the server is still running"
    finally:
        cleanup(p, server)


def test_copy_sigpipe_exit_status_as_nbdcopy(pynbd_server: Callable[..., Server]) -> None:
    """The shell's view: `pynbd copy URI - | head -c16` exits 141 with no message, as
    nbdcopy does."""
    srv = pynbd_server("pattern", "64M")
    script = f'{" ".join(PYNBD)} copy "{srv.uri}" - | head -c16 >/dev/null; ' \
             'echo "${PIPESTATUS[0]}"'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                       env=peer_env(), check=False)
    assert (r.stdout.strip(), r.stderr) == ("141", "")
