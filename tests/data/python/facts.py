# A test plugin that reads back what the nbdkit module says about the connection, as JSON
# padded with spaces: export_name, is_tls, peer_pid/uid/gid. pread at offset 4096 raises
# RuntimeError("pread fails on purpose"); close raises when the export is "bad-close".
import json

import nbdkit

API_VERSION = 2


def default_export(readonly, is_tls):
    return "the-default"


def open(readonly):
    return {"export": nbdkit.export_name(), "readonly": readonly}


def close(h):
    if h["export"] == "bad-close":
        raise ValueError("close fails on purpose")


def get_size(h):
    return 8192


def pread(h, buf, offset, flags):
    if offset == 4096:
        raise RuntimeError("pread fails on purpose")
    facts = {"open_export": h["export"], "export_name": nbdkit.export_name(),
             "readonly": h["readonly"], "is_tls": nbdkit.is_tls(),
             "peer_pid": nbdkit.peer_pid(), "peer_uid": nbdkit.peer_uid(),
             "peer_gid": nbdkit.peer_gid()}
    buf[:] = json.dumps(facts).encode().ljust(len(buf))
