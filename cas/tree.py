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

A large directory (more than ``PAGE_THRESHOLD`` entries) is *paged*: its entries are split
into leaf TREE nodes at content-defined boundaries (after a name whose BLAKE3 hash has a zero
low byte, with 32..1024 entries per page), and the directory's key is an index TREE node
whose payload is ``u32 0xFFFFFFFF``, ``u32 page count``, then per page ``u32 child index,
u32 entry count, u16 first-name length, first name``. Adding or changing one file in a
directory of 100,000 entries rewrites one page and the index, not the whole directory, and a
reader can find a name by reading the index and one page. Use :func:`read_tree` (or
:func:`find_entry`) rather than :func:`decode_tree` on a directory key.
"""

from __future__ import annotations

import bisect
import stat
import struct
from typing import Callable

import blake3
from dataclasses import dataclass, field

from .nodes import ChildTable, decode_node

NONE = 0xFFFFFFFF
_FIXED = struct.Struct("<HBHIIqqqQQQIQQIHH")
_XA = struct.Struct("<HI")
_U32 = struct.Struct("<I")
_PAGE = struct.Struct("<IIH")
PAGED = 0xFFFFFFFF
PAGE_THRESHOLD = 512
PAGE_MIN, PAGE_MAX = 32, 1024

REG, DIR, LNK, FIFO, CHR, BLK, SOCK = 1, 2, 3, 4, 5, 6, 7
TYPE_NAMES = {REG: "file", DIR: "dir", LNK: "symlink", FIFO: "fifo", CHR: "chardev", BLK: "blockdev", SOCK: "socket"}
_S_IFMT = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, LNK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
           CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, SOCK: stat.S_IFSOCK}


def type_of_mode(st_mode: int) -> int | None:
    """The entry type of a file's ``st_mode`` (REG, DIR, ...), or None for a type trees do not hold."""
    fmt = stat.S_IFMT(st_mode)
    for t, f in _S_IFMT.items():
        if f == fmt:
            return t
    return None


@dataclass(slots=True)
class Entry:
    """One directory entry of a TREE node: name, type, metadata and its content's key."""

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
        """The full ``st_mode``: file type bits and permission bits."""
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
    """The entries of a leaf TREE node, sorted by name (ValueError for a paged index node)."""
    children, payload = decode_node(raw)
    p = bytes(payload)
    (count,) = _U32.unpack_from(p)
    if count == PAGED:
        raise ValueError("a paged directory index: read it with read_tree()")
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


def _boundary(name: bytes) -> bool:
    return blake3.blake3(name).digest(1)[0] == 0


def split_pages(entries: list[Entry]) -> list[list[Entry]]:
    """Content-defined pages of a sorted entry list (boundaries depend on names only)."""
    pages, cur = [], []
    for e in entries:
        cur.append(e)
        if len(cur) >= PAGE_MAX or (len(cur) >= PAGE_MIN and _boundary(e.name)):
            pages.append(cur)
            cur = []
    if cur:
        if pages and len(cur) < PAGE_MIN:
            pages[-1].extend(cur)
        else:
            pages.append(cur)
    return pages


def build_tree(put_node: Callable[[int, list[bytes], bytes], bytes], entries: list[Entry]) -> bytes:
    """Store a directory (paged when large) through ``put_node``; return its key."""
    from .keys import Kind
    entries = sorted(entries, key=lambda e: e.name)
    if len(entries) <= PAGE_THRESHOLD:
        return put_node(Kind.TREE, *encode_tree(entries))
    table = ChildTable()
    parts = []
    pages = split_pages(entries)
    for page in pages:
        key = put_node(Kind.TREE, *encode_tree(page))
        first = page[0].name
        parts.append(_PAGE.pack(table.index(key), len(page), len(first)))
        parts.append(first)
    payload = _U32.pack(PAGED) + _U32.pack(len(pages)) + b"".join(parts)
    return put_node(Kind.TREE, table.keys, payload)


def tree_pages(raw: bytes) -> list[tuple[bytes, int, bytes]] | None:
    """(page key, entry count, first name) per page of a paged index node; None for a leaf."""
    children, payload = decode_node(raw)
    p = bytes(payload)
    if _U32.unpack_from(p)[0] != PAGED:
        return None
    (n,) = _U32.unpack_from(p, 4)
    off = 8
    out = []
    for _ in range(n):
        idx, count, nl = _PAGE.unpack_from(p, off)
        off += _PAGE.size
        out.append((children[idx], count, p[off:off + nl]))
        off += nl
    return out


def read_tree(get: Callable[[bytes], bytes], key: bytes) -> list[Entry]:
    """Every entry of the directory ``key`` (paged or not), sorted by name."""
    raw = get(key)
    pages = tree_pages(raw)
    if pages is None:
        return decode_tree(raw)
    out: list[Entry] = []
    for k, _, _ in pages:
        out.extend(decode_tree(get(k)))
    return out


def find_entry(get: Callable[[bytes], bytes], key: bytes, name: bytes) -> Entry | None:
    """The entry ``name`` of directory ``key``, reading at most the index and one page."""
    raw = get(key)
    pages = tree_pages(raw)
    if pages is not None:
        i = bisect.bisect_right([first for _, _, first in pages], name) - 1
        if i < 0:
            return None
        raw = get(pages[i][0])
    for e in decode_tree(raw):
        if e.name == name:
            return e
    return None
