# A test plugin (PARALLEL) whose pread never blocks while pwrite waits for the file
# flag=PATH to exist (at most 10 s). impure=1 swaps in a pread that calls a helper of the
# script, which the server cannot know to be harmless.
import os
import time

import nbdkit

API_VERSION = 2

disk = bytearray(1024 * 1024)
flag = ""


def config(key, value):
    if key == "flag":
        globals()["flag"] = value
    elif key == "impure":
        globals()["pread"] = pread_with_helper


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def copy(buf, offset):
    buf[:] = disk[offset:offset + len(buf)]


def pread_with_helper(h, buf, offset, flags):
    copy(buf, offset)


def pwrite(h, buf, offset, flags):
    for _ in range(1000):
        if os.path.exists(flag):
            break
        time.sleep(0.01)
    disk[offset:offset + len(buf)] = buf
