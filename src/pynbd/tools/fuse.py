"""``pynbd fuse``: show an NBD export as a regular file (libnbd's nbdfuse).

    pynbd fuse [-C N] [-d] [-o FUSE-OPTION] [-P PIDFILE] [-r] [-s] [-v] [-f|--background]
               MOUNTPOINT[/FILENAME] URI
    pynbd fuse MOUNTPOINT[/FILENAME] [ CMD [ARGS ...] ]
    pynbd fuse MOUNTPOINT[/FILENAME] --command CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --socket-activation CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --fd N | --tcp HOST PORT | --unix SOCKET | --vsock CID PORT

Each FUSE request becomes one NBD request. With a multi-conn server, worker processes serve
the mount, one connection each, one request at a time in blocking calls
(:mod:`pynbd.tools._fuse_sync`); otherwise this process serves on one event loop with
:class:`pynbd.client.AsyncClient`, as many requests in flight as the kernel sends. The kernel
side is :mod:`pynbd.tools._fuse_kernel`. The user guide is docs/fuse.md.

This module runs a mount from start to end; its parts are the command line
(:mod:`~pynbd.tools._fuse_cli`), the file's answers to FUSE requests
(:mod:`~pynbd.tools._fuse_file`) and the worker processes (:mod:`~pynbd.tools._fuse_workers`,
:mod:`~pynbd.tools._fuse_sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

from pynbd.tools import _fuse_kernel as fk
from pynbd.tools._fuse_cli import (
    ADDRESS_MODES,
    PROG,
    Options,
    UsageError,
    address,
    describe,
    errmsg,
    parse_args,
)
from pynbd.tools._fuse_file import RELEASE_TIMEOUT, NbdFile
from pynbd.tools._fuse_workers import (
    WORKER_ENV,
    reap_workers,
    serve_worker,
    signal_worker,
    spawn_workers,
    watch_workers,
    workers_wanted,
)

__all__ = ["main"]

#: The kernel's readahead for a FUSE mount (-o max_readahead above it needs root).
KERNEL_READAHEAD = 128 * 1024
#: The readahead set for the mount when root and no -o max_readahead is given: sequential
#: readers through the page cache then get up to 1 MiB requests, several in flight, instead
#: of one 128 KiB request at a time. Random reads are not affected (the kernel reads only
#: what a random reader asks for).
DEFAULT_READAHEAD = 4 << 20


def _leave_mountpoint(mountpoint: str) -> None:
    """Before mounting: leave the working directory for ``/`` (as a daemon does), and drop
    the mountpoint and what is under it from the import path. Once mounted, looking there
    is a FUSE request to the process that serves it: an import that checks a directory on
    ``sys.path`` (``python -m`` puts the working directory there) would wait for ever."""
    real = os.path.realpath(mountpoint)
    inside = real.rstrip("/") + "/"

    def under(p: str) -> bool:
        r = os.path.realpath(p or ".")
        return r == real or r.startswith(inside)

    sys.path[:] = [p for p in sys.path if not under(p)]
    for p in [p for p in sys.path_importer_cache if isinstance(p, str) and under(p)]:
        del sys.path_importer_cache[p]
    os.chdir("/")


async def connect(o: Options, connections: int | None = None) -> Any:
    from pynbd.client.pool import connect as pool_connect

    if o.mode in ADDRESS_MODES:
        n = o.connections if connections is None else connections
        return await pool_connect(connections=n, **address(o))
    kw: dict[str, Any] = {}
    if o.mode == "command":
        kw["command"] = o.args
    elif o.mode in ("bracket", "socket-activation"):
        kw["socket_activation"] = o.args
    else:  # fd
        kw["sock"] = socket.socket(fileno=int(o.args[0], 0))
    return await pool_connect(connections=1, **kw)


async def serve(o: Options, ready: Any = None) -> int:
    """Connect, mount, answer requests until unmounted or signalled, clean up."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal(signame: str) -> None:
        if not stop.done():
            stop.set_result(signame)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(s, on_signal, s.name)

    try:
        # With worker processes this connection only learns what the export is (and whether
        # it allows multi-conn); otherwise it is the pool that serves.
        nbd = await _until(connect(o, 1 if workers_wanted(o) else o.connections), stop)
    except Exception as e:  # noqa: BLE001
        print(f"{PROG}: {describe(o)}: {errmsg(e)}", file=sys.stderr)
        return 1
    if nbd is None:
        return 1
    session = _Session(o, nbd, stop)
    try:
        if nbd.is_read_only():
            o.readonly = True
        mounted = _mount(o)
        if mounted is None:
            return 1
        return await session.run(*mounted, ready)
    finally:
        await _close(nbd, session.responsive)


def _mount(o: Options) -> tuple[int, str, int | None] | None:
    """Mount (the device's descriptor, the real mountpoint, the readahead asked of the
    kernel), or None (said why)."""
    root_mode = stat.S_IFREG if o.file_mode else stat.S_IFDIR
    # Nothing may look at the mountpoint's path once mounted: a lookup would be a FUSE
    # request to this very process and deadlock.
    real_mountpoint = os.path.realpath(o.mountpoint)
    _leave_mountpoint(real_mountpoint)
    try:
        fd = fk.mount(o.mountpoint, root_mode=root_mode, fsname=o.fsname,
                      subtype=o.subtype, options=o.mount_options, read_only=o.mount_ro)
    except fk.MountError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return None
    except OSError as e:
        print(f"{PROG}: {errmsg(e)}", file=sys.stderr)
        return None
    ra = o.max_readahead
    if ra is None and os.geteuid() == 0:
        ra = DEFAULT_READAHEAD
    if ra is not None and ra > KERNEL_READAHEAD:
        # before INIT is answered: the kernel takes the smaller of the two
        why_not = fk.set_readahead(real_mountpoint, ra)
        if why_not:
            if o.max_readahead is not None:  # asked for: say why not
                print(f"{PROG}: cannot raise readahead: {why_not}", file=sys.stderr)
            ra = None
    return fd, real_mountpoint, ra


class _Session:
    """One mount, from the mount to the unmount: served by this process's event loop, or
    by worker processes it watches."""

    def __init__(self, o: Options, nbd: Any, stop: asyncio.Future[Any]) -> None:
        self.o = o
        self.nbd = nbd
        self.stop = stop
        self.f = NbdFile(o, nbd)
        self.workers: list[subprocess.Popen[bytes]] = []
        #: Whether the server still answers (else it is cut off rather than waited for).
        self.responsive = True

    async def run(self, fd: int, real_mountpoint: str, ra: int | None, ready: Any) -> int:
        """Serve the mounted file until unmounted or stopped, then clean up; the exit
        status."""
        f = self.f
        ch = fk.FuseChannel(fd, f.handle, max_readahead=ra, after_batch=f.flush_requests)
        f.ch = ch
        status, unmounted = 0, False
        try:
            self._started(ready)
            if workers_wanted(self.o) and self.nbd.can_multi_conn():
                self.workers = spawn_workers(self.o, fd, ra, workers_wanted(self.o))
            if self.workers:
                # They serve; this process only owns the mount and watches them.
                await _close(self.nbd, True)
            else:
                ch.start()
            f.debug(f"mounted {self.o.mountpoint} ({self.o.filename}, {f.size} bytes"
                    f"{', read-only' if self.o.readonly else ''}, "
                    f"{len(self.workers) or len(f.clients)} connection(s), "
                    f"{1 + len(self.workers)} process(es))")
            status, unmounted = await self._wait_end(ch)
        finally:
            await reap_workers(self.workers)
            # As libfuse: close the device first (the kernel aborts the connection, so the
            # unmount cannot recurse into this filesystem), then detach the mount.
            ch.close()
            if not unmounted:
                try:
                    fk.unmount(real_mountpoint)
                except fk.MountError as e:
                    print(f"{PROG}: {e}", file=sys.stderr)
        return status

    def _started(self, ready: Any) -> None:
        """The mount is live: the pid file, and the parent of --background told."""
        if self.o.pidfile:
            try:
                with open(self.o.pidfile, "w") as fp:
                    fp.write(str(os.getpid()))
            except OSError as e:
                print(f"{PROG}: pidfile: {errmsg(e)}", file=sys.stderr)
        if ready is not None:
            ready()  # (in --background, stdout and stderr are /dev/null from here)

    async def _wait_end(self, ch: fk.FuseChannel) -> tuple[int, bool]:
        """Until unmounted, a signal, or a worker lost: (exit status, unmounted)."""
        workers, status = self.workers, 0
        lost = asyncio.ensure_future(watch_workers(workers))
        await asyncio.wait([ch.closed, self.stop, lost], return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            why, status = lost.result()
            if status:
                print(f"{PROG}: {why}", file=sys.stderr)
        else:
            lost.cancel()
            why = ch.closed.result() if ch.closed.done() else f"signal {self.stop.result()}"
        self.f.debug(f"stopping: {why}")
        ch.stop(why)
        for w in workers:
            signal_worker(w, signal.SIGTERM)
        if not workers:
            self.responsive = await self.f.drain()
        return status, why == "unmounted"


async def _close(nbd: Any, responsive: bool) -> None:
    """Disconnect and stop a server we started; a server that does not answer any more is
    cut off rather than waited for."""
    if responsive:
        try:
            await asyncio.wait_for(nbd.close(), RELEASE_TIMEOUT)
            return
        except TimeoutError:
            print(f"{PROG}: the server did not answer; closing the connection",
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            msg = errmsg(e)
            if "closed" not in msg:
                print(f"{PROG}: close: {msg}", file=sys.stderr)
    clients = list(getattr(nbd, "clients", [nbd]))
    for c in clients:
        c.abort()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _until(coro: Coroutine[Any, Any, Any], stop: asyncio.Future[Any]) -> Any:
    """Run ``coro`` unless a signal comes first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None


def _run(o: Options, ready: Any = None) -> int:
    try:
        return asyncio.run(serve(o, ready))
    except KeyboardInterrupt:
        return 1


def _background(o: Options) -> int:
    """Fork; the parent exits when the child has mounted (0) or failed (1)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as fp:
            ok = fp.read(1)
        if ok == b"1":
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    # child
    os.close(r)
    os.setsid()

    def ready() -> None:
        os.write(w, b"1")
        os.close(w)
        if not o.verbose:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)

    code = _run(o, ready)
    os._exit(code)


def main(argv: list[str]) -> int:
    from pynbd.tools import _lifetime

    worker = os.environ.pop(WORKER_ENV, None)
    if worker is not None:
        import json

        return serve_worker(json.loads(worker))
    try:
        parsed = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if isinstance(parsed, int):
        return parsed
    o = parsed
    if not os.path.exists("/dev/fuse"):
        print(f"{PROG}: /dev/fuse does not exist: the fuse kernel module is not loaded",
              file=sys.stderr)
        return 1
    with _lifetime.tool():  # a server started for --command or [ CMD ] dies with this process
        if o.background:
            return _background(o)
        return _run(o)
