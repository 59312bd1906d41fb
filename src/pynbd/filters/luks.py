"""The luks filter: read and write a LUKSv1-encrypted disk. Its manual page is
:class:`LuksFilter`'s docstring."""

from __future__ import annotations

import errno
import threading
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._formats_luks import SECTOR, LuksKey, load_header, require_cryptography
from pynbd.plugin import CacheMode, Filter, Flag
from pynbd.plugins._nbdkit_module import read_password

__all__ = ["LuksFilter"]

_UINT32_MAX = (1 << 32) - 1


def _read_secret(value: str) -> bytes:
    """nbdkit_read_password, with its messages."""
    try:
        return read_password(value)
    except FileNotFoundError as e:
        raise ConfigError(f"open {value[1:]}: {e.strerror}") from None
    except OSError as e:
        if value.startswith("-") and value[1:].isdigit():
            raise ConfigError(f"fdopen {value[1:]}: {e.strerror}") from None
        raise ConfigError(f"open {value[1:]}: {e.strerror}") from None
    except RuntimeError as e:
        raise ConfigError(str(e).split(":")[0]) from None


class _Handle:
    __slots__ = ("key",)

    def __init__(self) -> None:
        self.key: LuksKey | None = None


class LuksFilter(Filter):
    """NAME
        luks - pynbd luks filter: read and write LUKS-encrypted disks and partitions

    SYNOPSIS
        pynbd serve --filter=luks PLUGIN [PLUGIN-ARGS...] passphrase=SECRET
        pynbd serve --filter=luks PLUGIN [PLUGIN-ARGS...] passphrase=+FILENAME
        pynbd serve --filter=luks PLUGIN [PLUGIN-ARGS...] passphrase-file=FILENAME

    DESCRIPTION
        luks opens a disk encrypted with LUKS ("Linux Unified Key Setup", the disk
        encryption Linux systems use) and serves it decrypted: reads are decrypted and
        writes encrypted on the way through, so the plugin below only ever sees encrypted
        data. Serving an encrypted image from a web server (the curl plugin) this way, the
        web server never learns what is on the disk; the NBD client receives plain data, so
        use a Unix socket or TLS if that matters.

        The disk must be LUKS version 1, as made by "cryptsetup luksFormat --type luks1"
        or by qemu-img's luks format, with AES in XTS mode (128 or 256 bit) or CBC mode
        (128, 192 or 256 bit) and "plain" or "plain64" IVs; key slots may use any of the
        md5, sha1, sha224, sha256, sha384, sha512 hashes. The filter cannot create disks or
        change passphrases or key slots: use cryptsetup(8) for that.

        The client sees the payload: the disk minus the LUKS header and key material.
        Requests may have any alignment (a partial sector is read, decrypted, changed,
        encrypted and written back); the preferred block size advertised is the 512-byte
        sector. Trim and extents are not offered; zeroing writes encrypted zeroes.

        If the LUKS volume is inside a partition, put the partition filter below this one:

            pynbd serve file disk.img --filter=luks passphrase=+key --filter=partition partition=1

        This is nbdkit-luks-filter(1) for pynbd, with nbdkit 1.32's parameters and messages.
        It needs the Python package "cryptography" (pip install 'pynbd[luks]').

    PARAMETERS
        passphrase=SECRET
            The passphrase. On the command line it is visible to every user of the machine:
            prefer one of the forms below.

        passphrase=+FILENAME
            Read the passphrase from FILENAME (a final newline is dropped).

        passphrase=-FD
            Read the passphrase from the inherited file descriptor FD (3 or more).

        passphrase=-
            Ask for the passphrase on the terminal at start-up.

        passphrase-file=FILENAME
            The same as passphrase=+FILENAME (pynbd's spelling; nbdkit 1.32 has only the
            other forms).

    EXAMPLES
        Serve an encrypted disk image, the passphrase in a file only you can read:

            pynbd serve file encrypted-disk.img --filter=luks passphrase=+/tmp/secret

        Make a LUKSv1 image to try it with:

            qemu-img create -f luks --object secret,data=SECRET,id=sec0 \\
                -o key-secret=sec0 encrypted-disk.img 1G
    """

    name = "luks"
    version = "1.32.5"
    config_help = "passphrase=<SECRET>      Secret passphrase."

    def __init__(self) -> None:
        self.passphrase: bytes | None = None
        self._rmw = threading.Lock()  # read-modify-write cycles of partial sectors

    def unload(self) -> None:
        self.passphrase = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "passphrase":
            self.passphrase = _read_secret(value)
        elif key == "passphrase-file":
            self.passphrase = _read_secret("+" + value)
        else:
            next_config(key, value)

    def config_complete(self) -> None:
        if self.passphrase is None:
            raise ConfigError('LUKS "passphrase" parameter is missing')
        require_cryptography()

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        return _Handle()

    def prepare(self, next: Any, h: _Handle, readonly: bool) -> None:
        assert self.passphrase is not None
        h.key = load_header(next, self.passphrase)

    def close(self, h: _Handle) -> None:
        h.key = None

    @staticmethod
    def _key(h: _Handle) -> LuksKey:
        if h.key is None:
            raise CommandError(errno.EIO, "luks: the disk was not unlocked")
        return h.key

    def get_size(self, next: Any, h: _Handle) -> int:
        payload = self._key(h).payload_offset
        size: int = next.get_size()
        if size < payload:
            raise CommandError(errno.EIO,
                               "disk too small, or contains an incomplete LUKS partition")
        return size - payload

    def can_extents(self, next: Any, h: _Handle) -> bool:
        return False

    def can_trim(self, next: Any, h: _Handle) -> bool:
        return False

    def can_zero(self, next: Any, h: _Handle) -> bool:
        return True  # zero() declines, and the server writes zeroes through pwrite

    def can_fast_zero(self, next: Any, h: _Handle) -> bool:
        return False

    def can_cache(self, next: Any, h: _Handle) -> CacheMode:
        return CacheMode.EMULATE

    def block_size(self, next: Any, h: _Handle) -> tuple[int, int, int]:
        below = next.block_size()
        if below is None:
            return (SECTOR, SECTOR, _UINT32_MAX)
        mn, pref, mx = below
        mn = max(mn, SECTOR)
        return (mn, max(mn, pref, SECTOR), mx)

    def zero(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        raise CommandError(errno.ENOTSUP, "luks: zeroes are written encrypted")

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        key = self._key(h)
        first = offset // SECTOR
        last = (offset + count + SECTOR - 1) // SECTOR
        raw = next.pread((last - first) * SECTOR, key.payload_offset + first * SECTOR, 0)
        plain = bytearray(len(raw))
        key.decrypt(first, raw, plain)
        skip = offset - first * SECTOR
        if skip == 0 and len(plain) == count:
            return plain
        return memoryview(plain)[skip:skip + count]

    def _rmw_sector(self, next: Any, key: LuksKey, sector: int, at: int, data: Any,
                    flags: int) -> None:
        """Change bytes [at, at+len(data)) of one sector: read, decrypt, patch, encrypt,
        write back, holding the lock so overlapping partial writes do not undo each
        other."""
        where = key.payload_offset + sector * SECTOR
        with self._rmw:
            buf = bytearray(SECTOR)
            key.decrypt(sector, next.pread(SECTOR, where, 0), buf)
            buf[at:at + len(data)] = data
            key.encrypt(sector, buf, buf)
            next.pwrite(buf, where, flags)

    def pwrite(self, next: Any, h: _Handle, buf: Any, offset: int, flags: int) -> None:
        key = self._key(h)
        mv = memoryview(buf).cast("B")
        sector, at = divmod(offset, SECTOR)
        flags &= Flag.FUA
        if at:
            n = min(SECTOR - at, len(mv))
            self._rmw_sector(next, key, sector, at, mv[:n], flags)
            mv = mv[n:]
            sector += 1
        body = len(mv) - len(mv) % SECTOR
        if body:
            out = bytearray(body)
            key.encrypt(sector, mv[:body], out)
            next.pwrite(out, key.payload_offset + sector * SECTOR, flags)
            mv = mv[body:]
            sector += body // SECTOR
        if len(mv):
            self._rmw_sector(next, key, sector, 0, mv, flags)
