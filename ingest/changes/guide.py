"""What a tree walk may skip: the changes between the previous point's snapshot and the new one,
in the source's own relative paths (bytes), for the walker (ingest/walk.py).

The walker keeps the previous point's entry for every name that is not *dirty* -- not changed
and with no change below it -- without looking at it, lists a directory only when its entries
changed (else its names are the previous point's), and reads a modified file only around its
written extents. This is exact only where the previous point's tree is what a full walk of the
parent snapshot made: the caller (ingest/changes/btrfs_plan.py) checks that before it makes a
Guide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .btrfs_send import Changes


@dataclass
class Guide:
    """The changes below the source (paths relative to it, as bytes; ``b""`` is the source);
    ``parent`` is the source in the parent snapshot (where an extent read checks the old file)."""
    parent: Path
    dirty: set[bytes] = field(default_factory=set)       # changed paths and every ancestor of one
    listed: set[bytes] = field(default_factory=set)      # directories whose entries changed
    whole: set[bytes] = field(default_factory=set)       # files to read whole
    extents: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)
    moved: dict[bytes, bytes] = field(default_factory=dict)   # renamed directory: new path -> old path

    def is_dirty(self, rel: bytes) -> bool:
        """Whether ``rel`` or something below it changed."""
        return rel in self.dirty

    def must_list(self, rel: bytes) -> bool:
        """Whether the directory ``rel`` must be listed (its names changed)."""
        return rel in self.listed

    def extents_of(self, rel: bytes) -> list[tuple[int, int]] | None:
        """The written (offset, length) extents of the changed file ``rel`` (none when only its
        metadata or names changed); None when it must be read whole (new, cloned, truncated,
        written with data)."""
        if rel in self.whole:
            return None
        return self.extents.get(rel, [])


def guide_from(ch: Changes, prefix: str, parent: Path) -> Guide:
    """The Guide of the source at ``prefix`` (its path in the snapshot, "" for the whole
    subvolume) from the send stream's ``ch`` (paths relative to the snapshot's root)."""
    g = Guide(parent)

    def rel(p: str) -> bytes | None:
        if not prefix:
            return os.fsencode(p)
        if p == prefix:
            return b""
        if p.startswith(prefix + "/"):
            return os.fsencode(p[len(prefix) + 1:])
        return None

    g.dirty.add(b"")
    for p in ch.changed:
        r = rel(p)
        if r is None:
            continue
        while r:
            if r in g.dirty:
                break
            g.dirty.add(r)
            r = os.path.dirname(r)
    for p in ch.dirs:
        r = rel(p)
        if r is not None:
            g.listed.add(r)
    for p in ch.whole:
        r = rel(p)
        if r is not None:
            g.whole.add(r)
    for p, ext in ch.extents.items():
        r = rel(p)
        if r is not None:
            g.extents[r] = list(ext)
    for p, old in ch.moved.items():
        r, o = rel(p), rel(old)
        if r and o:
            g.moved[r] = o
    return g
