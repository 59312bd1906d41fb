"""Differential tests of failures: the same program under Debian's python3-libnbd 1.14.2 and
under pynbd.libnbd must print the same ``nbd.Error`` strings and errnos, handle states and
results.

Covered: NBD URIs that libxml2 or lib/uri.c reject (unknown or wrongly cased schemes,
malformed hosts, ports, percent-escapes, socket= mistakes, transports and TLS settings that
are not allowed, local files), URIs that parse but do not connect (closed TCP ports, missing
Unix sockets, vsock with nothing listening, unknown service names), subprocess servers that
cannot be run or exit at once (``connect_command`` and
``connect_systemd_socket_activation``, including the child's line on stderr), and option
mode against a plain (not fixed) newstyle server. ``nbds://`` URIs that do not connect are
compared too (TLS itself: test_tls_client_libnbd.py).

Each program runs under both interpreters (``helpers.run_libnbd`` for the real bindings,
this interpreter with ``pynbd.libnbd`` installed as ``nbd`` for ours) and the outputs are
compared line by line.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    Server,
    free_tcp_port,
    require,
    run_libnbd,
    run_peer,
    run_pynbd,
    run_pynbd_libnbd,
    start_server,
)

pytestmark = pytest.mark.interop

#: ``tr(label, fn)`` prints fn()'s result, or its error: string, errno name, number.
HEADER = r'''
import nbd, sys, errno
def tr(label, f):
    try:
        r = f()
    except nbd.Error as e:
        print(label, "ERR", repr(e.string), e.errno, e.errnum)
    except Exception as e:
        print(label, "EXC", type(e).__name__, e)
    else:
        print(label, "OK", repr(r))
def state(h):
    return h.connection_state().split(":")[0]
'''


def run_ours(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pynbd_libnbd(script, *args, check=False)


def differential(script: str, *args: str, stderr: bool = False,
                 fresh: Callable[[], Server] | None = None,
                 normalize: Callable[[str], str] | None = None) -> str:
    """Run ``script`` under both bindings; stdout (and with ``stderr``, stderr) must be
    identical. With ``fresh`` each run gets its own server, its URI as ``sys.argv[1]``;
    ``normalize`` rewrites the real run's stdout first."""
    script = HEADER + script
    a1 = a2 = args
    if fresh is not None:
        a1, a2 = (fresh().uri, *args), (fresh().uri, *args)
    real = run_libnbd(script, *a1, check=False)
    ours = run_ours(script, *a2)
    assert real.returncode == 0, real.stderr
    assert ours.returncode == 0, ours.stderr
    real_out = normalize(real.stdout) if normalize else real.stdout
    for what, r, o in [("stdout", real_out, ours.stdout),
                       *([("stderr", real.stderr, ours.stderr)] if stderr else [])]:
        if r != o:
            diff = "\n".join(difflib.unified_diff(r.splitlines(), o.splitlines(), "libnbd",
                                                  "pynbd.libnbd", lineterm=""))
            pytest.fail(f"{what} differs\n--- script:\n{script}\n--- diff:\n{diff}",
                        pytrace=False)
    assert real.stdout.strip(), "the program printed nothing"
    return real.stdout


# ------------------------------------------------------------------------------ URIs

#: URIs that fail before anything is connected (libxml2's parser or lib/uri.c's checks).
BAD_URIS = [
    # schemes: unknown, wrongly cased (libnbd compares them as written), missing
    "http://localhost/", "foo://x/", "NBD://localhost/", "Nbd://x/", "nbd+UNIX:///?socket=/x",
    "localhost:10809", "nbd:localhost", "nbd:/x", "nbd:", "nbd", "", "localhost", "LOCALHOSTX",
    "/tmp/sock", "//localhost/",
    # malformed hosts, ports and escapes
    "nbd://[::1/", "nbd://[::1]x/", "nbd://a b/", "nbd://host:port/", "nbd://localhost:/",
    "nbd://localhost:1:2/", "nbd://a@b@localhost/", "nbd://%zz/", "nbd://%/", "nbd://a%2/",
    "nbd://a\\b/", "nbd://a|b/", "nbd://{a}/", "nbd://\u00e9/", "nbd://localhost/\u00e9",
    "nbd://localhost/a b", "nbd://localhost/%zz", "nbd://localhost/?a=%zz", "nbd://localhost/?a b",
    "nbd://localhost:2147483648/", "nbd://localhost:4294967297/",
    "nbd+vsock://1:99999999999", "nbd+vsock://abc", "nbd+vsock://abc:1",
    # socket= in the wrong place, or missing
    "nbd://localhost/?socket=/x", "nbd://localhost/?a=b;socket=/x", "nbds://localhost/?socket=/x",
    "nbd+vsock://2/?socket=/x", "nbd+unix:///", "nbd+unix:///?sock=x", "nbds+unix:///",
    "nbds+vsock:///?socket=/x",
    # local files need set_uri_allow_local_file
    "nbd://localhost/?tls-psk-file=/x", "nbd+unix:///?socket=/x&tls-certificates=/y",
]


def test_bad_uris() -> None:
    differential(r"""
for u in sys.argv[1:]:
    for call in ("connect_uri", "aio_connect_uri"):
        if call == "aio_connect_uri" and u == "nbd+vsock://":
            # whether the reset arrives before the aio call returns is a race, in both
            continue
        h = nbd.NBD()
        tr(f"{call}({u!r})", lambda: getattr(h, call)(u))
        print("   ", state(h), repr(h.get_export_name()))
""", *BAD_URIS)


def test_uri_allow_lists() -> None:
    differential(r"""
for tls, u in [(nbd.TLS_DISABLE, "nbds://localhost/"), (nbd.TLS_REQUIRE, "nbd://localhost/"),
               (nbd.TLS_REQUIRE, "nbd+unix:///?socket=/x")]:
    h = nbd.NBD(); h.set_uri_allow_tls(tls)
    tr(f"tls={tls} {u}", lambda: h.connect_uri(u))
for mask, u in [(nbd.ALLOW_TRANSPORT_TCP, "nbd+unix:///?socket=/x"),
                (nbd.ALLOW_TRANSPORT_UNIX, "nbd://localhost/"),
                (nbd.ALLOW_TRANSPORT_TCP, "nbd+vsock://2"),
                (nbd.ALLOW_TRANSPORT_TCP, "/tmp/sock"),
                (nbd.ALLOW_TRANSPORT_UNIX, "localhost")]:
    h = nbd.NBD(); h.set_uri_allow_transports(mask)
    tr(f"transports={mask} {u}", lambda: h.connect_uri(u))
""")


def test_uris_that_do_not_connect(tmp_path: Path) -> None:
    """The URI parses; the connection fails: the message names the connect() failure, the
    handle goes back to START (TCP) or is DEAD (Unix, vsock); parsed parts are kept. As in
    libnbd, an aio call fails at once when connect(2) does (a vsock connect is still in
    progress when the call returns)."""
    missing = str(tmp_path / "missing.sock")
    uris = [
        "nbd://localhost:1/export", "nbd://127.0.0.1:1", "nbd://[::1]:1/", "nbd://u@localhost:1/",
        "nbd://loc%61lhost:1/%41", "nbd://localhost:1#fragment", "nbd://localhost:1//a//b",
        "nbd://localhost:99999/", "nbd://localhost:65536/",
        f"nbd+unix:///e?socket={missing}", f"nbd+unix://host/?socket={missing}",
        f"nbd+unix:///?socket={missing}&socket={missing}2", f"nbd+unix:///?&socket={missing}&",
        f"nbd+unix:///?=x&socket={missing.replace('/', '%2F')}", f"nbd+unix://:5/?socket={missing}",
        "nbd+unix:///?socket=", "nbd+unix:///?socket",
        "nbd+vsock://2:10809", "nbd+vsock://", "nbd+vsock://3:1",
    ]
    differential(r"""
for u in sys.argv[1:]:
    for call in ("connect_uri", "aio_connect_uri"):
        if call == "aio_connect_uri" and u == "nbd+vsock://":
            # whether the reset arrives before the aio call returns is a race, in both
            continue
        h = nbd.NBD()
        tr(f"{call}({u!r})", lambda: getattr(h, call)(u))
        if call == "connect_uri" or not u.startswith("nbd+vsock"):
            print("   ", state(h), repr(h.get_export_name()))
""", *uris)


def test_tcp_service_names() -> None:
    """connect_tcp resolves the port string in the call (getaddrinfo errors have no errno and
    leave the handle in START); every address is tried before "could not connect"."""
    differential(r"""
for port in ["1", "nosuchservice", "-1", "99999"]:
    for call in ("connect_tcp", "aio_connect_tcp"):
        h = nbd.NBD()
        tr(f"{call} {port}", lambda: getattr(h, call)("localhost", port))
        if call == "connect_tcp":
            print("   ", state(h))
""")


def test_tls_urls_that_do_not_connect(tmp_path: Path) -> None:
    """nbds URIs go through the same checks and connect(2) as nbd ones, and set TLS_REQUIRE
    (the TLS itself: tests/interop/test_tls_client_libnbd.py)."""
    missing = str(tmp_path / "missing.sock")
    differential(r"""
for u in sys.argv[1:]:
    h = nbd.NBD()
    tr(u, lambda: h.connect_uri(u))
    print("   ", state(h), h.get_tls())
h = nbd.NBD()
tr("set_tls(REQUIRE)", lambda: h.set_tls(nbd.TLS_REQUIRE))
print(h.get_tls(), h.supports_tls())
""", "nbds://localhost:1/", f"nbds+unix:///?socket={missing}", "nbds+vsock://3:1")


def test_tcp_connections_that_work(tmp_path: Path) -> None:
    """The other side of the connect(2) path: every way of naming a TCP server connects
    (sync and aio), with the URI libnbd gives back."""
    port = free_tcp_port()
    srv = start_server([require("nbdkit"), "-f", "-i", "127.0.0.1", "-p", str(port),
                        "memory", "1M"], logdir=tmp_path / "nbdkit", port=port)
    try:
        differential(r"""
port = sys.argv[1]
for how in ["uri", "uri4", "tcp", "aio_uri", "aio_tcp"]:
    h = nbd.NBD()
    if how == "uri": h.connect_uri(f"nbd://localhost:{port}/x")
    elif how == "uri4": h.connect_uri(f"nbd://127.0.0.1:{port}")
    elif how == "tcp": h.connect_tcp("localhost", port)
    elif how == "aio_uri":
        h.aio_connect_uri(f"nbd://localhost:{port}/")
        while not h.aio_is_ready(): h.poll(-1)
    else:
        h.aio_connect_tcp("127.0.0.1", port)
        while not h.aio_is_ready(): h.poll(-1)
    print(how, h.get_size(), h.get_uri().replace(port, "PORT"), state(h))
    h.shutdown()
""", str(port))
    finally:
        srv.stop(check=False)


# ------------------------------------------------------------------------------ subprocesses

#: Programs that cannot serve: missing (by path and by name), not executable, a directory,
#: exiting early with and without an error, and an empty argv.
BAD_PROGRAMS = r"""
progs = [["/nonexistent/prog", "arg"], ["no-such-program-pynbd-test"], ["/etc/passwd"],
         ["/tmp"], ["sh", "-c", "sleep 0.1"], ["sh", "-c", "sleep 0.1; exit 3"], []]
"""


#: What libnbd reports, now and then, instead of its usual reset when a socket-activated
#: server is gone before libnbd connects (seen with nbdinfo 1.14 on a busy machine).
LIBNBD_SA_RACES = ("connect: Connection refused", "connect: Connection reset by peer",
                   "external event 0 is invalid in state CONNECT.START: Invalid argument")


def libnbd_sa_race(out: str) -> str:
    """libnbd closes its copy of the listening socket before it connects: when the server
    is gone by then (rarely, e.g. exec failed at once on a busy machine) it reports one of
    LIBNBD_SA_RACES instead of the usual reset. pynbd.libnbd keeps the listener open until
    connected, so it always sees the reset; read libnbd's rare forms as its usual one."""
    races = "|".join(re.escape(r) for r in LIBNBD_SA_RACES)
    out = re.sub(rf"nbd_(aio_)?connect_systemd_socket_activation: (?:{races})"
                 r"(?P<errno>' E[A-Z]+ \d+)?",
                 lambda m: ("nbd_poll" if m.group(1) else
                            "nbd_connect_systemd_socket_activation") +
                 ": recv: Connection reset by peer" +
                 ("' ECONNRESET 104" if m.group("errno") else ""), out)
    # The aio form may meet the race in nbd_poll, which leaves the handle in CONNECT.START.
    return re.sub(r"nbd_poll: external event 0 is invalid in state CONNECT\.START: Invalid "
                  r"argument' EINVAL 22\n    CONNECT\.START",
                  "nbd_poll: recv: Connection reset by peer' ECONNRESET 104\n    DEAD", out)


def test_socket_activation_that_fails() -> None:
    """libnbd connects before the server runs: a server that cannot start or exits early
    resets the connection; a program that cannot be run also gets the child's line on
    stderr."""
    differential(BAD_PROGRAMS + r"""
for call in ("connect_systemd_socket_activation", "aio_connect_systemd_socket_activation"):
    for argv in progs:
        h = nbd.NBD()
        if call.startswith("aio"):
            def go():
                h.aio_connect_systemd_socket_activation(argv)
                while not (h.aio_is_dead() or h.aio_is_ready()):
                    h.poll(-1)
        else:
            go = lambda: h.connect_systemd_socket_activation(argv)
        tr(f"{call} {argv}", go)
        sys.stdout.flush()
        print("   ", state(h))
        sys.stdout.flush()
""", stderr=True, normalize=libnbd_sa_race)


def test_connect_command_that_fails() -> None:
    differential(BAD_PROGRAMS + r"""
for argv in progs:
    h = nbd.NBD()
    tr(f"connect_command {argv}", lambda: h.connect_command(argv))
    print("   ", state(h))
    sys.stdout.flush()
""", stderr=True)


# ------------------------------------------------------------------------------ plain newstyle

PLAIN_NEWSTYLE = r"""
uri = sys.argv[1]
def handle():
    h = nbd.NBD()
    h.set_opt_mode(True)
    tr("connect", lambda: h.connect_uri(uri))
    return h
def step(h, label, f):
    tr(label, f)
    print("   ", state(h))

h = handle()
print("   ", state(h))
step(h, "protocol", h.get_protocol)
step(h, "handshake flags", h.get_handshake_flags)
step(h, "structured", h.get_structured_replies_negotiated)
step(h, "size", h.get_size)
step(h, "opt_list", lambda: h.opt_list(lambda n, d: print("  export", n, d)))
step(h, "aio_opt_list", lambda: h.aio_opt_list(lambda n, d: 0))
step(h, "opt_info", h.opt_info)
step(h, "aio_opt_info", h.aio_opt_info)
step(h, "opt_list_meta_context", lambda: h.opt_list_meta_context(lambda n: 0))
step(h, "set_export_name", lambda: h.set_export_name(""))
step(h, "add_meta_context", lambda: h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
step(h, "opt_go", h.opt_go)
step(h, "size", h.get_size)
step(h, "can_meta_context", lambda: h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
step(h, "pread", lambda: bytes(h.pread(4, 0)))
step(h, "shutdown", h.shutdown)

h = handle()
step(h, "opt_abort", h.opt_abort)
step(h, "size", h.get_size)

h = handle()
step(h, "aio_opt_abort", h.aio_opt_abort)

h = handle()
done = []
tr("aio_opt_go", lambda: h.aio_opt_go(lambda e: done.append(e.value) or 0))
while not done:
    h.poll(-1)
print("completion", done, state(h))
step(h, "size", h.get_size)
"""


def test_opt_mode_plain_newstyle_nbdkit(nbdkit_server) -> None:
    """Option mode stays in negotiation with a server that is not fixed newstyle: opt_list,
    opt_info and opt_list_meta_context fail with ENOTSUP, opt_go sends NBD_OPT_EXPORT_NAME,
    opt_abort just drops the connection."""
    differential(PLAIN_NEWSTYLE,
                 fresh=lambda: nbdkit_server("--mask-handshake=0", "memory", "1M"))


def test_opt_mode_plain_newstyle_pynbd(pynbd_server) -> None:
    differential(PLAIN_NEWSTYLE,
                 fresh=lambda: pynbd_server("--mask-handshake=0", "pattern", "1M"))


# ------------------------------------------------------------------------------ pynbd info

@pytest.mark.parametrize("args", [
    ["http://localhost/"], ["nbd://[::1/"], ["nbd://a b/"], ["NBD://localhost/"], ["localhost"],
    ["nbd+vsock://2"], ["--", "[", "/nonexistent/prog", "]"],
    ["--", "[", "sh", "-c", "sleep 0.1", "]"],
])
def test_pynbd_info_failures_read_as_nbdinfos(args) -> None:
    """pynbd info prints what pynbd.libnbd raises, so its failures are nbdinfo's lines."""
    real = run_peer("nbdinfo", *args, check=False)
    ours = run_pynbd("info", *args, check=False)
    assert (ours.returncode, ours.stdout) == (real.returncode, real.stdout) == (1, b"")
    # nbdinfo names itself by its argv[0], the full path here.
    prog = require("nbdinfo").encode() + b": "
    real_err = libnbd_sa_race(real.stderr.decode()).encode()  # libnbd's rare races
    assert ours.stderr.replace(b"pynbd info: ", b"") == real_err.replace(prog, b"")
    assert ours.stderr.count(b"pynbd info: ") == real.stderr.count(prog) == 1
