"""A plugin or filter that fails while it is set up: one line naming it and what failed.

Whatever a plugin raises in ``__init__``, ``config``, ``config_complete``, ``get_ready`` or
``after_fork`` stops ``pynbd serve`` with exit status 1 and one line on stderr (no
traceback; ``-v`` adds it). A failing ``cleanup`` at exit is logged as one line.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PYNBD, ROOT, peer_env

TIMEOUT = 30.0

PLUGIN = '''
from pynbd.plugin import Plugin

class Failing(Plugin):
    """NAME
    failing - raises in the callback named by the FAIL_IN environment variable
    """
    name = "failing"

    def __init__(self):
        self._fail("load")

    def _fail(self, where):
        import os
        if os.environ.get("FAIL_IN") == where:
            {raise_}

    def config(self, key, value):
        self._fail("config")

    def config_complete(self):
        self._fail("config_complete")

    def get_ready(self):
        self._fail("get_ready")

    def after_fork(self):
        self._fail("after_fork")

    def cleanup(self):
        self._fail("cleanup")

    def get_size(self, h):
        return 512

    def pread(self, h, count, offset, flags):
        return bytes(count)
'''

FILTER = '''
from pynbd.plugin import Filter

class Picky(Filter):
    name = "picky"

    def config(self, next_config, key, value):
        if key == "picky":
            raise KeyError(value)
        next_config(key, value)
'''


def _serve(*args: str | os.PathLike[str], fail_in: str = "",
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYNBD, "serve", *(os.fspath(a) for a in args)], check=False,
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          stdin=subprocess.DEVNULL, env=peer_env({"FAIL_IN": fail_in}))


def _one_line(cp: subprocess.CompletedProcess[str]) -> str:
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stdout == ""
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


@pytest.fixture
def failing(tmp_path: Path) -> Path:
    p = tmp_path / "failing.py"
    p.write_text(PLUGIN.replace("{raise_}", "raise RuntimeError(f'kaboom in {where}')"))
    return p


@pytest.mark.parametrize("callback", ["load", "config", "config_complete", "get_ready",
                                      "after_fork"])
def test_failing_callback_is_one_line(failing: Path, callback: str) -> None:
    cp = _serve("-U", "-", failing, "x=1", "--run", "true", fail_in=callback)
    assert _one_line(cp) == (f"pynbd serve: error: failing: {callback}: "
                             f"RuntimeError: kaboom in {callback}")


@pytest.mark.parametrize("callback", ["config_complete", "after_fork"])
def test_verbose_adds_the_traceback(failing: Path, callback: str) -> None:
    cp = _serve("-v", "-U", "-", failing, "--run", "true", fail_in=callback)
    assert cp.returncode == 1
    assert "Traceback (most recent call last)" in cp.stderr
    assert f"in {callback}" in cp.stderr  # the plugin's own frame is shown
    assert f"failing: {callback}: RuntimeError: kaboom in {callback}" in cp.stderr


def test_failing_cleanup_is_logged_in_one_line(failing: Path) -> None:
    cp = _serve("-U", "-", failing, "--run", "true", fail_in="cleanup")
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    assert cp.stderr.splitlines() == [
        "pynbd: error: failing: cleanup: RuntimeError: kaboom in cleanup"]


def test_os_error_reads_like_one(tmp_path: Path) -> None:
    p = tmp_path / "oserr.py"
    p.write_text(PLUGIN.replace("{raise_}", "open('/nonexistent/state')"))
    line = _one_line(_serve("-U", "-", p, "--run", "true", fail_in="get_ready"))
    assert line == ("pynbd serve: error: failing: get_ready: /nonexistent/state: "
                    "No such file or directory")


def test_config_error_is_the_plugins_own_words(tmp_path: Path) -> None:
    p = tmp_path / "cfg.py"
    p.write_text(PLUGIN.replace("{raise_}", "raise ConfigError('failing: what= is required')")
                 .replace("from pynbd.plugin import Plugin",
                          "from pynbd import ConfigError\nfrom pynbd.plugin import Plugin"))
    line = _one_line(_serve("-U", "-", p, "--run", "true", fail_in="config_complete"))
    assert line == "pynbd serve: error: failing: what= is required"


def test_failing_filter_is_named(tmp_path: Path) -> None:
    f = tmp_path / "picky.py"
    f.write_text(FILTER)
    line = _one_line(_serve("-U", "-", f"--filter={f}", "memory", "1M", "picky=7",
                            "--run", "true"))
    assert line == "pynbd serve: error: picky: config: KeyError: '7'"
    # A key the filter passes down is the plugin's to refuse.
    line = _one_line(_serve("-U", "-", f"--filter={f}", "memory", "1M", "frob=7",
                            "--run", "true"))
    assert line == "pynbd serve: error: memory: unknown parameter 'frob'"


def test_dump_plugin_failure_is_one_line(failing: Path) -> None:
    line = _one_line(_serve(failing, "--dump-plugin", fail_in="load"))
    assert line == "pynbd serve: error: failing: load: RuntimeError: kaboom in load"


# ---------------------------------------------------------------------------- README's plugin


def _readme_plugin(tmp_path: Path) -> Path:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
              if "class " in b]
    assert blocks, "README.md has no plugin example"
    p = tmp_path / "ramdisk.py"
    p.write_text(blocks[0])
    return p


def test_readme_plugin_without_a_size(tmp_path: Path) -> None:
    """Run as the README shows, minus the size: one line, not an error at connect time."""
    _readme_plugin(tmp_path)
    line = _one_line(_serve("-U", "-", "./ramdisk.py", "--run", "true", cwd=tmp_path))
    assert line == ("pynbd serve: error: ramdisk: you must specify size=<SIZE> "
                    "on the command line")
    line = _one_line(_serve("-U", "-", "./ramdisk.py", "64M", "colour=red", "--run", "true",
                            cwd=tmp_path))
    assert line == "pynbd serve: error: ramdisk: unknown parameter 'colour'"
    line = _one_line(_serve("-U", "-", "./ramdisk.py", "64Q", "--run", "true", cwd=tmp_path))
    assert line.startswith("pynbd serve: error: could not parse size")


def test_readme_plugin_with_a_size_serves(tmp_path: Path) -> None:
    _readme_plugin(tmp_path)
    script = ("from pynbd.client import Client\nimport sys\n"
              "with Client.connect(sys.argv[1]) as c:\n"
              "    c.pwrite(b'hello', 0)\n    print(c.size, bytes(c.pread(5, 0)))\n")
    (tmp_path / "client.py").write_text(script)
    cmd = f"{sys.executable} {tmp_path / 'client.py'} \"$uri\""
    cp = _serve("-U", "-", "./ramdisk.py", "64M", "--run", cmd, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"{64 << 20} b'hello'"
    assert cp.stderr == ""


def test_failing_after_fork_in_the_background_is_logged(failing: Path, sockdir: Path) -> None:
    """Once in the background there is no terminal: the line goes to the log (stderr with
    -v, which the daemon keeps), and the daemon exits instead of serving."""
    sock = sockdir / "bg.sock"
    proc = subprocess.Popen([*PYNBD, "serve", "-v", "--log=stderr", "-U", sock, failing],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env=peer_env({"FAIL_IN": "after_fork"}))
    # stderr reaches EOF when the parent and the daemon, which shares it, have both exited.
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0  # the parent left once the socket was bound, as nbdkit's
    assert "pynbd: error: failing: after_fork: RuntimeError: kaboom in after_fork" in err
    with socket.socket(socket.AF_UNIX) as s, pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        s.connect(os.fspath(sock))  # the listener was closed: nobody serves there
