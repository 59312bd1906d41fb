"""The fuzzers' own parts: the model, the mutator, the strict reply reader, and the oracles,
each shown to fail when it must (a fuzzer whose oracles cannot fail finds nothing)."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import hostile_replies as R
from fuzz import wire as W
from fuzz.client_faces import Op, Outcome
from fuzz.client_fuzz import judge
from fuzz.hostile import Record
from fuzz.model import Disk
from fuzz.mutate import SENTINEL, mutate
from fuzz.server_check import Session, Wrong
from fuzz.server_plan import Op as Opt
from fuzz.server_plan import Plan, Request, make_plan, plan_stream

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- the disk model

_ops = st.lists(st.tuples(st.sampled_from(["write", "zero", "trim"]), st.integers(0, 300),
                          st.integers(0, 120)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(_ops, st.integers(0, 300), st.integers(0, 120))
def test_disk_model_agrees_with_a_plain_one(ops: list[tuple[str, int, int]], off: int,
                                            n: int) -> None:
    size = 420
    d, data, unknown = Disk(size), bytearray(size), [False] * size
    for i, (kind, o, k) in enumerate(ops):
        k = min(k, size - o)
        if kind == "write":
            d.write(o, bytes([i + 1]) * k)
            data[o:o + k] = bytes([i + 1]) * k
        elif kind == "zero":
            d.zero(o, k)
            data[o:o + k] = bytes(k)
        else:
            d.trim(o, k)
        for x in range(o, o + k):
            unknown[x] = kind == "trim"
    n = min(n, size - off)
    known = [x for a, b in d.known(off, n) for x in range(a, b)]
    assert known == [x for x in range(off, off + n) if not unknown[x]]
    got = bytearray(data[off:off + n])
    assert d.first_mismatch(off, bytes(got)) is None
    assert d.nonzero_in(off, n) == next((x for x in known if data[x]), None)
    if known:
        got[known[-1] - off] ^= 0xFF
        assert d.first_mismatch(off, bytes(got)) == known[-1]


# --------------------------------------------------------------------------- the mutator


def test_mutations_repeat_with_the_seed_and_change_the_stream() -> None:
    plan = make_plan(random.Random(1), 1 << 20)
    s = plan_stream(plan)
    original = s.bytes()
    outs = [mutate(random.Random(seed), s)[0] for seed in range(300)]
    assert outs == [mutate(random.Random(seed), s)[0] for seed in range(300)]
    assert sum(o != original for o in outs) >= 285
    assert len(set(outs)) >= 250


def test_patterns_never_hold_the_sentinel() -> None:
    from fuzz.server_plan import pattern

    rng = random.Random(3)
    assert all(SENTINEL not in pattern(rng, 5000) for _ in range(200))
    assert SENTINEL not in R.Disk(random.Random(4)).data(0, 1 << 16)


# --------------------------------------------------------------------------- the strict reader


def _reader() -> W.ReplyReader:
    r = W.ReplyReader(structured=True, extended=False)
    r.expect(7, W.CMD.READ, 4096, 1024)
    return r


def _chunk(flags: int, rtype: int, cookie: int, payload: bytes) -> bytes:
    return W.CHUNK.pack(W.STRUCTURED_MAGIC, flags, rtype, cookie, len(payload)) + payload


def test_reply_reader_reads_a_split_read() -> None:
    r = _reader()
    data = _chunk(0, W.RT.OFFSET_HOLE, 7, struct.pack(">QI", 4096 + 512, 512)) + _chunk(
        W.DONE, W.RT.OFFSET_DATA, 7, W.U64.pack(4096) + b"a" * 512)
    for i in range(len(data)):  # one byte at a time
        r.feed(data[i:i + 1])
    (rep,) = r.replies()
    assert W.read_data(rep, 1024) == b"a" * 512 + bytes(512)


@pytest.mark.parametrize("bad", [
    _chunk(0, W.RT.NONE, 7, b""),  # NONE without DONE
    _chunk(W.DONE, W.RT.OFFSET_DATA, 7, W.U64.pack(4096 + 1020) + b"abcdefgh"),  # past the end
    _chunk(W.DONE, W.RT.OFFSET_HOLE, 7, struct.pack(">QI", 4096, 0)),  # a hole of length 0
    _chunk(W.DONE, W.RT.NONE, 8, b""),  # an unknown cookie
    _chunk(W.DONE, 77, 7, b""),  # an unknown chunk type
    _chunk(W.DONE, W.RT.ERROR, 7, struct.pack(">IH", 0, 0)),  # error 0
    W.SIMPLE.pack(W.SIMPLE_MAGIC, 0, 7),  # a simple reply to a structured READ
    W.SIMPLE.pack(0x12345678, 0, 7) + bytes(4),  # a bad magic
    _chunk(W.DONE | 4, W.RT.NONE, 7, b""),  # an unknown reply flag
], ids=["none-not-done", "data-outside", "hole-0", "cookie", "type", "errno-0", "simple",
        "magic", "flag"])
def test_reply_reader_rejects_what_the_spec_forbids(bad: bytes) -> None:
    with pytest.raises(W.Violation):
        _reader().feed(bad)


def test_read_data_rejects_gaps_and_overlaps() -> None:
    rep = W.Reply(7, data=[(0, 512, b"a" * 512), (600, 424, b"b" * 424)])
    with pytest.raises(W.Violation, match="gap"):
        W.read_data(rep, 1024)
    rep = W.Reply(7, data=[(0, 600, b"a" * 600), (512, 512, None)])
    with pytest.raises(W.Violation, match="overlaps"):
        W.read_data(rep, 1024)


# --------------------------------------------------------------------------- the server oracle


def _plan(*batches: list[Request]) -> Plan:
    return Plan(3, [Opt(W.OPT.STRUCTURED_REPLY),
                    Opt(W.OPT.SET_META_CONTEXT, W.meta_request("", ["base:allocation"])),
                    Opt(W.OPT.GO, W.info_request(""))], list(batches), "disc")


def test_server_oracle_passes_a_correct_server_and_catches_a_wrong_disk(
        pynbd_server: Any) -> None:
    srv = pynbd_server("memory", "1M")
    disk = Disk(1 << 20)
    size = 1 << 20
    Session(srv.sock, disk, _plan(
        [Request(W.CMD.WRITE, 0, 4096, 4096, 1, b"x" * 4096),
         Request(W.CMD.READ, 0, size - 10, 20, 2),  # past the end: EINVAL
         Request(W.CMD.WRITE, 0, size, 1, 3, b"y")],  # past the end: ENOSPC
        [Request(W.CMD.READ, 0, 4000, 200, 4),
         Request(W.CMD.BLOCK_STATUS, 0, 0, 65536, 5)])).run()
    assert disk.data[4096:8192] == b"x" * 4096
    disk.data[4100] = 1  # the model now disagrees with the server
    with pytest.raises(Wrong, match="byte at 4100"):
        Session(srv.sock, disk, _plan([Request(W.CMD.READ, 0, 4096, 512, 1)])).run()
    disk.data[4100] = ord("x")
    disk.data[300000] = 9  # a byte the server's extents say reads as zero
    with pytest.raises(Wrong, match="said to read as zero"):
        Session(srv.sock, disk, _plan([Request(W.CMD.BLOCK_STATUS, 0, 262144, 65536, 1)])).run()


# --------------------------------------------------------------------------- the client oracle


def _case(result: Any, sent: R.Sent | None, face: str = "async",
          op: Op | None = None) -> list[tuple[str, str]]:
    op = op or Op("read", 1000, 8)
    out = Outcome(face, connected=True, size=1 << 20, ops=[op], results=[result])
    rec = Record(advertised_size=1 << 20)
    if sent is not None:
        rec.sent[op.key] = sent
    return judge(out, rec)


def test_client_oracle_passes_what_the_server_sent() -> None:
    sent = R.Sent(data=[(1000, 4, b"abcd"), (1004, 4, None)])
    assert _case(b"abcd\0\0\0\0", sent) == []


@pytest.mark.parametrize(("result", "sent", "want"), [
    (b"abcdxxxx", R.Sent(data=[(1000, 4, b"abcd"), (1004, 4, None)]), "server sent 0x0"),
    (b"abcd\0\0\0\0", R.Sent(data=[(1000, 4, b"abcd")]), "no chunk sent covers byte 4"),
    (b"abcd\0\0\0\0", None, "sent no reply"),
    (b"abc" + bytes([SENTINEL]) + b"0000", R.Sent(data=[(1000, 8, b"abcdefgh")], desync=True),
     "never written"),
], ids=["wrong-byte", "uncovered", "no-reply", "sentinel"])
def test_client_oracle_catches_data_the_server_did_not_send(result: bytes, sent: R.Sent | None,
                                                            want: str) -> None:
    ((kind, detail),) = _case(result, sent)
    assert kind == "data" and want in detail


def test_client_oracle_catches_undocumented_exceptions_and_huge_sizes() -> None:
    from pynbd.errors import CommandError

    assert _case(CommandError(5), None) == []
    ((kind, detail),) = _case(ValueError("boom"), None)
    assert kind == "exception" and "ValueError: boom" in detail
    out = Outcome("blocking", connected=True, size=1 << 63)
    assert [k for k, _ in judge(out, Record())] == ["accepted"]


def test_client_oracle_catches_extents_the_server_did_not_send() -> None:
    op = Op("status", 0, 4096)
    rec_sent = R.Sent(status={1: [[(4096, 0)], [(512, 0), (3584, 0)]]})
    out = Outcome("async", connected=True, size=1 << 20, ops=[op],
                  results=[{"base:allocation": [(4096, 3)]}])
    rec = Record(contexts={1: "base:allocation"})
    rec.sent[op.key] = rec_sent
    ((kind, detail),) = judge(out, rec)
    assert kind == "data" and "the server sent [[(4096, 0)], [(512, 0), (3584, 0)]]" in detail
    out.results = [{"base:allocation": [(512, 0), (3000, 0)]}]  # one chunk's, clipped
    assert judge(out, rec) == []


def test_every_reply_mutation_changes_the_reply() -> None:
    disk = R.Disk(random.Random(0))
    disk.hole_mask = 0b0101  # a read across blocks 0 and 1: a hole, then data
    for name, fn in R._MUTATIONS.items():
        changed = 0
        for seed in range(20):
            rng = random.Random(seed)
            chunks = R.read_reply(random.Random(1), disk, 5, 65536 - 100, 300, True)
            if name == "status":
                chunks = R.status_reply(rng, disk, 5, 0, 200000, 0, {1: "base:allocation"})
            before = R.serialize(chunks)
            fn(rng, chunks, [9])
            changed += R.serialize(chunks) != before
        assert changed >= 10, f"mutation {name} rarely changes anything ({changed}/20)"


# --------------------------------------------------------------------------- scripts/fuzz


def test_scripts_fuzz_runs_both_fuzzers_and_reports() -> None:
    cp = subprocess.run([str(ROOT / "scripts" / "fuzz"), "--inputs", "60", "--seed", "1",
                         "--no-probes", "--plugins", "memory", "--jobs", "1"],
                        capture_output=True, text=True, timeout=120, check=False)
    assert "server fuzzer: 30 inputs" in cp.stdout, cp.stdout + cp.stderr
    assert "client fuzzer: 30 inputs" in cp.stdout, cp.stdout + cp.stderr
    assert "memory at the end: memory-model" in cp.stdout
    assert cp.returncode == 0, cp.stdout + cp.stderr
