"""The python plugin's --dump-plugin facts and bad-script messages against nbdkit 1.32's.

``callbacks()`` and ``dump_plugin()`` are checked directly, in this process, against the
lines of ``nbdkit python SCRIPT --dump-plugin``: nbdkit's python plugin defines every
callback (has_X=1 for all of them, whatever the script defines), prints python_version,
python_pep_384_abi_version and nbdkit_python_maximum_api_version, then what the script's
dump_plugin prints. tests/data/python/dump.py prints what the nbdkit module answers
(constants, functions, parse_size on many strings), so that is compared too.
"""

from __future__ import annotations

import platform
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_peer, run_pynbd

from pynbd.plugin import ThreadModel
from pynbd.plugins.python import PythonPlugin

DATA = Path(__file__).resolve().parents[1] / "data" / "python"
_NBDKIT_KEYS = ("path", "name", "version", "api_version", "struct_size", "max_thread_model",
                "thread_model", "errno_is_preserved", "magic_config_key")
_PYTHON_KEYS = ("python_version", "python_pep_384_abi_version",
                "nbdkit_python_maximum_api_version")


@pytest.fixture
def plugin() -> Iterator[PythonPlugin]:
    p = PythonPlugin()
    p.load()
    try:
        yield p
    finally:
        p.unload()


def nbdkit_dump(*args: str) -> list[str]:
    return run_peer("nbdkit", "python", *args, "--dump-plugin").stdout.decode().splitlines()


def split(lines: list[str]) -> tuple[dict[str, str], set[str], list[str], list[str]]:
    """(server keys, has_X callbacks, python_* lines, the script's own lines).

    The script's lines may come before nbdkit's own when stdout is a pipe (Python's buffer
    is flushed first); their order among themselves is kept."""
    head, has, python, script = {}, set(), [], []
    for line in lines:
        key, _, value = line.partition("=")
        if key in _NBDKIT_KEYS:
            head[key] = value
        elif key.startswith("has_") and value == "1":
            has.add(key[4:])
        elif key in _PYTHON_KEYS:
            python.append(line)
        else:
            script.append(line)
    return head, has, python, script


def test_dump_plugin_matches_nbdkit(plugin):
    path = str(DATA / "dump.py")
    head, has, python, script = split(nbdkit_dump(path, "k=v"))
    plugin.config("script", path)
    plugin.config("k", "v")
    mine = plugin.dump_plugin()
    assert plugin.callbacks() == has
    assert ThreadModel(plugin.thread_model).name.lower() == head["max_thread_model"]
    assert plugin.get_thread_model().name.lower() == head["thread_model"] == \
        "serialize_requests"
    assert [ln.split("=")[0] for ln in mine[:3]] == [ln.split("=")[0] for ln in python]
    assert mine[0] == f"python_version={platform.python_version()}"  # ours, not nbdkit's
    assert mine[1:3] == python[1:3]
    functions = next(ln for ln in script if ln.startswith("functions="))
    mine_functions = next(ln for ln in mine if ln.startswith("functions="))
    assert set(functions[10:].split(",")) <= set(mine_functions[10:].split(","))
    assert [ln for ln in mine[3:] if ln != mine_functions] == \
        [ln for ln in script if ln != functions]
    assert "dump_plugin_says=hello" in mine and len(mine) > 40


def test_dump_plugin_without_a_script(plugin):
    head, has, python, script = split(nbdkit_dump())
    assert plugin.callbacks() == has
    assert plugin.get_thread_model().name.lower() == head["thread_model"]
    assert [ln.split("=")[0] for ln in plugin.dump_plugin()] == \
        [ln.split("=")[0] for ln in python]
    assert script == []


def test_script_without_thread_model(plugin):
    path = str(DATA / "ex_faults.py")
    head, has, _python, script = split(nbdkit_dump(path))
    plugin.config("script", path)
    assert plugin.get_thread_model().name.lower() == head["thread_model"] == \
        "serialize_all_requests"
    assert plugin.callbacks() == has
    assert plugin.dump_plugin()[3:] == script == []


def test_unload_puts_main_and_nbdkit_back(plugin):
    import sys

    main = sys.modules["__main__"]
    had_nbdkit = "nbdkit" in sys.modules
    plugin.config("script", str(DATA / "ex_ramdisk.py"))
    assert sys.modules["__main__"] is not main and sys.modules["nbdkit"].FLAG_FUA == 2
    plugin.unload()
    assert sys.modules["__main__"] is main
    assert ("nbdkit" in sys.modules) == had_nbdkit


# ---- bad scripts: nbdkit's messages ----------------------------------------------------

GOOD = """\
def open(readonly): return 1
def get_size(h): return 4096
def pread(h, count, offset): return bytes(count)
"""
#: case -> (script text, the plugin's parameters; {s} is the script's path)
BAD = {
    "syntax": ("def open(readonly) return 1\n", ["{s}"]),
    "missing_get_size": ("def open(readonly): return 1\ndef pread(h, c, o): return b''\n",
                         ["{s}"]),
    "raises_at_load": ("raise RuntimeError('no disk today')\n", ["{s}"]),
    "config_raises": (GOOD + "def config(k, v): raise ValueError('bad key ' + k)\n",
                      ["{s}", "x=1"]),
    "config_complete_raises": (GOOD + "def config_complete(): raise RuntimeError('cc')\n",
                               ["{s}"]),
    "no_config": (GOOD, ["{s}", "x=1"]),
    "api_version": ("API_VERSION = 3\n" + GOOD, ["{s}"]),
    "thread_model_raises": (GOOD + "def thread_model(): raise RuntimeError('tm')\n", ["{s}"]),
    "get_ready_raises": (GOOD + "def get_ready(): raise OSError(5, 'not ready')\n", ["{s}"]),
    "first_not_script": (GOOD, ["key=value", "script={s}"]),
    "no_such_file": (GOOD, ["{s}.missing"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_script_messages_match_nbdkit(tmp_path, case):
    """The same first error line (ours in one line, nbdkit's may go on with a traceback),
    exit status 1 from both."""
    text, params = BAD[case]
    s = tmp_path / "plugin.py"
    s.write_text(textwrap.dedent(text))
    common = ["-f", "-U", str(tmp_path / "sock"), "python",
              *(p.format(s=s) for p in params)]
    n = run_peer("nbdkit", *common, check=False)
    p = run_pynbd("serve", *common, check=False)
    assert n.returncode == p.returncode == 1
    errors = [ln.removeprefix("nbdkit: error: ")
              for ln in n.stderr.decode().splitlines() if ln.startswith("nbdkit: error: ")]
    want = errors[0].removesuffix("Traceback (most recent call last):")
    (got,) = p.stderr.decode().splitlines()
    assert got.removeprefix("pynbd serve: error: ").startswith(want), (got, want)
