"""The iso plugin without nbdkit: the command it runs (xorriso gets -as mkisofs, other
programs do not; params is shell text), its manual, and its bad parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from helpers import run_pynbd

from pynbd.plugins.iso import IsoPlugin, iso_command

pytestmark = pytest.mark.timeout(60)


def test_command() -> None:
    assert iso_command("xorriso", None, ["/a b", "/c"]) == \
        "xorriso -as mkisofs -quiet '/a b' /c"
    assert iso_command("/usr/bin/xorriso", "-JrT -V 'My Disk'", ["/d"]) == \
        "/usr/bin/xorriso -as mkisofs -quiet -JrT -V 'My Disk' /d"
    assert iso_command("genisoimage", "-r", ["/d"]) == "genisoimage -quiet -r /d"
    assert iso_command("xorrisofs", "", ["/d"]) == "xorrisofs -quiet /d"


@pytest.mark.parametrize("args, message", [
    ([], ("iso: you must supply the dir=<DIRECTORY> parameter after the plugin name on the "
         "command line")),
    (["SRC/nonexistent"], "iso: realpath: SRC/nonexistent: No such file or directory"),
    (["SRC", "label=x"], "iso: unknown parameter 'label'"),
    (["SRC", "prog=false"], "iso: false: command failed with exit code 1"),
    (["SRC", "prog=/nonexistent/mkisofs"],
     "iso: /nonexistent/mkisofs: command failed with exit code 127: "),
])
def test_bad_parameters(tmp_path: Path, sockdir: Path, args: list[str], message: str) -> None:
    args = [a.replace("SRC", str(tmp_path)) for a in args]
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_pynbd("serve", "-f", "-U", sockdir / "s", "iso", *args, check=False,
                  env={"TMPDIR": str(tmpdir)})
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pynbd serve: error: " + message.replace("SRC", str(tmp_path))), err
    assert list(tmpdir.iterdir()) == []


def test_manual() -> None:
    lines = inspect.cleandoc(IsoPlugin.__doc__ or "").splitlines()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in lines, section
