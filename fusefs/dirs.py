"""Directory listings: which children a directory has, name lookup, and readdir paging.

A directory inside a point is its TREE node (paged or not, see docs/FORMAT.md "Paged
directories"), read and decoded when the directory is first looked into and kept in a cache
bounded in bytes. The directories above the points (the mount's root, the groups) and a volume
point's folder come from :mod:`.folders`.

readdir offsets: 1 and 2 follow ``.`` and ``..``; ``i + 3`` follows child ``i`` in name order.
A listing is fixed when the directory is opened, so offsets stay valid for that handle.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from pointsafe.cas import IntegrityError, ObjectMissing, Safe, decode_tree, read_tree
from pointsafe.cas.tree import DIR

from .cache import ByteLRU
from .errors import DamageLog, NotADir, NotFound
from .folders import Folders, is_volume, volume_listing
from .inodes import (INO_MASK, K_ENTRY, K_GROUP, K_POINT, K_ROOT, ROOT_INO, DirRef, Handles, Inodes, Listing,
                     Node, child)


def _listing_size(raw_len: int, count: int) -> int:
    # What a decoded listing costs in resident memory, measured (tests/test_fuse_memory.py):
    # ≈ 570 B per entry as Python allocates it (Entry, name, list slots), and as much again in
    # the allocator's pools once listings come and go. Counting less lets the cache hold
    # twice its bound.
    return 4 * raw_len + 520 * count + 64


class DirHandle:
    """An open directory: its node and the listing it was opened with."""

    __slots__ = ("listing", "node")

    def __init__(self, node: Node, listing: Listing):
        self.node = node
        self.listing = listing


class Directories:
    """Listings of every kind of directory of the mount, through one byte-bounded cache."""

    def __init__(self, safe: Safe, folders: Folders, inodes: Inodes, handles: Handles,
                 damage: DamageLog, cache_bytes: int):
        self.safe = safe
        self.folders = folders
        self.inodes = inodes
        self.handles = handles
        self.damage = damage
        self.cache: ByteLRU[Listing] = ByteLRU(cache_bytes, sizeof=lambda lst: lst.size)

    def listing(self, node: Node) -> Listing:
        """The children of directory ``node``, sorted by name (loads its TREE node on first use).

        NotADir for anything else; Damaged when the directory's objects are damaged or missing."""
        if node.entry.type != DIR:
            raise NotADir(self.inodes.path(node))
        if node.kind == K_ROOT:
            return self.folders.root_listing()
        if node.kind == K_GROUP:
            return self.folders.group_listing(node.group)
        if node.kind == K_POINT and is_volume(node.point):
            return volume_listing(node)
        key = node.entry.ref
        if key is None:
            return Listing([], [])
        try:
            return self._tree_listing(key)
        except (IntegrityError, ObjectMissing, ValueError) as e:
            raise self.damage.damaged(node, e, "directory cannot be read") from None

    def _tree_listing(self, key: bytes) -> Listing:
        """The listing of the point directory whose TREE key is ``key``, through the cache."""
        return self.cache.get(key, lambda: self._load_tree(key))

    def _load_tree(self, key: bytes) -> Listing:
        raw = self.safe.get(key)
        try:
            entries = decode_tree(raw)
        except ValueError:  # a paged directory (cas/tree.py): read its pages
            entries = read_tree(lambda k: raw if k == key else self.safe.get(k), key)
        return Listing([e.name for e in entries], entries, size=_listing_size(len(raw), len(entries)),
                       dref=DirRef(key, self._tree_listing))

    def cached_listing(self, node: Node) -> Listing | None:
        """The listing of point directory ``node`` when its TREE node is cached, else None
        (nothing is loaded; the other kinds of directory are always None)."""
        if node.kind not in (K_ENTRY, K_POINT) or (node.kind == K_POINT and is_volume(node.point)):
            return None
        e = node.entry
        if e.type != DIR or e.ref is None:
            return None
        return self.cache.peek(e.ref)

    def lookup(self, parent: Node, name: bytes, lst: Listing | None = None) -> Node:
        """The child ``name`` of directory ``parent`` (not counted; NotFound when there is none),
        in ``lst`` when the caller has the listing already."""
        if lst is None:
            lst = self.listing(parent)
        i = bisect.bisect_left(lst.names, name)
        if i == len(lst.names) or lst.names[i] != name:
            raise NotFound(name.decode("utf-8", "backslashreplace"))
        return child(parent, lst, i)

    def opendir(self, node: Node) -> int:
        """A handle on directory ``node`` whose listing stays fixed until it is released."""
        return self.handles.add(DirHandle(node, self.listing(node)))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Node, int, bool]]:
        """(name, node, next offset, counted) from offset ``start``; ``.`` and ``..`` first.

        BadHandle (at once, not when iterated) for a handle that is not an open directory.
        ``counted`` is False for the dot entries: the caller remembers only the others.
        """
        h = self.handles.get(fh, DirHandle)
        assert isinstance(h, DirHandle)
        return self._entries(h.node, h.listing, start)

    def _entries(self, node: Node, lst: Listing, start: int) -> Iterator[tuple[bytes, Node, int, bool]]:
        if start == 0:
            yield b".", node, 1, False
            start = 1
        if start == 1:
            yield b"..", self.inodes.parent_of(node), 2, False
            start = 2
        if lst.kinds is not None:
            for i in range(start - 2, len(lst.names)):
                yield lst.names[i], child(node, lst, i), i + 3, True
            return
        # The hot loop of `find` and `ls -R`: child() inlined for a point's directories.
        names, entries, dref = lst.names, lst.entries, lst.dref
        pino, scope, point = node.ino, node.scope, node.point
        for i in range(start - 2, len(names)):
            e = entries[i]
            ino = hash((b"hardlink", scope, e.link_group) if e.link_group and e.type != DIR
                       else (pino, e.name)) & INO_MASK
            if ino <= ROOT_INO:
                ino += 2
            yield names[i], Node(ino, pino, K_ENTRY, e, point, scope, b"", dref, i), i + 3, True

    def releasedir(self, fh: int) -> None:
        """Close directory handle ``fh``."""
        self.handles.release(fh)
