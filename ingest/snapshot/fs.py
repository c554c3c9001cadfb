"""What the machine says about a path: its filesystem type, its mount, its btrfs subvolume."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

BTRFS = 0x9123683E
XFS = 0x58465342
FS_NAMES = {BTRFS: "btrfs", XFS: "xfs", 0xEF53: "ext4", 0x01021994: "tmpfs", 0x794C7630: "overlayfs",
            0x6969: "nfs", 0x65735546: "fuse", 0x2FC12FC1: "zfs"}
SUBVOL_ROOT_INO = 256          # every btrfs subvolume's top directory has this inode number
EMPTY_SUBVOL_INO = 2           # a nested subvolume seen inside a snapshot: an empty stand-in

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def fs_type(path: str | os.PathLike[str]) -> int:
    """The filesystem magic number (statfs ``f_type``) of the filesystem holding ``path``;
    OSError when it cannot be asked."""
    buf = ctypes.create_string_buffer(256)      # struct statfs is 120 bytes on x86-64, f_type first
    if _libc.statfs(os.fsencode(os.fspath(path)), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_name(path: str | os.PathLike[str]) -> str:
    """A readable name of the filesystem holding ``path`` ("btrfs", "ext4", ... or its magic in hex)."""
    try:
        t = fs_type(path)
    except OSError:
        return "unknown"
    return FS_NAMES.get(t, f"0x{t:x}")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what device, which filesystem, its options."""
    mountpoint: str
    device: str
    fstype: str
    options: str


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape") if "\\" in s else s


def mounts() -> list[Mount]:
    """The mounts this process sees, in mount order."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                a, b = left.split(), right.split()
                if len(a) < 6 or len(b) < 2:
                    continue
                out.append(Mount(_unescape(a[4]), _unescape(b[1]), b[0], a[5] + "," + (b[2] if len(b) > 2 else "")))
    except OSError:
        pass
    return out


def mount_of(path: str | os.PathLike[str]) -> Mount | None:
    """The mount that holds ``path`` (the longest mount point above it; the last one mounted wins)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts():
        mp = m.mountpoint
        if real == mp or real.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mountpoint):
                best = m
    return best


def mounts_below(path: str | os.PathLike[str]) -> list[str]:
    """Mount points strictly below the directory ``path``."""
    real = os.path.realpath(path).rstrip("/") + "/"
    return sorted({m.mountpoint for m in mounts() if m.mountpoint.startswith(real) and m.mountpoint != real})


def subvolume_root(path: Path) -> Path | None:
    """The top directory of the btrfs subvolume holding ``path`` (a directory, or a file's
    directory); None when ``path`` is not on btrfs."""
    p = path if path.is_dir() else path.parent
    try:
        if fs_type(p) != BTRFS:
            return None
        dev = os.stat(p).st_dev
        while os.stat(p).st_ino != SUBVOL_ROOT_INO:
            up = p.parent
            if up == p or os.stat(up).st_dev != dev:
                return None
            p = up
    except OSError:
        return None
    return p
