"""``pynbd copy``: nbdcopy 1.14's command line (``pynbd copy [OPTIONS] SOURCE DESTINATION``;
USAGE below is what ``--help`` prints).

SOURCE and DESTINATION are each ``-`` (standard input/output), a file, a block device, an
NBD URI or ``[ CMD ARGS ... ]`` (a server started with systemd socket activation); the
destination may also be ``null:``. Options, messages and exit statuses are nbdcopy's, but
the messages name ``pynbd copy`` (and ``-V`` prints pynbd's version, then libnbd's API level);
the ``--progress=FD`` lines are exactly nbdcopy's. The user guide is docs/copy.md.
"""

from __future__ import annotations

import os
import re
import sys

from pynbd import __version__
from pynbd.client.negotiate import drive
from pynbd.tools import _getopt
from pynbd.tools._copy_ends import (
    PROG,
    CopyError,
    End,
    NbdEnd,
    NullEnd,
    OpError,
    PipeClosed,
    human_size,
    open_local,
)
from pynbd.tools._copy_run import Options, Progress, copy_blocking, copy_multi, copy_sync

__all__ = ["main"]

MIN_REQUEST_SIZE = 4096
MAX_REQUEST_SIZE = 32 * 1024 * 1024
#: Request size without --request-size. nbdcopy uses 256 KiB, the best size for its C loop;
#: in Python each request costs more than the bytes it moves, and 1 MiB halves the time.
DEFAULT_REQUEST_SIZE = 1024 * 1024
#: Bytes in flight per worker without --queue-size (nbdcopy: 16 MiB): at least four
#: requests, and 4 MiB, so what is read is still in the CPU cache when it is written
#: (measured: a file to nbdkit 0.46 s against 0.66 s with 16 MiB in flight).
DEFAULT_QUEUE_SIZE = 4 * 1024 * 1024

USAGE = """
Copy to and from an NBD server:

    pynbd copy [--allocated] [-C N|--connections=N]
               [--destination-is-zero|--target-is-zero] [--flush]
               [--no-extents] [-p|--progress|--progress=FD]
               [--queue-size=N] [--request-size=N] [-R N|--requests=N]
               [-S N|--sparse=N] [--synchronous] [-T N|--threads=N]
               [-v|--verbose]
               SOURCE DESTINATION

    SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI | [ CMD ARGS ... ]
    DESTINATION += null:

Other options:

    pynbd copy --help
    pynbd copy -V|--version

Examples:

    pynbd copy nbd://example.com local.img
    pynbd copy local.img nbd://example.com
    pynbd copy nbd://example.com - | file -
    cat disk1 disk2 | pynbd copy -- - [ qemu-nbd -f qcow2 output.qcow2 ]

pynbd copy follows libnbd's nbdcopy: its options, output and exit statuses.
Please read docs/copy.md (or nbdcopy(1)) for full usage.

"""

SHORT_OPTIONS = "C:pR:S:T:vV"
#: (name, argument: 0 none / 1 required / 2 optional, key) in nbdcopy's order.
LONG_OPTIONS: list[tuple[str, int, str]] = [
    ("help", 0, "help"),
    ("long-options", 0, "long-options"),
    ("allocated", 0, "allocated"),
    ("connections", 1, "C"),
    ("destination-is-zero", 0, "destination-is-zero"),
    ("flush", 0, "flush"),
    ("no-extents", 0, "no-extents"),
    ("progress", 2, "p"),
    ("queue-size", 1, "queue-size"),
    ("request-size", 1, "request-size"),
    ("requests", 1, "R"),
    ("short-options", 0, "short-options"),
    ("sparse", 1, "S"),
    ("synchronous", 0, "synchronous"),
    ("target-is-zero", 0, "destination-is-zero"),
    ("threads", 1, "T"),
    ("verbose", 0, "v"),
    ("version", 0, "V"),
]

_LONGOPTS = [_getopt.LongOption(name, has_arg, key) for name, has_arg, key in LONG_OPTIONS]

NBD_URI_PREFIXES = ("nbd:", "nbds:", "nbd+unix:", "nbds+unix:", "nbd+vsock:", "nbds+vsock:")


class UsageError(Exception):
    """A bad command line: the message is the one line printed."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def getopt_long(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """nbdcopy's options through glibc's getopt_long rules: ([(key, value)], operands)."""
    try:
        return _getopt.getopt_long(argv, SHORT_OPTIONS, _LONGOPTS)
    except _getopt.GetoptError as e:
        raise UsageError(f"{PROG}: {e}") from None


_NUM = re.compile(r"\s*([+-]?)(\d+)")


def _scan_unsigned(s: str) -> int | None:
    """sscanf("%u"): leading digits (trailing text ignored); a minus sign wraps."""
    m = _NUM.match(s)
    if not m:
        return None
    v = int(m.group(2))
    if v > 0xFFFFFFFFFFFFFFFF:
        return 0xFFFFFFFF
    if m.group(1) == "-":
        v = -v
    return v & 0xFFFFFFFF


def _scan_int(s: str) -> int | None:
    """sscanf("%d")."""
    m = _NUM.match(s)
    if not m:
        return None
    v = int(m.group(2))
    v = -v if m.group(1) == "-" else v
    return max(min(v, 0x7FFFFFFF), -0x80000000)


class Settings:
    """The command line, parsed; nbdcopy's defaults."""

    def __init__(self, operands: list[str]) -> None:
        self.allocated = False
        self.connections = 4
        self.destination_is_zero = False
        self.extents = True
        self.flush = False
        self.requests = 64
        self.progress = False
        self.progress_fd = -1
        self.queue_size: int | None = None
        self.request_size: int | None = None
        self.sparse_size = 4096
        self.synchronous = False
        self.threads = 0
        self.verbose = False
        self.operands = operands


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _number(val: str | None, option: str, zero_ok: bool = True) -> int:
    """An unsigned option argument as nbdcopy reads it (sscanf "%u")."""
    assert val is not None
    n = _scan_unsigned(val)
    if n is None or (n == 0 and not zero_ok):
        raise UsageError(f"{PROG}: --{option}: could not parse: {val}")
    return n


def parse(argv: list[str]) -> Settings:
    """Parse nbdcopy's options. Raises UsageError (one line) or _Exit (help, version)."""
    opts, operands = getopt_long(argv)
    s = Settings(operands=operands)
    for key, val in opts:
        if _getopt.print_listing(key, USAGE, _LONGOPTS, SHORT_OPTIONS):
            raise _Exit(0)
        if key == "V":
            from pynbd import libnbd as nbd  # only here: it takes a while to import

            print(f"{PROG} {__version__}\n{nbd.package_name} {nbd.__version__}")
            raise _Exit(0)
        if key == "allocated":
            s.allocated = True
        elif key == "destination-is-zero":
            s.destination_is_zero = True
        elif key == "flush":
            s.flush = True
        elif key == "no-extents":
            s.extents = False
        elif key == "synchronous":
            s.synchronous = True
        elif key == "v":
            s.verbose = True
        elif key == "C":
            s.connections = _number(val, "connections", zero_ok=False)
        elif key == "p":
            s.progress = True
            if val is not None:
                fd = _scan_int(val)
                if fd is None or fd < 0:
                    raise UsageError(f"{PROG}: --progress: could not parse: {val}")
                s.progress_fd = fd
        elif key == "queue-size":
            s.queue_size = _number(val, "queue-size")
        elif key == "request-size":
            n = _number(val, "request-size")
            if not MIN_REQUEST_SIZE <= n <= MAX_REQUEST_SIZE or not _is_pow2(n):
                raise UsageError(f"{PROG}: --request-size: must be a power of 2 within "
                                 f"{MIN_REQUEST_SIZE}-{MAX_REQUEST_SIZE}")
            s.request_size = n
        elif key == "R":
            s.requests = _number(val, "requests", zero_ok=False)
        elif key == "S":
            n = _number(val, "sparse")
            if n != 0 and (n < 512 or not _is_pow2(n)):
                raise UsageError(f"{PROG}: --sparse: must be a power of 2 and >= 512")
            s.sparse_size = n
        elif key == "T":
            s.threads = _number(val, "threads")
    return s


class _Spec:
    """One operand: ``kind`` is "nbd", "cmd", "null" or "local"; ``argv`` a command's."""

    def __init__(self, kind: str, text: str, argv: list[str] | None = None) -> None:
        self.kind = kind
        self.text = text
        self.argv = argv if argv is not None else []


def _split_operands(ops: list[str]) -> tuple[_Spec, _Spec]:
    """SOURCE DESTINATION, either of which may be ``[ CMD ARGS ... ]``."""
    specs: list[_Spec] = []
    i = 0
    for which in ("SOURCE", "DESTINATION"):
        if i >= len(ops):
            missing = "SOURCE and DESTINATION" if which == "SOURCE" else "DESTINATION"
            raise UsageError(f"{PROG}: missing {missing}; try '{PROG} --help'")
        a = ops[i]
        if a == "[":
            try:
                j = ops.index("]", i + 1)
            except ValueError:
                raise UsageError(f"{PROG}: {which} '[' has no matching ']'") from None
            argv = ops[i + 1:j]
            if not argv:
                raise UsageError(f"{PROG}: {which} '[ ]' has no command")
            specs.append(_Spec("cmd", argv[0], argv))
            i = j + 1
        else:
            if which == "DESTINATION" and a == "null:":
                specs.append(_Spec("null", a))
            elif a.startswith(NBD_URI_PREFIXES):
                specs.append(_Spec("nbd", a))
            else:
                specs.append(_Spec("local", a))
            i += 1
    if i != len(ops):
        raise UsageError(f"{PROG}: unexpected extra argument '{ops[i]}'; "
                         f"try '{PROG} --help'")
    return specs[0], specs[1]


async def _open(spec: _Spec, reading: bool, s: Settings, blocking: bool) -> tuple[End, bool]:
    end: End
    sync = False
    if spec.kind == "null":
        end = NullEnd(spec.text)
    elif spec.kind in ("nbd", "cmd"):
        end = NbdEnd(spec.text, uri=spec.text if spec.kind == "nbd" else None,
                     argv=spec.argv if spec.kind == "cmd" else None,
                     reading=reading, extents=s.extents)
    else:
        end, sync = open_local(spec.text, writing=not reading)
    end.blocking = blocking  # before opening: how an NBD end connects
    if isinstance(end, NbdEnd):
        await end.open()
    return end, sync


def _threads(s: Settings) -> int:
    """``--threads``, or nbdcopy's default: one per online CPU."""
    return s.threads or os.cpu_count() or 1


def _may_block(s: Settings, src_spec: _Spec, dst_spec: _Spec) -> bool:
    """Whether the copy can start in blocking calls, with no event loop (asyncio is not even
    imported): it may use several connections (then it is the blocking copy of
    ``_copy_run``). It falls back to an event loop when it finds it has one connection."""
    return (not s.synchronous and s.connections > 1 and _threads(s) != 1
            and "cmd" not in (src_spec.kind, dst_spec.kind))


def _print_rw(end: End, prefix: str) -> None:
    print(f"{prefix}: {end.ops_name} \"{end.name}\"", file=sys.stderr)
    print(f"{prefix}: size={end.size} ({human_size(end.size)}), "
          f"preferred block size={end.preferred}", file=sys.stderr)


def _options(s: Settings, src: End, dst: End, connections: int,
             synchronous: bool) -> Options:
    """What the copy loops are told: connections, request, queue and sparse sizes settled
    against what both ends allow (nbdcopy's rules). Fails if the destination is read-only
    or smaller than the source."""
    if dst.is_read_only():
        raise CopyError(f"{PROG}: {dst.name}: "
                        "the destination is read-only, cannot write to it")
    if not src.can_multi_conn() or not dst.can_multi_conn():
        connections = 1
    if synchronous:
        connections = 1
    # nbdcopy's rule: a thread per CPU unless told, and no more connections than threads
    # (2 on 2 CPUs). Here each thread works its own connections in blocking calls (two
    # reads in flight); more threads than CPUs only hand the interpreter lock around more
    # and make a server start more threads (over TLS from nbdkit, 1 GiB to null: with 4
    # connections the copy used ~15% more CPU and nbdkit ~8% more).
    threads = min(_threads(s), connections)
    connections = threads

    if s.request_size is None:
        # Never above what a server accepts in one request.
        request_size = min(DEFAULT_REQUEST_SIZE, src.max_request, dst.max_request)
    else:
        request_size = s.request_size
    request_size = max(request_size, src.preferred, dst.preferred)
    if s.queue_size is None:
        queue_size = max(DEFAULT_QUEUE_SIZE, 4 * request_size)
    else:
        queue_size = max(s.queue_size, request_size)
    sparse_size = s.sparse_size
    if 0 < sparse_size < dst.preferred:
        sparse_size = dst.preferred

    destination_is_zero = s.destination_is_zero
    if dst.truncate(src.size):
        destination_is_zero = True
    if src.size >= 0 and dst.size >= 0 and src.size > dst.size:
        raise CopyError(f"{PROG}: error: destination size is smaller than source size")

    if s.verbose:
        _print_rw(src, f"{PROG}: src")
        _print_rw(dst, f"{PROG}: dst")
        print(f"{PROG}: connections={connections} requests={s.requests} "
              f"threads={threads} synchronous={'true' if synchronous else 'false'}",
              file=sys.stderr)

    opts = Options(allocated=s.allocated, destination_is_zero=destination_is_zero,
                   extents=s.extents and src.can_extents(), request_size=request_size,
                   requests=s.requests, queue_size=queue_size, sparse_size=sparse_size,
                   connections=connections, flush=s.flush)
    return opts


async def _run(s: Settings, src_spec: _Spec, dst_spec: _Spec, blocking: bool) -> None:
    """The copy. With ``blocking`` it is driven without an event loop (``drive``): the ends
    are opened in blocking calls, and if several connections are used the copy runs in
    threads (copy_blocking); if not, the rest runs on an event loop after all."""
    ends: list[End] = []
    progress = Progress(s.progress, s.progress_fd)
    ok = False
    try:
        connections = s.connections
        synchronous = s.synchronous
        if src_spec.kind == "cmd" or dst_spec.kind == "cmd":
            connections = 1  # multi-conn not supported with socket activation
        src, sync1 = await _open(src_spec, True, s, blocking)
        ends.append(src)
        dst, sync2 = await _open(dst_spec, False, s, blocking)
        ends.append(dst)
        synchronous = synchronous or sync1 or sync2

        opts = _options(s, src, dst, connections, synchronous)
        progress(0, 1)
        if blocking and (synchronous or opts.connections == 1):
            # One connection (or a stream): many requests in flight on an event loop.
            import asyncio

            ends.clear()  # _finish owns them from here
            asyncio.run(_finish(s, src, dst, opts, progress, synchronous, adopt=True))
        else:
            ends.clear()
            await _finish(s, src, dst, opts, progress, synchronous)
        ok = True
    finally:
        progress.close()
        if not ok:
            for end in ends:
                end.abandon()


async def _finish(s: Settings, src: End, dst: End, opts: Options, progress: Progress,
                  synchronous: bool, adopt: bool = False) -> None:
    """Copy, flush, close; on a failure, abandon both ends (in the loop they run in)."""
    ends = [src, dst]
    try:
        if adopt:
            for end in ends:
                end.go_async()
        if synchronous:
            await copy_sync(src, dst, opts, progress)
        elif src.blocking:  # several connections, opened in blocking calls
            await copy_blocking(src, dst, opts, progress)
        else:
            await copy_multi(src, dst, opts, progress)
        progress(1, 1)

        ends.remove(src)
        await src.close()
        if s.flush:
            try:
                await dst.flush()
            except OpError as e:
                raise CopyError(f"{dst.name}: {e.detail}") from None
        ends.remove(dst)
        await dst.close()
    finally:
        for end in ends:
            end.abandon()


def main(argv: list[str] | None = None) -> int:
    from pynbd.tools import _lifetime

    # A server started for [ CMD ] dies with the copy, however it ends; Ctrl-C ends it at
    # once, as nbdcopy (a write blocked on a full pipe would not see KeyboardInterrupt).
    with _lifetime.tool(default_sigint=True):
        return _main(sys.argv[1:] if argv is None else list(argv))


def _main(args: list[str]) -> int:
    try:
        s = parse(args)
        src_spec, dst_spec = _split_operands(s.operands)
    except _Exit as e:
        return e.status
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 1
    try:
        if _may_block(s, src_spec, dst_spec):
            drive(_run(s, src_spec, dst_spec, True))
        else:
            import asyncio

            asyncio.run(_run(s, src_spec, dst_spec, False))
    except CopyError as e:
        sys.stdout.flush()
        print(str(e), file=sys.stderr)
        return 1
    except PipeClosed:  # both ends are closed (a server we started is stopped)
        import signal

        from pynbd.tools._lifetime import die_of

        die_of(signal.SIGPIPE)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"{PROG}: {e or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
