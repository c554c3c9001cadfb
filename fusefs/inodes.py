"""Nodes as the kernel sees them: inode numbers, attributes, the inode table and open handles.

Inode numbers are computed, not stored: ``hash(parent inode, name)``, or for a hardlinked
file ``hash(point folder inode, link group)`` so that every name of one hardlink group has
the same inode number. Only the nodes the kernel currently knows (lookup count > 0) are kept
in the inode table; ``forget`` drops them. A node of a point's file is small (its attributes
stay in the directory cache, see :class:`DirRef`), so a kernel that holds every inode of a
100,000-file point costs the mount a few MiB, not the attributes of every file again. A
number therefore stays the same for the life of the mount even when the kernel forgets and
looks a node up again.

Threads: every method may be called from any thread; each table has its own lock.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple

from pointsafe.cas import Entry, Point
from pointsafe.cas.tree import DIR, LNK

from .errors import BadHandle, NotFound

ROOT_INO = 1

# Node kinds
K_ROOT, K_GROUP, K_LINK, K_POINT, K_ENTRY, K_IMAGE = range(6)
VIRTUAL = (K_ROOT, K_GROUP, K_LINK)

INO_MASK = (1 << 63) - 1
_new_tuple = tuple.__new__


class DirRef:
    """Where a point directory's entries are: its TREE key and the directory cache that loads it.

    Nodes of a point's files keep this (shared by all children of one directory) and their
    index in the listing instead of their own copy of the attributes, so that a node the kernel
    holds costs a few dozen bytes and the attributes live once, in the byte-bounded directory
    cache (reloaded if it evicted them)."""

    __slots__ = ("key", "load")

    def __init__(self, key: bytes, load: "Callable[[bytes], Listing]"):
        self.key = key
        self.load = load

    def entry(self, i: int) -> Entry:
        """Entry ``i`` of the directory's listing (loads the listing if it is not cached)."""
        return self.load(self.key).entries[i]


class Node:
    """One file, directory or link of the mount, with the attributes the kernel is shown.

    A node made outside a point's directories (the root, groups, point folders, links, a
    volume's image) holds its ``Entry``. A node of a point's directory holds it only until it
    enters the inode table (:meth:`compact`); from then on ``entry`` is read through its
    directory's :class:`DirRef`."""

    __slots__ = ("ino", "parent", "kind", "point", "scope", "group", "nlookup", "_entry", "dref", "idx")

    def __init__(self, ino: int, parent: int, kind: int, entry: Entry | None, point: Point | None,
                 scope: int, group: bytes = b"", dref: DirRef | None = None, idx: int = 0):
        self.ino = ino
        self.parent = parent
        self.kind = kind
        self._entry = entry
        self.point = point      # the point this node belongs to
        self.scope = scope      # inode of the point's folder (hardlink scope); 0 outside points
        self.group = group      # K_GROUP: the group's name
        self.dref = dref
        self.idx = idx
        self.nlookup = 0

    @property
    def entry(self) -> Entry:
        """The node's attributes (name, type, mode, times, size, content key, xattrs)."""
        e = self._entry
        if e is not None:
            return e
        assert self.dref is not None   # compact() keeps the entry of nodes without one
        return self.dref.entry(self.idx)

    @property
    def name(self) -> bytes:
        """The node's name in its directory."""
        return self.entry.name

    def compact(self) -> None:
        """Drop the node's own copy of its attributes when its directory can give them again."""
        if self.dref is not None:
            self._entry = None


class Stat(NamedTuple):
    """The attributes of a node (what ``stat`` shows)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    virtual: bool           # may change while mounted (point list), cache it briefly


@dataclass(slots=True)
class Listing:
    """One directory's children, sorted by name. ``kinds``/``points`` None: all K_ENTRY of the parent's point."""

    names: list[bytes]
    entries: list[Entry]
    kinds: list[int] | None = None
    points: list[Point | None] | None = None
    groups: list[bytes] | None = None
    size: int = 0           # estimated memory, for the directory cache's byte bound
    dref: DirRef | None = None   # a point directory's: where its children's nodes find their entries


def make_listing(items: list[tuple[bytes, Entry, int, Point | None, bytes]]) -> Listing:
    """A listing of made-up children: (name, entry, kind, point, group) each, sorted here by name."""
    items.sort(key=lambda t: t[0])
    return Listing([t[0] for t in items], [t[1] for t in items], [t[2] for t in items],
                   [t[3] for t in items], [t[4] for t in items])


def hash_ino(*parts: bytes | int) -> int:
    """A stable inode number (> ROOT_INO) for ``parts``."""
    # Python's hash of a tuple of ints and bytes is SipHash-based and stable for the life of
    # the process, which is exactly as long as inode numbers must stay the same.
    n = hash(parts) & INO_MASK
    return n if n > ROOT_INO else n + 2


def child(parent: Node, lst: Listing, i: int) -> Node:
    """The node of child ``i`` of ``lst``, the listing of ``parent`` (not yet in the table)."""
    e = lst.entries[i]
    kind = K_ENTRY if lst.kinds is None else lst.kinds[i]
    point = parent.point if lst.points is None else lst.points[i]
    if kind == K_ENTRY and e.link_group and e.type != DIR:
        ino = hash_ino(b"hardlink", parent.scope, e.link_group)
    else:
        ino = hash_ino(parent.ino, e.name)
    scope = ino if kind == K_POINT else parent.scope
    return Node(ino, parent.ino, kind, e, point, scope, lst.groups[i] if lst.groups is not None else b"",
                lst.dref, i)


def stat(node: Node) -> Stat:
    """The attributes of ``node``."""
    e = node.entry
    if node.kind == K_ENTRY:
        nlink = e.nlink or 1
    elif e.type == DIR:
        nlink = max(e.nlink, 2)
    else:
        nlink = 1
    size = len(e.target) if e.type == LNK else e.size
    # tuple.__new__: a NamedTuple's own constructor costs a Python call per entry of `find`
    return _new_tuple(Stat, (node.ino, e.st_mode, nlink, e.uid, e.gid, e.rdev, size,
                             (size + 511) // 512, e.atime_ns, e.mtime_ns, e.ctime_ns,
                             node.kind != K_ENTRY and node.kind != K_IMAGE))


def fill(node: Node, a) -> bool:
    """Set ``a``'s st_* attributes for ``node`` (the fast form of :func:`stat`, used for every
    entry of a directory listing). Returns True when the node is virtual (may change while
    mounted, so it should be cached only briefly)."""
    e = node.entry
    kind = node.kind
    a.st_ino = node.ino
    a.st_mode = e.st_mode
    if kind == K_ENTRY:
        a.st_nlink = e.nlink or 1
    elif e.type == DIR:
        a.st_nlink = max(e.nlink, 2)
    else:
        a.st_nlink = 1
    a.st_uid = e.uid
    a.st_gid = e.gid
    a.st_rdev = e.rdev
    size = len(e.target) if e.type == LNK else e.size
    a.st_size = size
    a.st_blocks = (size + 511) // 512
    a.st_atime_ns = e.atime_ns
    a.st_mtime_ns = e.mtime_ns
    a.st_ctime_ns = e.ctime_ns
    return kind != K_ENTRY and kind != K_IMAGE


class Inodes:
    """The nodes the kernel knows, by inode number, with their lookup counts.

    The root is always known. A node enters with its first :meth:`remember` and leaves when
    :meth:`forget` brings its count to zero, so the table holds what the kernel holds, no more.
    """

    def __init__(self, root: Node):
        root.nlookup = 1
        self.table: dict[int, Node] = {ROOT_INO: root}
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.table)

    def node(self, ino: int) -> Node:
        """The known node ``ino``; NotFound when the kernel does not hold it."""
        with self.lock:
            n = self.table.get(ino)
        if n is None:
            raise NotFound(f"inode {ino} is not known")
        return n

    def parent_of(self, node: Node) -> Node:
        """The parent of ``node`` if known, else ``node`` itself (the root is its own parent)."""
        with self.lock:
            return self.table.get(node.parent, node)

    def remember(self, node: Node) -> Node:
        """Count one kernel lookup of ``node``; returns the node the table holds for its inode."""
        with self.lock:
            have = self.table.get(node.ino)
            if have is None:
                self.table[node.ino] = have = node
                node.compact()
            have.nlookup += 1
            return have

    def remember_many(self, nodes: list[Node]) -> None:
        """:meth:`remember` for each of ``nodes`` (one lock for a whole readdir reply)."""
        with self.lock:
            table = self.table
            for node in nodes:
                have = table.get(node.ino)
                if have is None:
                    table[node.ino] = have = node
                    node.compact()
                have.nlookup += 1

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` lookups of ``ino``; the node leaves the table at zero (never the root)."""
        with self.lock:
            node = self.table.get(ino)
            if node is None or ino == ROOT_INO:
                return
            node.nlookup -= n
            if node.nlookup <= 0:
                del self.table[ino]

    def path(self, node: Node) -> str:
        """A readable path of ``node`` below the mount point (for warnings)."""
        parts = []
        seen = 0
        with self.lock:
            while node.ino != ROOT_INO and seen < 4096:
                parts.append(node.name.decode("utf-8", "backslashreplace"))
                up = self.table.get(node.parent)
                if up is None:
                    parts.append("...")
                    break
                node, seen = up, seen + 1
        return "/" + "/".join(reversed(parts))


class Handles:
    """Open file and directory handles by number; numbers are never reused during a mount."""

    def __init__(self) -> None:
        self.open: dict[int, object] = {}
        self.numbers = itertools.count(1)
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.open)

    def add(self, handle: object) -> int:
        """Keep ``handle``; returns its new number."""
        with self.lock:
            fh = next(self.numbers)
            self.open[fh] = handle
        return fh

    def get(self, fh: int, kind: type) -> object:
        """The open handle ``fh``, which must be a ``kind``; BadHandle otherwise."""
        with self.lock:
            h = self.open.get(fh)
        if not isinstance(h, kind):
            raise BadHandle(str(fh))
        return h

    def release(self, fh: int) -> None:
        """Forget handle ``fh`` (a handle released twice is no error)."""
        with self.lock:
            self.open.pop(fh, None)
