"""``pynbd sh`` (nbdsh) against ``pynbd serve``: -c snippets in order, errors and exit status,
scripts, bad command lines, and the interactive shell in a real terminal (tmux)."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYNBD, missing, peer_env, run_pynbd

from pynbd import __version__
from pynbd import libnbd as nbd
from pynbd.tools import sh


def pysh(*args: str, input: bytes | None = None, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_pynbd("sh", *args, input=input, check=check, env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One pynbd memory server (1 MiB) shared by the module's read-only tests: its URI."""
    from helpers import short_tmpdir, start_server

    d = short_tmpdir()
    sock = d / "s.sock"
    srv = start_server([*PYNBD, "serve", "-f", "-U", sock, "memory", "1M"], logdir=d / "log",
                       sock=sock)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"hello, world", 512)
    h.shutdown()
    h.close()
    try:
        yield srv.uri
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- -c snippets


def test_command_prints_size(server: str) -> None:
    assert pysh("-u", server, "-c", "print(h.get_size())").stdout == b"1048576\n"


def test_commands_run_in_order_in_one_namespace(server: str) -> None:
    out = pysh("-c", "x = 1", "-u", server, "-c", "x += h.get_size()", "-c", "print(x)",
               "--command", "print(bytes(h.pread(12, 512)))").stdout
    assert out == b"1048577\nb'hello, world'\n"


def test_options_replay_in_command_line_order(server: str) -> None:
    # --opt-mode before -u: the handle stops negotiating, -c then finishes it.
    out = pysh("--opt-mode", "-u", server, "-c", "print(h.aio_is_negotiating())",
               "-c", "h.opt_go()", "-c", "print(h.aio_is_ready(), h.get_size())").stdout
    assert out == b"True\nTrue 1048576\n"
    # --base-allocation before -u asks for the context; a -c after -u is too late.
    code = "print(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))"
    assert pysh("--base-allocation", "-u", server, "-c", code).stdout == b"True\n"
    assert pysh("-u", server, "-c", code).stdout == b"False\n"
    late = pysh("-u", server, "-c", "h.add_meta_context('base:allocation')", check=False)
    assert late.returncode == 1
    assert late.stderr.startswith(b"pynbd sh: command line script failed: nbd_add_meta_context: ")
    # -u accepts its hidden synonym --connect and the long --uri.
    assert pysh("--connect", server, "-c", "print(h.get_size())").stdout == b"1048576\n"
    assert pysh("--uri=" + server, "-c", "print(h.get_size())").stdout == b"1048576\n"


def test_handle_name_and_preloaded_names() -> None:
    out = pysh("-c", "print(h.get_handle_name(), nbd.__name__, __name__, sys.platform != '',"
                     " os.sep)").stdout
    assert out == b"nbdsh pynbd.libnbd nbdsh True /\n"


def test_command_from_stdin(server: str) -> None:
    cp = pysh("-u", server, "-c", "-", input=b"print(h.get_size())\nprint('two')\n")
    assert cp.stdout == b"1048576\ntwo\n"


def test_nbd_error_is_one_line_exit_1(server: str) -> None:
    cp = pysh("-u", server, "-c", "h.pread(10, 1048570)", check=False)
    assert cp.returncode == 1
    assert cp.stdout == b""
    assert cp.stderr == (b"pynbd sh: command line script failed: nbd_pread: request out of bounds:"
                         b" Invalid argument\n")


def test_nbd_error_with_debug_is_a_traceback(server: str) -> None:
    for how in (["-v"], []):
        env = {} if how else {"LIBNBD_DEBUG": "1"}
        cp = pysh(*how, "-u", server, "-c", "h.pread(10, 1048570)", check=False, env=env)
        assert cp.returncode == 1
        err = cp.stderr.decode()
        assert "Traceback (most recent call last):" in err
        assert "Error: nbd_pread: request out of bounds: Invalid argument (EINVAL)\n" in err
        assert "libnbd: debug: nbdsh: nbd_pread: enter:" in err  # debug messages are on
        assert "command line script failed" not in err


def test_bad_connect_uri_fails_like_nbdsh() -> None:
    cp = pysh("-u", "nbd+unix:///?socket=/nonexistent/sock", check=False)
    assert cp.returncode == 1
    assert cp.stderr == (b"pynbd sh: command line script failed: nbd_connect_uri: connect:"
                         b" No such file or directory\n")


def test_python_errors_are_tracebacks_of_the_user_code() -> None:
    cp = pysh("-c", "x = 1", "-c", "1/0", check=False)
    assert cp.returncode == 1
    err = cp.stderr.decode()
    assert err.startswith("Traceback (most recent call last):\n")
    assert '  File "<string>", line 1, in <module>\n' in err
    assert err.endswith("ZeroDivisionError: division by zero\n")
    assert "pynbd" not in err  # no frames of the shell itself
    cp = pysh("-c", "syntax error here", check=False)
    assert cp.returncode == 1
    assert cp.stderr.decode().endswith("SyntaxError: invalid syntax\n")


def test_exit_status_of_sys_exit() -> None:
    assert pysh("-c", "sys.exit(3)", check=False).returncode == 3
    assert pysh("-c", "sys.exit()", "-c", "print('not reached')").stdout == b""
    cp = pysh("-c", "sys.exit('bye')", check=False)
    assert (cp.returncode, cp.stderr) == (1, b"bye\n")


def test_no_handle() -> None:
    cp = pysh("-n", "-c", "print(h)", check=False)
    assert cp.returncode == 1
    assert cp.stderr.decode().endswith("NameError: name 'h' is not defined\n")
    cp = pysh("-n", "-c", "g = nbd.NBD(); print(g.get_handle_name().startswith('nbd'))")
    assert cp.stdout == b"True\n"


# ----------------------------------------------------------------------------- scripts


def test_script_file_and_arguments(server: str, tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(__name__, sys.argv, h.get_size())\n")
    out = pysh("-u", server, str(script), "a", "-b").stdout.decode()
    assert out == f"__main__ ['{script}', 'a', '-b'] 1048576\n"
    out = pysh("-u", server, "-", "x", input=script.read_bytes()).stdout.decode()
    assert out == "__main__ ['-', 'x'] 1048576\n"


def test_script_errors(server: str, tmp_path: Path) -> None:
    script = tmp_path / "e.py"
    script.write_text("print('before')\nh.pread(1, 2 ** 20)\n")
    cp = pysh("-u", server, str(script), check=False)
    assert (cp.returncode, cp.stdout) == (1, b"before\n")
    assert cp.stderr == (b"pynbd sh: command line script failed: nbd_pread: request out of bounds:"
                         b" Invalid argument\n")
    script.write_text("def f():\n    raise ValueError('no')\nf()\n")
    cp = pysh(str(script), check=False)
    assert cp.returncode == 1
    assert f'File "{script}", line 2, in f' in cp.stderr.decode()
    cp = pysh(str(tmp_path / "missing.py"), check=False)
    assert cp.returncode == 2
    assert cp.stderr == (f"pynbd sh: can't open file '{tmp_path / 'missing.py'}': [Errno 2] No such"
                         " file or directory\n").encode()


# ----------------------------------------------------------------------------- command line

BAD = [
    (["--foo"], 2, "pynbd sh: error: unrecognized arguments: --foo"),
    (["-u"], 2, "pynbd sh: error: argument -u/--uri: expected one argument"),
    (["-c"], 2, "pynbd sh: error: argument -c/--command: expected one argument"),
    (["--co", "x"], 2, "pynbd sh: error: ambiguous option: --co could match --command, --connect"),
    (["--base-allocation=1"], 2,
     "pynbd sh: error: argument --base-allocation: ignored explicit argument '1'"),
    (["-n", "-u", "nbd://x"], 1,
     "pynbd sh: error: -n option cannot be used with --base-allocation, --opt-mode or --uri"),
    (["-n", "--opt-mode"], 1,
     "pynbd sh: error: -n option cannot be used with --base-allocation, --opt-mode or --uri"),
    (["--base-allocation", "-n"], 1,
     "pynbd sh: error: -n option cannot be used with --base-allocation, --opt-mode or --uri"),
]


@pytest.mark.parametrize(("argv", "status", "message"), BAD,
                         ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_command_line(argv: list[str], status: int, message: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert sh.main(argv) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert err == message + "\n"


def test_bad_command_line_through_the_cli() -> None:
    cp = pysh("--no-such", check=False)
    assert (cp.returncode, cp.stdout) == (2, b"")
    assert cp.stderr == b"pynbd sh: error: unrecognized arguments: --no-such\n"


def test_version_help_and_completion_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert sh.main(["-V"]) == 0
    version = f"pynbd sh {__version__}\nlibnbd 1.14.2\n"
    assert capsys.readouterr().out == version
    assert sh.main(["--short-options"]) == 0
    assert capsys.readouterr().out == "-V\n-c\n-n\n-u\n-v\n"
    assert sh.main(["--long-options"]) == 0
    assert capsys.readouterr().out.split() == [
        "--base-allocation", "--command", "--opt-mode", "--uri", "--verbose", "--version"]
    assert sh.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: pynbd sh ")
    assert "follows libnbd's nbdsh" in text
    assert "--base-allocation" in text and "--connect" not in text
    assert pysh("--version").stdout == version.encode()


# ----------------------------------------------------------------------------- interactive


def test_banner_variants() -> None:
    banner = sh.make_banner(None)
    assert "The ‘nbd’ module has already been imported.\n" in banner
    assert 'h.connect_tcp("remote", "10809")   # Connect to a remote server.' in banner
    h = nbd.NBD()
    banner = sh.make_banner(h)
    assert "is an open NBD handle called ‘h’ in state 'START'." in banner
    assert "h.opt_go()" not in banner
    h.set_opt_mode(True)
    assert "h.opt_go()                         # Finish option negotiation" in sh.make_banner(h)


def test_interactive_from_a_pipe(server: str) -> None:
    cp = pysh("-u", server, input=b"print(h.get_size())\nx = 1 +\n")
    assert cp.stdout == b"nbd> 1048576\nnbd> nbd> "
    err = cp.stderr.decode()
    assert err.startswith("\nWelcome to nbdsh, the shell for interacting with\n")
    assert "in state 'READY'" in err
    assert "SyntaxError" in err


_sessions = itertools.count()


class Terminal:
    """A program running in a real terminal: a tmux session on a private tmux server."""

    def __init__(self, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            missing("tmux not found on PATH (Debian package tmux)")
        self.socket = f"pynbd-sh-{os.getpid()}-{next(_sessions)}"
        self.status = workdir / "status"
        self.env = peer_env(env)
        cmd = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.status))}"
        self._tmux("new-session", "-d", "-s", "t", "-x", "150", "-y", "50", cmd)

    def _tmux(self, *args: str) -> str:
        cp = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                            env=self.env, timeout=20, check=False)
        return cp.stdout.decode(errors="replace")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, count: int = 1, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) not on the terminal:\n{screen}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self.status.exists() or not self.status.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running:\n{self.screen()}")
            time.sleep(0.05)
        return int(self.status.read_text())

    def close(self) -> None:
        self._tmux("kill-server")


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    try:
        yield made
    finally:
        for t in made:
            t.close()


def test_terminal_size_completion_and_history(server: str, tmp_path: Path,
                                              terminal: list[Terminal]) -> None:
    history = tmp_path / "history"
    t = Terminal([*PYNBD, "sh", "-u", server], tmp_path, {"PYNBD_SH_HISTORY": str(history)})
    terminal.append(t)
    screen = t.wait_for("\nnbd>")
    assert "is an open NBD handle called ‘h’ in state 'READY'." in screen
    t.send("h.get_size()", "Enter")
    t.wait_for("\n1048576\n")
    # Tab completes the method name (and its empty argument list).
    t.send("h.get_si", "Tab")
    t.wait_for("nbd> h.get_size()", count=2)
    t.send(" + 1", "Enter")
    t.wait_for("\n1048577\n")
    # Up arrow: the previous line again, from the history.
    t.send("Up")
    t.wait_for("nbd> h.get_size() + 1", count=2)
    t.send("Enter")
    t.wait_for("\n1048577\n", count=2)
    t.send("C-d")
    assert t.wait_exit() == 0
    # The history file keeps the lines (readline drops a repeat of the line before).
    assert history.read_text().splitlines() == ["h.get_size()", "h.get_size() + 1"]
    # ... and the next session starts with them.
    (tmp_path / "status").unlink()
    t2 = Terminal([*PYNBD, "sh", "-n"], tmp_path, {"PYNBD_SH_HISTORY": str(history)})
    terminal.append(t2)
    t2.wait_for("\nnbd>")
    t2.send("Up", "Up")
    t2.wait_for("nbd> h.get_size()\n")  # the older line, not "... + 1"
    t2.send("C-u", "C-d")
    assert t2.wait_exit() == 0


def test_terminal_opt_mode_interrupt_and_exit_status(server: str, tmp_path: Path,
                                                     terminal: list[Terminal]) -> None:
    t = Terminal([*PYNBD, "sh", "--opt-mode", "-u", server], tmp_path,
                 {"PYNBD_SH_HISTORY": ""})
    terminal.append(t)
    screen = t.wait_for("\nnbd>")
    assert "in state 'NEGOTIATING'." in screen
    assert "h.opt_go()                         # Finish option negotiation" in screen
    t.send("h.opt_go(); print(h.get_size() + 1)", "Enter")
    t.wait_for("\n1048577\n")
    t.send("while True: pass", "Enter", "Enter")
    time.sleep(0.3)
    t.send("C-c")
    t.wait_for("KeyboardInterrupt")
    t.send("exit(3)", "Enter")
    assert t.wait_exit() == 3
