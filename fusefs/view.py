"""A synchronous, typed, read-only view of recovery points: what the mount shows.

The pyfuse3 adapter (``ops``) only translates FUSE requests into calls of this class and its
exceptions into errno values; everything a user can observe is decided here, so it can be
used and tested without FUSE.

Laziness. Nothing is read at construction but the point list. A directory's TREE node is
read and decoded when the directory is first looked into, and kept in a cache bounded in
bytes; file data is read per request through a shared chunk cache (``objects``).

Inode numbers are computed, not stored: ``hash(parent inode, name)``, or for a hardlinked
file ``hash(point folder inode, link group)`` so that every name of one hardlink group has
the same inode number. Only the nodes the kernel currently knows (lookup count > 0) are kept
in the inode table; ``forget`` drops them. A number therefore stays the same for the life of
the mount even when the kernel forgets and looks a node up again.

Threads: every public method may be called from any thread. The tables are guarded by one
lock; loading objects happens outside it.
"""

from __future__ import annotations

import bisect
import gc
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from pointsafe.cas import BlobReader, Entry, IntegrityError, Kind, NodeCache, ObjectMissing, Point, Safe, decode_tree, read_tree
from pointsafe.cas.tree import DIR, LNK, REG

from .cache import ByteLRU
from .layout import LATEST, Layout, image_name
from .objects import ChunkSource

log = logging.getLogger("pointsafe.mount")

ROOT_INO = 1
STATS_XATTR = b"user.pointsafe.stats"

# Node kinds
K_ROOT, K_GROUP, K_LINK, K_POINT, K_ENTRY, K_IMAGE = range(6)
VIRTUAL = (K_ROOT, K_GROUP, K_LINK)


class ViewError(Exception):
    """Base of what the view reports to the adapter; each maps to one errno there."""


class NotFound(ViewError):
    pass


class NotADir(ViewError):
    pass


class IsADir(ViewError):
    pass


class NotALink(ViewError):
    pass


class NoAttr(ViewError):
    pass


class ReadOnly(ViewError):
    pass


class Damaged(ViewError):
    """Stored data is damaged or missing; the message names the file. Never wrong bytes."""


class BadHandle(ViewError):
    pass


class _WouldLoad(Exception):
    """A cached-only read needs something that is not cached."""


_local = threading.local()
_new_tuple = tuple.__new__


@dataclass(slots=True, eq=False)
class Node:
    ino: int
    parent: int
    name: bytes
    kind: int
    entry: Entry            # attributes (made up for virtual nodes)
    point: Point | None     # the point this node belongs to
    scope: int              # inode of the point's folder (hardlink scope); 0 outside points
    group: bytes = b""      # K_GROUP: the group's name
    nlookup: int = 0


class Stat(NamedTuple):
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


_INO_MASK = (1 << 63) - 1


def _hash_ino(*parts: bytes | int) -> int:
    # Python's hash of a tuple of ints and bytes is SipHash-based and stable for the life of
    # the process, which is exactly as long as inode numbers must stay the same.
    n = hash(parts) & _INO_MASK
    return n if n > ROOT_INO else n + 2


def _listing_size(raw_len: int, count: int) -> int:
    # A decoded Entry costs far more than its encoding; an honest estimate keeps the bound real.
    return 2 * raw_len + 260 * count + 64


class FileHandle:
    """An open file: a blob reader plus the state of its sequential-read detection."""

    __slots__ = ("node", "path", "blob", "next_off", "streak", "ra_end", "lock")

    def __init__(self, node: Node, path: str, blob: BlobReader):
        self.node = node
        self.path = path
        self.blob = blob
        self.next_off = 0
        self.streak = 0
        self.ra_end = 0
        self.lock = threading.Lock()


class View:
    """Read-only view of one point (``point`` given) or of every point in ``safe``."""

    def __init__(self, safe: Safe, point: Point | None = None, *, chunk_cache_bytes: int = 256 << 20,
                 dir_cache_bytes: int = 64 << 20, readahead_bytes: int = 8 << 20,
                 refresh_seconds: float = 1.0):
        self.safe = safe
        self.chunks = ChunkSource(safe, chunk_cache_bytes)
        self.dirs: ByteLRU[Listing] = ByteLRU(dir_cache_bytes, sizeof=lambda lst: lst.size)
        self.nodes = NodeCache(1024)   # decoded LIST nodes of open files: ≤ ~20 KiB each, ≤ ~20 MiB
        self.readahead_bytes = readahead_bytes
        self.refresh_seconds = refresh_seconds
        self.lock = threading.RLock()
        self.table: dict[int, Node] = {}
        self.handles: dict[int, FileHandle | tuple[Node, Listing]] = {}
        self._next_fh = 1
        self._layout: Layout | None = None
        self._layout_at = 0.0
        self._warned: set[tuple[int, str]] = set()
        self._prefetch = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readahead")
        self.mounted_ns = time.time_ns()
        self.readdirs = 0           # readdir requests served
        self.lookups = 0
        self.getattrs = 0
        self.reads = 0              # read requests served, and their bytes (for benchmarks)
        self.read_bytes = 0
        uid, gid = os.getuid(), os.getgid()
        if point is None:
            root_entry = Entry(b"", DIR, 0o555, uid, gid, self.mounted_ns, self.mounted_ns, self.mounted_ns, nlink=2)
            root = Node(ROOT_INO, ROOT_INO, b"", K_ROOT, root_entry, None, 0)
        else:
            root = Node(ROOT_INO, ROOT_INO, b"", K_POINT, self._point_entry(point, b""), point, ROOT_INO)
        root.nlookup = 1
        self.table[ROOT_INO] = root

    def close(self) -> None:
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        self.chunks.close()

    # -- the point list -----------------------------------------------------------------

    def layout(self) -> Layout:
        """The whole-safe layout, re-read at most every ``refresh_seconds`` (new backups appear)."""
        now = time.monotonic()
        with self.lock:
            if self._layout is not None and now - self._layout_at < self.refresh_seconds:
                return self._layout
        with self.lock:
            shown = self._layout.by_id if self._layout is not None else None
        lay = Layout.build(self.safe.points(), keep=shown)
        with self.lock:
            self._layout, self._layout_at = lay, now
        return lay

    def _point_entry(self, p: Point, name: bytes) -> Entry:
        """The attributes of a point's folder: its tree's top directory, or made up for a volume."""
        fin = p.taken_ns
        if p.kind == "volume":
            return Entry(name, DIR, 0o555, os.getuid(), os.getgid(), fin, fin, fin, nlink=2)
        return p.root_entry(name)

    # -- nodes ----------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        with self.lock:
            n = self.table.get(ino)
        if n is None:
            raise NotFound(f"inode {ino} is not known")
        return n

    def stat(self, node: Node) -> Stat:
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

    def fill(self, node: Node, a) -> bool:
        """Set ``a``'s st_* attributes for ``node`` (the fast form of :meth:`stat`, used for
        every entry of a directory listing). Returns True when the node is virtual (may
        change while mounted, so it should be cached only briefly)."""
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

    def getattr(self, ino: int) -> Stat:
        self.getattrs += 1
        return self.stat(self.node(ino))

    def _child(self, parent: Node, lst: Listing, i: int) -> Node:
        e = lst.entries[i]
        kind = K_ENTRY if lst.kinds is None else lst.kinds[i]
        point = parent.point if lst.points is None else lst.points[i]
        if kind == K_ENTRY and e.link_group and e.type != DIR:
            ino = _hash_ino(b"hardlink", parent.scope, e.link_group)
        else:
            ino = _hash_ino(parent.ino, e.name)
        scope = ino if kind == K_POINT else parent.scope
        return Node(ino, parent.ino, e.name, kind, e, point, scope,
                    lst.groups[i] if lst.groups is not None else b"")

    def remember(self, node: Node) -> Node:
        """Count one kernel lookup of ``node``; returns the node the table holds for its inode."""
        with self.lock:
            have = self.table.get(node.ino)
            if have is None:
                self.table[node.ino] = have = node
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
                have.nlookup += 1

    def forget(self, ino: int, n: int) -> None:
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

    def _damaged(self, node: Node, err: Exception, what: str) -> Damaged:
        msg = f"{self.path(node)}: {what}: {err}"
        key = (node.ino, str(err))
        with self.lock:
            fresh = key not in self._warned
            if fresh:
                if len(self._warned) > 10000:
                    self._warned.clear()
                self._warned.add(key)
        if fresh:
            log.warning("damaged data: %s", msg)
        return Damaged(msg)

    # -- directories ----------------------------------------------------------------------

    def listing(self, node: Node) -> Listing:
        """The children of a directory node (loads its TREE node on first use)."""
        if node.entry.type != DIR:
            raise NotADir(self.path(node))
        if node.kind == K_ROOT:
            return self._root_listing()
        if node.kind == K_GROUP:
            return self._group_listing(node.group)
        p = node.point
        if node.kind == K_POINT and p is not None and p.kind == "volume":
            size = p.size
            fin = node.entry.mtime_ns
            img = Entry(image_name(p), REG, 0o444, node.entry.uid, node.entry.gid, fin, fin, fin,
                        size=size, nlink=1, ref=p.root)
            return Listing([img.name], [img], [K_IMAGE], [p])
        key = node.entry.ref
        if key is None:
            return Listing([], [])
        try:
            return self.dirs.get(key, lambda: self._load_tree(key))
        except (IntegrityError, ObjectMissing, ValueError) as e:
            raise self._damaged(node, e, "directory cannot be read") from None

    def _load_tree(self, key: bytes) -> Listing:
        raw = self.safe.get(key)
        try:
            entries = decode_tree(raw)
        except ValueError:  # a paged directory (cas/tree.py): read its pages
            entries = read_tree(lambda k: raw if k == key else self.safe.get(k), key)
        return Listing([e.name for e in entries], entries, size=_listing_size(len(raw), len(entries)))

    def _root_listing(self) -> Listing:
        lay = self.layout()
        items: list[tuple[bytes, Entry, int, Point | None, bytes]] = []
        for name, p in lay.folders:
            items.append((name, self._point_entry(p, name), K_POINT, p, b""))
        for g, members in lay.groups.items():
            t = max(p.taken_ns for _, p in members)
            e = Entry(g, DIR, 0o555, os.getuid(), os.getgid(), t, t, t, nlink=2)
            items.append((g, e, K_GROUP, None, g))
        latest = lay.latest_name()
        if latest is not None:
            items.append((LATEST, self._link(LATEST, latest), K_LINK, None, b""))
        return _make_listing(items)

    def _group_listing(self, group: bytes) -> Listing:
        lay = self.layout()
        members = lay.groups.get(group, [])
        items = [(name, self._point_entry(p, name), K_POINT, p, b"") for name, p in members]
        latest = lay.latest_name(group)
        if latest is not None:
            items.append((LATEST, self._link(LATEST, latest), K_LINK, None, b""))
        return _make_listing(items)

    def _link(self, name: bytes, target: bytes) -> Entry:
        t = self.mounted_ns
        return Entry(name, LNK, 0o777, os.getuid(), os.getgid(), t, t, t, target=target)

    def lookup(self, parent_ino: int, name: bytes) -> Node:
        """The child ``name`` of directory ``parent_ino``, counted as one kernel lookup."""
        self.lookups += 1
        parent = self.node(parent_ino)
        if name == b".":
            return self.remember(parent)
        if name == b"..":
            return self.remember(self.node(parent.parent))
        lst = self.listing(parent)
        i = bisect.bisect_left(lst.names, name)
        if i == len(lst.names) or lst.names[i] != name:
            raise NotFound(name.decode("utf-8", "backslashreplace"))
        return self.remember(self._child(parent, lst, i))

    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        lst = self.listing(node)
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = (node, lst)  # type: ignore[assignment]
        return fh

    def readdir(self, fh: int, start: int):
        """Yield (name, child node, next offset) from offset ``start``; ``.`` and ``..`` first.

        The caller calls :meth:`remember` for each child it hands to the kernel (not for the
        dot entries).
        """
        with self.lock:
            h = self.handles.get(fh)
        if not isinstance(h, tuple):
            raise BadHandle(str(fh))
        self.readdirs += 1
        node, lst = h
        if start == 0:
            yield b".", node, 1, False
            start = 1
        if start == 1:
            yield b"..", self.table.get(node.parent, node), 2, False
            start = 2
        if lst.kinds is not None:
            for i in range(start - 2, len(lst.names)):
                yield lst.names[i], self._child(node, lst, i), i + 3, True
            return
        # The hot loop of `find` and `ls -R`: _child() inlined for a point's directories.
        names, entries = lst.names, lst.entries
        pino, scope, point = node.ino, node.scope, node.point
        for i in range(start - 2, len(names)):
            e = entries[i]
            ino = hash((b"hardlink", scope, e.link_group) if e.link_group and e.type != DIR
                       else (pino, e.name)) & _INO_MASK
            if ino <= ROOT_INO:
                ino += 2
            yield names[i], Node(ino, pino, e.name, K_ENTRY, e, point, scope), i + 3, True

    def releasedir(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.entry.type != LNK:
            raise NotALink(self.path(node))
        return node.entry.target

    # -- extended attributes --------------------------------------------------------------

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        node = self.node(ino)
        if node.kind in (K_ENTRY, K_POINT):
            return list(node.entry.xattrs)
        return []

    def getxattr(self, ino: int, name: bytes) -> bytes:
        for n, v in self.xattrs(ino):
            if n == name:
                return v
        if ino == ROOT_INO and name == STATS_XATTR:
            return json.dumps(self.stats(), sort_keys=True).encode()
        raise NoAttr(name.decode("utf-8", "backslashreplace"))

    def stats(self) -> dict:
        """Counters for tests and benchmarks (the hidden root xattr ``user.pointsafe.stats``)."""
        with self.lock:
            inodes = len(self.table)
        return {"objects_read": self.safe.objects_read, "inodes": inodes,
                "chunk_cache_bytes": self.chunks.cache.bytes, "dir_cache_bytes": self.dirs.bytes,
                "chunk_cache_hits": self.chunks.cache.hits, "chunk_cache_misses": self.chunks.cache.misses,
                "reads": self.reads, "read_bytes": self.read_bytes, "readdirs": self.readdirs,
                "lookups": self.lookups, "getattrs": self.getattrs,
                "gc_collections": [g["collections"] for g in gc.get_stats()]}

    def statfs(self) -> dict:
        packs = self.safe.pack_entries()
        used = sum(pe.committed_len for pe in packs.values())
        try:
            st = os.statvfs(self.safe.path)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        bs = 4096
        return {"bsize": bs, "blocks": (used + free) // bs, "bfree": free // bs, "bavail": free // bs,
                "files": len(self.table), "ffree": 0, "namemax": 255}

    # -- files ----------------------------------------------------------------------------

    def open(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly(self.path(node))
        if node.entry.type == DIR:
            raise IsADir(self.path(node))
        if node.entry.type != REG:
            raise NotFound(self.path(node))   # fifos and devices never reach the filesystem
        e = node.entry
        path = self.path(node)
        try:
            kind_of = (lambda k: self._kind(k)) if e.ref is not None else (lambda k: Kind.CHUNK)
            blob = BlobReader(e.ref, e.size, self._get_node, kind_of, nodes=self.nodes)
        except (IntegrityError, ObjectMissing) as err:
            raise self._damaged(node, err, "file cannot be opened") from None
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = FileHandle(node, path, blob)
        return fh

    def _kind(self, key: bytes) -> int:
        ent = self.safe.entry(key)
        if ent is None:
            raise ObjectMissing(f"object {key.hex()[:12]} is not in the safe")
        return ent.kind

    def _get_node(self, key: bytes) -> bytes:
        if getattr(_local, "cached_only", False):
            raise _WouldLoad()
        return self.safe.get(key)

    def release(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def _handle(self, fh: int) -> FileHandle:
        with self.lock:
            h = self.handles.get(fh)
        if not isinstance(h, FileHandle):
            raise BadHandle(str(fh))
        return h

    def read(self, fh: int, off: int, size: int, cached_only: bool = False) -> bytes | memoryview | None:
        """Bytes [off, off+size) of an open file; Damaged (and a warning) when they cannot be had.

        With ``cached_only`` nothing is loaded: the answer is None unless every piece is in the
        caches already. The adapter tries that on its own thread first (the read-ahead usually
        has the chunks ready) and hops to a worker thread only when something must be loaded.
        """
        h = self._handle(fh)
        blob = h.blob
        end = min(off + size, blob.size)
        if off >= end:
            return b""
        try:
            if cached_only:
                _local.cached_only = True
                try:
                    out = self._read_range(blob, off, end, cached_only=True)
                except _WouldLoad:
                    return None
                finally:
                    _local.cached_only = False
            else:
                out = self._read_range(blob, off, end)
        except (IntegrityError, ObjectMissing, ValueError) as err:
            raise self._damaged(h.node, err, f"read at offset {off}") from None
        self._sequential(h, off, end)
        self.reads += 1
        self.read_bytes += len(out)
        return out

    def _read_range(self, blob: BlobReader, off: int, end: int, cached_only: bool = False) -> bytes | memoryview:
        exts = list(blob.extents(off, end))
        keys = [k for _, _, k in exts if k is not None]
        if cached_only:
            data = self.chunks.peek_many(keys)
            if data is None:
                raise _WouldLoad()
        else:
            data = self.chunks.get_many(keys) if keys else {}
        parts: list[bytes | memoryview] = []
        for lo, length, k in exts:
            a = max(off, lo) - lo
            b = min(end, lo + length) - lo
            if k is None:
                parts.append(bytes(b - a))
                continue
            chunk = data[k]
            if len(chunk) != length:
                raise IntegrityError(f"chunk {k.hex()[:12]} holds {len(chunk)} bytes, the file's list says {length}")
            parts.append(memoryview(chunk)[a:b] if (a, b) != (0, len(chunk)) else chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _sequential(self, h: FileHandle, off: int, end: int) -> None:
        """Detect a sequential reader and load the next chunks ahead of it in the background."""
        if self.readahead_bytes <= 0:
            return
        with h.lock:
            # Kernel read-ahead requests may arrive a little out of order: "near" is sequential.
            near = abs(off - h.next_off) <= max(4 * (end - off), 1 << 20)
            if near:
                h.streak += 1
                h.next_off = max(end, h.next_off)
            else:
                h.streak, h.ra_end, h.next_off = 0, 0, end
            if h.streak < 2 or end >= h.blob.size:
                return
            start = max(end, h.ra_end)
            stop = min(h.blob.size, end + self.readahead_bytes)
            if stop - start < self.readahead_bytes // 4:
                return
            h.ra_end = stop
        self._prefetch.submit(self._load_ahead, h.blob, start, stop)

    def _load_ahead(self, blob: BlobReader, start: int, stop: int) -> None:
        try:
            step = 1 << 20
            for a in range(start, stop, step):
                keys = [k for _, _, k in blob.extents(a, min(stop, a + step)) if k is not None]
                if keys:
                    self.chunks.get_many(keys)
        except Exception:
            pass    # a real read of the same bytes reports the problem


def _make_listing(items) -> Listing:
    items.sort(key=lambda t: t[0])
    return Listing([t[0] for t in items], [t[1] for t in items], [t[2] for t in items],
                   [t[3] for t in items], [t[4] for t in items])


__all__ = ["View", "Node", "Stat", "Listing", "ViewError", "NotFound", "NotADir", "IsADir", "NotALink",
           "NoAttr", "ReadOnly", "Damaged", "BadHandle", "ROOT_INO", "STATS_XATTR"]
