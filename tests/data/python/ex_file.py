"""A disk backed by a local file, for nbdkit's Python plugin API, written for pynbd's tests.

Exercises: API_VERSION 2; file= made absolute in config (the server may change directory
later); config_complete refusing a missing or unusable file=; thread_model (PARALLEL); one
file descriptor per connection from os.open, read-only when the client is; os.preadv and
os.pwritev straight into the server's buffer (a memoryview), looping over short transfers;
FLAG_FUA on pwrite answered with os.fdatasync (FUA_NATIVE); flush with os.fsync;
can_multi_conn (every connection flushes the same file); is_rotational false. No zero,
trim or extents: the server falls back or reports all data.

    nbdkit python ex_file.py file=DISK.IMG
"""

import errno
import os
import stat

import nbdkit

API_VERSION = 2

filename = None


def config(key, value):
    global filename
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (this disk takes file=FILENAME)")
    filename = os.path.abspath(value)


def config_complete():
    if filename is None:
        raise RuntimeError("missing file=FILENAME: the file to serve")
    try:
        st = os.stat(filename)
    except OSError as e:
        raise RuntimeError(f"{filename}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeError(f"{filename}: not a regular file")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    fd = os.open(filename, os.O_RDONLY if readonly else os.O_RDWR)
    nbdkit.debug(f"ex_file: opened {filename} as fd {fd} (readonly={readonly})")
    return {"fd": fd}


def close(h):
    os.close(h["fd"])


def get_size(h):
    return os.fstat(h["fd"]).st_size


def is_rotational(h):
    return False


def can_multi_conn(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def pread(h, buf, offset, flags):
    done = 0
    while done < len(buf):
        n = os.preadv(h["fd"], [buf[done:]], offset + done)
        if n == 0:
            nbdkit.set_error(errno.EIO)
            raise RuntimeError(f"{filename}: unexpected end of file at {offset + done}")
        done += n


def pwrite(h, buf, offset, flags):
    done = 0
    while done < len(buf):
        done += os.pwritev(h["fd"], [buf[done:]], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(h["fd"])


def flush(h, flags):
    os.fsync(h["fd"])
