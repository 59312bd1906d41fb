"""LUKSv1 for the luks filter (private): the header, unlocking a key slot, sector ciphers.

The on-disk format is the LUKS1 specification's (also what qemu and the Linux kernel's
dm-crypt read): a 592-byte big-endian header with the cipher, mode and hash names, the
payload offset, the master key's PBKDF2 digest, and 8 key slots, each holding the master
key encrypted with a key derived from a passphrase (PBKDF2) and spread over ``stripes``
copies by the anti-forensic splitter. Checks and messages are nbdkit 1.32's.

Cryptography comes from the ``cryptography`` package (AES in XTS and CBC modes, the ones
nbdkit's GnuTLS build supports) and the standard library's :func:`hashlib.pbkdf2_hmac`.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.errors import CommandError, ConfigError

__all__ = ["SECTOR", "LuksKey", "load_header", "require_cryptography"]

log = logging.getLogger("pynbd.server")

SECTOR = 512
_MAGIC = b"LUKS\xba\xbe"
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
_SLOTS = 8
_KEY_ENABLED, _KEY_DISABLED = 0x00AC71F3, 0x0000DEAD
_ALIGN_KEYSLOTS = 4096
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
#: (mode, key bytes) -> the name nbdkit prints, for the combinations nbdkit supports.
_SUPPORTED = {("xts", 32): "aes-128", ("xts", 64): "aes-256", ("cbc", 16): "aes-128",
              ("cbc", 24): "aes-192", ("cbc", 32): "aes-256"}


def require_cryptography() -> Any:
    """The ``cryptography`` package's cipher module, or a one-line error saying how to get
    it."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise ConfigError("luks: this filter needs the Python package 'cryptography' "
                          "(pip install 'pynbd[luks]')") from None
    return Cipher, algorithms, modes


def _fail(message: str) -> CommandError:
    return CommandError(errno.EIO, message)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


@dataclass
class _Slot:
    active: int
    iterations: int
    salt: bytes
    offset: int
    stripes: int


class LuksKey:
    """An unlocked LUKS disk: its payload offset and sector encryption and decryption."""

    def __init__(self, mode: str, ivgen: str, key: bytes, payload_offset: int) -> None:
        self.mode, self.ivgen, self.key = mode, ivgen, key
        self.payload_offset = payload_offset  # bytes
        self._cipher, self._algorithms, self._modes = require_cryptography()
        self._aes = self._algorithms.AES(key)

    def _iv(self, sector: int) -> bytes:
        n = sector & 0xFFFFFFFF if self.ivgen == "plain" else sector & (1 << 64) - 1
        return n.to_bytes(16, "little")

    def _crypt(self, sector: int, buf: Any, out: Any, encrypt: bool) -> None:
        """Encrypt or decrypt whole sectors of ``buf`` (sector number ``sector`` first)
        into ``out`` (same length; may be the same buffer)."""
        mv, dst = memoryview(buf), memoryview(out)
        mode = self._modes.XTS if self.mode == "xts" else self._modes.CBC
        for i in range(0, len(mv), SECTOR):
            c = self._cipher(self._aes, mode(self._iv(sector + i // SECTOR)))
            op = c.encryptor() if encrypt else c.decryptor()
            dst[i:i + SECTOR] = op.update(mv[i:i + SECTOR]) + op.finalize()

    def decrypt(self, sector: int, buf: Any, out: Any) -> None:
        self._crypt(sector, buf, out, False)

    def encrypt(self, sector: int, buf: Any, out: Any) -> None:
        self._crypt(sector, buf, out, True)


def _af_hash(name: str, block: bytearray) -> None:
    """The anti-forensic diffusion: hash each digest-sized piece with its index."""
    size = hashlib.new(name).digest_size
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        d = hashlib.new(name, (i // size).to_bytes(4, "big") + piece).digest()
        block[i:i + len(piece)] = d[:len(piece)]


def _xor(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    n = len(a)
    return bytearray((int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(n, "big"))


def _af_merge(name: str, stripes: int, material: bytes, keylen: int) -> bytes:
    block = bytearray(keylen)
    for i in range(stripes - 1):
        block = _xor(material[i * keylen:(i + 1) * keylen], block)
        _af_hash(name, block)
    return bytes(_xor(material[(stripes - 1) * keylen:stripes * keylen], block))


def _pbkdf2(name: str, secret: bytes, salt: bytes, rounds: int, length: int) -> bytes:
    try:
        return hashlib.pbkdf2_hmac(name, secret, salt, rounds, length)
    except ValueError as e:  # a hash this OpenSSL lacks (ripemd160 in OpenSSL 3)
        raise _fail(f"pbkdf2: {name}: {e}") from None


def _material_sectors(keylen: int, stripes: int) -> int:
    sectors = -(-keylen * stripes // SECTOR)
    align = _ALIGN_KEYSLOTS // SECTOR
    return -(-sectors // align) * align


def _check_slots(slots: list[_Slot], keylen: int, size: int) -> None:
    for i, ks in enumerate(slots):
        if ks.active == _KEY_DISABLED:
            continue
        if ks.active != _KEY_ENABLED:
            raise _fail(f"bad LUKSv1 header: key slot {i} has an invalid active flag")
        if not ks.stripes:
            raise _fail(f"bad LUKSv1 header: key slot {i} is corrupted")
        if ks.stripes >= 10000:
            raise _fail(f"bad LUKSv1 header: key slot {i} stripes too large")
        if ks.iterations == 0:
            raise _fail(f"bad LUKSv1 header: key slot {i} iterations is 0")
        length = _material_sectors(keylen, ks.stripes)
        if length > 4096:
            raise _fail(f"bad LUKSv1 header: key slot {i} key material length is too large")
        if ks.offset * SECTOR >= size or (ks.offset + length) * SECTOR >= size:
            raise _fail(f"bad LUKSv1 header: key slot {i} key material offset points "
                        "beyond the end of the disk")


def _parse_modes(name: str, mode_spec: str, hash_spec: str, keylen: int) -> tuple[str, str]:
    """(mode, ivgen) from the header's strings, or nbdkit's error."""
    mode, sep, ivgen = mode_spec.partition("-")
    if not sep:
        raise _fail("incorrect cipher_mode header, expecting mode-ivgenerator but got "
                    f'"{mode_spec}"')
    ivgen, colon, ivhash = ivgen.partition(":")
    if colon and ivhash not in _HASHES:
        raise _fail(_unknown_hash(ivhash))
    if mode not in ("ecb", "cbc", "xts", "ctr"):
        raise _fail(f'unknown cipher mode: {mode} (expecting "ecb", "cbc", "xts" or "ctr")')
    alg_bytes = keylen // 2 if mode == "xts" else keylen
    if name != "aes" or alg_bytes not in (16, 24, 32):
        raise _fail(f'unknown cipher algorithm: {name} (expecting "aes", etc)')
    if hash_spec not in _HASHES:
        raise _fail(_unknown_hash(hash_spec))
    if ivgen not in ("plain", "plain64"):
        raise _fail(f"unknown IV generation algorithm: {ivgen} "
                    '(expecting "plain", "plain64" etc)')
    if (mode, keylen) not in _SUPPORTED:
        raise _fail(f"cipher algorithm aes-{alg_bytes * 8} in mode {mode} is not supported "
                    "by GnuTLS")
    return mode, ivgen


def _unknown_hash(name: str) -> str:
    return f'unknown hash algorithm: {name} (expecting "md5", "sha1", "sha224", etc)'


def _try_slot(pread: Callable[[int, int], bytes], ks: _Slot, passphrase: bytes, hash_name: str,
              mode: str, ivgen: str, keylen: int, digest: bytes, salt: bytes,
              digest_iterations: int) -> bytes | None:
    """The master key if ``passphrase`` opens slot ``ks``, else None."""
    candidate = _pbkdf2(hash_name, passphrase, ks.salt, ks.iterations, keylen)
    material = bytearray(pread(keylen * ks.stripes, ks.offset * SECTOR))
    LuksKey(mode, ivgen, candidate, 0).decrypt(0, material, material)
    master = _af_merge(hash_name, ks.stripes, bytes(material), keylen)
    check = _pbkdf2(hash_name, master, salt, digest_iterations, len(digest))
    return master if hmac.compare_digest(check, digest) else None


def load_header(next: Any, passphrase: bytes) -> LuksKey:
    """Read and check the LUKSv1 header below, unlock a key slot with ``passphrase``."""
    require_cryptography()
    size = next.get_size()
    if size < 16384:
        raise _fail("disk is too small to be LUKS-encrypted")
    raw = bytes(next.pread(_HEADER.size + _SLOTS * _SLOT.size, 0, 0))
    (magic, version, cname, cmode, hspec, payload, keylen, digest, salt, digest_iter,
     uuid) = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise _fail("this disk does not contain a LUKS header")
    if version != 1:
        raise _fail(f"this disk contains a LUKS version {version} header, but this filter "
                    "only supports LUKSv1")
    if payload >= size // SECTOR:
        raise _fail("bad LUKSv1 header: payload offset points beyond the end of the disk")
    if digest_iter == 0:
        raise _fail("bad LUKSv1 header: master key iterations is 0")
    if keylen > 1024:
        raise _fail("bad LUKSv1 header: master key is too long")
    slots = [_Slot(*_SLOT.unpack_from(raw, _HEADER.size + i * _SLOT.size))
             for i in range(_SLOTS)]
    _check_slots(slots, keylen, size)
    name, mode_spec, hash_name = _cstr(cname), _cstr(cmode), _cstr(hspec)
    log.debug("LUKS v%d cipher: %s mode: %s hash: %s master key: %d bits",
              version, name, mode_spec, hash_name, keylen * 8)
    mode, ivgen = _parse_modes(name, mode_spec, hash_name, keylen)
    log.debug("LUKS UUID: %s", _cstr(uuid))

    def pread(count: int, offset: int) -> bytes:
        return bytes(next.pread(count, offset, 0))

    for ks in slots:
        if ks.active != _KEY_ENABLED:
            continue
        master = _try_slot(pread, ks, passphrase, hash_name, mode, ivgen, keylen, digest,
                           salt, digest_iter)
        if master is not None:
            log.debug("LUKS unlocked block device with passphrase")
            return LuksKey(mode, ivgen, master, payload * SECTOR)
    raise _fail("LUKS passphrase is not correct, no key slot could be unlocked")
