"""``pynbd sh`` compared with libnbd's nbdsh 1.14 on the same servers: output, errors, exit
status, banner, and the shell in a real terminal.

Messages and -V name ``pynbd sh`` where nbdsh names itself: nbdsh's stderr is read through
`as_pynbd_sh` (that name changed, every other byte compared). What user code prints, the
banner and the handle's name are nbdsh's."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    PYNBD,
    missing,
    peer_env,
    require,
    run_peer,
    run_pynbd,
    short_tmpdir,
    start_server,
)

from pynbd import __version__
from pynbd.tools import sh

pytestmark = pytest.mark.interop


def as_pynbd_sh(err: bytes) -> bytes:
    """nbdsh's messages as `pynbd sh` words them: a line's ``nbdsh: `` prefix names
    `pynbd sh`."""
    return re.sub(rb"(?m)^nbdsh: ", b"pynbd sh: ", err)


def both(*args: str, input: bytes | None = None) -> tuple[subprocess.CompletedProcess[bytes],
                                                         subprocess.CompletedProcess[bytes]]:
    """(nbdsh ARGS, pynbd sh ARGS), neither checked."""
    return (run_peer("nbdsh", *args, input=input, check=False),
            run_pynbd("sh", *args, input=input, check=False))


def assert_same(*args: str, input: bytes | None = None) -> bytes:
    real, ours = both(*args, input=input)
    assert real.returncode == 0, real.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, real.stdout, real.stderr)
    return real.stdout


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """A 1 MiB + 5 pattern disk served by pynbd and by nbdkit, for the whole module: URIs."""
    d = short_tmpdir()
    started = {}
    try:
        for name, cmd in (("pynbd", [*PYNBD, "serve"]), ("nbdkit", [require("nbdkit")])):
            sock = d / f"{name}.sock"
            started[name] = start_server([*cmd, "-f", "-U", sock, "pattern", "1048581"],
                                         logdir=d / f"{name}.log", sock=sock)
        yield {k: v.uri for k, v in started.items()}
    finally:
        for srv in started.values():
            srv.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["pynbd", "nbdkit"])
def uri(request: pytest.FixtureRequest, servers: dict[str, str]) -> str:
    """Each of the two servers in turn."""
    return servers[request.param]


@pytest.fixture
def puri(servers: dict[str, str]) -> str:
    """The pynbd server only (for comparisons where the server does not matter)."""
    return servers["pynbd"]


def test_size(uri: str) -> None:
    assert assert_same("-u", uri, "-c", "print(h.get_size())") == b"1048581\n"


def test_base_allocation(puri: str) -> None:
    code = "print(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))"
    assert assert_same("--base-allocation", "-u", puri, "-c", code) == b"True\n"
    assert assert_same("-u", puri, "-c", code) == b"False\n"


def test_opt_mode_order(uri: str) -> None:
    out = assert_same("--opt-mode", "-u", uri, "-c", "print(h.aio_is_negotiating())",
                      "-c", "h.opt_go()", "-c", "print(h.aio_is_ready(), h.get_size())")
    assert out == b"True\nTrue 1048581\n"


def test_data_and_flags(uri: str) -> None:
    assert_same("-u", uri, "-c", "sys.stdout.buffer.write(h.pread(4096, 1044480))")
    assert_same("-u", uri, "-c", "print(h.get_protocol(), h.is_read_only(), h.can_flush(),"
                " h.can_zero(), h.get_handle_name(), h.connection_state())")


def test_stdin_program(puri: str) -> None:
    program = b"x = h.pread(16, 8)\nprint(x.hex())\nprint(__name__)\n"
    assert assert_same("-u", puri, "-c", "-", input=program) == (
        b"00000000000000080000000000000010\nnbdsh\n")


@pytest.mark.parametrize(
    "code",
    ["h.pread(10, 1048580)", "h.opt_go()"],
)
def test_nbd_errors_match(puri: str, code: str) -> None:
    real, ours = both("-u", puri, "-c", code)
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, b"", as_pynbd_sh(real.stderr))
    assert real.returncode == 1
    assert real.stderr.startswith(b"nbdsh: command line script failed: nbd_")


@pytest.mark.parametrize("uri_arg", ["notauri", "nbd+unix:///?socket=/nonexistent/sock"])
def test_connect_errors_match(uri_arg: str) -> None:
    real, ours = both("-u", uri_arg)
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, real.stdout,
                                                           as_pynbd_sh(real.stderr))
    assert real.stderr.startswith(b"nbdsh: ")


@pytest.mark.parametrize(
    ("code", "status"),
    [("1/0", 1), ("syntax error here", 1), ("import sys; sys.exit(3)", 3),
     ("sys.exit('bye')", 1)],
)
def test_python_errors_and_exit_status_match(code: str, status: int) -> None:
    real, ours = both("-c", code)
    assert ours.returncode == real.returncode == status
    assert ours.stdout == real.stdout
    # Tracebacks differ in the shell's own frames; the error itself is the same.
    assert ours.stderr.splitlines()[-1:] == real.stderr.splitlines()[-1:]


@pytest.mark.parametrize("args", [["--no-such"], ["-u"], ["--co", "x"], ["-c"], ["x.py"]])
def test_bad_options_match(args: list[str], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    if args == ["x.py"]:
        # nbdsh has no script argument; pynbd's is an extension: a missing file is status 2.
        real, ours = both(str(tmp_path / "x.py"))
        assert ours.returncode == real.returncode == 2
        assert len(ours.stderr.splitlines()) == 1
        return
    real = run_peer("nbdsh", *args, check=False)
    assert sh.main(args) == real.returncode == 2
    out, err = capsys.readouterr()
    assert out == "" and real.stdout == b""
    # nbdsh prints argparse's usage lines first; the error line is the same.
    assert err.splitlines() == as_pynbd_sh(real.stderr).decode().splitlines()[-1:]
    assert err.startswith("pynbd sh: error: ")


@pytest.mark.parametrize("args", [["-n", "-u", "nbd://x"], ["-n", "--opt-mode"],
                                  ["--base-allocation", "-n"]])
def test_no_handle_conflicts_match(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    real = run_peer("nbdsh", *args, check=False)
    assert sh.main(args) == real.returncode == 1
    # Same text; pynbd's line carries the tool name first, as every error line does.
    assert capsys.readouterr().err == "pynbd sh: " + real.stderr.decode()


def test_version_and_completion_lists() -> None:
    for args in (["--short-options"], ["--long-options"]):
        assert_same(*args)
    for args in (["-V"], ["--version"]):
        # `pynbd sh` and its version, then the libnbd API level, as nbdsh's second line.
        real, ours = both(*args)
        assert real.returncode == 0 and real.stdout.startswith(b"nbdsh 1.14.2\n")
        expected = f"pynbd sh {__version__}\n".encode() + real.stdout.split(b"\n", 1)[1]
        assert (ours.returncode, ours.stdout, ours.stderr) == (0, expected, real.stderr)


def test_interactive_banner_and_prompt_from_a_pipe(puri: str) -> None:
    # Input that does not use h: nbdsh 1.14.2's shell has no h (pynbd's has).
    assert_same("-n", input=b"print(6 * 7)\n")
    assert_same("-u", puri, input=b"print(nbd.STATE_ZERO)\n")
    assert_same("--opt-mode", "-u", puri, input=b"x = 1\n")
    assert_same(input=b"")


def test_h_in_the_interactive_shell(puri: str) -> None:
    """nbdsh 1.14.2 loses ``h`` in its interactive shell (NameError); pynbd sh has it."""
    real, ours = both("-u", puri, input=b"print(h.get_size())\n")
    assert b"NameError: name 'h' is not defined" in real.stderr
    assert ours.stdout == b"nbd> 1048581\nnbd> "


def _terminal_screen(argv: list[str], keys: list[list[str]], wait: str, workdir: Path) -> str:
    """Run argv in a tmux terminal, type each group of keys, return the screen once `wait`
    is on it."""
    if shutil.which("tmux") is None:
        missing("tmux not found on PATH (Debian package tmux)")
    sock = f"pynbd-shi-{os.getpid()}-{len(list(workdir.iterdir()))}"
    (workdir / sock).touch()
    env = peer_env({"PYNBD_SH_HISTORY": ""})

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *a], capture_output=True, env=env,
                              timeout=20, check=False).stdout.decode(errors="replace")

    tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", shlex.join(argv))
    try:
        deadline = time.monotonic() + 30
        screen = ""

        def until(cond: Callable[[str], bool], what: str) -> str:
            while True:
                screen = tmux("capture-pane", "-p", "-t", "t")
                if cond(screen):
                    return screen
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what} not on the terminal:\n{screen}")
                time.sleep(0.05)

        for n, group in enumerate(keys, 1):
            # Type only at a prompt, so nothing is echoed before the program reads it.
            until(lambda s, n=n: s.count("nbd>") >= n, f"prompt {n}")
            tmux("send-keys", "-t", "t", *group)
        until(lambda s: s.count("nbd>") > len(keys), "the last prompt")
        screen = until(lambda s: wait in s, repr(wait))
        return screen
    finally:
        tmux("kill-server")


def test_terminal_screens_match(tmp_path: Path) -> None:
    """The same keys typed into both shells in a real terminal give the same screen."""
    keys = [["print(6 * 7)", "Enter"], ["nbd.STATE_ZERO", "Enter"], ["1/0", "Enter"]]
    real = _terminal_screen([require("nbdsh"), "-n"], keys, "ZeroDivisionError", tmp_path)
    ours = _terminal_screen([*PYNBD, "sh", "-n"], keys, "ZeroDivisionError", tmp_path)
    assert "\n42\n" in real
    assert ours == real
