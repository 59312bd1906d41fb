"""A RAM disk for nbdkit's Python plugin API, written for pynbd's tests.

Exercises: API_VERSION 2; config with nbdkit.parse_size (size=, default 1M); a bytearray
as the disk, allocated in config_complete; nbdkit.debug; thread_model (PARALLEL); pread
filling the buffer it is given; pwrite; trim; a zero that zeroes only when it may trim and
otherwise calls nbdkit.set_error(errno.EOPNOTSUPP) and raises, so the server writes zeroes
with pwrite instead. No flush and no extents. Every connection callback is straight-line
code on the bytearray (pynbd answers its pread on the event loop).

    nbdkit python ex_ramdisk.py [size=SIZE]
"""

import errno

import nbdkit

API_VERSION = 2

size = 1024 * 1024
disk = bytearray()


def config(key, value):
    global size
    if key != "size":
        raise RuntimeError(f"unknown parameter {key!r} (this disk takes size=SIZE)")
    size = nbdkit.parse_size(value)


def config_complete():
    global disk
    disk = bytearray(size)
    nbdkit.debug(f"ex_ramdisk: {size} bytes of RAM")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def trim(h, count, offset, flags):
    disk[offset:offset + count] = bytearray(count)


def zero(h, count, offset, flags):
    if flags & nbdkit.FLAG_MAY_TRIM:
        disk[offset:offset + count] = bytearray(count)
    else:
        nbdkit.set_error(errno.EOPNOTSUPP)
        raise RuntimeError("zero without MAY_TRIM: let the server write zeroes")
