"""process.keep_heap: with TLS, glibc keeps freed heap memory instead of faulting it in again.

Each case runs in a fresh interpreter (malloc's settings are per process): batches of
256-288 KiB bytes objects are made and freed 40 times, as a TLS connection's batches of
encrypted replies are, and the process's minor page faults are counted.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

_SCRIPT = """
import resource, sys
from pynbd.server import process
if sys.argv[1] == "keep":
    process.keep_heap()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    batch = [b"\\1" * (262144 + 4096 * j) for j in range(8)]
    del batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str, **env: str) -> int:
    cp = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                        check=True, env={**os.environ, "PYTHONPATH": str(SRC), **env})
    return int(cp.stdout)


def test_freed_batches_are_reused_not_faulted_in_again() -> None:
    default, kept = _faults("default"), _faults("keep")
    # one batch is ~2.2 MiB (~560 pages): faulted in once when kept, every time without
    assert kept < 2000, (kept, default)
    assert default > 4 * kept, (kept, default)


def test_the_users_malloc_settings_win() -> None:
    assert _faults("keep", MALLOC_TRIM_THRESHOLD_="0") > 4000
