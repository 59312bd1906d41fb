"""The stateful server fuzzer, bounded for CI (docs/fuzzing.md; scripts/fuzz runs long ones).

1,500 inputs (about 15 s) against `pynbd serve` with the memory and the file plugin, then the
memory probes. Fails on a crash, a traceback in a server log, or any finding that is not
already a test in test_findings.py; the seed is printed.
"""

from __future__ import annotations

from pathlib import Path

from fuzz.server_fuzz import ServerFuzzer

#: Seconds of inputs (the servers' start and the probes come on top: < 60 s in all).
#: Inputs per run: a fixed prefix of the seed's sequence, so a run is deterministic.
INPUTS = 1500
#: A safety cap only (on this 2-core machine the inputs take a fraction of it).
SECONDS = 180.0


def test_server_fuzz(fuzz_seed: str, fuzz_dir: Path) -> None:
    f = ServerFuzzer(fuzz_seed, fuzz_dir)
    t = f.run(inputs=INPUTS, seconds=SECONDS)
    summary = t.summary()
    print(summary)
    assert t.modes.get("valid", 0) > 20 and t.modes.get("mutated", 0) > 40, summary
    assert t.requests > 200, summary
    assert t.crashes == 0 and t.tracebacks == 0, f"seed {fuzz_seed}:\n{summary}"
    assert not t.unknown(), f"seed {fuzz_seed}: new findings:\n{summary}"
    assert set(t.memory_kib) == {"memory-model", "memory-mutant", "file-model", "file-mutant"}
