"""Test certificates and PSK keys for the TLS tests, made on demand with the cryptography
package (a test dependency).

``make_x509(d)`` writes the directory layout nbdkit, qemu and libnbd read
(``--tls-certificates=DIR``, ``tls-certificates=DIR``)::

    ca-cert.pem  ca-key.pem              the test CA
    server-cert.pem server-key.pem        CN=localhost, SAN DNS:localhost, IP:127.0.0.1
    client-cert.pem client-key.pem        CN=alice (for --tls-verify-peer), in the same dir,
                                          as libnbd and qemu expect on the client side

and beside it, for the failure cases, ``other-ca/`` (a directory whose server certificate
is signed by a different CA) and ``expired/`` (a server certificate that expired in 2000).
``make_psk(path, user)`` writes psktool's ``username:hexkey`` format.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_psk", "make_x509"]

_Key = rsa.RSAPrivateKey


def _write(d: Path, name: str, key: _Key, cert: x509.Certificate) -> None:
    (d / f"{name}-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (d / f"{name}-key.pem").chmod(0o600)
    (d / f"{name}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(cn: str, issuer: x509.Name, key: _Key, expired: bool) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((datetime.datetime(1999, 1, 1, tzinfo=datetime.UTC),
                   datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)) if expired
                  else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650)))
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end))


def _ca(d: Path) -> tuple[_Key, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pynbd test CA {d.name}")])
    cert = (_builder(name.rfc4514_string()[3:], name, key, False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(d, "ca", key, cert)
    return key, cert


def _leaf(d: Path, ca: tuple[_Key, x509.Certificate], name: str, cn: str, server: bool,
          *, expired: bool = False) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(cn, ca[1].subject, key, expired)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    _write(d, name, key, b.sign(ca[0], hashes.SHA256()))


def make_x509(d: Path) -> Path:
    """Write a CA, a server and a client certificate into ``d`` (made if missing)."""
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d)
    _leaf(d, ca, "server", "localhost", True)
    _leaf(d, ca, "client", "alice", False)
    other = d / "other-ca"
    other.mkdir(exist_ok=True)
    other_ca = _ca(other)
    _leaf(other, other_ca, "server", "localhost", True)
    _leaf(other, other_ca, "client", "alice", False)
    expired = d / "expired"
    expired.mkdir(exist_ok=True)
    _write(expired, "ca", *ca)
    _leaf(expired, ca, "server", "localhost", True, expired=True)
    _leaf(expired, ca, "client", "alice", False)
    return d


def make_psk(path: Path, user: str = "alice", key: str | None = None) -> str:
    """Write ``user:hexkey`` (psktool's format) to ``path``; return the hex key."""
    key = key or secrets.token_hex(32)
    path.write_text(f"{user}:{key}\n")
    path.chmod(0o600)
    return key
