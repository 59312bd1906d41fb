# A test plugin for thread models: each pread waits `sleep` seconds and records in the file
# stats=PATH how many preads ran at once at most, the most handles (connections) with a
# pread running at once, and how many handles did a pread in all.
# model=NAME returns nbdkit.THREAD_MODEL_NAME from thread_model(); without it the plugin
# has no thread_model and gets the default.
import io
import threading
import time

import nbdkit

API_VERSION = 2

params = {"sleep": "0.1"}
lock = threading.Lock()
state = {"active": 0, "most": 0, "handles": [], "conns": 0, "seen": set(), "next": 0}


def config(key, value):
    params[key] = value


def config_complete():
    if "model" in params:
        globals()["thread_model"] = lambda: getattr(nbdkit, "THREAD_MODEL_" +
                                                    params["model"].upper())


def save():
    with io.open(params["stats"], "w") as f:  # open is the callback here
        f.write("%d %d %d\n" % (state["most"], state["conns"], len(state["seen"])))


def open(readonly):
    with lock:
        state["next"] += 1
        return state["next"]


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    with lock:
        state["active"] += 1
        state["most"] = max(state["most"], state["active"])
        state["handles"].append(h)
        state["seen"].add(h)
        state["conns"] = max(state["conns"], len(set(state["handles"])))
        save()
    try:
        time.sleep(float(params["sleep"]))
        buf[:] = bytes(len(buf))
    finally:
        with lock:
            state["active"] -= 1
            state["handles"].remove(h)
