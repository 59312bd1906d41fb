"""Helpers for the filesystem plugins' tests (linuxdisk, floppy, iso, tmpdisk, ondemand):
the tools that check and read filesystems (e2fsck, debugfs, fsck.fat, xorriso), a directory
tree to serve, and trees compared as {relative path: what is there}."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

from helpers import missing, run_peer

__all__ = [
    "DEBIAN_PACKAGES",
    "debugfs_extract",
    "debugfs_inode",
    "e2fsck",
    "fat_listing",
    "fetch",
    "gpt_partition",
    "make_tree",
    "need",
    "tree",
    "xorriso_extract",
    "xorriso_listing",
]

#: The Debian package of each tool these tests run (beyond tests/helpers.py's list).
DEBIAN_PACKAGES = {
    "mke2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs", "fsck.fat": "dosfstools", "mkfs.fat": "dosfstools",
    "xorriso": "xorriso", "genisoimage": "genisoimage", "mdir": "mtools",
    "mcopy": "mtools", "mlabel": "mtools",
}


def need(tool: str) -> str:
    """The path of ``tool``; skip (fail under CI) without it, naming its package."""
    path = shutil.which(tool)
    if path is None:
        missing(f"{tool} not found on PATH (Debian package {DEBIAN_PACKAGES.get(tool, '?')})")
    return path


def fetch(uri: str, dest: Path) -> bytes:
    """Copy the whole export to ``dest`` with nbdcopy (libnbd's), and return its bytes."""
    run_peer("nbdcopy", uri, dest)
    return dest.read_bytes()


def make_tree(root: Path) -> Path:
    """A small tree with what the plugins must carry: nested directories, an empty
    directory, long and clashing names, non-ASCII, a 13-character name, a file of several
    clusters, a symbolic link and a hard link."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "emptydir").mkdir()
    (root / "hello.txt").write_text("hello, world\n")
    (root / "A long file name with spaces.text").write_text("long\n")
    (root / "longfilename1.txt").write_text("one\n")
    (root / "longfilename2.txt").write_text("two\n")
    (root / "h\u00e9llo w\u00f6rld.txt").write_text("unicode\n")
    (root / "abcdefghij.kl").write_text("thirteen\n")
    (root / "sub" / "big.bin").write_bytes(bytes(range(256)) * 300)  # 76800: 5 clusters
    (root / "sub" / "deeper" / "d").write_text("deep\n")
    for i in range(40):
        (root / "sub" / "deeper" / f"file{i:03d}.dat").write_text(f"{i}\n" * (i + 1))
    os.symlink("hello.txt", root / "link")
    os.link(root / "hello.txt", root / "sub" / "hardlink.txt")
    return root


def tree(root: Path, *, links: bool = True) -> dict[str, object]:
    """{path relative to root: ("dir",) | ("file", bytes) | ("link", target)}; symbolic
    links are left out with ``links=False`` (FAT has none)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                if links:
                    out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", p.read_bytes())
    return out


# ------------------------------------------------------------------ ext2/3/4 (linuxdisk)
def gpt_partition(image: bytes) -> tuple[int, int, bytes, bytes]:
    """Check a one-partition GPT disk (signature, CRCs, backup header, protective MBR) and
    return (first byte, length, type GUID, unique GUID) of its partition."""
    assert image[510:512] == b"\x55\xaa" and image[0x1C2] == 0xEE
    assert image[512:520] == b"EFI PART"
    hdr = image[512:512 + struct.unpack_from("<I", image, 524)[0]]
    assert len(hdr) >= 92
    crc = struct.unpack_from("<I", hdr, 16)[0]
    assert zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:]) == crc
    backup_lba, first_usable, last_usable = struct.unpack_from("<QQQ", hdr, 32)
    entries_lba, count, size, pt_crc = struct.unpack_from("<QIII", hdr, 72)
    pt = image[entries_lba * 512:entries_lba * 512 + count * size]
    assert zlib.crc32(pt) == pt_crc
    assert (backup_lba + 1) * 512 == len(image)
    backup = image[backup_lba * 512:backup_lba * 512 + 92]
    assert backup[:8] == b"EFI PART"
    assert struct.unpack_from("<QQ", backup, 24) == (backup_lba, 1)
    backup_entries = struct.unpack_from("<Q", backup, 72)[0]
    assert image[backup_entries * 512:backup_entries * 512 + count * size] == pt
    type_guid, unique = pt[:16], pt[16:32]
    first, last = struct.unpack_from("<QQ", pt, 32)
    assert pt[size:] == bytes(len(pt) - size)  # one partition only
    assert first_usable <= first <= last <= last_usable
    return first * 512, (last - first + 1) * 512, type_guid, unique


def e2fsck(path: Path) -> str:
    """``e2fsck -fn`` must find nothing wrong; its output."""
    cp = subprocess.run([need("e2fsck"), "-fn", str(path)], capture_output=True, text=True,
                        check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return cp.stdout


def debugfs_extract(image: Path, dest: Path) -> Path:
    """Everything in the ext2/3/4 filesystem ``image``, copied out by ``debugfs rdump``
    (symbolic links kept) into ``dest``; lost+found is left out."""
    dest.mkdir()
    cp = subprocess.run([need("debugfs"), "-R", f"rdump / {dest}", str(image)],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == 0, cp.stderr
    shutil.rmtree(dest / "lost+found", ignore_errors=True)
    return dest


def debugfs_inode(image: Path, path: str) -> tuple[int, int]:
    """(inode number, link count) of ``path`` in the ext2/3/4 filesystem ``image``."""
    cp = subprocess.run([need("debugfs"), "-R", f"stat {path}", str(image)],
                        capture_output=True, text=True, check=False)
    fields = cp.stdout.replace("\t", "  ").split()
    assert "Inode:" in fields and "Links:" in fields, cp.stdout + cp.stderr
    return (int(fields[fields.index("Inode:") + 1]), int(fields[fields.index("Links:") + 1]))


# ------------------------------------------------------------------ FAT (floppy)
def fat_listing(image: Path) -> tuple[int, list[str]]:
    """``fsck.fat -n -l`` of a FAT filesystem: (exit status, the paths of the files and
    directories it checked, sorted)."""
    cp = subprocess.run([need("fsck.fat"), "-n", "-l", str(image)], capture_output=True,
                        text=True, check=False)
    names = []
    for line in cp.stdout.splitlines():
        # "Checking file /PATH (SHORT)"; the root and the volume label have no short name
        if line.startswith("Checking file /") and line.endswith(")"):
            names.append(line[len("Checking file "):line.rindex(" (")])
    return cp.returncode, sorted(names)


# ------------------------------------------------------------------ ISO 9660 (iso)
def xorriso_listing(image: Path) -> list[str]:
    """The paths in an ISO image, as ``xorriso -indev IMAGE -find /`` lists them."""
    cp = subprocess.run([need("xorriso"), "-indev", str(image), "-find", "/"],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == 0, cp.stderr
    return sorted(line.strip("'") for line in cp.stdout.splitlines() if line.startswith("'"))


def xorriso_extract(image: Path, dest: Path) -> Path:
    """Everything in an ISO image, copied out by xorriso (osirrox) into ``dest``."""
    cp = subprocess.run([need("xorriso"), "-osirrox", "on", "-indev", str(image),
                         "-extract", "/", str(dest)], capture_output=True, text=True,
                        check=False)
    assert cp.returncode == 0, cp.stderr
    return dest
