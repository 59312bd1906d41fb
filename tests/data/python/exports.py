# A test plugin with several exports: list_exports, default_export, export_description and
# block_size, and nbdkit.export_name() (a read returns the export's name, padded with '.').
import nbdkit

API_VERSION = 2


def list_exports(readonly, is_tls):
    return ["plain", ("described", "an export with a description"), b"bytes-name"]


def default_export(readonly, is_tls):
    return "described"


def open(readonly):
    if nbdkit.export_name() == "missing":
        raise RuntimeError("no such export")
    return nbdkit.export_name()


def export_description(h):
    if h == "plain":
        return 42  # not a string: nbdkit then sends no description
    return "description of " + h


def block_size(h):
    if h == "blocky":
        return (512, 4096, 1024 * 1024)
    return (1, 8192, 16 * 1024 * 1024)


def get_size(h):
    return 64 * 1024


def pread(h, buf, offset, flags):
    buf[:] = h.encode().ljust(len(buf), b".")[:len(buf)]
