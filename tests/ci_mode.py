"""Under CI nothing skips quietly: pytest hooks that turn a skip into a failure.

CI (``.ci/run``) installs every peer and tool the suite uses, so a test that skips there is
a test nobody ran: a missing package, a broken install, a plugin that no longer imports.
With ``CI`` set (:data:`helpers.IN_CI`), every skip -- ``pytest.skip``, ``skipif``,
``importorskip``, a module-level skip -- is reported as a failure naming its reason. The one
exception is :func:`helpers.not_here` inside a test, for what no package can bring (an IPv6
loopback); a whole module never skips in CI. Expected failures (``xfail``) are left alone.

tests/conftest.py imports these hooks, so they apply to the whole suite; a pytest run
elsewhere can load them with ``-p ci_mode`` (with ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import helpers
import pytest

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]

_HINT = ("CI=true: nothing may skip in CI, where every peer and tool is installed"
         " (a machine property no package brings: helpers.not_here)")


def _reason(longrepr: object) -> str:
    """The reason of a skip report (pytest keeps it as (path, line, reason))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed(excinfo: pytest.ExceptionInfo[BaseException] | None) -> bool:
    return excinfo is not None and isinstance(excinfo.value, helpers.NotHere)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not helpers.IN_CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    if _allowed(call.excinfo):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped: {_reason(report.longrepr)}\n({_HINT})"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if not helpers.IN_CI or not report.skipped:
        return
    report.outcome = "failed"
    report.longrepr = f"module skipped: {_reason(report.longrepr)}\n({_HINT})"
