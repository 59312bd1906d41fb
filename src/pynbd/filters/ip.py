"""The ip filter: allow or deny clients by address, process, user or group. Its manual page
is :class:`IpFilter`'s docstring."""

from __future__ import annotations

import ast
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import UINT_MAX, parse_int64, parse_unsigned
from pynbd.plugin import ConnectionInfo, Filter, connection

__all__ = ["IpFilter"]

log = logging.getLogger("pynbd.filters.ip")

_KEYWORDS = {"all": "any", "any": "any", "allipv4": "anyipv4", "anyipv4": "anyipv4",
             "allipv6": "anyipv6", "anyipv6": "anyipv6", "allunix": "anyunix",
             "anyunix": "anyunix", "allvsock": "anyvsock", "anyvsock": "anyvsock"}
#: Rules with a number: (prefix, lowest, highest).
_IDS = {"pid:": (1, (1 << 63) - 1), "uid:": (0, (1 << 63) - 1), "gid:": (0, (1 << 63) - 1),
        "vsock-cid:": (0, UINT_MAX), "vsock-port:": (0, UINT_MAX)}
_NOT_PERMITTED = "client not permitted to connect because of source address restriction"


@dataclass(frozen=True)
class _Rule:
    kind: str  # a _KEYWORDS value, "pid:"..., or "ip"
    id: int = 0
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def __str__(self) -> str:
        if self.network is not None:
            return f"ipv{self.network.version}:{self.network}"
        return f"{self.kind}{self.id}" if self.kind.endswith(":") else self.kind


@dataclass(frozen=True)
class _Peer:
    """What the rules look at: the family, the IP address, the Unix credentials."""

    family: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    cid: int | None = None
    port: int | None = None


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as C's inet_pton reads it (no zone, no short IPv4 forms), or None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return ipaddress.ip_address(socket.inet_pton(family, text))
        except (OSError, ValueError):
            pass
    return None


def _parse_rule(param: str, text: str) -> _Rule:
    low = text.lower() if text.isascii() else text
    if low in _KEYWORDS:
        return _Rule(_KEYWORDS[low])
    for prefix, (lo, hi) in _IDS.items():
        if low.startswith(prefix):
            n = parse_int64(prefix, text[len(prefix):])
            if not lo <= n <= hi:
                raise ConfigError(f"{prefix} parameter out of range")
            return _Rule(prefix, n)
    addr_text, slash, bits_text = text.partition("/")
    if slash:
        if len(bits_text) > 32:
            raise ConfigError(f"{param}: cannot parse prefix length: {bits_text}")
        bits = parse_unsigned(param, bits_text)
        addr = _parse_address(addr_text)
        if addr is None:
            raise ConfigError(f'cannot parse address "{addr_text}" from {param}={text}')
        if bits > addr.max_prefixlen:
            raise ConfigError(f"prefix is > {addr.max_prefixlen} in {param}={text}")
        return _Rule("ip", network=ipaddress.ip_network((addr, bits), strict=False))
    addr = _parse_address(text)
    if addr is None:
        raise ConfigError(f"don't know how to parse rule: {param}={text}")
    return _Rule("ip", network=ipaddress.ip_network(addr))


def _parse_rules(param: str, value: str) -> list[_Rule]:
    """A comma-separated list (a trailing comma is allowed, an empty entry is not)."""
    rules = []
    pos = 0
    while pos < len(value):
        end = value.find(",", pos)
        if end < 0:
            end = len(value)
        if end == pos:
            raise ConfigError(f"{param}: empty entry in rule list")
        rules.append(_parse_rule(param, value[pos:end]))
        pos = end + 1
    return rules


def _peer(info: ConnectionInfo | None) -> _Peer | None:
    """The client's family and identity, from the server's description of it."""
    if info is None:
        return None
    if info.peer_uid is not None or info.peer_pid is not None:
        return _Peer(socket.AF_UNIX, pid=info.peer_pid, uid=info.peer_uid, gid=info.peer_gid)
    try:
        addr = ast.literal_eval(info.peer) if info.peer.startswith("(") else None
    except (ValueError, SyntaxError):
        addr = None
    if isinstance(addr, tuple) and len(addr) >= 2:
        if isinstance(addr[0], str):
            ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            return _Peer(family, address=ip)
        if isinstance(addr[0], int):
            return _Peer(socket.AF_VSOCK, cid=addr[0], port=addr[1])
    return None


def _matches(rule: _Rule, peer: _Peer) -> bool:
    family = peer.family
    kind = rule.kind
    if kind == "any":
        return True
    if kind in ("anyipv4", "anyipv6", "anyunix", "anyvsock"):
        return family == {"anyipv4": socket.AF_INET, "anyipv6": socket.AF_INET6,
                          "anyunix": socket.AF_UNIX, "anyvsock": socket.AF_VSOCK}[kind]
    if kind == "ip":
        assert rule.network is not None
        return peer.address is not None and peer.address in rule.network
    if kind in ("pid:", "uid:", "gid:"):
        got = {"pid:": peer.pid, "uid:": peer.uid, "gid:": peer.gid}[kind]
        return family == socket.AF_UNIX and got == rule.id
    got = peer.cid if kind == "vsock-cid:" else peer.port
    return family == socket.AF_VSOCK and got == rule.id


class IpFilter(Filter):
    """NAME
        ip - pynbd ip filter: allow or deny clients by address, process, user or group

    SYNOPSIS
        pynbd serve --filter=ip PLUGIN [allow=ADDR[,ADDR...]] [deny=ADDR[,ADDR...]]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        ip lets clients connect, or refuses them, by their IP address; over a Unix socket
        by their process ID, user ID or group ID; over AF_VSOCK by CID or port. A firewall
        usually does this better, but this works where there is none.

        RULES. When a client connects, its source is checked against the allow list, then
        the deny list:

        1. If it matches a rule of the allow list, it is let in.
        2. Else if it matches a rule of the deny list, it is refused.
        3. Else it is let in.

        A list not given is empty; the order of the parameters does not matter; if neither
        is given the filter does nothing. allow= and deny= may be given several times: the
        rules add up. A refused client is disconnected before it negotiates, and the
        server logs "client not permitted to connect because of source address
        restriction".

        Each list is a comma-separated list of:

        all, any              any client.
        allipv4, anyipv4      any IPv4 client.
        allipv6, anyipv6      any IPv6 client.
        allunix, anyunix      any client over a Unix socket.
        allvsock, anyvsock    any client over AF_VSOCK.
        A.B.C.D               one IPv4 address, such as 127.0.0.1.
        A.B.C.D/NN            an IPv4 network, such as 192.168.2.0/24 or 10.0.0.0/8.
        A:B:...               one IPv6 address (RFC 5952 forms).
        A:B:.../NN            an IPv6 network.
        pid:PID               the process PID, over a Unix socket (process IDs are reused:
                              not safe alone, but an extra check).
        uid:UID               processes of user ID UID, over a Unix socket.
        gid:GID               processes of group ID GID, over a Unix socket.
        vsock-cid:CID         AF_VSOCK clients of CID CID.
        vsock-port:PORT       AF_VSOCK clients from port PORT.

        Keywords and pid:/uid:/gid:/vsock- prefixes are read in any case. A client whose
        source cannot be known (with -s over a pipe) is refused when any rule is given.

        This is nbdkit-ip-filter(1) for pynbd, with nbdkit 1.32's parameters. nbdkit 1.32
        as built for Debian cannot read any IP address (every A.B.C.D or A:B:... rule is
        refused: "don't know how to parse rule"), and takes a pid:, uid:, gid: or vsock-
        rule only as the last entry of its list; pynbd does neither.

    PARAMETERS
        allow=ADDR[,...]
            Rules of the allow list.

        deny=ADDR[,...]
            Rules of the deny list.

    EXAMPLES
        Only clients on the loopback addresses:

            pynbd serve --filter=ip ... allow=127.0.0.1,::1 deny=all

        Anyone but the 8.0.0.0/8 network:

            pynbd serve --filter=ip ... deny=8.0.0.0/8

        IPv6 clients from anywhere, nobody else:

            pynbd serve --filter=ip ... allow=anyipv6 deny=all

        Only the current user, over a Unix socket (best in a directory only that user can
        enter):

            pynbd serve -U $tmpdir/sock --filter=ip ... allow=uid:`id -u` deny=all
    """

    name = "ip"
    nonblocking = True
    config_help = ("allow=addr[,addr...]     Set allow list.\n"
                   "deny=addr[,addr...]      Set deny list.")

    def __init__(self) -> None:
        self.allow: list[_Rule] = []
        self.deny: list[_Rule] = []
        #: -D ip.rules=1: log the rules, and how each client matched them.
        self.debug_rules = 0

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "allow":
            self.allow += _parse_rules(key, value)
        elif key == "deny":
            self.deny += _parse_rules(key, value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.debug_rules:
            for name, rules in (("ip: parsed allow", self.allow),
                                ("ip: parsed deny", self.deny)):
                for rule in rules:
                    log.debug("%s=%s", name, rule)

    def _listed(self, name: str, rules: list[_Rule], peer: _Peer) -> bool:
        for rule in rules:
            hit = _matches(rule, peer)
            if self.debug_rules:
                log.debug("%s=%s => %s", name, rule, "yes" if hit else "no")
            if hit:
                return True
        return False

    def allowed(self, peer: _Peer | None) -> bool:
        """Whether a client from ``peer`` may connect (None: its source is unknown)."""
        if not self.allow and not self.deny:
            return True
        if peer is None:
            return False  # fail closed
        if self._listed("ip: match source with allow", self.allow, peer):
            return True
        return not self._listed("ip: match source with deny", self.deny, peer)

    def preconnect(self, next_preconnect: Any, readonly: bool) -> None:
        if not self.allowed(_peer(connection())):
            raise CommandError(errno.EPERM, _NOT_PERMITTED)
        next_preconnect(readonly)
