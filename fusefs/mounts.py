"""Reading /proc/self/mountinfo: is a path a mount, and is it ours?

Our mounts carry the FUSE subtype ``pointsafe``, so their filesystem type reads
``fuse.pointsafe``; ``umount`` refuses anything else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FSTYPE = "fuse.pointsafe"
_ESC = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESC.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo: the mount's id, device (major:minor), mount point, type and source."""
    mount_id: int
    device: str         # "major:minor"
    mountpoint: str
    fstype: str
    source: str


def mounts() -> list[MountInfo]:
    """Every mount this process sees, in /proc/self/mountinfo order (later ones on top)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            try:
                sep = parts.index("-", 6)
            except ValueError:
                continue
            out.append(MountInfo(int(parts[0]), parts[2], _unescape(parts[4]), parts[sep + 1],
                                 _unescape(parts[sep + 2]) if len(parts) > sep + 2 else ""))
    return out


def mount_at(path: str, resolve: bool = True) -> MountInfo | None:
    """The topmost mount at exactly ``path``, or None.

    ``resolve=False`` when ``path`` is already absolute and free of symlinks: resolving stats
    the path, which a FUSE daemon must never do on its own mount point from its serving thread.
    """
    real = os.path.realpath(path) if resolve else path
    found = None
    for m in mounts():
        if m.mountpoint == real:
            found = m       # later lines are mounted on top of earlier ones
    return found


def raise_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the mount's read-ahead so the kernel sends 1 MiB+ reads. True if done.

    By default the kernel reads a FUSE file in 128 KiB requests, which caps even a trivial
    in-memory pyfuse3 filesystem near 1.6 GB/s here; with 1024-4096 in the mount's
    ``/sys/class/bdi/<major:minor>/read_ahead_kb`` it reached about 4.2 GB/s (docs/BENCHMARKS.md,
    Mount).

    ``mountpoint`` must be resolved already (see ``mount_at``).
    """
    m = mount_at(mountpoint, resolve=False)
    if m is None or kb <= 0:
        return False
    try:
        with open(f"/sys/class/bdi/{m.device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        return True
    except OSError:
        return False
