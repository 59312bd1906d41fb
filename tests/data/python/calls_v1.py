# A test plugin written against nbdkit's Python API version 1 (no API_VERSION): pread
# returns the data, the other data callbacks take no flags and zero takes may_trim. Every
# data callback is recorded; reading at or past offset SIZE returns the record.
SIZE = 1024 * 1024
disk = bytearray(SIZE)
calls = []


def note(*args):
    calls.append(" ".join(str(a) for a in args))


def open(readonly):
    return 1


def get_size(h):
    return SIZE + 4096


def pread(h, count, offset):
    if offset >= SIZE:
        text = "\n".join(calls).encode()[offset - SIZE:]
        return text[:count].ljust(count, b"\0")
    note("pread", count, offset)
    # more than asked for: only the first count bytes are sent
    return disk[offset:offset + count] + b"extra bytes"


def pwrite(h, buf, offset):
    note("pwrite", len(buf), offset, type(buf).__name__, buf.readonly)
    disk[offset:offset + len(buf)] = buf


def flush(h):
    note("flush")


def trim(h, count, offset):
    note("trim", count, offset)
    disk[offset:offset + count] = bytes(count)


def zero(h, count, offset, may_trim):
    note("zero", count, offset, may_trim)
    disk[offset:offset + count] = bytes(count)


def cache(h, count, offset, flags):
    note("cache", count, offset, flags)
