"""Tree nodes: one directory of a file-tree point.

A TREE node's payload (after the node envelope, see ``nodes``) is ``u32 LE count`` and then
``count`` entries sorted by name (raw bytes), each::

    fixed part, struct "<HBHIIqqqQQQIQQIHH" (89 bytes):
        name length, type, mode (permission bits incl. setuid/setgid/sticky), uid, gid,
        mtime ns, atime ns, ctime ns, size, st_dev, st_ino, st_nlink, rdev, hardlink group
        (0 = none), child index (0xFFFFFFFF = none), symlink target length, xattr count
    name bytes, symlink target bytes,
    per xattr: u16 name length, u32 value length, name bytes, value bytes

The child index names the entry's blob (regular file) or subtree (directory) in the node's
children. ``st_dev``/``st_ino``/``ctime`` are kept for change detection only.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

from .nodes import ChildTable, decode_node

NONE = 0xFFFFFFFF
_FIXED = struct.Struct("<HBHIIqqqQQQIQQIHH")
_XA = struct.Struct("<HI")
_U32 = struct.Struct("<I")

REG, DIR, LNK, FIFO, CHR, BLK, SOCK = 1, 2, 3, 4, 5, 6, 7
TYPE_NAMES = {REG: "file", DIR: "dir", LNK: "symlink", FIFO: "fifo", CHR: "chardev", BLK: "blockdev", SOCK: "socket"}
_S_IFMT = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, LNK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
           CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}


def type_of_mode(st_mode: int) -> int | None:
    fmt = stat.S_IFMT(st_mode)
    for t, f in _S_IFMT.items():
        if f == fmt:
            return t
    return None


@dataclass(slots=True)
class Entry:
    name: bytes
    type: int
    mode: int = 0o644          # permission bits only (st_mode & 0o7777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    dev: int = 0
    ino: int = 0
    nlink: int = 1
    rdev: int = 0
    link_group: int = 0
    ref: bytes | None = None   # blob root (REG) or subtree key (DIR)
    target: bytes = b""        # symlink target
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def st_mode(self) -> int:
        return _S_IFMT[self.type] | self.mode


def encode_tree(entries: list[Entry]) -> tuple[list[bytes], bytes]:
    """(children, payload) of a TREE node; entries are sorted here by name."""
    entries = sorted(entries, key=lambda e: e.name)
    table = ChildTable()
    parts = [_U32.pack(len(entries))]
    for e in entries:
        ref = NONE if e.ref is None else table.index(e.ref)
        parts.append(_FIXED.pack(len(e.name), e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.atime_ns,
                                 e.ctime_ns, e.size, e.dev, e.ino, e.nlink, e.rdev, e.link_group,
                                 ref, len(e.target), len(e.xattrs)))
        parts.append(e.name)
        parts.append(e.target)
        for xn, xv in e.xattrs:
            parts.append(_XA.pack(len(xn), len(xv)))
            parts.append(xn)
            parts.append(xv)
    return table.keys, b"".join(parts)


def decode_tree(raw: bytes) -> list[Entry]:
    """The entries of a TREE node, sorted by name."""
    children, payload = decode_node(raw)
    p = bytes(payload)
    (count,) = _U32.unpack_from(p)
    off = 4
    out = []
    fixed = _FIXED
    for _ in range(count):
        (nl, typ, mode, uid, gid, mt, at, ct, size, dev, ino, nlink, rdev, grp, ref, tl, nx) = fixed.unpack_from(p, off)
        off += fixed.size
        name = p[off:off + nl]
        off += nl
        target = p[off:off + tl]
        off += tl
        xattrs = []
        for _ in range(nx):
            xnl, xvl = _XA.unpack_from(p, off)
            off += _XA.size
            xattrs.append((p[off:off + xnl], p[off + xnl:off + xnl + xvl]))
            off += xnl + xvl
        out.append(Entry(name, typ, mode, uid, gid, mt, at, ct, size, dev, ino, nlink, rdev, grp,
                         None if ref == NONE else children[ref], target, xattrs))
    return out
