#!/usr/bin/env python3
"""A RAID 5 done by hand over five NBD exports, for the pictures of docs/view.md.

    raid5.py SOCKET1 SOCKET2 SOCKET3 SOCKET4 SOCKET5

Linux md's default layout (left-symmetric, 64 KiB chunks): stripe s keeps its parity on
disk 4 - s % 5 and its data on the disks after it, wrapping round. First a resync (each
stripe's data chunks read, its parity written), then a file written over the first half
of the array in full stripes (data and parity written).
"""

from __future__ import annotations

import functools
import operator
import sys

from pynbd.client.blocking import BlockingConnection

CHUNK = 64 << 10


def parity_disk(stripe: int, n: int) -> int:
    return n - 1 - stripe % n


def data_disks(stripe: int, n: int) -> list[int]:
    p = parity_disk(stripe, n)
    return [(p + 1 + i) % n for i in range(n - 1)]


def xor(chunks: list[bytes]) -> bytes:
    return functools.reduce(operator.xor, (int.from_bytes(c, "little") for c in chunks)
                            ).to_bytes(CHUNK, "little")


def main(sockets: list[str]) -> None:
    disks = [BlockingConnection.connect(unix=s) for s in sockets]
    n = len(disks)
    stripes = disks[0].size // CHUNK
    for s in range(stripes):  # resync: read the data, write the parity
        data = []
        for d in data_disks(s, n):
            buf = bytearray(CHUNK)
            disks[d].pread_into(memoryview(buf), s * CHUNK)
            data.append(bytes(buf))
        disks[parity_disk(s, n)].pwrite(xor(data), s * CHUNK)
    for s in range(stripes // 2):  # a file over the first half: full-stripe writes
        data = [bytes([(s * 7 + i) % 251 + 1]) * CHUNK for i in range(n - 1)]
        for d, chunk in zip(data_disks(s, n), data, strict=True):
            disks[d].pwrite(chunk, s * CHUNK)
        disks[parity_disk(s, n)].pwrite(xor(data), s * CHUNK)
    for c in disks:
        c.close()


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: raid5.py SOCKET1 SOCKET2 SOCKET3 SOCKET4 SOCKET5")
    main(sys.argv[1:])
