"""The point folders: what a point record looks like in the mount, and the whole-safe top level.

This is the one module that reads point records (``Point``): a point's folder attributes
(from its root metadata), a volume point's image file, and the listings of the mount's root
(one folder per point, per-name groups, ``latest`` links) and of each group, built from
:class:`~.layout.Layout` over the safe's point list, re-read at most every ``refresh_seconds``
so that new backups appear and forgotten ones go.
"""

from __future__ import annotations

import os
import threading
import time

from pointsafe.cas import Entry, Point, Safe
from pointsafe.cas.tree import DIR, LNK, REG

from .inodes import K_GROUP, K_IMAGE, K_LINK, K_POINT, K_ROOT, ROOT_INO, Listing, Node, make_listing
from .layout import LATEST, Layout, image_name


def point_time_ns(p: Point) -> int:
    """When point ``p`` finished (or started, if it never recorded its end), in ns."""
    return p.taken_ns


def is_volume(p: Point | None) -> bool:
    """Whether ``p`` is a volume point (its folder holds one image file)."""
    return p is not None and p.kind == "volume"


def point_entry(p: Point, name: bytes) -> Entry:
    """The attributes of a point's folder: its tree's top directory (``Point.root_entry``, as
    ``ls`` and ``restore`` see it), or made up for a volume."""
    if is_volume(p):
        fin = p.taken_ns
        return Entry(name, DIR, 0o555, os.getuid(), os.getgid(), fin, fin, fin, nlink=2)
    return p.root_entry(name)


def point_root(p: Point) -> Node:
    """The root node of a mount of the single point ``p``."""
    return Node(ROOT_INO, ROOT_INO, K_POINT, point_entry(p, b""), p, ROOT_INO)


def volume_listing(folder: Node) -> Listing:
    """The one child of a volume point's folder: its image file."""
    p = folder.point
    assert p is not None
    fin = folder.entry.mtime_ns
    img = Entry(image_name(p), REG, 0o444, folder.entry.uid, folder.entry.gid, fin, fin, fin,
                size=p.size, nlink=1, ref=p.root)
    return Listing([img.name], [img], [K_IMAGE], [p])


class Folders:
    """The top of a whole-safe mount: point folders, per-name groups and ``latest`` links."""

    def __init__(self, safe: Safe, refresh_seconds: float, mounted_ns: int):
        self.safe = safe
        self.refresh_seconds = refresh_seconds
        self.mounted_ns = mounted_ns
        self.lock = threading.Lock()
        self._layout: Layout | None = None
        self._layout_at = 0.0

    def root(self) -> Node:
        """The root node of a whole-safe mount."""
        t = self.mounted_ns
        e = Entry(b"", DIR, 0o555, os.getuid(), os.getgid(), t, t, t, nlink=2)
        return Node(ROOT_INO, ROOT_INO, K_ROOT, e, None, 0)

    def layout(self) -> Layout:
        """The whole-safe layout, re-read at most every ``refresh_seconds`` (new backups appear).

        A folder name once shown keeps its name for the life of the mount."""
        now = time.monotonic()
        with self.lock:
            if self._layout is not None and now - self._layout_at < self.refresh_seconds:
                return self._layout
            shown = self._layout.by_id if self._layout is not None else None
        lay = Layout.build(self.safe.points(), keep=shown)
        with self.lock:
            self._layout, self._layout_at = lay, now
        return lay

    def root_listing(self) -> Listing:
        """The mount's root: every point's folder, every group, and ``latest``."""
        lay = self.layout()
        items: list[tuple[bytes, Entry, int, Point | None, bytes]] = []
        for name, p in lay.folders:
            items.append((name, point_entry(p, name), K_POINT, p, b""))
        for g, members in lay.groups.items():
            t = max(point_time_ns(p) for _, p in members)
            e = Entry(g, DIR, 0o555, os.getuid(), os.getgid(), t, t, t, nlink=2)
            items.append((g, e, K_GROUP, None, g))
        latest = lay.latest_name()
        if latest is not None:
            items.append((LATEST, self._link(LATEST, latest), K_LINK, None, b""))
        return make_listing(items)

    def group_listing(self, group: bytes) -> Listing:
        """One group's folder: the folders of its points and its ``latest``."""
        lay = self.layout()
        members = lay.groups.get(group, [])
        items: list[tuple[bytes, Entry, int, Point | None, bytes]] = [
            (name, point_entry(p, name), K_POINT, p, b"") for name, p in members]
        latest = lay.latest_name(group)
        if latest is not None:
            items.append((LATEST, self._link(LATEST, latest), K_LINK, None, b""))
        return make_listing(items)

    def _link(self, name: bytes, target: bytes) -> Entry:
        t = self.mounted_ns
        return Entry(name, LNK, 0o777, os.getuid(), os.getgid(), t, t, t, target=target)
