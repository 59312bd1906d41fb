"""Fixtures for the fuzzers' tests.

``fuzz_seed`` is ``$PYNBD_FUZZ_SEED`` or a fresh random seed; it is printed, and every
failure message names it, so a failing run replays with
``PYNBD_FUZZ_SEED=SEED ./scripts/test tests/fuzz`` (or ``scripts/fuzz --seed SEED``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import short_tmpdir

CI_SEED = "5eed0001"


@pytest.fixture
def fuzz_seed() -> str:
    # A fixed seed and a fixed number of inputs keep the suite deterministic; scripts/fuzz
    # (or PYNBD_FUZZ_SEED=random) explores new ground.
    seed = os.environ.get("PYNBD_FUZZ_SEED") or CI_SEED
    if seed == "random":
        seed = secrets.token_hex(4)
    print(f"fuzz seed: {seed} (replay: PYNBD_FUZZ_SEED={seed}, or scripts/fuzz --seed {seed})")
    return seed


@pytest.fixture
def fuzz_dir() -> Iterator[Path]:
    d = short_tmpdir("pynbd-fuzz-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
