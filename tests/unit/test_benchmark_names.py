"""A benchmark script's directory comes first on sys.path when it runs, so a file there
named like a standard-library module (benchmarks/copy.py once) replaces that module for
every library the benchmark imports (boto3 failed on ``copy.deepcopy``)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_shadows_a_standard_module() -> None:
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert names, f"no benchmarks found in {BENCHMARKS}"
    shadowing = [n for n in names if n in sys.stdlib_module_names]
    assert not shadowing, f"benchmarks/{shadowing[0]}.py hides the standard library's module"
