"""A plugin for nbdkit's Python plugin API whose backend module is not installed, written
for pynbd's tests: loading it fails (ModuleNotFoundError while the script runs), so the
server must refuse to start with one readable line and never call a callback.

    nbdkit python ex_missing_module.py
"""

import pynbd_tests_no_such_backend as backend

API_VERSION = 2


def open(readonly):
    return backend.connect(readonly)


def get_size(h):
    return backend.size(h)


def pread(h, buf, offset, flags):
    buf[:] = backend.read(h, len(buf), offset)
