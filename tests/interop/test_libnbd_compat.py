"""Differential tests: the same libnbd-API program under Debian's python3-libnbd and pynbd.libnbd.

Each program is a string of Python that does ``import nbd`` and prints what it sees. It runs
twice against the same kind of server (a fresh server for each run, so neither run sees what
the other wrote):

(a) under /usr/bin/python3 with Debian's real bindings (``helpers.run_libnbd``);
(b) under this interpreter with ``pynbd.libnbd`` installed as the ``nbd`` module.

The two outputs must be identical: sizes, flags, data, block status entries, cookies,
completion results (printed order-insensitively where the order is the server's), error
strings and errnos with strict mode on and off. Only stdout is compared (tracebacks printed by
callbacks that raise name different files).
"""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server, require, run_libnbd, run_pynbd_libnbd

#: Shared by every program: ``tr(label, fn)`` prints the result or the error of ``fn()``.
HEADER = r'''
import nbd, sys, errno
def tr(label, f):
    try:
        r = f()
    except nbd.Error as e:
        print(label, "ERR", repr(e.string), e.errnum, e.errno, str(e) == e.string + (" (%s)" % e.errno if e.errno else ""))
    except Exception as e:
        print(label, "EXC", type(e).__name__, e)
    else:
        print(label, "OK", repr(r))
'''


def run_ours(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_pynbd_libnbd(script, *args, timeout=timeout)


def differential(script: str, *args: str,
                 fresh: Callable[[], Server] | None = None) -> str:
    """Run ``script`` under both bindings and assert identical stdout; return it.

    With ``fresh``, each run gets its own server from ``fresh()`` and ``sys.argv[1]`` is that
    server's URI, ``sys.argv[2]`` its socket path (then ``args``).
    """
    script = HEADER + script
    if fresh is not None:
        s1, s2 = fresh(), fresh()
        a1, a2 = (s1.uri, s1.sock or "", *args), (s2.uri, s2.sock or "", *args)
    else:
        a1 = a2 = args
    real = run_libnbd(script, *a1).stdout
    ours = run_ours(script, *a2).stdout
    if fresh is not None:  # the socket paths differ between the two servers
        real = real.replace(a1[1], "SOCK") if a1[1] else real
        ours = ours.replace(a2[1], "SOCK") if a2[1] else ours
    if real != ours:
        diff = "\n".join(difflib.unified_diff(real.splitlines(), ours.splitlines(),
                                              "libnbd", "pynbd.libnbd", lineterm=""))
        pytest.fail(f"outputs differ\n--- script:\n{script}\n--- diff:\n{diff}", pytrace=False)
    assert real.strip(), "the program printed nothing"
    return real


@pytest.fixture
def memory(request, nbdkit_server, pynbd_server) -> Callable[[], Server]:
    """A factory of fresh ``memory 1M`` servers of the parametrized kind."""
    factory = nbdkit_server if request.param == "nbdkit" else pynbd_server
    return lambda: factory("memory", "1M")


KINDS = pytest.mark.parametrize("memory", ["nbdkit", "pynbd"], indirect=True)


# ------------------------------------------------------------------------------ no server


def test_buffer_and_error() -> None:
    differential(r'''
b = nbd.Buffer(10)
print(len(b), b.size(), hasattr(b, "_init"), b.is_zero(), b.to_bytearray())
print(hasattr(b, "_init"), type(b.to_buffer()).__name__, hasattr(b, "_init"), b._init)
ba = bytearray(b"hello")
s = nbd.Buffer.from_buffer(ba); ba[0] = 106
print(s.to_bytearray(), s._o is ba, s.to_buffer() is ba, s.is_zero())
for arg in (b"\0\0x\0\0", 3, [0, 1], bytearray(4)):
    c = nbd.Buffer.from_bytearray(arg)
    print(c.to_bytearray(), c.is_zero(), c.size())
c = nbd.Buffer.from_bytearray(b"\0\0x\0\0")
for off, size in ((0, 2), (2, 1), (3, -1), (2, 0), (5, 0), (0, 5), (5, -1)):
    tr("is_zero%r" % ((off, size),), lambda: c.is_zero(off, size))
for off, size in ((6, -1), (0, 6), (-1, -1), (2, -2)):
    tr("is_zero%r" % ((off, size),), lambda: c.is_zero(off, size))
tr("from_buffer(str)", lambda: nbd.Buffer.from_buffer("x"))
e = nbd.Error("nbd_pread: request out of bounds: Invalid argument", 22)
print(e.args, e.string, e.errnum, e.errno, str(e), isinstance(e, Exception))
e = nbd.Error("no errno", 0)
print(e.args, e.errnum, e.errno, str(e))
print(issubclass(nbd.Error, Exception))
''')


#: A new handle: its getters, every call that needs a connection, the setters' checks,
#: then a connect that fails and what the dead handle answers.
BEFORE_CONNECTING = r'''
h = nbd.NBD()
print(h.get_handle_name(), nbd.NBD().get_handle_name(), h.connection_state())
print(nbd.package_name, nbd.__version__, h.get_package_name(), h.get_version())
print(h.get_export_name() == "", h.get_full_info(), h.get_tls(), h.get_tls_verify_peer(),
      h.get_request_structured_replies(), h.get_request_block_size(), h.get_pread_initialize(),
      h.get_handshake_flags(), h.get_strict_mode(), h.get_opt_mode(), h.get_debug(),
      h.get_private_data(), h.get_nr_meta_contexts(), h.supports_uri())
print(h.aio_is_created(), h.aio_is_connecting(), h.aio_is_negotiating(), h.aio_is_ready(),
      h.aio_is_processing(), h.aio_is_dead(), h.aio_is_closed(), h.aio_get_direction())
for name in ("get_size", "get_protocol", "is_read_only", "can_flush", "can_fua", "can_trim",
             "can_zero", "can_fast_zero", "can_df", "can_multi_conn", "can_cache",
             "is_rotational", "get_canonical_export_name", "get_export_description",
             "get_tls_negotiated", "get_structured_replies_negotiated", "aio_in_flight",
             "aio_peek_command_completed", "shutdown", "aio_disconnect", "flush", "opt_go",
             "opt_abort", "opt_info"):
    tr(name, getattr(h, name))
tr("can_meta_context", lambda: h.can_meta_context("base:allocation"))
tr("get_block_size", lambda: h.get_block_size(nbd.SIZE_MINIMUM))
tr("pread", lambda: h.pread(10, 0))
tr("pwrite", lambda: h.pwrite(b"x", 0))
tr("block_status", lambda: h.block_status(1, 0, lambda *a: 0))
tr("aio_pread", lambda: h.aio_pread(nbd.Buffer(1), 0))
tr("opt_list", lambda: h.opt_list(lambda n, d: 0))
tr("poll", lambda: h.poll(0))
tr("aio_command_completed", lambda: h.aio_command_completed(1))
tr("set_handshake_flags(4)", lambda: h.set_handshake_flags(4))
tr("set_tls(3)", lambda: h.set_tls(3))
tr("set_strict_mode(0x40)", lambda: h.set_strict_mode(0x40))
tr("set_uri_allow_transports(8)", lambda: h.set_uri_allow_transports(8))
tr("set_uri_allow_tls(5)", lambda: h.set_uri_allow_tls(5))
tr("get_meta_context(0)", lambda: h.get_meta_context(0))
tr("connect_command(tuple)", lambda: h.connect_command(("nbdkit", "-s")))
tr("set_private_data", lambda: h.set_private_data(5))
tr("set_private_data", lambda: h.set_private_data(7))
tr("get_private_data", lambda: h.get_private_data())
tr("kill_subprocess", lambda: h.kill_subprocess(0))
tr("get_uri", lambda: h.get_uri())
h.add_meta_context("a"); h.add_meta_context("base:allocation")
print(h.get_nr_meta_contexts(), h.get_meta_context(0), h.get_meta_context(1))
tr("get_meta_context(2)", lambda: h.get_meta_context(2))
h.clear_meta_contexts(); print(h.get_nr_meta_contexts())
h.set_handshake_flags(1); h.set_strict_mode(nbd.STRICT_BOUNDS); h.set_full_info(True)
h.set_opt_mode(True); h.set_request_structured_replies(False); h.set_export_name("x")
h.set_handle_name("mine")
print(h.get_handshake_flags(), h.get_strict_mode(), h.get_full_info(), h.get_opt_mode(),
      h.get_request_structured_replies(), h.get_export_name(), h.get_handle_name())
tr("connect_unix(missing)", lambda: h.connect_unix("/nonexistent/sock"))
print(h.connection_state(), h.aio_is_dead())
tr("connect_unix(again)", lambda: h.connect_unix("/nonexistent/sock"))
tr("get_size(dead)", lambda: h.get_size())
tr("aio_in_flight(dead)", lambda: h.aio_in_flight())
tr("poll(dead)", lambda: h.poll(0))
g = nbd.NBD()
try:  # the parser's wording is pynbd.protocol.uri's; compare the errno and the prefix
    g.connect_uri("nbd:unix:/tmp/sock")
except nbd.Error as e:
    print("connect_uri(no scheme)", e.errno, e.string.startswith("nbd_connect_uri: URI must"))
g.set_uri_allow_transports(nbd.ALLOW_TRANSPORT_TCP)
tr("connect_uri(not allowed)", lambda: g.connect_uri("nbd+unix:///?socket=/tmp/sock"))
print(g.aio_is_created())
'''


def test_states_before_connecting() -> None:
    differential(BEFORE_CONNECTING)


# ------------------------------------------------------------------------------ synchronous calls

SYNC = r'''
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
print(h.connection_state())
print("size", h.get_size(), "protocol", h.get_protocol(),
      "sr", h.get_structured_replies_negotiated(), "tls", h.get_tls_negotiated(),
      "hflags", h.get_handshake_flags(), "export", repr(h.get_export_name()))
print("flags", [getattr(h, f)() for f in ("is_read_only", "can_flush", "can_fua",
      "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_multi_conn",
      "can_cache")])
print("blocks", [h.get_block_size(t) for t in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
      nbd.SIZE_MAXIMUM)])
print("meta", h.can_meta_context("base:allocation"), h.can_meta_context("base:nothing"))
print("uri", h.get_uri())
tr("canonical", lambda: h.get_canonical_export_name())
tr("description", lambda: h.get_export_description())
tr("set_export_name", lambda: h.set_export_name("x"))
tr("add_meta_context", lambda: h.add_meta_context("x"))
tr("set_opt_mode", lambda: h.set_opt_mode(True))
tr("trim all", lambda: h.trim(h.get_size(), 0))
tr("pwrite", lambda: h.pwrite(b"hello, world" * 100, 4096))
tr("pwrite fua", lambda: h.pwrite(bytearray(b"abc"), 100, nbd.CMD_FLAG_FUA))
tr("pwrite memoryview", lambda: h.pwrite(memoryview(b"xyz")[1:], 200))
tr("pwrite str", lambda: h.pwrite("str", 0))
tr("pread", lambda: h.pread(12, 4096))
tr("pread type", lambda: type(h.pread(1, 0)).__name__)
tr("pread mid", lambda: h.pread(8, 98))
tr("pread -1 offset", lambda: h.pread(10, -1))
tr("pread str", lambda: h.pread("10", 0))
tr("flush", lambda: h.flush())
tr("cache", lambda: h.cache(4096, 0))
tr("zero", lambda: h.zero(100, 4100))
tr("zero no-hole", lambda: h.zero(100, 4300, nbd.CMD_FLAG_NO_HOLE))
tr("pread after zero", lambda: h.pread(12, 4096))
tr("trim", lambda: h.trim(512, 8192))
tr("pread after trim", lambda: bytes(h.pread(16, 4096 + 1200 - 8)))
data = h.pread(65536, 0)
print("sum", sum(data), data.count(0))
tr("pread 64M", lambda: len(h.pread(64 * 1024 * 1024, 0)))
print(h.connection_state(), h.aio_in_flight())
tr("shutdown", lambda: h.shutdown())
print(h.connection_state(), h.aio_is_closed(), h.aio_in_flight())
tr("pread closed", lambda: h.pread(1, 0))
tr("size closed", lambda: h.get_size())
tr("shutdown again", lambda: h.shutdown())
tr("poll closed", lambda: h.poll(0))
'''


@KINDS
def test_sync_calls(memory) -> None:
    differential(SYNC, fresh=memory)


def test_sync_calls_read_only(nbdkit_server) -> None:
    differential(SYNC.replace("h.trim(h.get_size(), 0)", "h.pread(1, 0)"),
                 fresh=lambda: nbdkit_server("-r", "pattern", "1M"))


# ------------------------------------------------------------------------------ strict mode

STRICT = r'''
for strict in (nbd.STRICT_MASK, 0, nbd.STRICT_FLAGS, nbd.STRICT_COMMANDS, nbd.STRICT_BOUNDS,
               nbd.STRICT_ZERO_SIZE, nbd.STRICT_ALIGN):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    h.set_strict_mode(strict)
    print("== strict", h.get_strict_mode())
    size = h.get_size()
    tr("pread oob", lambda: h.pread(10, size))
    tr("pread zero", lambda: h.pread(0, 0))
    tr("pread fua", lambda: h.pread(10, 0, nbd.CMD_FLAG_FUA))
    tr("pread 0x100", lambda: h.pread(10, 0, 0x100))
    tr("pread 0x10000", lambda: h.pread(10, 0, 0x10000))
    tr("pread tail", lambda: h.pread(10, size - 5))
    tr("pread too big", lambda: h.pread(64 * 1024 * 1024 + 1, 0))
    tr("pwrite tail", lambda: h.pwrite(b"x" * 10, size - 5))
    tr("pwrite fua", lambda: h.pwrite(b"x" * 10, 0, nbd.CMD_FLAG_FUA))
    tr("pwrite df", lambda: h.pwrite(b"x" * 10, 0, nbd.CMD_FLAG_DF))
    tr("pwrite empty", lambda: h.pwrite(b"", 0))
    tr("trim tail", lambda: h.trim(10, size - 5))
    tr("trim", lambda: h.trim(10, 0))
    tr("trim zero", lambda: h.trim(0, 0))
    tr("zero tail", lambda: h.zero(10, size - 5))
    tr("zero fast", lambda: h.zero(10, 0, nbd.CMD_FLAG_FAST_ZERO))
    tr("zero req_one", lambda: h.zero(10, 0, nbd.CMD_FLAG_REQ_ONE))
    tr("cache tail", lambda: h.cache(10, size - 5))
    tr("cache zero", lambda: h.cache(0, 0))
    tr("flush", lambda: h.flush())
    tr("flush fua", lambda: h.flush(nbd.CMD_FLAG_FUA))
    tr("block_status tail", lambda: h.block_status(10, size - 5, lambda *a: 0))
    tr("block_status fua", lambda: h.block_status(10, 0, lambda *a: 0, nbd.CMD_FLAG_FUA))
    tr("block_status zero", lambda: h.block_status(0, 0, lambda *a: 0))
    tr("pread_structured df", lambda: len(h.pread_structured(10, 0, lambda *a: 0, nbd.CMD_FLAG_DF)))
    tr("pread_structured req_one", lambda: h.pread_structured(10, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE))
    tr("aio_pread oob", lambda: h.aio_pread(nbd.Buffer(10), size))
    tr("aio_pwrite tail", lambda: h.aio_pwrite(nbd.Buffer(10), size - 5))
    tr("aio_pread empty", lambda: h.aio_pread(nbd.Buffer(0), 0))
    tr("shutdown flags", lambda: h.shutdown(1))
    while h.aio_in_flight():
        h.poll(-1)
    print("cookies", h.aio_flush() if h.can_flush() else None, h.connection_state())
    h.shutdown()
'''


@pytest.mark.parametrize("args", [["memory", "1M"], ["-r", "pattern", "1M"]],
                         ids=["memory", "readonly-pattern"])
def test_strict_mode_errors_nbdkit(nbdkit_server, args) -> None:
    differential(STRICT, fresh=lambda: nbdkit_server(*args))


def test_strict_mode_errors_pynbd(pynbd_server) -> None:
    differential(STRICT, fresh=lambda: pynbd_server("memory", "1M"))


# ------------------------------------------------------------------------------ aio with poll

AIO = r'''
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("first", h.pread(1, 0))
results = []
def completion(tag, ret=0):
    def f(err):
        results.append((tag, type(err).__name__, err.value))
        return ret
    return f
cookies = []
for i in range(16):
    buf = nbd.Buffer.from_bytearray(bytes([i + 1]) * 4096)
    cookies.append(h.aio_pwrite(buf, i * 4096, completion(("w", i))))
print("write cookies", cookies)
print("in flight", h.aio_in_flight() > 0, h.aio_peek_command_completed() >= 0)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("results", sorted(results))
retired = []
while True:
    try:
        c = h.aio_peek_command_completed()
    except nbd.Error as e:
        print("peek", e.string, e.errno)
        break
    retired.append(c)
    h.aio_command_completed(c)
print("peeked all", sorted(retired) == cookies)
print("completed twice", [h.aio_command_completed(c) for c in cookies[:3]], h.aio_command_completed(999))
results.clear()
bufs = [nbd.Buffer(4096) for i in range(16)]
cookies = [h.aio_pread(bufs[i], i * 4096, completion(("r", i), 1 if i % 2 else 0)) for i in range(16)]
print("read cookies", cookies, [hasattr(b, "_init") for b in bufs][:2])
while h.aio_in_flight() > 0:
    h.poll(-1)
print("results", sorted(results))
print("auto-retired", [h.aio_command_completed(c) for c in cookies])
print("data", [b.to_bytearray() == bytes([i + 1]) * 4096 for i, b in enumerate(bufs)])
print("is_zero", [b.is_zero() for b in bufs[:2]], nbd.Buffer(4096).is_zero())
tr("peek none", lambda: h.aio_peek_command_completed())
ba = bytearray(4096)
c = h.aio_pread(ba, 4096)
tr("resize in flight", lambda: ba.extend(b"x"))
while h.aio_in_flight():
    h.poll(-1)
tr("resize done", lambda: ba.extend(b"x"))
tr("retire", lambda: h.aio_command_completed(c))
tr("resize retired", lambda: ba.extend(b"x"))
print("ba", ba[:3], len(ba))
tr("aio_pread bytes", lambda: h.aio_pread(b"x" * 10, 0))
tr("aio_pread str", lambda: h.aio_pread("x", 0))
mv = memoryview(bytearray(8))
c = h.aio_pread(mv, 4096)
while not h.aio_command_completed(c):
    h.poll(-1)
print("memoryview", bytes(mv))
c1 = h.aio_flush(completion("flush"))
c2 = h.aio_zero(4096, 0, completion("zero"))
c3 = h.aio_trim(4096, 8192, completion("trim"))
c4 = h.aio_cache(4096, 0, completion("cache"))
print("cookies", c1, c2, c3, c4)
results.clear()
# (nbdkit may answer commands that arrive with NBD_CMD_DISC with ESHUTDOWN: wait first)
while h.aio_in_flight():
    h.poll(-1)
tr("shutdown", lambda: h.shutdown())
print("after shutdown", sorted(results), h.aio_in_flight(), h.connection_state())
print("retire", [h.aio_command_completed(c) for c in (c1, c2, c3, c4)])
tr("peek closed", lambda: h.aio_peek_command_completed())
'''


@KINDS
def test_aio_with_buffers_and_poll(memory) -> None:
    differential(AIO, fresh=memory)


def test_aio_server_errors(nbdkit_server) -> None:
    srv = lambda: nbdkit_server("--filter=error", "memory", "1M", "error-pread-rate=1",
                                "error-pread=EIO", "error-pwrite-rate=1",
                                "error-pwrite=ENOSPC", "error-trim-rate=1", "error-trim=EPERM")
    differential(r'''
h = nbd.NBD()
h.connect_uri(sys.argv[1])
tr("pread", lambda: h.pread(10, 0))
tr("pwrite", lambda: h.pwrite(b"x", 0))
tr("trim", lambda: h.trim(512, 0))
tr("flush", lambda: h.flush())
seen = []
def comp(tag, value=None, ret=0):
    def f(err):
        seen.append((tag, err.value))
        if value is not None:
            err.value = value
        return ret
    return f
c1 = h.aio_pread(nbd.Buffer(10), 0, comp("read"))
c2 = h.aio_pwrite(b"hello", 0, comp("write"))
c3 = h.aio_flush(comp("flush"))
c4 = h.aio_pread(bytearray(10), 0, comp("read-ignored", 0, 0))
c5 = h.aio_flush(comp("flush-fails", errno.ENOMEM, -1))
c6 = h.aio_pread(nbd.Buffer(10), 0, comp("read-retired", None, 1))
c7 = h.aio_pread_structured(bytearray(10), 0, lambda *a: 0, comp("read-structured"))
print([c1, c2, c3, c4, c5, c6, c7])
while h.aio_in_flight():
    h.poll(-1)
print(sorted(seen))
for c in (c1, c2, c3, c4, c5, c6, c7, c1):
    tr("completed %d" % c, lambda: h.aio_command_completed(c))
tr("peek", lambda: h.aio_peek_command_completed())
h.shutdown()
''', fresh=srv)


# ------------------------------------------------------------------------------ callbacks

CALLBACKS = r'''
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
h.trim(h.get_size(), 0)
h.pwrite(b"a" * 4096, 65536)
h.pwrite(b"b" * 4096, 3 * 65536)
def chunk(sub, off, st, err):
    print("chunk", type(sub).__name__, sub.readonly, len(sub), off, st, type(err).__name__,
          err.value, sum(sub), bytes(sub[:2]))
    return 0
for count, off in ((100, 65536), (4096 * 3, 65536 - 4096), (4 * 65536, 0)):
    b = h.pread_structured(count, off, chunk)
    print("buf", type(b).__name__, len(b), sum(b))
tr("chunk -1", lambda: h.pread_structured(100, 65536, lambda *a: -1))
def chunk_err(sub, off, st, err):
    err.value = errno.EFAULT
    return -1
tr("chunk error", lambda: h.pread_structured(100, 65536, chunk_err))
def chunk_raise(sub, off, st, err):
    raise RuntimeError("chunk raised")
tr("chunk raise", lambda: h.pread_structured(100, 65536, chunk_raise))
tr("chunk returns str", lambda: len(h.pread_structured(100, 65536, lambda *a: "x")))
saved = []
b = h.pread_structured(16, 65536, lambda sub, *a: saved.append(sub) or 0)
tr("resize pinned", lambda: b.extend(b"x"))
print("same object", saved[0].obj is b, bytes(saved[0][:3]))
b[0] = 65
print("shows through", bytes(saved[0][:3]))
del saved[:]
tr("resize unpinned", lambda: b.extend(b"x"))
def extent(ctx, off, entries, err):
    print("extent", ctx, off, type(entries).__name__, entries, type(err).__name__, err.value)
    return 0
for count, off, flags in ((h.get_size(), 0, 0), (1000, 0, 0), (65536 * 2, 65536, 0),
                          (h.get_size(), 0, nbd.CMD_FLAG_REQ_ONE), (4096, 3 * 65536 + 100, 0)):
    tr("block_status", lambda: h.block_status(count, off, extent, flags))
tr("extent -1", lambda: h.block_status(4096, 0, lambda *a: -1))
def extent_err(ctx, off, entries, err):
    err.value = errno.ENOMEM
    return -1
tr("extent error", lambda: h.block_status(4096, 0, extent_err))
tr("extent raise", lambda: h.block_status(4096, 0, lambda *a: 1 / 0))
order, order2 = [], []  # per command: the callback runs before the completion
c = h.aio_block_status(h.get_size(), 0, lambda *a: order.append("extent") or 0,
                       lambda err: order.append(("completion", err.value)) or 0)
c2 = h.aio_pread_structured(bytearray(100), 65536, lambda *a: order2.append("chunk") or 0,
                            lambda err: order2.append(("completion", err.value)) or 0)
print("cookies", c, c2)
while not h.aio_command_completed(c):
    h.poll(-1)
while not h.aio_command_completed(c2):
    h.poll(-1)
print("order", order, order2)
h.shutdown()
'''


@KINDS
def test_chunk_and_extent_callbacks(memory) -> None:
    differential(CALLBACKS, fresh=memory)


# ------------------------------------------------------------------------------ option mode

OPT = r'''
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
print(h.connection_state(), h.aio_is_negotiating(), h.aio_get_direction())
for name in ("get_size", "is_read_only", "get_protocol", "get_structured_replies_negotiated",
             "get_handshake_flags", "aio_in_flight", "get_canonical_export_name"):
    tr(name, getattr(h, name))
tr("can_meta_context", lambda: h.can_meta_context("base:allocation"))
tr("pread", lambda: h.pread(1, 0))
tr("set_opt_mode", lambda: h.set_opt_mode(False))
tr("poll", lambda: h.poll(0))
exports = []
tr("opt_list", lambda: h.opt_list(lambda name, desc: exports.append((name, desc))))
print("exports", sorted(exports))
ctxs = []
tr("opt_list_meta_context", lambda: h.opt_list_meta_context(lambda name: ctxs.append(name)))
print("contexts", ctxs)
for name in ("disk1", "nope", "disk2"):
    tr("set_export_name", lambda: h.set_export_name(name))
    tr("opt_info " + name, lambda: h.opt_info())
    tr("size", lambda: h.get_size())
    tr("canonical", lambda: h.get_canonical_export_name())
    tr("read only", lambda: h.is_read_only())
    tr("meta", lambda: h.can_meta_context("base:allocation"))
    print(h.connection_state())
h.clear_meta_contexts()
h.add_meta_context("base:")
tr("opt_list_meta_context base:", lambda: h.opt_list_meta_context(lambda n: print("ctx", n)))
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.set_export_name("nope")
tr("opt_go nope", lambda: h.opt_go())
print(h.connection_state())
h.set_export_name("disk1")
tr("opt_go", lambda: h.opt_go())
print(h.connection_state(), h.get_size(), h.can_meta_context("base:allocation"),
      h.get_export_name(), h.pread(4, 0))
tr("opt_go again", lambda: h.opt_go())
tr("opt_abort ready", lambda: h.opt_abort())
tr("uri", lambda: h.get_uri())
h.shutdown()

g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(sys.argv[1])
seen = []
g.set_export_name("disk2")
g.aio_opt_info(lambda err: seen.append(("info", err.value)) or 0)
while g.aio_is_connecting():
    g.poll(-1)
print(seen, g.connection_state(), g.get_size())
g.aio_opt_go(lambda err: seen.append(("go", err.value)) or 0)
while g.aio_is_connecting():
    g.poll(-1)
print(seen, g.connection_state(), g.get_size())
g.shutdown()

a = nbd.NBD()
a.set_opt_mode(True)
a.connect_uri(sys.argv[1])
tr("opt_abort", lambda: a.opt_abort())
print(a.connection_state(), a.aio_is_closed())
tr("size", lambda: a.get_size())
tr("opt_abort again", lambda: a.opt_abort())
tr("in flight", lambda: a.aio_in_flight())

n = nbd.NBD()
n.set_export_name("nope")
tr("connect bad export", lambda: n.connect_uri(sys.argv[1].replace("/?", "/nope?")))
print(n.connection_state())

s = nbd.NBD()
s.set_opt_mode(True)
s.set_request_structured_replies(False)
s.connect_uri(sys.argv[1])
tr("sr", lambda: s.get_structured_replies_negotiated())
tr("list meta without sr", lambda: s.opt_list_meta_context(lambda n: 0))
s.set_export_name("disk1")
tr("go", lambda: s.opt_go())
tr("meta", lambda: s.can_meta_context("base:allocation"))
tr("df", lambda: s.can_df())
tr("block status", lambda: s.block_status(512, 0, lambda *a: 0))
tr("pread", lambda: s.pread(4, 0))
s.shutdown()
'''


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exports"
    d.mkdir()
    (d / "disk1").write_bytes(b"DISK" + bytes(65532))
    with open(d / "disk2", "wb") as f:
        f.truncate(1 << 20)
    return d


@pytest.mark.parametrize("kind", ["nbdkit", "pynbd"])
def test_opt_mode(kind, nbdkit_server, pynbd_server, export_dir) -> None:
    factory = nbdkit_server if kind == "nbdkit" else pynbd_server
    differential(OPT, fresh=lambda: factory("file", f"dir={export_dir}"))


# ------------------------------------------------------------------------------ connecting

def test_connect_kinds(nbdkit_server) -> None:
    require("nbdkit")
    tcp = nbdkit_server("memory", "1M", tcp=True)
    unix = nbdkit_server("memory", "2M")
    differential(r'''
port, sock = sys.argv[1], sys.argv[2]
def show(label, connect, uri=True):
    h = nbd.NBD()
    tr(label, lambda: connect(h))
    print(" ", h.connection_state().split(":")[0])
    if h.aio_is_ready():
        print(" ", h.get_size(), h.get_protocol(), h.pread(2, 0))
        if uri:
            tr("  uri", lambda: h.get_uri())
        h.shutdown()
show("tcp", lambda h: h.connect_tcp("127.0.0.1", port))
show("uri tcp", lambda h: h.connect_uri("nbd://127.0.0.1:%s/" % port))
show("unix", lambda h: h.connect_unix(sock))
show("uri unix", lambda h: h.connect_uri("nbd+unix:///?socket=%s" % sock))
show("uri unix export", lambda h: h.connect_uri("nbd+unix:///some%%20name?socket=%s" % sock))
show("command", lambda h: h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", "3M"]))
show("socket activation", lambda h: h.connect_systemd_socket_activation(["nbdkit", "memory", "4M"]), uri=False)
import socket
s = socket.socket(socket.AF_UNIX); s.connect(sock)
show("socket", lambda h: h.connect_socket(s.detach()))
show("refused", lambda h: h.connect_tcp("127.0.0.1", "1"))
show("refused uri", lambda h: h.connect_uri("nbd://127.0.0.1:1/"))
show("missing unix", lambda h: h.connect_unix(sock + ".missing"))
h = nbd.NBD()
h.aio_connect_unix(sock)
while h.aio_is_connecting():
    h.poll(-1)
print("aio connect", h.connection_state(), h.get_size())
h.shutdown()
h = nbd.NBD()
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "memory", "3M"])
tr("kill_subprocess", lambda: h.kill_subprocess(0))
''', str(tcp.port), unix.sock)  # type: ignore[arg-type]


def test_threads_and_many_handles(nbdkit_server) -> None:
    differential(r'''
import threading
handles = []
for i in range(4):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    handles.append(h)
print([h.get_handle_name() for h in handles])
def work(i, h):
    for j in range(20):
        off = (i * 20 + j) * 4096
        h.pwrite(bytes([i * 20 + j]) * 4096, off)
ts = [threading.Thread(target=work, args=(i, handles[i % 2])) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
data = handles[3].pread(80 * 4096, 0)
print(all(data[k * 4096:(k + 1) * 4096] == bytes([k]) * 4096 for k in range(80)))
for h in handles:
    h.shutdown()
''', fresh=lambda: nbdkit_server("memory", "1M"))


# ------------------------------------------------------------------------------ protocol variants

VARIANT = r"""
for opt in OPT_MODES:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_opt_mode(opt)
    tr("connect", lambda: h.connect_uri(sys.argv[1]))
    print(" ", h.connection_state())
    for name in ("get_protocol", "get_handshake_flags", "get_structured_replies_negotiated",
                 "get_size", "can_df", "is_read_only", "aio_in_flight"):
        tr("  " + name, getattr(h, name))
    tr("  meta", lambda: h.can_meta_context("base:allocation"))
    tr("  opt_list", lambda: h.opt_list(lambda *a: 0))
    tr("  opt_info", lambda: h.opt_info())
    tr("  opt_go", lambda: h.opt_go())
    tr("  pread", lambda: h.pread(4, 0))
    tr("  pread_structured df", lambda: h.pread_structured(4, 0, lambda *a: 0, nbd.CMD_FLAG_DF))
    tr("  block_status", lambda: h.block_status(4, 0, lambda *a: 0))
    h.set_strict_mode(0)
    tr("  block_status unchecked", lambda: h.block_status(4, 0, lambda *a: 0))
    print(" ", h.connection_state())
"""


@pytest.mark.parametrize("option, opt_modes", [
    ("--oldstyle", "(False, True)"),
    ("--no-sr", "(False, True)"),
    # pynbd.libnbd differs here in option mode: the engine sends NBD_OPT_EXPORT_NAME at
    # once to a server that is not fixed-newstyle, where libnbd waits for opt_go().
    ("--mask-handshake=0", "(False,)"),
])
def test_protocol_variants(nbdkit_server, option, opt_modes) -> None:
    differential(VARIANT.replace("OPT_MODES", opt_modes),
                 fresh=lambda: nbdkit_server(option, "memory", "1M"))


def test_server_goes_away(nbdkit_server) -> None:
    """libnbd notices a dead server only when it next talks to it; so does pynbd.libnbd."""
    require("nbdkit")
    differential(r"""
import subprocess, time, os
sock = sys.argv[1] + ".%d" % os.getpid()
p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", "1M"])
while not os.path.exists(sock):
    time.sleep(0.01)
h = nbd.NBD()
for i in range(500):
    try:
        h.connect_unix(sock)
        break
    except nbd.Error:
        h = nbd.NBD()
        time.sleep(0.01)
c = h.aio_pread(nbd.Buffer(10), 0, lambda e: print("completion", e.value) or 0)
while h.aio_in_flight():
    h.poll(-1)
p.kill()
p.wait()
time.sleep(0.2)
print(h.connection_state())
tr("pread", lambda: h.pread(10, 0))
print(h.connection_state())
tr("pread again", lambda: h.pread(10, 0))
tr("in flight", lambda: h.aio_in_flight())
tr("completed", lambda: h.aio_command_completed(c))
tr("poll", lambda: h.poll(0))
tr("shutdown", lambda: h.shutdown())
tr("size", lambda: h.get_size())
""", str(nbdkit_server.sockdir / "gone"))  # type: ignore[attr-defined]
