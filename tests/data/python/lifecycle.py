# A test plugin that appends the name of every callback nbdkit calls (with its arguments
# for the configuration ones) to the file log=PATH, to compare the order of calls.
import io

import nbdkit

API_VERSION = 2
path = None


def note(*args):
    if path is not None:
        with io.open(path, "a") as f:  # the script's own open is the callback
            f.write(" ".join(str(a) for a in args) + "\n")


def config(key, value):
    global path
    if key == "log":
        path = value
    note("config", key, value)


def config_complete():
    note("config_complete")


def thread_model():
    note("thread_model")
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def get_ready():
    note("get_ready")


def after_fork():
    note("after_fork")


def preconnect(readonly):
    note("preconnect", readonly)


def open(readonly):
    note("open", readonly)
    return 1


def close(h):
    note("close")


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    note("pread", len(buf), offset)
    buf[:] = bytes(len(buf))


def cleanup():
    note("cleanup")
