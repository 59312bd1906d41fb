"""``pynbd view``'s model, the filter's record lines and the nbdkit log reader, in process."""

from __future__ import annotations

import base64
import json
import struct

from pynbd.filters._view_publish import RECORD, Publisher
from pynbd.tools._view_model import (
    COLOURS,
    DATA,
    HOLE,
    Model,
    Panel,
    block_colour,
    decode_events,
    first_time,
    records,
)
from pynbd.tools._view_sources import parse_nbdkit_log

T0 = 1_700_000_000_000_000  # µs


def _records(*evs: tuple[str, int, int, int, int, int, int, int]) -> dict[str, object]:
    data = b"".join(RECORD.pack(ord(k), f, err, c, o, n, t, d) for k, o, n, f, err, t, d, c in evs)
    return {"type": "events", "count": len(evs), "data": base64.b64encode(data).decode()}


def test_records_decode() -> None:
    msg = _records(("W", 4096, 8192, 2, 0, T0, 63, 1), ("R", 0, 512, 0, 5, T0 + 1, 3, 2))
    assert decode_events(msg) == [(87, 4096, 8192, 2, 0, T0, 63, 1),
                                  (82, 0, 512, 0, 5, T0 + 1, 3, 2)]
    assert first_time(msg) == T0 / 1e6
    raw = base64.b64decode(str(msg["data"]))
    assert next(iter(struct.iter_unpack("<BBHIQQqq", raw))) == (87, 2, 0, 1, 4096, 8192, T0, 63)


def test_panel_applies_state_and_requests() -> None:
    p = Panel("x", 4096)
    p.apply({"type": "hello", "exports": {"": 64 * 4096}})
    assert p.nblocks == 64
    p.apply({"type": "state", "size": 64 * 4096, "extents": [[0, 8192, 0], [8192, 253952, 3]]})
    assert list(p.base[:3]) == [1, 1, 0]
    p.apply(_records(("W", 8192, 4096, 0, 0, T0, 1, 1), ("T", 0, 4096, 0, 0, T0, 1, 1),
                     ("R", 40960, 100, 0, 0, T0, 1, 1), ("Z", 4096 * 63, 4096, 0, 5, T0, 1, 1)))
    assert list(p.base[:3]) == [0, 1, 1]  # trimmed, data, written
    assert p.colour(2, T0 / 1e6, 0) == COLOURS["W"]
    assert p.colour(10, T0 / 1e6, 0) == COLOURS["R"]  # a part of a block counts
    assert p.colour(63, T0 / 1e6, 0) == HOLE  # the zero failed: nothing drawn
    assert p.errors == 1 and p.counters["W"] == [1, 4096]


def test_fading() -> None:
    w = ord("W")
    assert block_colour(1, w, 0.0, 1.0) == COLOURS["W"]
    assert block_colour(1, w, 1.0, 1.0) == DATA
    mid = block_colour(0, w, 0.5, 1.0)
    assert mid == tuple(round((a + b) / 2) for a, b in zip(COLOURS["W"], HOLE, strict=True))
    assert block_colour(0, ord("R"), 0.5, 1.0) == HOLE  # reads fade twice as fast
    assert block_colour(0, w, 100.0, 0) == COLOURS["W"]  # fade 0: never


def test_requests_past_the_end_grow_the_panel() -> None:
    p = Panel("x", 4096)
    p.apply(_records(("W", 1 << 20, 4096, 0, 0, T0, 1, 1)))
    assert p.nblocks == 257 and p.base[256] == 1


def test_model_history_keeps_origin() -> None:
    m = Model(["a"], 4096)
    m.apply(0, {"type": "open", "size": 8192, "time": T0})
    m.apply(0, _records(("W", 0, 4096, 0, 0, T0, 1, 1)))
    assert len(m.history) == 2
    m.apply(0, _records(("W", 4096, 4096, 0, 0, T0 + 400_000_000, 1, 1)))  # 400 s later
    assert len(m.history) == 1  # older than the history's 300 s: folded into the origin
    assert list(m.origin[0].base) == [1, 0] and list(m.panels[0].base) == [1, 1]


class _FakeSubscriber:
    def __init__(self, fmt: str) -> None:
        self.format = fmt


def test_publisher_keeps_messages_in_order() -> None:
    """Each format (base64 lines, binary records after a line giving their size, binary
    in nanoseconds): the messages in order, each batch encoded once per format, times
    and durations in µs but for the nanosecond subscriber."""
    pub = Publisher()
    sent: list[tuple[str, bytes]] = []
    pub._subs = {0: _FakeSubscriber("base64"), 1: _FakeSubscriber("binary"),  # type: ignore[dict-item]
                 2: _FakeSubscriber("binary"), 3: _FakeSubscriber("ns")}
    pub._offer = lambda sub, data, count: sent.append((sub.format, data))  # type: ignore[method-assign]
    pub.message({"type": "open", "conn": 1})
    recs = [RECORD.pack(87, 0, 0, 1, 0, 4096, T0 * 1000 + 999, 1999),  # as the filter packs
            RECORD.pack(82, 0, 0, 1, 0, 4096, T0 * 1000, -1)]
    for r in recs:
        pub.put(r)
    pub.message({"type": "close", "conn": 1})
    pub._batch()
    assert [f for f, _ in sent] == ["base64", "binary", "binary", "ns"]
    assert sent[1][1] is sent[2][1]
    lines = [json.loads(x) for x in sent[0][1].splitlines()]
    assert [m["type"] for m in lines] == ["open", "events", "close"]
    assert [(e[0], e[5], e[6]) for e in decode_events(lines[1])] == [(87, T0, 1), (82, T0, -1)]
    us = [RECORD.pack(87, 0, 0, 1, 0, 4096, T0, 1), RECORD.pack(82, 0, 0, 1, 0, 4096, T0, -1)]
    for fmt, data, want, head in (("binary", sent[1][1], us, {}),
                                  ("ns", sent[3][1], recs, {"time": "ns"})):
        opened, rest = data.split(b"\n", 1)
        line, rest = rest.split(b"\n", 1)
        assert json.loads(opened) == {"type": "open", "conn": 1}, fmt
        assert json.loads(line) == {"type": "events", "count": 2, "size": 80, **head}, fmt
        assert rest[:80] == b"".join(want), fmt
        assert json.loads(rest[80:]) == {"type": "close", "conn": 1}, fmt
    pub._subs = {}
    pub.stop()


def test_records_in_ns_made_us() -> None:
    """The publisher's division (standard library) and the viewer's (numpy) agree, floor
    of negative durations included; whole records only."""
    from pynbd.filters._view_publish import records_to_us
    from pynbd.tools._view_batch import ns_to_us

    ns = b"".join(RECORD.pack(87, 2, 5, 7, i << 40, 4096, T0 * 1000 + i * 777, d)
                  for i, d in enumerate((0, 999, 1000, 123456789, -1, -1001)))
    want = b"".join(RECORD.pack(87, 2, 5, 7, i << 40, 4096, (T0 * 1000 + i * 777) // 1000,
                                d // 1000)
                    for i, d in enumerate((0, 999, 1000, 123456789, -1, -1001)))
    assert records_to_us(ns) == want
    assert ns_to_us(ns + b"part") == want
    assert records({"type": "events", "count": 6, "size": 240, "time": "ns", "raw": ns}) == want


def test_nbdkit_log_lines() -> None:
    lines = [
        ("2026-12-07 00:00:00.000000 connection=1 Connect export='' tls=0 size=0x100000 "
        "minsize=0x1 prefsize=0x1000 maxsize=0xffffffff write=1 flush=1"),
        "2026-12-07 00:00:00.000010 connection=1 Write id=1 offset=0x1000 count=0x2000 fua=1 ...",
        "2026-12-07 00:00:00.000020 connection=1 Read id=2 offset=0x0 count=0x200 ...",
        "2026-12-07 00:00:00.000030 connection=1 ...Read id=2 return=-1 error=EIO",
        "2026-12-07 00:00:00.000050 connection=1 ...Write id=1 return=0",
        "2026-12-07 00:00:00.000060 connection=1 Disconnect transactions=2",
    ]
    msgs = list(parse_nbdkit_log(lines))
    assert [m["type"] for m in msgs] == ["hello", "open", "events", "events", "close"]
    assert msgs[1]["size"] == 0x100000
    t0 = 1796601600 * 1_000_000  # 2026-12-07 00:00:00 UTC
    assert msgs[2]["events"] == [["R", 0, 0x200, 0, 5, t0 + 20, 10, 1]]
    assert msgs[3]["events"] == [["W", 0x1000, 0x2000, 2, 0, t0 + 10, 40, 1]]


def test_view_address() -> None:
    import pytest

    from pynbd.errors import ConfigError
    from pynbd.filters.view import _parse_address

    assert _parse_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert _parse_address("[::1]:8000") == ("::1", 8000)
    assert _parse_address("localhost:1") == ("localhost", 1)
    for bad in ("10.0.0.1:80", "[::]:80", "example.com:80", "127.0.0.1:0", ":80", "1.2.3.4"):
        with pytest.raises(ConfigError):
            _parse_address(bad)


def _random_batches(seed: int) -> list[dict[str, object]]:
    """Batches of records as a busy disk sends them: mostly one block, some spanning
    several, reads after writes to the same block, failures, unknown kinds, zero lengths,
    requests past the end."""
    import random

    rnd = random.Random(seed)
    batches = []
    t = T0
    for _ in range(6):
        evs = []
        for _ in range(rnd.randrange(1, 400)):
            t += rnd.randrange(0, 50)
            kind = rnd.choice("WWWWRRRTZCFEQ")
            block = rnd.randrange(0, 300 if rnd.random() < 0.98 else 600)
            length = rnd.choice([4096, 4096, 4096, 512, 8192, 65536, 0, 4096 * 37])
            offset = block * 4096 + rnd.choice([0, 0, 0, 1024])
            err = 5 if rnd.random() < 0.05 else 0
            evs.append((kind, offset, length, rnd.choice([0, 2]), err, t, 7, rnd.randrange(4)))
        batches.append(_records(*evs))
    return batches


def _panel_after(batches: list[dict[str, object]], batched: bool) -> Panel:
    import pynbd.tools._view_model as vm

    saved = vm.BATCHED
    vm.BATCHED = batched
    try:
        p = Panel("x", 4096)
        p.apply({"type": "hello", "exports": {"": 256 * 4096}})
        p.apply({"type": "state", "size": 256 * 4096, "extents": [[0, 65536, 0],
                                                                 [65536, 983040, 3]]})
        for b in batches:
            p.apply(b)
        return p
    finally:
        vm.BATCHED = saved


def test_batched_records_match_one_by_one() -> None:
    """numpy's batches leave a panel exactly as applying each request in order does."""
    import pytest

    from pynbd.tools import _view_batch

    if not _view_batch.HAVE_NUMPY:
        pytest.skip("numpy is not installed")
    for seed in range(20):
        batches = _random_batches(seed)
        one, many = _panel_after(batches, False), _panel_after(batches, True)
        assert many.nblocks == one.nblocks > 256  # grown by the requests past the end
        assert many.base == one.base, seed
        assert many.kind == one.kind, seed
        assert many.when == one.when, seed
        assert (many.counters, many.errors, many.last_time) == \
            (one.counters, one.errors, one.last_time)


def test_uniform_batches_match_one_by_one() -> None:
    """Batches of one kind (the usual ones, applied by a shorter way) leave a panel as
    applying each request in order does, blocks named twice in a batch included; a batch
    that cannot take the shorter way (out of order, several blocks, a failure, past the
    end) is applied all the same."""
    import random

    import pytest

    from pynbd.tools import _view_batch

    if not _view_batch.HAVE_NUMPY:
        pytest.skip("numpy is not installed")
    rnd = random.Random(7)
    batches, t = [], T0
    for i in range(40):
        kind = rnd.choice("WWRTZCF")
        evs = []
        if i % 6 == 5:  # a batch in order, but earlier than the ones before
            t = T0
        for _ in range(rnd.randrange(1, 300)):
            t += rnd.randrange(0, 3)
            skew = rnd.choice([0, 100]) if i % 3 == 0 else rnd.choice([0, 0, 3000])
            evs.append((kind, rnd.randrange(0, 64) * 4096 + skew,
                        rnd.choice([4096, 1000]) if not skew else 1000, 0, 0, t, 5, 1))
        if i % 5 == 1:
            evs[-1] = (*evs[-1][:5], T0, 5, 1)  # one started before the others
        if i % 7 == 2:
            evs[0] = (kind, 300 * 4096, 4096, 0, 0, t, 5, 1)  # past the end
        if i % 9 == 3:
            evs[0] = (kind, 0, 4096, 0, 5, t, 5, 1)  # failed
        batches.append(_records(*evs))
    for n in range(1, len(batches) + 1):  # after every batch
        one, many = _panel_after(batches[:n], False), _panel_after(batches[:n], True)
        assert (many.base, many.kind, many.when) == (one.base, one.kind, one.when), n
        assert (many.counters, many.errors, many.last_time) == \
            (one.counters, one.errors, one.last_time)


def test_batched_records_in_several_passes(monkeypatch: object) -> None:
    import pytest

    from pynbd.tools import _view_batch

    if not _view_batch.HAVE_NUMPY:
        pytest.skip("numpy is not installed")
    batches = _random_batches(99)
    one = _panel_after(batches, False)
    pytest.MonkeyPatch.setattr(monkeypatch, _view_batch, "MAX_PASS_BLOCKS", 50)  # type: ignore[arg-type]
    many = _panel_after(batches, True)
    assert (many.base, many.kind, many.when) == (one.base, one.kind, one.when)


def test_message_times_without_decoding() -> None:
    from pynbd.tools._view_model import message_time

    for n in range(1, 8):  # every alignment of the last record in base64
        evs = [("W", 0, 4096, 0, 0, T0 + i * 1000 + 7, 1, 1) for i in range(n)]
        msg = _records(*evs)
        assert first_time(msg) == (T0 + 7) / 1e6
        assert message_time(msg) == (T0 + (n - 1) * 1000 + 7) / 1e6
    assert message_time({"type": "events", "count": 0, "data": "", "time": 5_000_000}) == 5.0
