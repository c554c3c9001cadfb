"""A synchronous, typed, read-only view of recovery points: what the mount shows.

The pyfuse3 adapter (``ops``) only translates FUSE requests into calls of this class and its
exceptions into errno values; everything a user can observe is decided here, so it can be
used and tested without FUSE. ``View`` is a thin facade over the modules that hold each job:

- :mod:`.inodes`  — nodes, inode numbers, attributes, the inode and handle tables;
- :mod:`.folders` — point records as folders, and the whole-safe top level (layout);
- :mod:`.dirs`    — directory listings (TREE nodes, paged or not), lookup, readdir paging;
- :mod:`.files`   — open files, checked reads, read-ahead (chunks through :mod:`.objects`).

Laziness. Nothing is read at construction but the point list. A directory's TREE node is
read and decoded when the directory is first looked into, and kept in a cache bounded in
bytes; file data is read per request through a shared chunk cache.

Threads: every public method may be called from any thread.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator

from pointsafe.cas import Point, Safe
from pointsafe.cas.tree import LNK

from .dirs import Directories
from .errors import (BadHandle, Damaged, DamageLog, IsADir, NoAttr, NotADir, NotALink, NotFound, ReadOnly,
                     ViewError)
from .files import Files
from .folders import Folders, point_root
from .inodes import K_ENTRY, K_POINT, ROOT_INO, Handles, Inodes, Listing, Node, Stat, fill, stat
from .objects import ChunkSource

STATS_XATTR = b"user.pointsafe.stats"


class View:
    """Read-only view of one point (``point`` given) or of every point in ``safe``.

    ``safe`` is a :class:`Safe`, or any object with the few calls the view makes of one
    (``get``, ``entry``, ``points``, ``objects_read``, ``pack_entries``, ``path``); ``chunks``
    then gives file data in place of a :class:`ChunkSource` over the safe's packs (the server's
    mount: server/remote_view.py)."""

    def __init__(self, safe: Safe, point: Point | None = None, *, chunk_cache_bytes: int = 256 << 20,
                 dir_cache_bytes: int = 64 << 20, readahead_bytes: int = 32 << 20,
                 refresh_seconds: float = 1.0, chunks: ChunkSource | None = None):
        self.safe = safe
        self.mounted_ns = time.time_ns()
        self.folders = Folders(safe, refresh_seconds, self.mounted_ns)
        self.inodes = Inodes(self.folders.root() if point is None else point_root(point))
        self.handles = Handles()
        self.damage = DamageLog(self.inodes.path)
        self.dirs = Directories(safe, self.folders, self.inodes, self.handles, self.damage, dir_cache_bytes)
        self.files = Files(safe, self.inodes, self.handles, self.damage, chunk_cache_bytes, readahead_bytes,
                           chunks=chunks)
        self.readdirs = 0           # requests served (for tests and benchmarks)
        self.lookups = 0
        self.getattrs = 0
        self.requests: dict[str, int] | None = None   # FUSE requests per kind, when the adapter counts them
        # The hot paths, bound once: no facade call in between.
        self.node = self.inodes.node
        self.remember = self.inodes.remember
        self.remember_many = self.inodes.remember_many
        self.forget = self.inodes.forget
        self.path = self.inodes.path
        self.release = self.files.release
        self.releasedir = self.dirs.releasedir

    def close(self) -> None:
        """Stop background work and close pack files (the safe stays open)."""
        self.files.close()

    # Attributes. `fill` is the per-entry form the adapter uses for every readdir entry.
    stat = staticmethod(stat)
    fill = staticmethod(fill)

    def getattr(self, ino: int) -> Stat:
        """The attributes of known inode ``ino``."""
        self.getattrs += 1
        return stat(self.node(ino))

    # -- directories ----------------------------------------------------------------------

    def listing(self, node: Node) -> Listing:
        """The children of directory ``node``, sorted by name."""
        return self.dirs.listing(node)

    def lookup(self, parent_ino: int, name: bytes, cached_only: bool = False) -> Node | None:
        """The child ``name`` of directory ``parent_ino``, counted as one kernel lookup.

        With ``cached_only``, None (and nothing counted) unless the directory's listing is
        cached: the adapter answers from the listing on its own thread when it can."""
        parent = self.node(parent_ino)
        if name == b".":
            node = parent
        elif name == b"..":
            node = self.node(parent.parent)
        elif cached_only:
            lst = self.dirs.cached_listing(parent)
            if lst is None:
                return None
            node = self.dirs.lookup(parent, name, lst)
        else:
            node = self.dirs.lookup(parent, name)
        self.lookups += 1
        return self.remember(node)

    def opendir(self, ino: int) -> int:
        """A handle on directory ``ino``; its listing stays fixed until :meth:`releasedir`."""
        return self.dirs.opendir(self.node(ino))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Node, int, bool]]:
        """(name, child node, next offset, counted) from offset ``start``; ``.`` and ``..`` first.

        The caller calls :meth:`remember_many` with the children it handed to the kernel (those
        with ``counted``: not the dot entries)."""
        it = self.dirs.readdir(fh, start)
        self.readdirs += 1
        return it

    def readlink(self, ino: int) -> bytes:
        """The target of symlink ``ino``; NotALink for anything else."""
        node = self.node(ino)
        if node.entry.type != LNK:
            raise NotALink(self.path(node))
        return node.entry.target

    # -- extended attributes --------------------------------------------------------------

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The stored extended attributes of ``ino`` (none for the made-up folders and links)."""
        node = self.node(ino)
        if node.kind in (K_ENTRY, K_POINT):
            return list(node.entry.xattrs)
        return []

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """One extended attribute of ``ino``; NoAttr when it has none of that name."""
        for n, v in self.xattrs(ino):
            if n == name:
                return v
        if ino == ROOT_INO and name == STATS_XATTR:
            return json.dumps(self.stats(), sort_keys=True).encode()
        raise NoAttr(name.decode("utf-8", "backslashreplace"))

    def stats(self) -> dict:
        """Counters for tests and benchmarks (the hidden root xattr ``user.pointsafe.stats``)."""
        chunks = self.files.chunks.cache
        return {"objects_read": self.safe.objects_read, "inodes": len(self.inodes),
                "chunk_cache_bytes": chunks.bytes, "dir_cache_bytes": self.dirs.cache.bytes,
                "chunk_cache_hits": chunks.hits, "chunk_cache_misses": chunks.misses,
                "reads": self.files.reads, "loaded_reads": self.files.loaded_reads,
                "opens_here": self.files.opens_here, "read_bytes": self.files.read_bytes, "readdirs": self.readdirs,
                "lookups": self.lookups, "getattrs": self.getattrs,
                "gc_collections": [g["collections"] for g in gc.get_stats()],
                **({"requests": dict(self.requests)} if self.requests is not None else {})}

    def statfs(self) -> dict:
        """Sizes for ``df``: the safe's packs as used, its filesystem's free space as free."""
        packs = self.safe.pack_entries()
        used = sum(pe.committed_len for pe in packs.values())
        try:
            st = os.statvfs(self.safe.path)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        bs = 4096
        return {"bsize": bs, "blocks": (used + free) // bs, "bfree": free // bs, "bavail": free // bs,
                "files": len(self.inodes), "ffree": 0, "namemax": 255}

    # -- files ----------------------------------------------------------------------------

    def open(self, ino: int, flags: int, cached_only: bool = False) -> int | None:
        """A read handle on regular file ``ino`` (ReadOnly, IsADir, NotFound or Damaged otherwise).
        With ``cached_only``, None when opening would have to read the safe's index."""
        return self.files.open(self.node(ino), flags, cached_only)

    def read(self, fh: int, off: int, size: int, cached_only: bool = False) -> bytes | memoryview | None:
        """Bytes [off, off+size) of open file ``fh``, clipped at its end; Damaged when they
        cannot be had. With ``cached_only``, None unless every piece is cached (nothing loads)."""
        return self.files.read(fh, off, size, cached_only)


__all__ = ["ROOT_INO", "STATS_XATTR", "BadHandle", "Damaged", "IsADir", "Listing", "NoAttr", "Node", "NotADir",
           "NotALink", "NotFound", "ReadOnly", "Stat", "View", "ViewError"]
