# A test plugin whose callbacks fail on purpose. Data callbacks decide by the 4 KiB block
# they touch (see ERRORS): succeed, raise, or call nbdkit.set_error first. fail=NAME makes
# the control callback NAME (open, get_size, can_write, ...) raise instead.
import errno

import nbdkit

API_VERSION = 2

SIZE = 64 * 4096
disk = bytearray(SIZE)
fail = set()

#: block -> the errno given to set_error before raising (None: raise without it;
#: "ok": call set_error(EIO) and then succeed anyway; "exit": sys.exit())
ERRORS = {
    1: None,
    2: errno.ENOSPC,
    3: errno.EPERM,
    4: errno.ENOENT,
    5: errno.ESHUTDOWN,
    6: errno.ENOMEM,
    7: errno.EDQUOT,
    8: errno.EROFS,
    9: "ok",
    10: errno.EOVERFLOW,
    11: "exit",
    12: errno.ENOTSUP,
    13: errno.EFBIG,
}


def config(key, value):
    if key == "fail":
        fail.update(value.split(","))
    else:
        raise RuntimeError("unknown parameter: " + key)


def check(name, block):
    if name in fail:
        raise RuntimeError("%s fails on purpose" % name)
    what = ERRORS.get(block, "none")
    if what == "none":
        return
    if what == "ok":
        nbdkit.set_error(errno.EIO)
        return
    if what == "exit":
        raise SystemExit(3)
    if what is not None:
        nbdkit.set_error(what)
    raise RuntimeError("%s at block %d fails on purpose" % (name, block))


def open(readonly):
    check("open", -1)
    return 1


def get_size(h):
    check("get_size", -1)
    return SIZE


def can_write(h):
    check("can_write", -1)
    return True


def can_flush(h):
    check("can_flush", -1)
    return True


def can_trim(h):
    check("can_trim", -1)
    return True


def can_zero(h):
    check("can_zero", -1)
    return True


def can_fast_zero(h):
    return True


def can_extents(h):
    check("can_extents", -1)
    return True


def can_cache(h):
    check("can_cache", -1)
    return nbdkit.CACHE_NATIVE


def can_fua(h):
    check("can_fua", -1)
    return nbdkit.FUA_NATIVE


def pread(h, buf, offset, flags):
    check("pread", offset // 4096)
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    check("pwrite", offset // 4096)
    disk[offset:offset + len(buf)] = buf


def trim(h, count, offset, flags):
    check("trim", offset // 4096)


def zero(h, count, offset, flags):
    if offset // 4096 == 20:
        # fall back to pwrite without raising (nbdkit's documented way)
        nbdkit.set_error(errno.EOPNOTSUPP)
        return
    if offset // 4096 == 21:
        nbdkit.set_error(errno.ENOTSUP)
        raise RuntimeError("zero falls back")
    check("zero", offset // 4096)
    disk[offset:offset + count] = bytes(count)


def flush(h, flags):
    check("flush", -1)


def cache(h, count, offset, flags):
    check("cache", offset // 4096)


def extents(h, count, offset, flags):
    check("extents", offset // 4096)
    return [(offset, count, 0)]
