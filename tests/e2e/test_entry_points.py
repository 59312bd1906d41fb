"""Third-party plugins and filters found through real entry points (an installed
distribution's metadata on sys.path), not through pynbd's own list."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import PYNBD


def _install_dist(site: Path) -> None:
    """A minimal installed distribution: a module and its .dist-info with entry points."""
    (site / "thirdparty_nbd.py").write_text(textwrap.dedent('''
        from pynbd.plugin import Filter, Plugin, parse_size

        class Stripes(Plugin):
            """NAME
                stripes - every byte is its offset modulo 251
            """
            name = "stripes"
            magic_config_key = "size"
            nonblocking = True

            def config(self, key, value):
                self.size = parse_size(value)

            def get_size(self, h):
                return self.size

            def pread(self, h, count, offset, flags):
                return bytes((offset + i) % 251 for i in range(count))

        class Halve(Filter):
            """NAME
                halve - show the first half of the disk
            """
            name = "halve"

            def get_size(self, next, h):
                return next.get_size() // 2
    '''))
    info = site / "thirdparty_nbd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-nbd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pynbd.plugins]\nstripes = thirdparty_nbd:Stripes\n\n"
        "[pynbd.filters]\nhalve = thirdparty_nbd:Halve\n")


def _serve(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *sys.path]))
    return subprocess.run([*PYNBD, "serve", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_plugin_from_an_entry_point_serves(tmp_path: Path) -> None:
    _install_dist(tmp_path)
    script = ("import sys; from pynbd.client import Client; "
              "c = Client.connect(sys.argv[1]); print(c.size, list(c.pread(4, 250))); c.close()")
    cp = _serve(tmp_path, "-U", "-", "stripes", "1K", "--run",
                f"{sys.executable} -c '{script}' \"$uri\"")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split("\n")[0] == "1024 [250, 0, 1, 2]"


def test_filter_from_an_entry_point_stacks(tmp_path: Path) -> None:
    _install_dist(tmp_path)
    script = ("import sys; from pynbd.client import Client; "
              "c = Client.connect(sys.argv[1]); print(c.size); c.close()")
    cp = _serve(tmp_path, "-U", "-", "--filter=halve", "stripes", "1K", "--run",
                f"{sys.executable} -c '{script}' \"$uri\"")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "512"


def test_entry_point_plugin_help_is_its_docstring(tmp_path: Path) -> None:
    _install_dist(tmp_path)
    cp = _serve(tmp_path, "stripes", "--help")
    assert cp.returncode == 0, cp.stderr
    assert "stripes - every byte is its offset modulo 251" in cp.stdout
