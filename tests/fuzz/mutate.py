"""A seeded mutation engine over byte streams that know their fields.

Fuzzers build a *valid* stream field by field (:class:`Stream`: each field a width and a
kind, e.g. a u32 length or a u64 offset), then :func:`mutate` changes it the way a broken or
hostile peer would: a field set to a boundary value, a length that lies, a field dropped,
repeated or swapped, a stream cut short, stray bytes. Starting from valid streams reaches
deep into a parser; random bytes would mostly die at the first magic.

Everything is drawn from a :class:`random.Random`, so a seed replays an input exactly.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

__all__ = ["Field", "Stream", "interesting", "mutate"]

#: A byte the fuzzers' data patterns never contain: a buffer a client pre-fills with it
#: and reports as read must not contain it anywhere.
SENTINEL = 0xA5

_FMT = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}


@dataclass
class Field:
    data: bytes
    kind: str  # magic, flags, type, cookie, offset, len, count, id, data, name, raw

    @property
    def width(self) -> int:
        return len(self.data)


@dataclass
class Stream:
    """A byte stream as a list of fields."""

    fields: list[Field] = field(default_factory=list)

    def int(self, width: int, value: int, kind: str) -> Stream:
        self.fields.append(Field(struct.pack(_FMT[width], value & ((1 << 8 * width) - 1)), kind))
        return self

    def raw(self, data: bytes, kind: str = "data") -> Stream:
        if data:
            self.fields.append(Field(bytes(data), kind))
        return self

    def extend(self, other: Stream) -> Stream:
        self.fields += other.fields
        return self

    def bytes(self) -> bytes:
        return b"".join(f.data for f in self.fields)

    def __len__(self) -> int:
        return sum(f.width for f in self.fields)


def interesting(rng: random.Random, width: int, old: int) -> int:
    """A value a parser is likely to mishandle, for a field ``width`` bytes wide."""
    bits = 8 * width
    top = (1 << bits) - 1
    choices = [0, 1, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1, old + 1, old - 1,
               old * 2, old // 2, old + 4096, old - 512, rng.getrandbits(bits)]
    if width >= 4:
        choices += [1 << 31, (1 << 32) - 1, 1 << 32, 1 << 25, (1 << 25) + 1, 1 << 26, 4096,
                    512, 65536, 65537]
    if width == 8:
        choices += [1 << 63, (1 << 63) - 1, (1 << 64) - 4096, 1 << 62]
    return rng.choice(choices) & top


def _int_of(f: Field) -> int:
    return int.from_bytes(f.data, "big")


def _set_int(f: Field, v: int) -> Field:
    return Field(v.to_bytes(f.width, "big"), f.kind)


def _field_mutation(rng: random.Random, fields: list[Field]) -> None:
    ints = [i for i, f in enumerate(fields) if f.width in _FMT and f.kind != "data"]
    if not ints:
        return
    i = rng.choice(ints)
    f = fields[i]
    if f.kind == "flags" and rng.random() < 0.6:
        fields[i] = _set_int(f, _int_of(f) ^ (1 << rng.randrange(8 * f.width)))
    else:
        fields[i] = _set_int(f, interesting(rng, f.width, _int_of(f)))


def _structure_mutation(rng: random.Random, fields: list[Field]) -> None:
    if not fields:
        return
    i = rng.randrange(len(fields))
    op = rng.randrange(5)
    if op == 0:
        del fields[i]
    elif op == 1:
        fields.insert(i, fields[i])
    elif op == 2 and i + 1 < len(fields):
        fields[i], fields[i + 1] = fields[i + 1], fields[i]
    elif op == 3:
        j = rng.randrange(len(fields))
        fields.insert(i, fields[j])  # a field from elsewhere (a header in a payload...)
    else:
        fields.insert(i, Field(rng.randbytes(rng.choice((1, 2, 3, 4, 7, 8, 16, 28, 32))), "raw"))


def _byte_mutation(rng: random.Random, data: bytearray) -> None:
    if not data:
        data += rng.randbytes(rng.randint(1, 32))
        return
    op = rng.randrange(5)
    pos = rng.randrange(len(data))
    if op == 0:
        data[pos] ^= 1 << rng.randrange(8)
    elif op == 1:
        data[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif op == 2:
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif op == 3:
        del data[pos:pos + rng.randint(1, 16)]
    else:
        n = rng.randint(1, min(64, len(data)))
        src = rng.randrange(len(data) - n + 1)
        data[pos:pos] = data[src:src + n]


def mutate(rng: random.Random, stream: Stream, n: int | None = None) -> tuple[bytes, list[str]]:
    """Apply ``n`` (default: 1 to 4) mutations; return the bytes and what was done."""
    if n is None:
        n = 1 + min(3, int(rng.expovariate(1.0)))
    fields = list(stream.fields)
    done: list[str] = []
    tail: list[int] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            _field_mutation(rng, fields)
            done.append("field")
        elif r < 0.75:
            _structure_mutation(rng, fields)
            done.append("structure")
        elif r < 0.9:
            tail.append(0)
            done.append("bytes")
        else:
            tail.append(1)
            done.append("truncate")
    data = bytearray(b"".join(f.data for f in fields))
    for t in tail:
        if t == 0:
            _byte_mutation(rng, data)
        elif data:
            del data[rng.randrange(len(data)):]
    return bytes(data), done
