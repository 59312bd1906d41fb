"""``pynbd fuse``'s worker processes. With a server that allows multi-conn (and only then:
the connections must share one cache), worker processes serve the mount, each on its own
connection and its own clone of the FUSE device, one request at a time in blocking calls
(:mod:`pynbd.tools._fuse_sync`): the kernel wakes one waiting worker per request. The main
process mounts, starts them, and unmounts when they are done. Each is a fresh
``python -m pynbd fuse`` handed the device and the parsed options (never a fork of a running
event loop), working in ``/``. Without multi-conn, or with one connection, the main process
serves alone on its event loop, many requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

from pynbd.tools import _fuse_kernel as fk
from pynbd.tools._fuse_cli import ADDRESS_MODES, PROG, Options, address, describe, errmsg
from pynbd.tools._fuse_file import RELEASE_TIMEOUT, NbdFile

__all__ = ["WORKER_ENV", "reap_workers", "serve_worker", "signal_worker", "spawn_workers",
           "watch_workers", "workers_wanted"]

WORKER_ENV = "PYNBD_FUSE_WORKER"
#: How many worker processes (PYNBD_FUSE_WORKERS=N overrides, at most -C; 0 turns them off).
WORKERS_ENV = "PYNBD_FUSE_WORKERS"
#: A worker's exit status when it could not connect and so never read a request.
WORKER_DID_NOT_START = 75
#: A worker's exit status when the mount went away (it read ENODEV).
WORKER_UNMOUNTED = 0
#: ... and when it was told to stop.
WORKER_STOPPED = 3


def workers_wanted(o: Options) -> int:
    """How many worker processes to start if the server allows multi-conn: one per
    connection (-C, nbdfuse's default 4); none for a single connection, -s, or a server
    reached through a command or a descriptor (one connection only)."""
    if o.single or o.mode not in ADDRESS_MODES or o.connections < 2:
        return 0
    env = os.environ.get(WORKERS_ENV)
    if env is not None:
        try:
            return max(0, min(int(env), o.connections))
        except ValueError:
            return 0
    return o.connections


def spawn_workers(o: Options, fd: int, ra: int | None, n: int) -> list[
        subprocess.Popen[bytes]]:
    import dataclasses
    import json

    spec = json.dumps({"options": dataclasses.asdict(o), "fd": fd, "readahead": ra,
                       "parent": os.getpid()})
    env = dict(os.environ, **{WORKER_ENV: spec})
    if env.get("PYTHONPATH"):  # relative entries were relative to the old directory
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.join(o.cwd, p) if p else o.cwd for p in env["PYTHONPATH"].split(os.pathsep))
    workers = []
    for _ in range(n):
        try:
            # A session of its own: a Ctrl-C on the terminal reaches the main process only,
            # which stops the workers itself (SIGTERM), one request at a time. It runs in
            # "/": its working directory may be the mountpoint, which it serves.
            p = subprocess.Popen([sys.executable, "-m", "pynbd", "fuse"], pass_fds=[fd],
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 cwd="/", env=env)
        except OSError as e:
            print(f"{PROG}: cannot start a worker process: {errmsg(e)}", file=sys.stderr)
            break
        workers.append(p)
    return workers


def signal_worker(p: subprocess.Popen[bytes], sig: int) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)


async def watch_workers(workers: list[subprocess.Popen[bytes]]) -> tuple[str, int]:
    """Resolves when a worker ends while the mount is live, with why and the exit status
    for the tool: (unmounted, 0) when it saw the mount go away; an error when it died (the
    requests it had taken were failed by the kernel) or when none could connect."""
    started = len(workers)
    while True:
        for p in list(workers):
            rc = p.poll()
            if rc is None:
                continue
            if rc == WORKER_UNMOUNTED:
                return "unmounted", 0
            if rc == WORKER_DID_NOT_START:
                workers.remove(p)
                if not workers and started:
                    return "no worker process could start (see above); stopping", 1
                continue
            return f"a worker process exited ({rc}); stopping", 1
        await asyncio.sleep(0.05)


async def reap_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 3 * RELEASE_TIMEOUT
    for p in workers:
        signal_worker(p, signal.SIGTERM)
    for p in workers:
        while p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if p.poll() is None:
            p.kill()
            p.wait()


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the main process dies (even by SIGKILL): its copy of the
    device must not keep a mount alive that nobody manages."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _connect_blocking(o: Options) -> Any:
    """A worker's connection: blocking calls, simple replies (no event loop)."""
    from pynbd.client.blocking import BlockingConnection

    return BlockingConnection.connect(structured=False, meta_contexts=(), **address(o))


def _connect_until_stopped(o: Options, stopping: list[bool]) -> Any:
    """Connect in a thread while this (main) thread watches for a stop: a signal handler
    never has to interrupt a handshake (raising from it could land inside an import or a
    finalizer, where the exception is lost). None if told to stop or if it failed (said)."""
    import threading

    result: list[Any] = []

    def run() -> None:
        try:
            result.append(_connect_blocking(o))
        except Exception as e:  # noqa: BLE001 - reported below
            result.append(e)

    t = threading.Thread(target=run, name="pynbd-fuse-connect", daemon=True)
    t.start()
    while t.is_alive() and not stopping[0]:
        t.join(0.05)
    if not result:  # stopped while connecting: the daemon thread dies with the process
        return None
    r = result[0]
    if isinstance(r, Exception):
        print(f"{PROG}: {describe(o)}: {errmsg(r)}", file=sys.stderr)
        return None
    if stopping[0]:
        r.close()
        return None
    return r


def serve_worker(spec: dict[str, Any]) -> int:
    """A worker process (:mod:`pynbd.tools._fuse_sync`): serve a clone of the FUSE device it
    was handed until the mount goes away or it is told to stop (SIGTERM from the main
    process), then flush and disconnect."""
    from pynbd.errors import CommandError
    from pynbd.tools import _fuse_sync as fs

    o = Options(**spec["options"])
    fd = int(spec["fd"])
    _die_with_parent(int(spec["parent"]))
    stopping = [False, False]  # stop asked for; waiting (where the signal may interrupt)
    fs.install_stop_handler(stopping, RELEASE_TIMEOUT)
    try:
        dev_fd = fs.clone_device(fd)
    except OSError as e:
        print(f"{PROG}: cannot clone the FUSE device: {errmsg(e)}", file=sys.stderr)
        return WORKER_DID_NOT_START
    finally:
        os.close(fd)
    try:
        conn = _connect_until_stopped(o, stopping)
        if conn is None:
            return WORKER_DID_NOT_START
        f = NbdFile(o, conn)
        dev = fk.FuseDevice(dev_fd, max_readahead=spec.get("readahead"))
        f.ch = dev
        why = fs.serve(f, dev, conn, stopping)
        f.debug(f"worker {os.getpid()}: {why}")
        if not f.readonly and f.can_flush and conn.failure is None:
            fs.arm(RELEASE_TIMEOUT)
            try:
                conn.flush()
            except (OSError, CommandError) as e:
                print(f"{PROG}: flush at unmount: {errmsg(e)}", file=sys.stderr)
        fs.disarm()
        conn.close()
        return WORKER_UNMOUNTED if why == "unmounted" else WORKER_STOPPED
    finally:
        os.close(dev_fd)


