# A test plugin (nbdkit Python API, version 2) that records every data callback with its
# arguments. Reading at or past offset SIZE returns the record, one call per line, so a
# client can compare what nbdkit and pynbd called.
import errno

import nbdkit

API_VERSION = 2

SIZE = 1024 * 1024
disk = bytearray(SIZE)
calls = []


def note(*args):
    calls.append(" ".join(str(a) for a in args))


def config(key, value):
    note("config", key, value)


def open(readonly):
    return {"readonly": readonly}


def get_size(h):
    return SIZE + 4096


def is_rotational(h):
    return True


def can_multi_conn(h):
    return 1  # not True: nbdkit counts it as false


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_fast_zero(h):
    return True


def pread(h, buf, offset, flags):
    if offset >= SIZE:
        text = "\n".join(calls).encode()[offset - SIZE:]
        buf[:] = text[:len(buf)].ljust(len(buf), b"\0")
        return
    note("pread", len(buf), offset, flags, type(buf).__name__, buf.readonly)
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    note("pwrite", len(buf), offset, flags, type(buf).__name__, buf.readonly)
    disk[offset:offset + len(buf)] = buf


def flush(h, flags):
    note("flush", flags)


def trim(h, count, offset, flags):
    note("trim", count, offset, flags)
    disk[offset:offset + count] = bytes(count)


def zero(h, count, offset, flags):
    note("zero", count, offset, flags)
    if not flags & nbdkit.FLAG_MAY_TRIM:
        # nbdkit then writes the zeroes with pwrite (unless this was a fast zero)
        nbdkit.set_error(errno.EOPNOTSUPP)
        return
    disk[offset:offset + count] = bytes(count)


def cache(h, count, offset, flags):
    note("cache", count, offset, flags)


def extents(h, count, offset, flags):
    note("extents", count, offset, flags)
    half = count // 2
    return [(offset, half, 0),
            (offset + half, count - half, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)]
