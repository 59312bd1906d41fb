"""The hostile-server fuzzer against the clients, bounded for CI (docs/fuzzing.md).

1,500 inputs (about 20 s) spread over the asyncio engine, the blocking connection and
pynbd.libnbd. Fails on a hang, a dead worker, or any finding that is not already a test in
test_findings.py; the seed is printed.
"""

from __future__ import annotations

from fuzz.client_fuzz import ClientFuzzer

#: Inputs per run: a fixed prefix of the seed's sequence, so a run is deterministic.
INPUTS = 1500
#: A safety cap only (on this 2-core machine the inputs take a fraction of it).
SECONDS = 180.0


def test_client_fuzz(fuzz_seed: str) -> None:
    f = ClientFuzzer(fuzz_seed, jobs=2)
    t = f.run(inputs=INPUTS, seconds=SECONDS)
    summary = t.summary()
    print(summary)
    assert all(t.modes.get(face, 0) > 20 for face in ("async", "blocking", "libnbd")), summary
    assert t.crashes == 0, f"seed {fuzz_seed}:\n{summary}"
    assert not t.unknown(), f"seed {fuzz_seed}: new findings:\n{summary}"
