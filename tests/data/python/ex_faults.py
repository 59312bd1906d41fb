"""A RAM disk with injected faults, for nbdkit's Python plugin API, written for pynbd's tests.

Exercises errors, deterministically (they depend on offsets and the disk's state only):
- bad=B,B,... names bad 4K blocks. pread touching one raises without nbdkit.set_error, so
  the client gets the default EIO. A pwrite covering a bad block whole heals it; one
  covering part of it fails with nbdkit.set_error(errno.EIO) and changes nothing.
- full=OFFSET: a pwrite ending past OFFSET fails with nbdkit.set_error(errno.ENOSPC)
  and writes nothing.
- flush fails with nbdkit.set_error(errno.EIO) while a bad block is left.
No thread_model (nbdkit's default, SERIALIZE_ALL_REQUESTS), no zero (the server writes
zeroes with pwrite, under the same rules), API_VERSION 2.

    nbdkit python ex_faults.py [size=SIZE] [bad=B,B,...] [full=OFFSET]
"""

import errno

import nbdkit

API_VERSION = 2
BLOCK = 4096

size = 1024 * 1024
full = None
bad = set()
disk = bytearray()


def config(key, value):
    global size, full
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "full":
        full = nbdkit.parse_size(value)
    elif key == "bad":
        bad.update(int(b) for b in value.split(","))
    else:
        raise RuntimeError(f"unknown parameter {key!r} (size=, bad= or full=)")


def config_complete():
    global disk
    disk = bytearray(size)


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def blocks(count, offset):
    """The numbers of the blocks that [offset, offset + count) touches."""
    return range(offset // BLOCK, (offset + count + BLOCK - 1) // BLOCK)


def pread(h, buf, offset, flags):
    hit = sorted(bad.intersection(blocks(len(buf), offset)))
    if hit:
        raise RuntimeError(f"read of bad block {hit[0]}")
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    end = offset + len(buf)
    if full is not None and end > full:
        nbdkit.set_error(errno.ENOSPC)
        raise RuntimeError(f"no space left at {full}")
    touched = bad.intersection(blocks(len(buf), offset))
    partial = [b for b in touched if b * BLOCK < offset or (b + 1) * BLOCK > end]
    if partial:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"partial write of bad block {min(partial)}")
    disk[offset:end] = buf
    bad.difference_update(touched)


def flush(h, flags):
    if bad:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"{len(bad)} bad blocks left")
