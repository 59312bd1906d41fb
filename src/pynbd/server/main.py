"""``pynbd serve``: nbdkit's command line over the pynbd server.

    pynbd serve [OPTIONS] PLUGIN [[KEY=]VALUE ...]

Options may come before or after the plugin and its parameters (GNU getopt permutation),
exactly as nbdkit accepts them. Bad command lines get one clear line and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getopt
import importlib
import importlib.util
import inspect
import logging
import logging.handlers
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from pynbd import __version__
from pynbd.errors import ConfigError
from pynbd.plugin import Filter, Plugin, ThreadModel, parse_bool
from pynbd.protocol.constants import HandshakeFlag
from pynbd.protocol.uri import NBDURI, format_uri
from pynbd.server.backend import Chain
from pynbd.server.server import Server, ServerConfig, bind_tcp, bind_unix, bind_vsock
from pynbd.server.stream import FdStream

__all__ = ["Options", "main", "parse_args"]

PROG = "pynbd serve"

SHORT = "46D:e:fg:i:nop:P:rst:u:U:vV"
LONG = [
    "help", "version", "dump-config", "dump-plugin", "ipv4-only", "ipv6-only", "debug=",
    "exit-with-parent", "export=", "export-name=", "exportname=", "filter=", "foreground",
    "no-fork", "group=", "ip-addr=", "ipaddr=", "log=", "mask-handshake=", "new-style",
    "newstyle", "no-sr", "no-structured-replies", "no-mc", "no-meta-contexts", "old-style",
    "oldstyle", "pid-file=", "pidfile=", "port=", "read-only", "readonly", "run=",
    "selinux-label=", "single", "stdin", "swap", "threads=", "tls=", "tls-certificates=",
    "tls-psk=", "tls-verify-peer", "unix=", "user=", "verbose", "vsock", "print-uri",
    "print-url", "show-uri", "show-url", "keepalive", "keep-alive", "timeout=",
    "long-options", "short-options",
]
_ALIASES = {
    "-4": "ipv4-only", "-6": "ipv6-only", "-D": "debug", "-e": "export", "-f": "foreground",
    "-g": "group", "-i": "ip-addr", "-n": "new-style", "-o": "old-style", "-p": "port",
    "-P": "pid-file", "-r": "read-only", "-s": "single", "-t": "threads", "-u": "user",
    "-U": "unix", "-v": "verbose", "-V": "version",
    "--export-name": "export", "--exportname": "export", "--no-fork": "foreground",
    "--ipaddr": "ip-addr", "--newstyle": "new-style", "--no-structured-replies": "no-sr",
    "--no-meta-contexts": "no-mc", "--oldstyle": "old-style", "--pidfile": "pid-file",
    "--readonly": "read-only", "--stdin": "single", "--print-url": "print-uri",
    "--show-uri": "print-uri", "--show-url": "print-uri", "--keep-alive": "keepalive",
}
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")

USAGE = """\
pynbd serve [-4|-6] [-D NAME.FLAG=N] [--exit-with-parent] [-e EXPORTNAME]
            [--filter=FILTER ...] [-f] [-g GROUP] [-i IPADDR] [--mask-handshake=MASK]
            [-n] [--no-sr] [-o] [-P PIDFILE] [-p PORT] [--print-uri] [-r]
            [--run 'CMD'] [-s] [-t THREADS] [--timeout=SECS] [-U SOCKET|-] [-u USER] [-v]
            [--vsock] PLUGIN [[KEY=]VALUE [KEY=VALUE ...]]
pynbd serve PLUGIN --help | --dump-plugin
pynbd serve --dump-config | --help | --version

Serve an NBD export from PLUGIN. Built-in plugins: memory, file, null, zero, full, pattern.
`pynbd serve PLUGIN --help` prints the plugin's manual page.
"""


class UsageError(ConfigError):
    pass


@dataclass
class Options:
    plugin: str | None = None
    params: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    help: bool = False
    version: bool = False
    dump_config: bool = False
    dump_plugin: bool = False
    family: int = socket.AF_UNSPEC
    exit_with_parent: bool = False
    export: str = ""
    foreground: bool = False
    ip_addr: str | None = None
    mask_handshake: int = 3
    no_sr: bool = False
    oldstyle: bool = False
    pidfile: str | None = None
    port: str | None = None
    readonly: bool = False
    run: str | None = None
    single: bool = False
    threads: int = 16
    unix: str | None = None
    verbose: bool = False
    vsock: bool = False
    print_uri: bool = False
    timeout: float | None = None
    tls: str = "off"
    user: str | None = None
    keepalive: bool = False
    log: str | None = None
    no_mc: bool = False
    swap: bool = False
    group: str | None = None
    debug_flags: list[str] = field(default_factory=list)


def _canonical(long_name: str) -> str:
    return _ALIASES.get("--" + long_name, long_name)


def _expand_prefixes(argv: list[str]) -> list[str]:
    """GNU getopt_long's rule for abbreviations, which Python's getopt lacks.

    A prefix matching several long options is not ambiguous when they are all spellings of
    the same option: nbdkit accepts ``--read`` (--read-only, --readonly), ``--pid``
    (--pid-file, --pidfile) and ``--exp=NAME``. Such prefixes are rewritten to one full
    name; anything else is left for getopt to accept or report.
    """
    takes_arg = {x.rstrip("="): x.endswith("=") for x in LONG}
    short_with_arg = set(re.findall(r"(\w):", SHORT))
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        out.append(a)
        i += 1
        if a == "--":
            out += argv[i:]
            break
        if a.startswith("--"):
            name, eq, _ = a[2:].partition("=")
            if name not in takes_arg:
                cands = [x for x in takes_arg if x.startswith(name)] if name else []
                if cands and len({_canonical(c) for c in cands}) == 1:
                    name = cands[0]
                    out[-1] = "--" + name + a[2 + len(a[2:].partition("=")[0]):]
            if takes_arg.get(name) and not eq and i < len(argv):
                out.append(argv[i])  # the option's value, whatever it looks like
                i += 1
        elif a.startswith("-") and len(a) > 1:
            for j, c in enumerate(a[1:], 1):
                if c in short_with_arg:
                    if j == len(a) - 1 and i < len(argv):
                        out.append(argv[i])
                        i += 1
                    break
    return out


_DELAY_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u03bcs": 1e-6, "ns": 1e-9}
_DELAY_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(s|ms|us|\u03bcs|ns)?")


def parse_delay(text: str, what: str) -> float:
    """nbdkit_parse_delay: ``1``, ``1.5``, ``1.5s``, ``100ms``, ``20us``, ``20\u03bcs``, ``5ns``."""
    m = _DELAY_RE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"{what}: could not parse delay: {text!r}")
    return float(m.group(1)) * _DELAY_UNITS[m.group(2) or ""]


def parse_args(argv: list[str]) -> Options:
    try:
        opts, args = getopt.gnu_getopt(_expand_prefixes(argv), SHORT, LONG)
    except getopt.GetoptError as e:
        raise UsageError(f"{e.msg}. Try 'pynbd serve --help'.") from None
    o = Options()
    for raw, val in opts:
        key = _ALIASES.get(raw, raw.lstrip("-"))
        if key == "help":
            o.help = True
        elif key == "version":
            o.version = True
        elif key == "dump-config":
            o.dump_config = True
        elif key == "dump-plugin":
            o.dump_plugin = True
        elif key == "ipv4-only":
            o.family = socket.AF_INET
        elif key == "ipv6-only":
            o.family = socket.AF_INET6
        elif key == "debug":
            if "=" not in val or "." not in val.split("=", 1)[0]:
                raise UsageError(f"-D (Debug Flag) must have the format NAME.FLAG=N: {val!r}")
            o.debug_flags.append(val)
        elif key == "exit-with-parent":
            o.exit_with_parent = True
            o.foreground = True
        elif key == "export":
            o.export = val
        elif key == "filter":
            o.filters.append(val)
        elif key == "foreground":
            o.foreground = True
        elif key == "group":
            o.group = val
        elif key == "user":
            o.user = val
        elif key == "ip-addr":
            o.ip_addr = val
        elif key == "log":
            if val not in ("stderr", "syslog", "null"):
                raise UsageError(f"--log must be stderr, syslog or null, not {val!r}")
            o.log = val
        elif key == "mask-handshake":
            try:
                o.mask_handshake = int(val, 0)
            except ValueError:
                raise UsageError(f"--mask-handshake: could not parse {val!r}") from None
        elif key == "new-style":
            o.oldstyle = False
        elif key == "old-style":
            o.oldstyle = True
        elif key == "no-sr":
            o.no_sr = True
        elif key == "no-mc":
            o.no_mc = True
        elif key == "pid-file":
            o.pidfile = os.path.abspath(val)
        elif key == "port":
            o.port = val
        elif key == "read-only":
            o.readonly = True
        elif key == "run":
            o.run = val
            o.foreground = True
        elif key == "single":
            o.single = True
            o.foreground = True
        elif key == "threads":
            try:
                o.threads = int(val)
                if o.threads < 0:
                    raise ValueError
            except ValueError:
                raise UsageError(f"cannot parse number of threads: {val}") from None
            if o.threads == 0:
                o.threads = 16
        elif key == "unix":
            if not val:
                raise UsageError("-U: the socket path is empty (use -U - for a private socket)")
            o.unix = val if val == "-" else os.path.abspath(val)
        elif key == "verbose":
            o.verbose = True
        elif key == "vsock":
            o.vsock = True
        elif key == "print-uri":
            o.print_uri = True
        elif key == "timeout":
            o.timeout = parse_delay(val, "--timeout")
            if o.timeout <= 0:
                raise UsageError(f"--timeout: must be greater than zero: {val!r}")
        elif key == "keepalive":
            o.keepalive = True
        elif key == "tls":
            v = val.lower()
            if v in ("require", "required", "force"):
                raise UsageError("--tls=require: TLS is not supported by this version of pynbd")
            try:
                if parse_bool(v, "--tls"):
                    raise UsageError("--tls=on: TLS is not supported by this version of pynbd")
            except ConfigError as e:
                raise UsageError(str(e)) from None
        elif key in ("tls-certificates", "tls-psk", "tls-verify-peer"):
            raise UsageError(f"--{key}: TLS is not supported by this version of pynbd")
        elif key == "selinux-label":
            # As nbdkit built without SELinux: refusing beats an unlabelled socket.
            raise UsageError("--selinux-label: this pynbd has no SELinux support")
        elif key == "swap":
            o.swap = True
        elif key == "long-options":
            print("\n".join("--" + x.rstrip("=") for x in LONG))
            raise SystemExit(0)
        elif key == "short-options":
            print("\n".join("-" + c for c in SHORT.replace(":", "")))
            raise SystemExit(0)
    if args:
        o.plugin = args[0]
        o.params = args[1:]
    _check_conflicts(o)
    return o


def _check_conflicts(o: Options) -> None:
    modes = [o.port is not None, o.unix is not None, o.single, o.vsock and o.unix is not None]
    bad = (
        (o.port is not None and o.unix is not None)
        or (o.port is not None and o.single)
        or (o.unix is not None and o.single)
        or (o.single and o.run is not None)
        or (o.single and o.dump_plugin)
        or (o.vsock and o.unix is not None)
        or (o.vsock and o.single)
    )
    del modes
    if bad:
        raise UsageError(
            "--dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination")
    if o.port is not None:
        try:
            p = int(o.port)
            if not 0 <= p <= 65535:
                raise ValueError
        except ValueError:
            try:
                socket.getservbyname(o.port, "tcp")
            except OSError:
                raise UsageError(f"-p: unknown port or service: {o.port}") from None


# ---- plugin and filter loading ----------------------------------------------------------


def load_plugin(name: str) -> type[Plugin]:
    if "/" in name or name.endswith(".py"):
        return _load_from_file(name, Plugin)  # type: ignore[return-value]
    return _find_builtin("plugin", name, Plugin)  # type: ignore[return-value]


def load_filter(name: str) -> type[Filter]:
    if "/" in name or name.endswith(".py"):
        return _load_from_file(name, Filter)  # type: ignore[return-value]
    return _find_builtin("filter", name, Filter)  # type: ignore[return-value]


def _find_builtin(kind: str, name: str, base: type) -> type:
    """A plugin or filter by short name: the package's finder, else the entry points.

    Whatever goes wrong (unknown name, a module that fails to import) becomes one clear
    ConfigError: a bad name on the command line must never print a traceback.
    """
    package = f"pynbd.{kind}s"
    finder_name = f"find_{kind}"
    try:
        finder = getattr(importlib.import_module(package), finder_name, None)
    except ImportError:
        finder = None
    try:
        if finder is not None:
            found = finder(name)
        else:
            found = _from_entry_points(package, name)
    except ConfigError:
        raise
    except (LookupError, ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{kind} '{name}' not found ({type(e).__name__}: {e})") from None
    if found is None:
        raise ConfigError(f"{kind} '{name}' not found")
    if not (inspect.isclass(found) and issubclass(found, base)):
        raise ConfigError(f"{kind} '{name}' is not a pynbd {base.__name__} class")
    return found


def _from_entry_points(group: str, name: str) -> type | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()  # type: ignore[no-any-return]
    return None


def _load_from_file(path: str, base: type) -> type:
    kind = base.__name__.lower()
    if not os.path.isfile(path):
        raise ConfigError(f"cannot open {kind} file {path!r}: no such file")
    modname = f"pynbd_user_{kind}_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path!r}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # inspect, pickle and dataclasses look modules up here
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001
        del sys.modules[modname]
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    found = [v for v in vars(mod).values()
             if inspect.isclass(v) and issubclass(v, base) and v is not base
             and v.__module__ == mod.__name__]
    if len(found) != 1:
        raise ConfigError(f"{path}: expected exactly one {base.__name__} class, found {len(found)}")
    return found[0]


def apply_params(chain: Chain, plugin_cls: type[Plugin], params: list[str]) -> None:
    """nbdkit's key=value rule, with the magic key for bare values."""
    magic = plugin_cls.magic_config_key
    first_bare = True
    for p in params:
        key, sep, value = p.partition("=")
        if sep and _KEY_RE.match(key):
            chain.config(key, value)
        elif magic:
            chain.config(magic, p)
        elif first_bare:
            first_bare = False
            chain.config("script", p)
        else:
            raise ConfigError(f"expecting key=value on the command line but got: {p}")


def manual(cls: type) -> str:
    doc = inspect.getdoc(cls) or f"{cls.__name__}: no manual page."
    return doc.rstrip() + "\n"


# ---- the URI and --run -------------------------------------------------------------------


def make_uri(o: Options, unix_path: str | None, port: int | None, vsock_port: int | None) -> str:
    """The URI clients use, as nbdkit's ``$uri`` spells it (the port always written)."""
    if unix_path is not None:
        u = NBDURI(transport="unix", socket=unix_path, export=o.export)
    elif vsock_port is not None:
        u = NBDURI(transport="vsock", host="1", port=vsock_port, export=o.export)
    else:
        u = NBDURI(transport="tcp", host=o.ip_addr or "localhost", port=port or 10809,
                   export=o.export)
    uri = format_uri(u, always_port=True)
    # nbdkit writes no "/" after the authority when the export name is empty
    return uri[:-1] if u.transport != "unix" and not o.export else uri


def _run_command(cmd: str, uri: str, o: Options, unix_path: str | None,
                 port: int | None) -> subprocess.Popen[bytes]:
    assigns = {
        "uri": uri, "nbd": uri, "port": "" if port is None else str(port),
        "unixsocket": unix_path or "", "exportname": o.export,
    }
    script = "".join(f"{k}={shlex.quote(v)}\n" for k, v in assigns.items()) + cmd
    return subprocess.Popen(["/bin/sh", "-c", script], close_fds=True)


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _listen_fds() -> list[socket.socket] | None:
    pid = os.environ.get("LISTEN_PID")
    nfds = os.environ.get("LISTEN_FDS")
    if pid is None or nfds is None:
        return None
    if pid != str(os.getpid()):
        logging.getLogger("pynbd").info("LISTEN_PID was not for us (ignored)")
        return None
    del os.environ["LISTEN_PID"]
    del os.environ["LISTEN_FDS"]
    os.environ.pop("LISTEN_FDNAMES", None)
    try:
        n = int(nfds)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS is not a number: {nfds!r}") from None
    if not 1 <= n <= 16:
        raise ConfigError(f"LISTEN_FDS out of range: {n}")
    socks = []
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _dump_config() -> str:
    import platform

    return "".join(f"{k}={v}\n" for k, v in [
        ("binary", shutil.which("pynbd") or sys.argv[0]), ("host_cpu", platform.machine()),
        ("host_os", sys.platform + "-gnu" if sys.platform == "linux" else sys.platform),
        ("name", "pynbd"), ("run_default_socket", "Unix"), ("tls", "no"),
        ("version", __version__), ("version_major", __version__.split(".")[0]),
        ("version_minor", __version__.split(".")[1]), ("vsock_option", "yes"),
        ("timeout_option", "yes"), ("exit_with_parent", "yes"),
    ])


_CALLBACKS = ("config", "config_complete", "get_ready", "after_fork", "cleanup", "preconnect",
              "list_exports", "default_export", "open", "close", "export_description",
              "get_size", "block_size", "can_write", "can_flush", "is_rotational", "can_trim",
              "can_zero", "can_fast_zero", "can_extents", "can_fua", "can_multi_conn",
              "can_cache", "pread", "pwrite", "flush", "trim", "zero", "extents", "cache")


def _source_path(cls: type) -> str:
    try:
        return os.path.abspath(inspect.getfile(cls))
    except (TypeError, OSError):
        return getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__


def _dump_plugin(plugin: Plugin, chain: Chain, path: str) -> str:
    cls = type(plugin)
    lines = [f"path={path}", f"name={cls.name}", f"version={cls.version or __version__}",
             "api_version=2", f"max_thread_model={ThreadModel(cls.thread_model).name.lower()}",
             f"thread_model={chain.thread_model.name.lower()}", "errno_is_preserved=1"]
    if cls.magic_config_key:
        lines.append(f"magic_config_key={cls.magic_config_key}")
    for cb in _CALLBACKS:
        mine = getattr(cls, cb, None)
        if cb == "pread":
            defined = cls.pread is not Plugin.pread or \
                cls.pread_into is not Plugin.pread_into
        else:
            defined = mine is not None and mine is not getattr(Plugin, cb, None)
        if defined or cb in ("open", "get_size"):
            lines.append(f"has_{cb}=1")
    lines += list(plugin.dump_plugin())
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return _main(args)
    except ConfigError as e:
        _error(str(e))
        return 1
    except _Terminated:
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
        what = f"{e.filename}: " if e.filename else ""
        _error(f"{what}{e.strerror or e}")
        return 1
    except Exception as e:  # a bad command line never prints a traceback
        if _wants_traceback(args):
            raise
        _error(f"{type(e).__name__}: {e} (run with -v for the traceback)")
        return 1


def _error(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def _wants_traceback(args: list[str]) -> bool:
    """-v (or --verbose, or -v inside combined short flags) shows tracebacks of internal errors."""
    for a in args:
        if a == "--":
            break
        # -v alone or in a cluster of argument-less short flags (-fv, -rsv).
        if a == "--verbose" or re.fullmatch(r"-[46fnorsV]*v[46fnorsvV]*", a):
            return True
    return bool(os.environ.get("PYNBD_DEBUG"))


class _Formatter(logging.Formatter):
    """nbdkit's message shape: ``pynbd: error: MESSAGE`` (log scrapers match it)."""

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


class _SysLog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass  # syslog went away: losing a message beats a traceback on every error


def _syslog_available() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect("/dev/log")
        except OSError:
            return False
    return True


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _setup_logging(verbose: bool, log: str | None = None, background: bool = False) -> None:
    """--log: where errors go (stderr; syslog, the default once in the background; null).

    Debug messages (-v) always go to stderr, as nbdkit's.
    """
    root = logging.getLogger("pynbd")
    dest = log or ("syslog" if background else "stderr")
    handlers: list[logging.Handler] = []
    errors: logging.Handler | None = None
    if dest == "syslog":
        if _syslog_available():
            errors = _SysLog(address="/dev/log",
                             facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            errors.setFormatter(_Formatter(f"pynbd[{os.getpid()}]: %(level)s: %(message)s"))
        else:
            dest = "stderr"  # no syslog daemon here: stderr is better than nothing
    if dest == "stderr":
        errors = logging.StreamHandler(sys.stderr)
        errors.setFormatter(_Formatter("pynbd: %(level)s: %(message)s"))
        if verbose:
            errors.setLevel(logging.DEBUG)
    if errors is not None:
        if dest != "stderr" or not verbose:
            errors.setLevel(logging.WARNING)
        handlers.append(errors)
    if verbose and dest != "stderr":
        debug = logging.StreamHandler(sys.stderr)
        debug.setFormatter(_Formatter("pynbd: %(level)s: %(message)s"))
        debug.addFilter(_BelowWarning())
        handlers.append(debug)
    # No handler at all would make logging fall back to its "last resort" stderr handler.
    root.handlers[:] = handlers or [logging.NullHandler()]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


class _Terminated(BaseException):
    """SIGTERM or SIGQUIT arrived before the event loop took signals over."""


def _early_signal(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _main(argv: list[str]) -> int:
    o = parse_args(argv)
    # Until the loop installs its handlers, SIGTERM unwinds through the finally blocks
    # (listeners closed, the -U - directory removed, plugin cleanup) instead of killing
    # the process where it stands: a supervisor may signal a server that is still loading.
    for sig in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, _early_signal)
    _setup_logging(o.verbose, o.log)
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
    plugin_cls = load_plugin(o.plugin)
    filter_classes = [load_filter(f) for f in o.filters]
    if o.help:
        for fc in filter_classes:
            sys.stdout.write(manual(fc) + "\n")
        sys.stdout.write(manual(plugin_cls))
        return 0
    if o.version:
        print(f"pynbd {__version__}")
        print(f"{plugin_cls.name} {plugin_cls.version or __version__}")
        for fc in filter_classes:
            print(f"{fc.name} {fc.version or __version__}")
        return 0
    plugin = plugin_cls()
    chain = Chain(plugin, [fc() for fc in filter_classes])
    apply_params(chain, plugin_cls, o.params)
    if o.dump_plugin:
        sys.stdout.write(_dump_plugin(plugin, chain, _source_path(plugin_cls)))
        return 0
    chain.config_complete()
    chain.get_ready()
    try:
        return _serve(o, chain)
    finally:
        chain.cleanup()


def _serve(o: Options, chain: Chain) -> int:
    config = ServerConfig(
        readonly=o.readonly, threads=o.threads, no_sr=o.no_sr, oldstyle=o.oldstyle,
        handshake_flags=(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) & o.mask_handshake,
        export_name=o.export, keepalive=o.keepalive, no_mc=o.no_mc,
    )
    if o.timeout:
        config.handshake_timeout = o.timeout
    server = Server(chain, config)
    if o.exit_with_parent:
        _set_pdeathsig()

    activated = _listen_fds()
    if activated is not None:
        if o.port is not None or o.unix is not None or o.single or o.run or o.ip_addr:
            raise UsageError("socket activation cannot be used with -i, -p, -s, -U or --run")
        _detach_stdio()
        _change_user(o)
        _write_pidfile(o)
        _after_fork(o, chain)
        return _run_loop(server, server.serve(activated))

    if o.single:
        rfd, wfd = os.dup(0), os.dup(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        _change_user(o)
        _write_pidfile(o)
        _after_fork(o, chain)

        async def one() -> None:
            owner = None
            try:
                owner = socket.socket(fileno=os.dup(rfd))
                if owner.type != socket.SOCK_STREAM:
                    owner.close()
                    owner = None
            except OSError:
                owner = None
            if owner is not None:
                os.close(rfd)
                if wfd != rfd:
                    os.close(wfd)
                stream = FdStream(asyncio.get_running_loop(), owner.fileno(), owner=owner)
            else:
                stream = FdStream(asyncio.get_running_loop(), rfd, wfd)
            await server.serve_stream(stream)

        return _run_loop(server, one())

    # bind
    tmpdir = None
    unix_path = None
    port = None
    vsock_port = None
    try:
        if o.unix is None and o.port is None and o.run is not None and not o.vsock:
            o.unix = "-"
        if o.unix is not None:
            if o.unix == "-":
                tmpdir = tempfile.mkdtemp(prefix="pynbd")
                unix_path = os.path.join(tmpdir, "socket")
            else:
                unix_path = o.unix
            listeners = [bind_unix(unix_path)]
        elif o.vsock:
            vsock_port = int(o.port) if o.port is not None else 10809
            listeners = [bind_vsock(vsock_port)]
        else:
            port = int(o.port) if o.port is not None and o.port.isdigit() else (
                socket.getservbyname(o.port, "tcp") if o.port else 10809)
            listeners = bind_tcp(port, o.ip_addr, o.family)
            if port == 0:
                port = listeners[0].getsockname()[1]
    except OSError as e:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise ConfigError(f"cannot listen: {e.strerror or e}") from None

    uri = make_uri(o, unix_path, port, vsock_port)
    if o.print_uri:
        print(uri, flush=True)
    runner = None
    try:
        if o.run is not None:
            sys.stdout.flush()
            runner = _run_command(o.run, uri, o, unix_path, port)
        # CMD (above) got the real stdin/stdout; the server keeps neither, as nbdkit:
        # a plugin's print() cannot corrupt a caller's output, and a pipe reading a
        # foreground server's stdout sees EOF once the URI is printed.
        _detach_stdio()
        _change_user(o, tmpdir)
        if not o.foreground:
            if o.pidfile and not os.path.isdir(os.path.dirname(o.pidfile)):
                # Found out now, while the error can still reach the user's terminal.
                raise ConfigError(f"-P {o.pidfile}: the directory does not exist")
            _daemonize(o.verbose)
            _setup_logging(o.verbose, o.log, background=True)
        _write_pidfile(o)
        _after_fork(o, chain)
        if runner is None:
            return _run_loop(server, server.serve(listeners))
        return _run_captive(server, listeners, runner)
    except BaseException:
        # The server could not start (a pid file it may not write, a user it may not
        # become...): CMD must not wait forever for it.
        if runner is not None and runner.poll() is None:
            runner.terminate()
            runner.wait()
        raise
    finally:
        for ls in listeners:
            ls.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


#: Modules the server may import lazily while serving, imported before -u/-g drop
#: privileges: the new user may not be able to read the Python installation (a pyenv
#: under /root), and a failed lazy import then would break a running server.
_PRELOAD = ("concurrent.futures.thread", "traceback", "linecache", "encodings.idna",
            "pynbd.server.connection", "pynbd.server.stream", "pynbd.stream")


def _change_user(o: Options, tmpdir: str | None = None) -> None:
    """-g GROUP then -u USER (names or numbers), after binding, as nbdkit.

    A private ``-U -`` directory is handed to the new user so the server can still remove
    it at exit.
    """
    import grp
    import pwd

    if o.group is None and o.user is None:
        return
    for mod in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    if tmpdir is not None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            uid = -1 if o.user is None else (
                int(o.user) if o.user.isdigit() else pwd.getpwnam(o.user).pw_uid)
            gid = -1 if o.group is None else (
                int(o.group) if o.group.isdigit() else grp.getgrnam(o.group).gr_gid)
            os.chown(tmpdir, uid, gid)
    if o.group is not None:
        try:
            gid = int(o.group) if o.group.isdigit() else grp.getgrnam(o.group).gr_gid
        except KeyError:
            raise ConfigError(f"-g: unknown group: {o.group}") from None
        try:
            os.setgroups([gid])
            os.setgid(gid)
        except OSError as e:
            raise ConfigError(f"-g {o.group}: cannot change group: {e.strerror}") from None
    if o.user is not None:
        try:
            uid = int(o.user) if o.user.isdigit() else pwd.getpwnam(o.user).pw_uid
        except KeyError:
            raise ConfigError(f"-u: unknown user: {o.user}") from None
        try:
            os.setuid(uid)
        except OSError as e:
            raise ConfigError(f"-u {o.user}: cannot change user: {e.strerror}") from None


def _after_fork(o: Options, chain: Chain) -> None:
    """In the process that will serve (the daemon, once forked): --swap, then after_fork."""
    if o.swap:
        _lock_memory()
    chain.after_fork()


def _lock_memory() -> None:
    """--swap: mlockall, so serving swap to our own host cannot deadlock on paging us in."""
    libc = ctypes.CDLL(None, use_errno=True)
    MCL_CURRENT, MCL_FUTURE = 1, 2
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        raise ConfigError(f"--swap: mlockall: {os.strerror(err)}")


def _detach_stdio() -> None:
    """Point fds 0 and 1 at /dev/null (nbdkit does this after get_ready)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
    finally:
        os.close(devnull)


def _write_pidfile(o: Options) -> None:
    if o.pidfile:
        tmp = o.pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, o.pidfile)


def _daemonize(verbose: bool) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not verbose:
        os.dup2(devnull, 2)
    os.close(devnull)


def _run_loop(server: Server, main_coro: Any) -> int:
    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(sig, server.shutdown)
        await main_coro

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        asyncio.run(runner())
    finally:
        # Closing the loop put SIGTERM back to its default: a repeated SIGTERM while the
        # listeners, the -U - directory and the plugin are cleaned up must not cut that short.
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


def _run_captive(server: Server, listeners: list[socket.socket],
                 runner: subprocess.Popen[bytes]) -> int:
    async def both() -> None:
        loop = asyncio.get_running_loop()

        def wait_for_cmd() -> None:
            # A plain thread, not the loop's executor: nothing to import lazily (which can
            # fail after -u), and nothing that can fail and leave the server running
            # forever after CMD is gone.
            try:
                runner.wait()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(server.shutdown)

        watcher = threading.Thread(target=wait_for_cmd, name="pynbd-run-wait", daemon=True)
        watcher.start()
        try:
            await server.serve(listeners)
        finally:
            if runner.poll() is None:
                runner.terminate()

    _run_loop(server, both())
    rc = runner.returncode
    if rc is None:
        rc = runner.wait()
    return 128 - rc if rc < 0 else rc
