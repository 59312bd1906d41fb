"""The CI switch: which values of ``CI`` mean CI, and that under it nothing skips quietly.

The hooks (tests/ci_mode.py) are exercised in a real pytest run in a subprocess, on a small
test file with every kind of skip, once with ``CI`` set and once without.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "Yes", "on", "ON",
                                   " true\n"])
def test_truthy_spellings_mean_ci(value: str) -> None:
    assert helpers.ci_enabled(value)


@pytest.mark.parametrize("value", [None, "", "false", "0", "no", "off", "2", "tru", "y",
                                   "enabled"])
def test_other_values_do_not(value: str | None) -> None:
    assert not helpers.ci_enabled(value)


SAMPLE = textwrap.dedent('''
    import pytest
    from helpers import missing, not_here

    def test_passes():
        assert True

    def test_skip():
        pytest.skip("tool-x not found")

    @pytest.mark.skipif(True, reason="needs tool-y")
    def test_skipif():
        pass

    def test_importorskip():
        pytest.importorskip("no_such_module_for_ci_mode")

    def test_missing_peer():
        missing("peer-z not found")

    def test_not_here():
        not_here("no IPv6 loopback here")

    @pytest.mark.xfail(reason="known", strict=True)
    def test_xfail():
        assert False
''')

MODULE_SKIP = 'import pytest\npytest.skip("no backend", allow_module_level=True)\n'


def _run(tmp_path: Path, ci: str | None, source: str = SAMPLE) -> str:
    """pytest -rA on one test file holding `source`, with CI=`ci` (None: unset)."""
    (tmp_path / "test_sample.py").write_text(source)
    env = dict(os.environ)
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # a quicker start: only ci_mode is needed
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_mode", "-p", "no:cacheprovider",
         "-o", "addopts=", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL)
    return cp.stdout + cp.stderr


def _counts(out: str) -> dict[str, int]:
    """pytest's closing line as {"passed": 1, "skipped": 5, ...}."""
    last = [line for line in out.splitlines() if line.startswith("=")][-1]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", last)}


def _outcomes(out: str) -> dict[str, str]:
    """{test name: PASSED/FAILED/ERROR/XFAIL} from pytest's -rA summary."""
    got = {}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "XFAIL"):
            got[rest.split(" - ", 1)[0].rsplit("::", 1)[-1]] = word
    return got


def test_outside_ci_skips_stay_skips(tmp_path: Path) -> None:
    out = _run(tmp_path, None)
    assert _counts(out) == {"passed": 1, "skipped": 5, "xfailed": 1}, out
    out = _run(tmp_path, None, MODULE_SKIP)
    assert _counts(out) == {"skipped": 1}, out


def test_in_ci_every_skip_fails_but_not_here(tmp_path: Path) -> None:
    out = _run(tmp_path, "Yes")  # any truthy spelling (the spellings are tested above)
    # (a skipif marker skips in setup, so it fails as an error there)
    assert _counts(out) == {"failed": 3, "error": 1, "passed": 1, "skipped": 1,
                            "xfailed": 1}, out
    got = _outcomes(out)
    for name in ("test_skip", "test_importorskip", "test_missing_peer"):
        assert got.get(name) == "FAILED", out
    assert got.get("test_skipif") == "ERROR", out
    assert (got.get("test_passes"), got.get("test_xfail")) == ("PASSED", "XFAIL"), out
    # each failure names its reason; the one skip left is not_here's
    for reason in ("tool-x not found", "needs tool-y", "no_such_module_for_ci_mode",
                   "peer-z not found"):
        assert reason in out, out
    assert "SKIPPED [1]" in out and "no IPv6 loopback here" in out, out


def test_in_ci_a_module_level_skip_is_a_collection_error(tmp_path: Path) -> None:
    out = _run(tmp_path, "true", MODULE_SKIP)
    assert _counts(out) == {"error": 1}, out
    assert "module skipped: no backend" in out, out


def _ci_run_normalises(value: str | None) -> tuple[int, str]:
    """Run the block of .ci/run that reads CI (the real text, cut out of the script)."""
    script = (TESTS.parent / ".ci" / "run").read_text()
    start = script.index('ci_value="${CI:-true}"')
    block = script[start:script.index("\nesac\n", start) + 6]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if value is not None:
        env["CI"] = value
    cp = subprocess.run(["bash", "-c", f"set -eu\n{block}\necho \"CI=$CI\""], check=False,
                        capture_output=True, text=True, env=env, timeout=30)
    return cp.returncode, cp.stdout.strip()


@pytest.mark.parametrize("value", [None, "", "true", "TRUE", "1", "yes", "On"])
def test_ci_run_passes_truthy_values_on_as_true(value: str | None) -> None:
    rc, out = _ci_run_normalises(value)
    assert (rc, out) == (0, "CI=true")
    assert helpers.ci_enabled(out.removeprefix("CI="))


@pytest.mark.parametrize("value", ["false", "0", "No", "OFF"])
def test_ci_run_keeps_an_explicit_false(value: str) -> None:
    rc, out = _ci_run_normalises(value)
    assert (rc, out) == (0, "CI=false")
    assert not helpers.ci_enabled(out.removeprefix("CI="))


def test_ci_run_refuses_a_value_it_cannot_read() -> None:
    rc, out = _ci_run_normalises("sometimes")
    assert rc == 2 and out == ""
