"""pynbd.libnbd: libnbd's Python API (``import nbd``) - the parts that need no peer.

Buffer semantics, nbd.Error formatting, constant values, method signatures, handle names,
ClosedHandle, defaults, argument and state errors; and, against an in-process pynbd memory
server, the aio rules (cookies, callbacks in the caller's thread, auto-retirement, pinned
buffers, aio_get_fd) that the differential interop tests can only observe from outside.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import inspect
import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pynbd.libnbd as nbd
from pynbd.plugins.memory import MemoryPlugin
from pynbd.server.backend import Chain
from pynbd.server.server import Server, ServerConfig, bind_unix

# ------------------------------------------------------------------------------ constants

CONSTANTS = {
    "TLS_DISABLE": 0, "TLS_ALLOW": 1, "TLS_REQUIRE": 2,
    "SIZE_MINIMUM": 0, "SIZE_PREFERRED": 1, "SIZE_MAXIMUM": 2, "SIZE_PAYLOAD": 3,
    "CMD_FLAG_FUA": 0x01, "CMD_FLAG_NO_HOLE": 0x02, "CMD_FLAG_DF": 0x04,
    "CMD_FLAG_REQ_ONE": 0x08, "CMD_FLAG_FAST_ZERO": 0x10, "CMD_FLAG_MASK": 0x1f,
    "HANDSHAKE_FLAG_FIXED_NEWSTYLE": 1, "HANDSHAKE_FLAG_NO_ZEROES": 2, "HANDSHAKE_FLAG_MASK": 3,
    "STRICT_COMMANDS": 1, "STRICT_FLAGS": 2, "STRICT_BOUNDS": 4, "STRICT_ZERO_SIZE": 8,
    "STRICT_ALIGN": 0x10, "STRICT_PAYLOAD": 0x20, "STRICT_MASK": 0x1f,
    "ALLOW_TRANSPORT_TCP": 1, "ALLOW_TRANSPORT_UNIX": 2, "ALLOW_TRANSPORT_VSOCK": 4,
    "ALLOW_TRANSPORT_MASK": 7,
    "SHUTDOWN_ABANDON_PENDING": 0x10000, "SHUTDOWN_MASK": 0x10000,
    "AIO_DIRECTION_READ": 1, "AIO_DIRECTION_WRITE": 2, "AIO_DIRECTION_BOTH": 3,
    "READ_DATA": 1, "READ_HOLE": 2, "READ_ERROR": 3,
    "NAMESPACE_BASE": "base:", "CONTEXT_BASE_ALLOCATION": "base:allocation",
    "STATE_HOLE": 1, "STATE_ZERO": 2,
}


def test_constants() -> None:
    for name, value in CONSTANTS.items():
        assert getattr(nbd, name) == value, name
        assert type(getattr(nbd, name)) is type(value), name
    # No public constant that libnbd does not have.
    extra = {k for k in vars(nbd) if k.isupper() and not k.startswith("_")} - set(CONSTANTS) - {"NBD"}
    assert not extra


def test_package_and_version() -> None:
    assert nbd.package_name == "libnbd"
    assert nbd.__version__ == "1.14.2"
    h = nbd.NBD()
    assert h.get_package_name() == "libnbd"
    assert h.get_version() == "1.14.2"
    assert h.supports_uri() is True
    assert h.supports_tls() is True


# ------------------------------------------------------------------------------ signatures

# Every method of libnbd 1.14.2's nbd.NBD, as inspect.signature prints it (without self).
LIBNBD_1_14_2 = """
add_meta_context(name) aio_block_status(count, offset, extent, completion=None, flags=0)
aio_cache(count, offset, completion=None, flags=0) aio_command_completed(cookie)
aio_connect(addr) aio_connect_command(argv) aio_connect_socket(sock)
aio_connect_systemd_socket_activation(argv) aio_connect_tcp(hostname, port)
aio_connect_unix(unixsocket) aio_connect_uri(uri) aio_connect_vsock(cid, port)
aio_disconnect(flags=0) aio_flush(completion=None, flags=0) aio_get_direction() aio_get_fd()
aio_in_flight() aio_is_closed() aio_is_connecting() aio_is_created() aio_is_dead()
aio_is_negotiating() aio_is_processing() aio_is_ready() aio_notify_read() aio_notify_write()
aio_opt_abort() aio_opt_go(completion=None) aio_opt_info(completion=None)
aio_opt_list(list, completion=None) aio_opt_list_meta_context(context, completion=None)
aio_peek_command_completed() aio_pread(buf, offset, completion=None, flags=0)
aio_pread_structured(buf, offset, chunk, completion=None, flags=0)
aio_pwrite(buf, offset, completion=None, flags=0)
aio_trim(count, offset, completion=None, flags=0) aio_zero(count, offset, completion=None, flags=0)
block_status(count, offset, extent, flags=0) cache(count, offset, flags=0) can_cache() can_df()
can_fast_zero() can_flush() can_fua() can_meta_context(metacontext) can_multi_conn() can_trim()
can_zero() clear_debug_callback() clear_meta_contexts() connect_command(argv) connect_socket(sock)
connect_systemd_socket_activation(argv) connect_tcp(hostname, port) connect_unix(unixsocket)
connect_uri(uri) connect_vsock(cid, port) connection_state() flush(flags=0)
get_block_size(size_type) get_canonical_export_name() get_debug() get_export_description()
get_export_name() get_full_info() get_handle_name() get_handshake_flags() get_meta_context(i)
get_nr_meta_contexts() get_opt_mode() get_package_name() get_pread_initialize()
get_private_data() get_protocol() get_request_block_size() get_request_structured_replies()
get_size() get_strict_mode() get_structured_replies_negotiated() get_tls() get_tls_negotiated()
get_tls_username() get_tls_verify_peer() get_uri() get_version() is_read_only() is_rotational()
kill_subprocess(signum) opt_abort() opt_go() opt_info() opt_list(list)
opt_list_meta_context(context) poll(timeout) pread(count, offset, flags=0)
pread_structured(count, offset, chunk, flags=0) pwrite(buf, offset, flags=0) set_debug(debug)
set_debug_callback(debug) set_export_name(export_name) set_full_info(request)
set_handle_name(handle_name) set_handshake_flags(flags) set_opt_mode(enable)
set_pread_initialize(request) set_private_data(private_data) set_request_block_size(request)
set_request_structured_replies(request) set_strict_mode(flags) set_tls(tls)
set_tls_certificates(dir) set_tls_psk_file(filename) set_tls_username(username)
set_tls_verify_peer(verify) set_uri_allow_local_file(allow) set_uri_allow_tls(tls)
set_uri_allow_transports(mask) shutdown(flags=0) supports_tls() supports_uri()
trim(count, offset, flags=0) zero(count, offset, flags=0)
"""
ADDED_IN_1_16 = {"close", "stats_bytes_sent", "stats_bytes_received", "stats_chunks_sent",
                 "stats_chunks_received", "supports_vsock"}
#: Later libnbd's calls (1.22: the TLS host name).
ADDED_LATER = {"get_tls_hostname", "set_tls_hostname"}


def _plain_signature(fn: object) -> str:
    params = list(inspect.signature(fn).parameters.values())[1:]  # type: ignore[arg-type]
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                     for p in params)


def test_every_libnbd_method_with_its_signature() -> None:
    want = {}
    for item in LIBNBD_1_14_2.split(")"):
        item = item.strip()
        if item:
            name, _, args = item.partition("(")
            want[name] = args
    assert len(want) == 122
    # the handle's calls, wherever in the package's parts they are written
    members = {n: f for cls in reversed(nbd.NBD.__mro__) for n, f in vars(cls).items()}
    have = {n: _plain_signature(f) for n, f in members.items()
            if not n.startswith("_") and callable(f)}
    for name, args in want.items():
        assert name in have, f"missing NBD.{name}"
        assert have[name] == args, f"NBD.{name}({have[name]}) != libnbd's ({args})"
    assert set(have) - set(want) == ADDED_IN_1_16 | ADDED_LATER


def test_keyword_arguments_work() -> None:
    h = nbd.NBD()
    h.set_export_name(export_name="x")
    assert h.get_export_name() == "x"
    with pytest.raises(nbd.Error):
        h.pread(count=1, offset=0, flags=0)


# ------------------------------------------------------------------------------ nbd.Error


def test_error_attributes_and_str() -> None:
    e = nbd.Error("nbd_pread: request out of bounds: Invalid argument", errno.EINVAL)
    assert isinstance(e, Exception)
    assert e.args == ("nbd_pread: request out of bounds: Invalid argument", errno.EINVAL)
    assert e.string == e.args[0]
    assert e.errnum == errno.EINVAL
    assert e.errno == "EINVAL"
    assert str(e) == "nbd_pread: request out of bounds: Invalid argument (EINVAL)"
    zero = nbd.Error("nbd_connect_command: recv: server disconnected unexpectedly", 0)
    assert zero.errno is None
    assert str(zero) == "nbd_connect_command: recv: server disconnected unexpectedly"
    odd = nbd.Error("x", 99999)
    assert odd.errno is None and str(odd) == "x"


def test_error_from_a_call() -> None:
    h = nbd.NBD()
    with pytest.raises(nbd.Error) as ei:
        h.get_size()
    e = ei.value
    assert e.errnum == errno.ENOTCONN and e.errno == "ENOTCONN"
    assert e.string == ("nbd_get_size: invalid state: START: the handle must be negotiating, "
                        "or connected with the server, or shut down: Transport endpoint is not "
                        "connected")
    assert str(e) == e.string + " (ENOTCONN)"
    assert e.__cause__ is None and e.__suppress_context__


# ------------------------------------------------------------------------------ nbd.Buffer


def test_buffer_fresh() -> None:
    b = nbd.Buffer(10)
    assert isinstance(b._o, bytearray) and len(b._o) == 10
    assert not hasattr(b, "_init")
    assert len(b) == 10 and b.size() == 10
    assert b.is_zero()
    assert b.to_bytearray() == bytearray(10)
    assert not hasattr(b, "_init")  # a copy does not initialise
    shared = b.to_buffer()
    assert shared is b._o and b._init is True


def test_buffer_from_buffer_shares() -> None:
    ba = bytearray(b"hello")
    b = nbd.Buffer.from_buffer(ba)
    assert b._o is ba and b._init is True
    ba[0] = ord("j")
    assert b.to_bytearray() == bytearray(b"jello")
    assert b.to_buffer() is ba
    with pytest.raises(TypeError):
        nbd.Buffer.from_buffer("not a buffer")


def test_buffer_from_bytearray_copies() -> None:
    ba = bytearray(b"abc")
    b = nbd.Buffer.from_bytearray(ba)
    ba[0] = 0
    assert b.to_bytearray() == bytearray(b"abc")
    assert nbd.Buffer.from_bytearray(4).to_bytearray() == bytearray(4)
    assert nbd.Buffer.from_bytearray([1, 2]).to_bytearray() == bytearray(b"\x01\x02")
    assert nbd.Buffer.from_bytearray(b"xy").to_buffer() == bytearray(b"xy")


def test_buffer_is_zero_ranges() -> None:
    b = nbd.Buffer.from_bytearray(b"\0\0x\0" + bytes(100))
    assert not b.is_zero()
    assert b.is_zero(0, 2)
    assert not b.is_zero(2, 1)
    assert b.is_zero(3)
    assert b.is_zero(3, -1)
    assert b.is_zero(2, 0)          # size 0 is always zero
    assert b.is_zero(104, 0)
    assert b.is_zero(4, 100)
    with pytest.raises(IndexError):
        b.is_zero(105)
    with pytest.raises(IndexError):
        b.is_zero(0, 105)
    with pytest.raises(IndexError):
        b.is_zero(-1)
    big = nbd.Buffer.from_bytearray(bytes(1 << 20))
    assert big.is_zero()
    big.to_buffer()[-1] = 1
    assert not big.is_zero() and big.is_zero(0, (1 << 20) - 1)


def test_buffer_uninitialised_reads_as_zero() -> None:
    b = nbd.Buffer(8)
    b._o[3] = 7  # libnbd's storage is uninitialised: contents before first use don't count
    assert b.is_zero()
    assert b.to_bytearray() == bytearray(8)
    with pytest.raises(IndexError):
        b.is_zero(9)


# ------------------------------------------------------------------------------ handles


def test_handle_names_count_up() -> None:
    a, b = nbd.NBD(), nbd.NBD()
    na, nb = a.get_handle_name(), b.get_handle_name()
    assert na.startswith("nbd") and nb == f"nbd{int(na[3:]) + 1}"
    a.set_handle_name("src0")
    assert a.get_handle_name() == "src0"
    assert repr(a).startswith("<nbd.NBD src0 START")


def test_first_user_handle_is_nbd3() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import pynbd.libnbd as nbd; print(nbd.NBD().get_handle_name())"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "nbd3"


def test_close_and_closed_handle() -> None:
    assert issubclass(nbd.ClosedHandle, ValueError)
    h = nbd.NBD()
    msgs = []
    h.set_debug(True)
    h.set_debug_callback(lambda ctx, msg: msgs.append((ctx, msg)))
    msgs.clear()
    h.close()
    assert [m for m in msgs if m[1].startswith("closing")] == [("nbd_close", "closing handle")]
    with pytest.raises(nbd.ClosedHandle):
        h.close()
    with pytest.raises(nbd.ClosedHandle):
        h.get_size()
    with pytest.raises(nbd.ClosedHandle):
        h.get_handle_name()


def test_nbd_context_manager() -> None:
    with nbd.nbd() as h:
        assert isinstance(h, nbd.NBD)
        assert h.aio_is_created()
    with pytest.raises(nbd.ClosedHandle):
        h.aio_is_created()


def test_defaults() -> None:
    h = nbd.NBD()
    assert h.get_export_name() == ""
    assert h.get_full_info() is False
    assert h.get_tls() == nbd.TLS_DISABLE
    assert h.get_tls_verify_peer() is True
    assert h.get_request_structured_replies() is True
    assert h.get_request_block_size() is True
    assert h.get_pread_initialize() is True
    assert h.get_handshake_flags() == 3
    assert h.get_strict_mode() == nbd.STRICT_MASK == 31
    assert h.get_opt_mode() is False
    assert h.get_debug() is (os.environ.get("LIBNBD_DEBUG") == "1")
    assert h.get_private_data() == 0
    assert h.get_nr_meta_contexts() == 0
    assert h.connection_state() == "START: Handle after being initially created"
    assert h.aio_is_created() and not h.aio_is_connecting() and not h.aio_is_ready()
    assert h.aio_get_direction() == 0


def test_settings_round_trip() -> None:
    h = nbd.NBD()
    assert h.set_private_data(5) == 0
    assert h.set_private_data(7) == 5
    assert h.get_private_data() == 7
    h.add_meta_context("a")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_nr_meta_contexts() == 2
    assert h.get_meta_context(1) == "base:allocation"
    with pytest.raises(nbd.Error) as ei:
        h.get_meta_context(2)
    assert ei.value.string == ("nbd_get_meta_context: meta context request out of range: "
                               "Invalid argument")
    h.clear_meta_contexts()
    assert h.get_nr_meta_contexts() == 0
    h.set_strict_mode(nbd.STRICT_MASK | nbd.STRICT_PAYLOAD)
    assert h.get_strict_mode() == 0x3f
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    assert h.get_handshake_flags() == 1
    h.set_opt_mode(True)
    assert h.get_opt_mode() is True


@pytest.mark.parametrize("call, message", [
    (lambda h: h.set_handshake_flags(4),
     "nbd_set_handshake_flags: flags: invalid value for flag: 0x4: Invalid argument"),
    (lambda h: h.set_tls(3), "nbd_set_tls: tls: invalid value for parameter: 3: Invalid argument"),
    (lambda h: h.set_strict_mode(0x40),
     "nbd_set_strict_mode: flags: invalid value for flag: 0x40: Invalid argument"),
    (lambda h: h.set_uri_allow_transports(8),
     "nbd_set_uri_allow_transports: mask: invalid value for flag: 0x8: Invalid argument"),
    (lambda h: h.poll(0), "nbd_poll: nothing to poll for in state START: Invalid argument"),
    (lambda h: h.aio_peek_command_completed(),
     "nbd_aio_peek_command_completed: no commands are in flight: Invalid argument"),
])
def test_einval(call, message) -> None:
    with pytest.raises(nbd.Error) as ei:
        call(nbd.NBD())
    assert ei.value.string == message
    assert ei.value.errnum == errno.EINVAL


@pytest.mark.parametrize("call, want", [
    (lambda h: h.pread(1, 0), "connected with the server"),
    (lambda h: h.opt_go(), "negotiating"),
    (lambda h: h.aio_in_flight(), "connected with the server, or shut down, or dead"),
    (lambda h: h.get_block_size(nbd.SIZE_MINIMUM),
     "negotiating, or connected with the server, or shut down"),
])
def test_wrong_state_before_connecting_is_enotconn(call, want) -> None:
    with pytest.raises(nbd.Error) as ei:
        call(nbd.NBD())
    assert ei.value.errnum == errno.ENOTCONN
    assert f"invalid state: START: the handle must be {want}: " in ei.value.string


def test_string_lists_must_be_lists() -> None:
    h = nbd.NBD()
    with pytest.raises(TypeError, match="expecting a list parameter"):
        h.connect_command(("nbdkit", "-s"))  # type: ignore[arg-type]
    assert h.aio_is_created()


def test_connect_failure_leaves_the_handle_dead(tmp_path: Path) -> None:
    h = nbd.NBD()
    with pytest.raises(nbd.Error) as ei:
        h.connect_unix(str(tmp_path / "nothing-here"))
    assert ei.value.string == "nbd_connect_unix: connect: No such file or directory"
    assert ei.value.errnum == errno.ENOENT
    assert h.aio_is_dead()
    with pytest.raises(nbd.Error) as ei:
        h.connect_unix(str(tmp_path / "nothing-here"))
    assert ei.value.string == ("nbd_connect_unix: invalid state: DEAD: the handle must be newly "
                               "created: Invalid argument")


def test_bad_uri_is_einval() -> None:
    with pytest.raises(nbd.Error) as ei:
        nbd.NBD().connect_uri("/tmp/sock")
    assert ei.value.errnum == errno.EINVAL
    assert ei.value.string.startswith("nbd_connect_uri: NBD URI does not have a scheme")
    h = nbd.NBD()
    h.set_uri_allow_transports(nbd.ALLOW_TRANSPORT_TCP)
    with pytest.raises(nbd.Error) as ei:
        h.connect_uri("nbd+unix:///?socket=/tmp/x")
    assert ei.value.string == ("nbd_connect_uri: URI transport nbd+unix is not permitted: "
                               "Operation not permitted")


def test_debug_trace_format(capsys) -> None:
    h = nbd.NBD()
    h.set_handle_name("dbg")
    h.set_debug(True)
    h.set_export_name("abc")
    with pytest.raises(nbd.Error):
        h.get_size()
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "libnbd: debug: dbg: nbd_set_debug: leave: ret=0",
        'libnbd: debug: dbg: nbd_set_export_name: enter: export_name="abc"',
        "libnbd: debug: dbg: nbd_set_export_name: leave: ret=0",
        "libnbd: debug: dbg: nbd_get_size: enter:",
        ('libnbd: debug: dbg: nbd_get_size: leave: error="nbd_get_size: invalid state: START: '
         "the handle must be negotiating, or connected with the server, or shut down: Transport "
         'endpoint is not connected"'),
    ]


# ------------------------------------------------------------------------------ in-process server


class _ServerThread:
    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.listener = bind_unix(path)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="libnbd-test-server", daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self.ready.set)
            await self.server.serve([self.listener])

        asyncio.run(main())

    def stop(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def memsock(sockdir: Path) -> Iterator[str]:
    """An in-process ``pynbd serve memory 1M`` on a Unix socket; yields the socket path."""
    chain = Chain(MemoryPlugin())
    chain.config("size", "1M")
    chain.config_complete()
    chain.get_ready()
    path = str(sockdir / "mem.sock")
    st = _ServerThread(Server(chain, ServerConfig(threads=4)), path)
    try:
        yield path
    finally:
        st.stop()
        chain.cleanup()


def _connect(path: str, meta: bool = False) -> nbd.NBD:
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(path)
    return h


def test_sync_round_trip(memsock: str) -> None:
    with nbd.nbd() as h:
        h.connect_unix(memsock)
        assert h.connection_state() == "READY: Connection is ready to process NBD commands"
        assert h.get_size() == 1 << 20
        assert h.get_protocol() == "newstyle-fixed"
        assert h.get_structured_replies_negotiated()
        h.pwrite(b"hello", 4096)
        data = h.pread(5, 4096)
        assert type(data) is bytearray and data == b"hello"
        h.zero(4096, 4096)
        assert h.pread(5, 4096) == bytes(5)
        h.shutdown()
        assert h.connection_state() == "CLOSED: Connection is closed"
        assert h.aio_in_flight() == 0


def test_cookies(memsock: str) -> None:
    h = _connect(memsock)
    h.pread(1, 0)                                     # a sync call takes cookie 1
    with pytest.raises(nbd.Error):
        h.aio_pread(nbd.Buffer(1), 1 << 20)           # refused before the wire: no cookie
    with pytest.raises(BufferError, match="not writable"):
        h.aio_pread(b"x", 0)
    assert h.aio_pread(nbd.Buffer(1), 0) == 2
    assert h.aio_flush() == 3
    while h.aio_in_flight():
        h.poll(-1)
    assert h.aio_peek_command_completed() in (2, 3)
    assert h.aio_command_completed(2) is True
    assert h.aio_command_completed(2) is False        # retired
    assert h.aio_command_completed(99) is False       # unknown
    assert h.aio_peek_command_completed() == 3
    assert h.aio_command_completed(3) is True
    with pytest.raises(nbd.Error, match="no commands are in flight"):
        h.aio_peek_command_completed()
    h.close()


def test_callbacks_run_in_the_callers_thread_inside_poll(memsock: str) -> None:
    h = _connect(memsock)
    seen = []

    def completion(err: ctypes.c_int) -> int:
        seen.append((threading.get_ident(), type(err), err.value))
        return 0

    buf = nbd.Buffer(512)
    cookie = h.aio_pread(buf, 0, completion)
    assert buf._init is True
    # Nothing runs behind the caller's back: not until the handle is polled.
    threading.Event().wait(0.2)
    assert seen == [] and h.aio_in_flight() == 1
    assert h.poll(-1) == 1
    assert seen == [(threading.get_ident(), ctypes.c_int, 0)]
    assert h.aio_in_flight() == 0
    assert h.aio_command_completed(cookie)
    h.close()


def test_completion_returning_1_auto_retires(memsock: str) -> None:
    h = _connect(memsock)
    c1 = h.aio_flush(lambda err: 1)
    c2 = h.aio_flush(lambda err: 0)
    c3 = h.aio_flush(lambda err: "not an int")
    while h.aio_in_flight():
        h.poll(-1)
    assert h.aio_command_completed(c1) is False       # already retired
    assert h.aio_command_completed(c2) is True
    assert h.aio_command_completed(c3) is True
    h.close()


def test_completion_can_replace_the_error(memsock: str, capsys) -> None:
    h = _connect(memsock)

    def fail(err: ctypes.c_int) -> int:
        err.value = errno.ENOMEM
        return -1

    def boom(err: ctypes.c_int) -> int:
        raise ValueError("boom")

    c1 = h.aio_flush(fail)
    c2 = h.aio_flush(lambda err: -1)                  # -1 without an errno: no change
    c3 = h.aio_flush(boom)                            # traceback printed, command fine
    while h.aio_in_flight():
        h.poll(-1)
    with pytest.raises(nbd.Error) as ei:
        h.aio_command_completed(c1)
    assert ei.value.string == "nbd_aio_command_completed: flush: command failed: Cannot " \
                              "allocate memory"
    assert ei.value.errnum == errno.ENOMEM
    assert h.aio_command_completed(c2) is True
    assert h.aio_command_completed(c3) is True
    err = capsys.readouterr().err
    assert "ValueError: boom" in err and "in boom" in err
    h.close()


def test_aio_buffers_are_pinned_until_retired(memsock: str) -> None:
    h = _connect(memsock)
    h.pwrite(b"abcdefgh", 0)
    ba = bytearray(8)
    cookie = h.aio_pread(ba, 0)
    with pytest.raises(BufferError):
        ba.extend(b"x")
    while h.aio_in_flight():
        h.poll(-1)
    with pytest.raises(BufferError):
        ba.extend(b"x")                                # done, but not yet retired
    assert h.aio_command_completed(cookie)
    assert ba == b"abcdefgh"
    ba.extend(b"x")
    h.close()


def test_pread_structured_subbuf_is_a_readonly_slice_of_the_result(memsock: str) -> None:
    h = _connect(memsock)
    h.pwrite(b"xyz", 100)
    saved = []

    def chunk(sub: memoryview, offset: int, status: int, err: ctypes.c_int) -> int:
        saved.append((sub, offset, status, err.value))
        return 0

    buf = h.pread_structured(3, 100, chunk)
    assert buf == b"xyz"
    (sub, offset, status, err), = saved
    assert sub.readonly and bytes(sub) == b"xyz" and (offset, status, err) == (100, 1, 0)
    assert sub.obj is buf
    buf[0] = ord("X")
    assert bytes(sub) == b"Xyz"
    with pytest.raises(BufferError):
        buf.extend(b"!")
    saved.clear()
    del sub
    buf.extend(b"!")

    def refuse(sub: memoryview, offset: int, status: int, err: ctypes.c_int) -> int:
        err.value = errno.EFAULT
        return -1

    with pytest.raises(nbd.Error) as ei:
        h.pread_structured(3, 100, refuse)
    assert ei.value.string == "nbd_pread_structured: read: command failed: Bad address"
    with pytest.raises(nbd.Error) as ei:
        h.pread_structured(3, 100, lambda *a: -1)
    assert ei.value.errnum == errno.EPROTO
    h.close()


def test_block_status_flat_entries(memsock: str) -> None:
    h = _connect(memsock, meta=True)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"\1" * 65536, 65536)
    got = []

    def extent(ctx: str, offset: int, entries: list[int], err: ctypes.c_int) -> int:
        got.append((ctx, offset, entries, err.value))
        return 0

    h.block_status(1 << 20, 0, extent)
    (ctx, offset, entries, err), = got
    assert (ctx, offset, err) == ("base:allocation", 0, 0)
    assert type(entries) is list and len(entries) % 2 == 0
    assert sum(entries[0::2]) == 1 << 20
    assert entries[:2] == [65536, 3] and entries[2:4] == [65536, 0]
    h.close()


def test_strict_mode_off_sends_the_bad_request(memsock: str) -> None:
    h = _connect(memsock)
    with pytest.raises(nbd.Error) as ei:
        h.pread(10, 1 << 20)
    assert ei.value.string == "nbd_pread: request out of bounds: Invalid argument"
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as ei:
        h.pread(10, 1 << 20)
    assert ei.value.string == "nbd_pread: read: command failed: Invalid argument"
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 10, (1 << 20) - 5)
    assert ei.value.errnum == errno.ENOSPC
    assert h.aio_is_ready()
    h.close()


def test_own_event_loop_with_aio_get_fd(memsock: str) -> None:
    h = _connect(memsock)
    fd = h.aio_get_fd()
    cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(16)]
    while h.aio_in_flight():
        assert h.aio_get_direction() & nbd.AIO_DIRECTION_READ
        r, _, _ = select.select([fd], [], [], 10)
        assert r == [fd]
        h.aio_notify_read()
    assert all(h.aio_command_completed(c) for c in cookies)
    assert h.pread(1, 15 * 4096) == b"\x0f"
    h.close()


def test_stats(memsock: str) -> None:
    h = _connect(memsock)
    assert h.stats_bytes_sent() > 0 and h.stats_bytes_received() > 0
    sent, csent = h.stats_bytes_sent(), h.stats_chunks_sent()
    recv, crecv = h.stats_bytes_received(), h.stats_chunks_received()
    h.flush()
    assert h.stats_bytes_sent() - sent == 28 and h.stats_chunks_sent() - csent == 1
    assert h.stats_bytes_received() - recv in (16, 20)  # simple reply or one NONE chunk
    assert h.stats_chunks_received() - crecv == 1
    # requests queued together go out in one write, and each counts as a chunk still
    sent, csent = h.stats_bytes_sent(), h.stats_chunks_sent()
    cookies = [h.aio_pread(nbd.Buffer(512), i * 512) for i in range(5)]
    h.aio_flush()
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert h.stats_bytes_sent() - sent == 6 * 28 and h.stats_chunks_sent() - csent == 6
    h.close()


def test_opt_mode(memsock: str) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(memsock)
    assert h.aio_is_negotiating()
    assert h.connection_state().startswith("NEGOTIATING: ")
    with pytest.raises(nbd.Error) as ei:
        h.get_size()
    assert ei.value.string == ("nbd_get_size: server has not returned export size, you need to "
                               "connect to the server first: Invalid argument")
    h.opt_info()
    assert h.get_size() == 1 << 20 and h.aio_is_negotiating()
    seen: list[int] = []

    def completion(err: ctypes.c_int) -> int:
        seen.append(err.value)
        return 0

    h.aio_opt_go(completion)
    while h.aio_is_connecting():
        h.poll(-1)
    assert seen == [0] and h.aio_is_ready()
    h.close()


def test_opt_abort(memsock: str) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(memsock)
    h.opt_abort()
    assert h.aio_is_closed()
    assert h.aio_in_flight() == 0
    with pytest.raises(nbd.Error) as ei:
        h.opt_abort()
    assert ei.value.errnum == errno.EINVAL


def test_shutdown_runs_pending_completions(memsock: str) -> None:
    h = _connect(memsock)
    seen: list[int] = []

    def retire(i: int) -> Callable[[ctypes.c_int], int]:
        def completion(err: ctypes.c_int) -> int:
            seen.append(i)
            return 1
        return completion

    for i in range(8):
        h.aio_pwrite(b"z" * 4096, i * 4096, retire(i))
    h.shutdown()
    assert sorted(seen) == list(range(8))
    assert h.aio_is_closed()
    with pytest.raises(nbd.Error) as ei:
        h.pread(1, 0)
    assert ei.value.string == ("nbd_pread: invalid state: CLOSED: the handle must be connected "
                               "with the server: Invalid argument")


def test_close_with_commands_in_flight_does_not_hang(memsock: str) -> None:
    h = _connect(memsock)
    for i in range(16):
        h.aio_pread(nbd.Buffer(65536), i * 65536)
    h.close()


def test_threads_share_a_handle(memsock: str) -> None:
    h = _connect(memsock)
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                off = (n * 20 + i) * 512
                h.pwrite(bytes([n]) * 512, off)
                assert h.pread(512, off) == bytes([n]) * 512
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    h.close()
