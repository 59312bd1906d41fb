"""``pynbd serve``'s command line: nbdkit's options, parsed into :class:`Options`.

Options may come before or after the plugin and its parameters (GNU getopt permutation),
exactly as nbdkit accepts them. A bad command line raises :class:`UsageError` with one line
for the user.
"""

from __future__ import annotations

import getopt
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import parse_bool

__all__ = ["LONG", "PROG", "SHORT", "USAGE", "Options", "UsageError", "parse_args", "parse_delay"]

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

USAGE = """\
pynbd serve [-4|-6] [-D NAME.FLAG=N] [--exit-with-parent] [-e EXPORTNAME]
            [--filter=FILTER ...] [-f] [-g GROUP] [-i IPADDR] [--mask-handshake=MASK]
            [-n] [--no-sr] [-o] [-P PIDFILE] [-p PORT] [--print-uri] [-r]
            [--run 'CMD'] [-s] [-t THREADS] [--timeout=SECS]
            [--tls=off|on|require] [--tls-certificates=DIR] [--tls-psk=FILE]
            [--tls-verify-peer] [-U SOCKET|-] [-u USER] [-v]
            [--vsock] PLUGIN [[KEY=]VALUE [KEY=VALUE ...]]
pynbd serve PLUGIN --help | --dump-plugin
pynbd serve --dump-config | --help | --version

Serve an NBD export from PLUGIN. Built-in plugins: memory, file, null, zero, full, pattern.
`pynbd serve PLUGIN --help` prints the plugin's manual page.
"""


class UsageError(ConfigError):
    """A bad command line (the message is the one line the user sees)."""


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
    #: --tls: "off", "on" (both kinds of client) or "require".
    tls: str = "off"
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    tls_psk: str | None = None
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


# ---- one option at a time --------------------------------------------------------------

#: Options without a value: the fields each one sets.
_FLAGS: dict[str, dict[str, Any]] = {
    "help": {"help": True}, "version": {"version": True},
    "dump-config": {"dump_config": True}, "dump-plugin": {"dump_plugin": True},
    "ipv4-only": {"family": socket.AF_INET}, "ipv6-only": {"family": socket.AF_INET6},
    "exit-with-parent": {"exit_with_parent": True, "foreground": True},
    "foreground": {"foreground": True}, "new-style": {"oldstyle": False},
    "old-style": {"oldstyle": True}, "no-sr": {"no_sr": True}, "no-mc": {"no_mc": True},
    "read-only": {"readonly": True}, "single": {"single": True, "foreground": True},
    "verbose": {"verbose": True}, "vsock": {"vsock": True}, "print-uri": {"print_uri": True},
    "keepalive": {"keepalive": True}, "swap": {"swap": True},
    "tls-verify-peer": {"tls_verify_peer": True},
}
#: Options whose value is stored as given.
_STRINGS = {"export": "export", "group": "group", "user": "user", "ip-addr": "ip_addr",
            "port": "port"}


def _opt_debug(o: Options, val: str) -> None:
    if "=" not in val or "." not in val.split("=", 1)[0]:
        raise UsageError(f"-D (Debug Flag) must have the format NAME.FLAG=N: {val!r}")
    o.debug_flags.append(val)


def _opt_log(o: Options, val: str) -> None:
    if val not in ("stderr", "syslog", "null"):
        raise UsageError(f"--log must be stderr, syslog or null, not {val!r}")
    o.log = val


def _opt_mask_handshake(o: Options, val: str) -> None:
    try:
        o.mask_handshake = int(val, 0)
    except ValueError:
        raise UsageError(f"--mask-handshake: could not parse {val!r}") from None


def _opt_threads(o: Options, val: str) -> None:
    try:
        o.threads = int(val)
        if o.threads < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"cannot parse number of threads: {val}") from None
    if o.threads == 0:
        o.threads = 16


def _opt_unix(o: Options, val: str) -> None:
    if not val:
        raise UsageError("-U: the socket path is empty (use -U - for a private socket)")
    o.unix = val if val == "-" else os.path.abspath(val)


def _opt_run(o: Options, val: str) -> None:
    o.run = val
    o.foreground = True


def _opt_timeout(o: Options, val: str) -> None:
    o.timeout = parse_delay(val, "--timeout")
    if o.timeout <= 0:
        raise UsageError(f"--timeout: must be greater than zero: {val!r}")


def _opt_tls(o: Options, val: str) -> None:
    v = val.lower()
    if v in ("require", "required", "force"):
        o.tls = "require"
        return
    try:
        on = parse_bool(v, "--tls")
    except ConfigError:
        raise UsageError(f"could not decipher boolean ({val})") from None
    o.tls = "on" if on else "off"


def _opt_selinux(o: Options, val: str) -> None:
    # As nbdkit built without SELinux: refusing beats an unlabelled socket.
    raise UsageError("--selinux-label: this pynbd has no SELinux support")


def _opt_list(text: str) -> Callable[[Options, str], None]:
    def show(o: Options, val: str) -> None:
        print(text)
        raise SystemExit(0)

    return show


_VALUED: dict[str, Callable[[Options, str], None]] = {
    "debug": _opt_debug, "log": _opt_log, "mask-handshake": _opt_mask_handshake,
    "threads": _opt_threads, "unix": _opt_unix, "run": _opt_run, "timeout": _opt_timeout,
    "tls": _opt_tls, "selinux-label": _opt_selinux,
    "filter": lambda o, val: o.filters.append(val),
    "pid-file": lambda o, val: setattr(o, "pidfile", os.path.abspath(val)),
    "tls-certificates": lambda o, val: setattr(o, "tls_certificates", os.path.abspath(val)),
    "tls-psk": lambda o, val: setattr(o, "tls_psk", val),
    "long-options": _opt_list("\n".join("--" + x.rstrip("=") for x in LONG)),
    "short-options": _opt_list("\n".join("-" + c for c in SHORT.replace(":", ""))),
}


def _apply(o: Options, key: str, val: str) -> None:
    if key in _FLAGS:
        for attr, value in _FLAGS[key].items():
            setattr(o, attr, value)
    elif key in _STRINGS:
        setattr(o, _STRINGS[key], val)
    else:
        _VALUED[key](o, val)


def parse_args(argv: list[str]) -> Options:
    """nbdkit's command line (``[OPTIONS] PLUGIN [[KEY=]VALUE ...]``) as :class:`Options`."""
    try:
        opts, args = getopt.gnu_getopt(_expand_prefixes(argv), SHORT, LONG)
    except getopt.GetoptError as e:
        raise UsageError(f"{e.msg}. Try 'pynbd serve --help'.") from None
    o = Options()
    for raw, val in opts:
        _apply(o, _ALIASES.get(raw, raw.lstrip("-")), val)
    if args:
        o.plugin = args[0]
        o.params = args[1:]
    _check_conflicts(o)
    return o


def _check_conflicts(o: Options) -> None:
    if o.oldstyle and o.tls == "require":
        raise UsageError("cannot use oldstyle protocol (-o) and require TLS")
    bad = (
        (o.port is not None and o.unix is not None)
        or (o.port is not None and o.single)
        or (o.unix is not None and o.single)
        or (o.single and o.run is not None)
        or (o.single and o.dump_plugin)
        or (o.vsock and o.unix is not None)
        or (o.vsock and o.single)
    )
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
