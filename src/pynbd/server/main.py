"""``pynbd serve``: nbdkit's command line over the pynbd server.

    pynbd serve [OPTIONS] PLUGIN [[KEY=]VALUE ...]

The steps are nbdkit's: parse the command line (:mod:`.options`), load and configure the
plugin and filters (:mod:`.loading`), bind (:mod:`.listeners`), then in the serving process
drop privileges, daemonize, write the pid file (:mod:`.process`) and serve. Bad command
lines and failing plugins get one clear line and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import traceback
from collections.abc import Callable

from pynbd import __version__
from pynbd.errors import ConfigError
from pynbd.limits import HANDSHAKE_TIMEOUT
from pynbd.plugin import Filter, Plugin
from pynbd.protocol.constants import HandshakeFlag
from pynbd.server import process
from pynbd.server.backend import Chain
from pynbd.server.listeners import listen, make_uri
from pynbd.server.loading import (
    PluginError,
    apply_debug_flags,
    apply_params,
    dump_plugin,
    guarded,
    instantiate,
    load,
    load_filter,
    load_plugin,
    manual,
)
from pynbd.server.logs import setup_logging
from pynbd.server.options import PROG, USAGE, Options, UsageError, parse_args, parse_delay
from pynbd.server.server import Server, ServerConfig
from pynbd.server.stream import FdStream
from pynbd.server.tls import make_context

# load_plugin, apply_params, make_uri, parse_delay, Options: importable from here as before.
__all__ = ["Options", "apply_params", "load_plugin", "main", "make_uri", "parse_args",
           "parse_delay", "server_config"]

log = logging.getLogger("pynbd")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return _main(args)
    except ConfigError as e:
        if isinstance(e, PluginError) and _wants_traceback(args):
            _print_traceback(e.cause)
        _error(str(e))
        return 1
    except _Logged:
        return 1
    except process.Terminated:
        return 0  # SIGTERM/SIGQUIT before serving: a clean, if early, shutdown
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pynbd serve --help | head -1`: the reader went away; nothing left to say.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # A pid file in a missing directory, a socket we may not create...: one line.
        _error(_one_line(e))
        return 1
    except Exception as e:  # a bad command line never prints a traceback
        if _wants_traceback(args):
            raise
        _error(f"{type(e).__name__}: {e} (run with -v for the traceback)")
        return 1


class _Logged(Exception):
    """An error already logged (by the daemon, which has no terminal to print it on)."""


def _one_line(e: BaseException) -> str:
    """An OSError as ``FILE: strerror``; anything else as its message."""
    if isinstance(e, OSError):
        what = f"{e.filename}: " if e.filename else ""
        return f"{what}{e.strerror or e}"
    return str(e)


def _error(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def _print_traceback(e: BaseException) -> None:
    with contextlib.suppress(OSError, ValueError):
        traceback.print_exception(e, file=sys.stderr)


def _wants_traceback(args: list[str]) -> bool:
    """-v (or --verbose, or -v inside combined short flags) shows tracebacks of internal errors."""
    for a in args:
        if a == "--":
            break
        # -v alone or in a cluster of argument-less short flags (-fv, -rsv).
        if a == "--verbose" or re.fullmatch(r"-[46fnorsV]*v[46fnorsvV]*", a):
            return True
    return bool(os.environ.get("PYNBD_DEBUG"))


def _main(argv: list[str]) -> int:
    o = parse_args(argv)
    process.catch_early_signals()
    setup_logging(o.verbose, o.log)
    if o.version and not o.plugin:
        print(f"pynbd {__version__}")
        return 0
    if o.dump_config:
        sys.stdout.write(_dump_config())
        return 0
    if o.help and not o.plugin:
        sys.stdout.write(USAGE)
        return 0
    if not o.plugin:
        raise UsageError("no plugins given on the command line. Try 'pynbd serve --help'.")
    loaded = load(o.plugin, Plugin)
    plugin_cls: type[Plugin] = loaded.cls
    filter_classes = [load_filter(f) for f in o.filters]
    if o.help or o.version:
        _describe(o, plugin_cls, filter_classes)
        return 0
    chain = Chain(instantiate(plugin_cls), [instantiate(fc) for fc in filter_classes],
                  debug=o.verbose)
    guarded(chain, "load", chain.load)
    # A failure from here to get_ready exits at once, without cleanup or unload (as nbdkit).
    apply_debug_flags(chain, o.debug_flags)
    apply_params(chain, plugin_cls, loaded.params + o.params)
    if o.dump_plugin:
        sys.stdout.write(dump_plugin(chain))
        return 0
    guarded(chain, "config_complete", chain.config_complete)
    guarded(chain, "get_ready", chain.get_ready)
    try:
        return _serve(o, chain)
    finally:
        _cleanup(chain, "cleanup", chain.cleanup)


def _describe(o: Options, plugin_cls: type[Plugin], filter_classes: list[type[Filter]]) -> None:
    """PLUGIN --help (the manual pages) or PLUGIN --version."""
    if o.help:
        for fc in filter_classes:
            sys.stdout.write(manual(fc) + "\n")
        sys.stdout.write(manual(plugin_cls))
        return
    print(f"pynbd {__version__}")
    print(f"{plugin_cls.name} {plugin_cls.version or __version__}")
    for fc in filter_classes:
        print(f"{fc.name} {fc.version or __version__}")


def _cleanup(chain: Chain, phase: str, call: Callable[[], None]) -> None:
    """cleanup (or unload) at exit: a failure is logged in one line, never a traceback."""
    try:
        guarded(chain, phase, call)
    except PluginError as e:
        log.error("%s", e)
        log.debug("%s failed", phase, exc_info=e.cause)


def _dump_config() -> str:
    import platform

    return "".join(f"{k}={v}\n" for k, v in [
        ("binary", shutil.which("pynbd") or sys.argv[0]), ("host_cpu", platform.machine()),
        ("host_os", sys.platform + "-gnu" if sys.platform == "linux" else sys.platform),
        ("name", "pynbd"), ("run_default_socket", "Unix"), ("tls", "yes"),
        ("version", __version__), ("version_major", __version__.split(".")[0]),
        ("version_minor", __version__.split(".")[1]), ("vsock_option", "yes"),
        ("timeout_option", "yes"), ("exit_with_parent", "yes"),
    ])


# ---- serving -------------------------------------------------------------------------------


def server_config(o: Options) -> ServerConfig:
    """The server's whole configuration, from the command line."""
    return ServerConfig(
        readonly=o.readonly, threads=o.threads, no_sr=o.no_sr, oldstyle=o.oldstyle,
        handshake_flags=(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) & o.mask_handshake,
        export_name=o.export, keepalive=o.keepalive, no_mc=o.no_mc,
        handshake_timeout=o.timeout or HANDSHAKE_TIMEOUT,
        tls=o.tls, tls_context=make_context(o.tls, o.tls_certificates, o.tls_verify_peer,
                                            o.tls_psk),
    )


def _serve(o: Options, chain: Chain) -> int:
    server = Server(chain, server_config(o))
    if server.config.tls_context is not None:
        process.keep_heap()  # the TLS stream's batches reuse the heap, not fresh pages
    if o.exit_with_parent:
        process.set_pdeathsig()
    activated = process.listen_fds()
    if activated is not None:
        if o.port is not None or o.unix is not None or o.single or o.run or o.ip_addr:
            raise UsageError("socket activation cannot be used with -i, -p, -s, -U or --run")
        process.detach_stdio()
        _become_server(o, chain)
        return process.run_loop(server, server.serve(activated))
    if o.single:
        return _serve_single(o, chain, server)
    return _serve_listening(o, chain, server)


def _become_server(o: Options, chain: Chain, tmpdir: str | None = None,
                   background: bool = False) -> None:
    """Turn this process into the server: -g/-u, into the background, the pid file,
    --swap, then the plugin's after_fork (nbdkit's order)."""
    process.change_user(o, tmpdir)
    if not background:
        _after_fork(o, chain)
        return
    process.daemonize(o.verbose)
    setup_logging(o.verbose, o.log, background=True)
    try:
        _after_fork(o, chain)
    except (ConfigError, OSError) as e:
        # The daemon's stderr is /dev/null: the one line goes where --log says.
        log.error("%s", _one_line(e))
        if isinstance(e, PluginError):
            log.debug("%s failed", e, exc_info=e.cause)
        raise _Logged from None


def _after_fork(o: Options, chain: Chain) -> None:
    """In the serving process: the pid file, --swap, then the plugin's after_fork."""
    process.write_pidfile(o)
    if o.swap:
        process.lock_memory()
    guarded(chain, "after_fork", chain.after_fork)


def _serve_single(o: Options, chain: Chain, server: Server) -> int:
    """-s: one connection on stdin/stdout (a socket, or a pair of pipes)."""
    rfd, wfd = os.dup(0), os.dup(1)
    process.detach_stdio()
    _become_server(o, chain)

    async def one() -> None:
        owner = _stream_socket(rfd)
        if owner is not None:
            os.close(rfd)
            if wfd != rfd:
                os.close(wfd)
            stream = FdStream(asyncio.get_running_loop(), owner.fileno(), owner=owner)
        else:
            stream = FdStream(asyncio.get_running_loop(), rfd, wfd)
        await server.serve_stream(stream)

    return process.run_loop(server, one())


def _stream_socket(fd: int) -> socket.socket | None:
    """A socket object for a copy of FD when FD is a stream socket, else None (pipes)."""
    dup = os.dup(fd)
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    if s.type != socket.SOCK_STREAM:
        s.close()
        return None
    return s


def _serve_listening(o: Options, chain: Chain, server: Server) -> int:
    """-U, -p/-i, --vsock, --run: bind, print the URI, start CMD, detach, serve."""
    where = listen(o)
    runner = None
    try:
        uri = make_uri(o, where.unix_path, where.port, where.vsock_port)
        if o.print_uri:
            print(uri, flush=True)
        if o.run is not None:
            sys.stdout.flush()
            runner = process.start_command(o.run, uri, o, where.unix_path, where.port)
        # CMD (above) got the real stdin/stdout; the server keeps neither, as nbdkit:
        # a plugin's print() cannot corrupt a caller's output, and a pipe reading a
        # foreground server's stdout sees EOF once the URI is printed.
        process.detach_stdio()
        if not o.foreground and o.pidfile and not os.path.isdir(os.path.dirname(o.pidfile)):
            # Found out now, while the error can still reach the user's terminal.
            raise ConfigError(f"-P {o.pidfile}: the directory does not exist")
        _become_server(o, chain, where.tmpdir, background=not o.foreground)
        if runner is None:
            return process.run_loop(server, server.serve(where.sockets))
        return process.run_captive(server, where.sockets, runner)
    except BaseException:
        # The server could not start (a pid file it may not write, a user it may not
        # become...): CMD must not wait forever for it.
        if runner is not None and runner.poll() is None:
            runner.terminate()
            runner.wait()
        raise
    finally:
        where.close()
