"""README.md as a new user follows it: the first command, then the tour, as written.

A fresh copy of this checkout, a fresh HOME (Debian's /etc/skel) and the PATH a Debian user
has (/etc/profile's), nothing from the test run's own environment: the README's first
command must leave ``pynbd`` on PATH without putting the venv's python3 before Debian's
(which would break nbdsh), and every tour command that can run here must then work as
written. Only ``/tmp/`` is moved to a private directory (the tour's fixed paths would collide
with other runs on this machine); the one command on a fixed TCP port, the fuse mount and
the test suite itself (README's second command) are not run here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, require, short_tmpdir, wait_listening

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

#: The PATH /etc/profile gives a Debian user (no venv, no pyenv, no ~/.local/bin yet).
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Seconds for one tour command.
TIMEOUT = 120.0
#: Environment a user's shell would have that the install needs (a proxy, pip's index).
_PASS_THROUGH = re.compile(r"^(PIP_\w+|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)$")


# ---------------------------------------------------------------------------- the README


def _section(readme: str, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level
    (a ``#`` inside a fenced block is a shell comment, not a heading)."""
    lines = readme.splitlines(keepends=True)
    fenced = False
    level = 0
    out: list[str] = []
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) (.*)\n?$", line)
        if m and level and len(m.group(1)) <= level:
            break
        if level:
            out.append(line)
        elif m and m.group(2) == heading:
            level = len(m.group(1))
    assert level, f"README.md has no section {heading!r}"
    return "".join(out)


def _blocks(text: str, lang: str) -> list[str]:
    found = re.findall(rf"^ *```{lang}\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(b) for b in found]


def _commands(block: str) -> list[str]:
    """Shell commands of a block: comment lines dropped, continued lines joined."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.strip() if not pending else " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        elif not pending.endswith(("&&", "||", "|")):
            out.append(pending)
            pending = ""
    assert not pending, f"unterminated command: {pending}"
    return out


@dataclass
class Tour:
    step1: str
    tour: list[str]
    plugin_source: str
    plugin_run: list[str]
    client: str
    tools: list[str]


def _readme() -> Tour:
    readme = (ROOT / "README.md").read_text()
    two = _section(readme, "Two commands")
    plugin = _section(readme, "Writing a plugin")
    steps = _blocks(two, "sh")
    assert len(steps) == 2 and steps[1].strip() == "./scripts/test", steps
    return Tour(
        step1=" ".join(_commands(steps[0])),
        tour=_commands(_blocks(_section(readme, "A short tour"), "sh")[0]),
        plugin_source=_blocks(plugin, "python")[0],
        plugin_run=_commands(_blocks(plugin, "sh")[0]),
        client=_blocks(_section(readme, "The client"), "python")[0],
        tools=_commands(_blocks(_section(readme, "The tools"), "sh")[0]),
    )


# ---------------------------------------------------------------------------- a new user


@dataclass
class User:
    """A shell session in a fresh copy of the checkout, with a fresh HOME."""

    checkout: Path
    home: Path
    private: Path  # where the README's /tmp/ paths go
    env: dict[str, str]

    def adapt(self, cmd: str) -> str:
        """The README's /tmp/ paths moved to the private directory (once)."""
        mine = re.escape(self.private.name)
        return re.sub(rf"(?<![\w/])/tmp/(?!{mine}/)", f"{self.private}/", cmd)

    def run(self, cmd: str, timeout: float = TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run(["bash", "-c", self.adapt(cmd)], cwd=self.checkout, check=False,
                            env=env or self.env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, f"{cmd}\nexit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        return cp


def _copy_checkout(dest: Path) -> None:
    """This checkout's files as a fresh clone would have them (plus uncommitted work)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"],
                                cwd=ROOT, check=True, capture_output=True).stdout
        for name in filter(None, listed.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache"))


def _fresh_env(home: Path) -> dict[str, str]:
    env = {"HOME": str(home), "PATH": USER_PATH, "LANG": "C.UTF-8", "SHELL": "/bin/bash",
           "USER": os.environ.get("USER", "root"), "LOGNAME": os.environ.get("USER", "root")}
    env.update({k: v for k, v in os.environ.items() if _PASS_THROUGH.match(k)})
    return env


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    for tool in ("nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-nbd"):
        require(tool)
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("the README is for Debian's /usr/bin/python3")
    private = short_tmpdir("pynbd-readme-")
    home, checkout = private / "home", private / "pynbd"
    home.mkdir()
    checkout.mkdir()
    for skel in (".profile", ".bashrc"):
        if os.path.exists(f"/etc/skel/{skel}"):
            shutil.copy(f"/etc/skel/{skel}", home / skel)
    _copy_checkout(checkout)
    u = User(checkout, home, private, _fresh_env(home))
    try:
        yield u
    finally:
        pidfile = private / "pynbd.pid"
        if pidfile.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def tour() -> Tour:
    return _readme()


@pytest.fixture(scope="module")
def session(user: User, tour: Tour) -> dict[str, str]:
    """README's first command in the user's shell; that shell's environment after it."""
    cp = user.run(tour.step1 + '\nprintf "\\n%s\\n" "$PATH"', timeout=300)
    lines = cp.stdout.rstrip("\n").split("\n")
    assert f"nbd+unix:///?socket={user.private}/pynbd.sock" in lines, cp.stdout
    return dict(user.env, PATH=lines[-1])


def _which(user: User, env: dict[str, str], name: str, login: bool = False) -> str:
    flags = "-lc" if login else "-c"
    cp = subprocess.run(["bash", flags, f"command -v {name}"], env=env, cwd=user.checkout,
                        check=False, capture_output=True, text=True, timeout=TIMEOUT,
                        stdin=subprocess.DEVNULL)
    return cp.stdout.strip()


def test_first_command_puts_pynbd_on_path_and_not_the_venv(user: User,
                                                            session: dict[str, str]) -> None:
    link = str(user.home / ".local" / "bin" / "pynbd")
    assert _which(user, session, "pynbd") == link
    # Debian's python3 stays first: nbdsh (python3 -m nbd) still finds libnbd.
    assert _which(user, session, "python3") == "/usr/bin/python3"
    assert ".venv" not in session["PATH"]
    assert user.run("pynbd --version", env=session).stdout.startswith("pynbd ")
    # A new login shell (the next terminal after logging in) finds it through ~/.profile.
    if (user.home / ".profile").exists():
        assert _which(user, user.env, "pynbd", login=True) == link
        assert _which(user, user.env, "python3", login=True) == "/usr/bin/python3"


def _foreground_server(user: User, session: dict[str, str], cmd: str) -> None:
    """A tour command that serves until stopped: it must listen and answer nbdinfo."""
    argv = shlex.split(user.adapt(cmd))
    sock = argv[argv.index("-U") + 1]
    proc = subprocess.Popen(["bash", "-c", "exec " + user.adapt(cmd)], cwd=user.checkout,
                            env=session, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_listening(sock=sock, proc=proc, describe=cmd)
        uri = f"nbd+unix:///?socket={sock}"
        what = ["--list"] if "dir=" in cmd else ["--size"]
        out = user.run(shlex.join(["nbdinfo", *what, uri]), env=session).stdout
        assert ("disk.img" in out) if "dir=" in cmd else (out.strip() == str(1 << 30)), out
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have failed to start
            os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err


#: What some tour commands print (the rest must simply succeed).
_EXPECT = {"print(h.get_size())": str(1 << 30), "size=9223372036854775807": "9223372036854775807"}


def test_tour(user: User, session: dict[str, str], tour: Tour) -> None:
    images = user.private / "images"
    images.mkdir(exist_ok=True)
    (images / "disk.img").write_bytes(bytes(4096))
    ran = 0
    for cmd in tour.tour:
        cmd = cmd.replace("/var/lib/images", str(images))
        if " -f " in f" {cmd} " and "-U" not in shlex.split(cmd):
            continue  # a fixed TCP port (10809): not on a machine shared with other runs
        if " -f " in f" {cmd} ":
            _foreground_server(user, session, cmd)
        else:
            out = user.run(cmd, env=session).stdout
            for needle, expected in _EXPECT.items():
                if needle in cmd:
                    assert expected in out.split(), (cmd, out)
        ran += 1
    assert ran >= 7, tour.tour
    assert (user.checkout / "pattern.bin").stat().st_size == 1 << 20


def test_plugin_example(user: User, session: dict[str, str], tour: Tour) -> None:
    (user.checkout / "ramdisk.py").write_text(tour.plugin_source)
    for cmd in tour.plugin_run:
        out = user.run(cmd, env=session).stdout
        assert "virtual size: 64 MiB" in out, out


def test_client_and_tools(user: User, session: dict[str, str], tour: Tour) -> None:
    """The client snippet (under the venv's python) and the tools, against step 1's server."""
    out = user.run(f".venv/bin/python -c {shlex.quote(tour.client)}", env=session).stdout
    assert out.strip() == f"{1 << 30} b'hello'"
    (user.checkout / "disk.img").write_bytes(b"disk.img" * 512)
    user.run("qemu-img create -q -f qcow2 disk.qcow2 1M", env=session)
    ran = 0
    for cmd in tour.tools:
        if cmd.startswith("pynbd fuse "):
            continue  # mounting is tests/interop/test_tool_fuse.py's business
        out = user.run(cmd, env=session).stdout
        if cmd.startswith("pynbd sh "):
            assert out.strip() == str(1 << 30)
        if cmd.startswith("pynbd dump "):
            assert "disk.img" in out  # copied there by the line before
        ran += 1
    assert ran >= 5, tour.tools
    assert (user.checkout / "disk.raw").stat().st_size == 1 << 20
