# A test plugin whose dump_plugin prints what the nbdkit module answers: constants, which
# functions it has, parse_size on many strings and its errors. Compared line by line
# between `nbdkit python dump.py --dump-plugin` and pynbd.
import nbdkit

API_VERSION = 2

SIZES = ["0", "512", "1k", "1K", "2s", "1M", "1G", "1T", "1P", "1E", "1e", "7E", "8E",
         "16E", "1b", " 1M", "\t2k", "1M ", "1.5M", "-1", "-0", "+5", "", " ", "1x", "0x10",
         "010", "1KiB", "1 M", "9223372036854775807", "9223372036854775808",
         "99999999999999999999999", "k"]


def config(key, value):
    pass


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def attempt(what, fn, *args):
    try:
        print("%s=%r" % (what, fn(*args)))
    except Exception as e:
        print("%s=%s: %s" % (what, type(e).__name__, e))


def dump_plugin():
    print("dump_plugin_says=hello")
    names = sorted(n for n in dir(nbdkit) if not n.startswith("_"))
    print("constants=" + ",".join("%s:%d" % (n, getattr(nbdkit, n))
                                  for n in names if n.isupper()))
    print("functions=" + ",".join(n for n in names if callable(getattr(nbdkit, n))))
    for s in SIZES:
        attempt("parse_size(%r)" % s, nbdkit.parse_size, s)
    for v in [1, None, b"1M"]:
        attempt("parse_size(%r)" % v, nbdkit.parse_size, v)
    attempt("debug(1)", nbdkit.debug, 1)
    attempt("debug('ok')", nbdkit.debug, "ok")
    attempt("set_error(5)", nbdkit.set_error, 5)


def open(readonly):
    return 1


def get_size(h):
    return 0


def pread(h, buf, offset, flags):
    pass
