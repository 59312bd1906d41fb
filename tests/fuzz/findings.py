"""What a fuzzer reports: findings (each with its reproducer) and a run's totals.

A finding that has a regression test in tests/fuzz/test_findings.py (marked xfail until the
owner of the code fixes it) is *known*: :data:`KNOWN` matches it by its signature, so the
bounded runs in CI stay green while it is open, and report it. Once the fix lands, its strict
xfail test fails; then drop the mark and the entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = ["KNOWN", "Finding", "Known", "Totals", "known_as"]


@dataclass
class Finding:
    fuzzer: str  # "server" or "client"
    target: str  # the server's plugin, or the client face (async, blocking, libnbd)
    input: int  # which input of the run, with seed: the reproducer
    seed: str
    kind: str  # died, traceback, hang, reply, memory, exception, data, accepted
    detail: str

    def repro(self) -> str:
        if self.input < 0:  # the memory probes, or the servers' exit: no input of their own
            return f"scripts/fuzz --{self.fuzzer} --plugins {self.target} --inputs 0"
        return f"scripts/fuzz --{self.fuzzer} --seed {self.seed} --only {self.input}"

    def line(self) -> str:
        k = known_as(self)
        tag = f" [known: {k.test}]" if k else ""
        return (f"{self.fuzzer}/{self.target} input {self.input} {self.kind}: "
                f"{self.detail.splitlines()[0][:300] if self.detail else ''}{tag}\n"
                f"    reproduce: {self.repro()}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Known:
    """A finding already turned into an xfail regression test."""

    test: str  # its test in tests/fuzz/test_findings.py
    fuzzer: str
    kind: str
    pattern: str  # a regular expression the finding's detail matches

    def matches(self, f: Finding) -> bool:
        return (f.fuzzer == self.fuzzer and f.kind == self.kind
                and re.search(self.pattern, f.detail) is not None)


#: Open findings, each with its strict-xfail regression test.
KNOWN: list[Known] = []


def known_as(f: Finding) -> Known | None:
    return next((k for k in KNOWN if k.matches(f)), None)


@dataclass
class Totals:
    """A run's counts, for the summary and docs/fuzzing.md."""

    fuzzer: str
    inputs: int = 0
    requests: int = 0
    findings: list[Finding] = field(default_factory=list)
    crashes: int = 0  # a server died, or a client worker died or went silent
    tracebacks: int = 0
    memory_kib: dict[str, int] = field(default_factory=dict)  # per process, at the end
    peak_kib: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    modes: dict[str, int] = field(default_factory=dict)
    _logged: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)

    def add(self, f: Finding, log: Callable[[str], None]) -> None:
        """Keep a finding; log it unless three like it were logged already."""
        self.findings.append(f)
        key = (f.fuzzer, f.target, f.kind, f.detail[:40])
        n = self._logged.get(key, 0) + 1
        self._logged[key] = n
        if n <= 3:
            log(f.line())
        elif n == 4:
            log(f"    (more like {f.fuzzer}/{f.target} input {f.input} are counted, not shown)")

    def count(self, mode: str) -> None:
        self.modes[mode] = self.modes.get(mode, 0) + 1

    def unknown(self) -> list[Finding]:
        return [f for f in self.findings if known_as(f) is None]

    def summary(self) -> str:
        mem = ", ".join(f"{k} {v / 1024:.0f} MiB (peak {self.peak_kib.get(k, v) / 1024:.0f})"
                        for k, v in self.memory_kib.items())
        head = (f"{self.fuzzer} fuzzer: {self.inputs} inputs ({self.requests} requests) in "
                f"{self.seconds:.0f} s; crashes {self.crashes}, tracebacks {self.tracebacks}, "
                f"findings {len(self.findings)} ({len(self.unknown())} new)")
        lines = [head]
        if self.modes:
            lines.append("  inputs by kind: " + ", ".join(f"{k} {v}" for k, v in
                                                          sorted(self.modes.items())))
        if mem:
            lines.append(f"  memory at the end: {mem}")
        known: dict[str, int] = {}
        for f in self.findings:
            k = known_as(f)
            if k:
                known[k.test] = known.get(k.test, 0) + 1
        for test, n in sorted(known.items()):
            lines.append(f"  known, {n} times: tests/fuzz/test_findings.py::{test}")
        seen: set[tuple[str, str, str]] = set()
        for f in self.findings:
            if known_as(f):
                continue
            key = (f.target, f.kind, f.detail[:60])
            if key not in seen:
                seen.add(key)
                lines.append("  " + f.line())
        return "\n".join(lines)
