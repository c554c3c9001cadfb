"""Walking the newest point of each source in file order: the read pattern that
fragmentation measures and defrag optimises.

File order is the order a restore reads: a tree point's directories depth first, entries in
name order (as stored), each regular file's blob from offset 0 to its end; a volume point's
image from block 0 to its end. Holes are skipped. Memory: one directory listing per level
and a bounded cache of list nodes.
"""

from __future__ import annotations

from typing import Callable, Iterator

from pointsafe.cas import BlobReader, NodeCache, ObjectMissing, Point, Safe, latest_per, read_tree
from pointsafe.cas.tree import DIR, REG


def newest_points(safe: Safe, points: list[Point] | None = None) -> list[Point]:
    """The newest point of each source (by ``name``), sorted by name."""
    best = latest_per(safe.points() if points is None else points, lambda p: p.name)
    return [best[n] for n in sorted(best)]


def _kind_of(safe: Safe) -> Callable[[bytes], int]:
    def kind(key: bytes) -> int:
        oe = safe.entry(key)
        if oe is None:   # a damaged safe: one error line, not a crash
            raise ObjectMissing(f"object {key.hex()[:12]} is missing from the safe "
                                "(run pointsafe verify)")
        return oe.kind
    return kind


def blob_chunks(safe: Safe, root: bytes | None, size: int, nodes: NodeCache) -> Iterator[tuple[bytes, int]]:
    """(chunk key, length) of a blob in offset order, holes skipped."""
    if root is None or size <= 0:
        return
    r = BlobReader(root, size, safe.get, _kind_of(safe), nodes=nodes)
    for _off, length, key in r.extents():
        if key is not None:
            yield key, length


def point_chunks(safe: Safe, rec: Point, nodes: NodeCache | None = None) -> Iterator[tuple[bytes, int]]:
    """(chunk key, length) of every chunk a restore of point ``rec`` reads, in file order."""
    nodes = nodes or NodeCache(64)
    root = rec.root
    if root is None:
        return
    if rec.kind == "volume":
        yield from blob_chunks(safe, root, rec.size, nodes)
        return
    stack = [iter(read_tree(safe.get, root))]
    while stack:
        e = next(stack[-1], None)
        if e is None:
            stack.pop()
            continue
        if e.type == REG and e.ref is not None:
            yield from blob_chunks(safe, e.ref, e.size, nodes)
        elif e.type == DIR and e.ref is not None:
            stack.append(iter(read_tree(safe.get, e.ref)))


def newest_chunks(safe: Safe, points: list[Point] | None = None) -> Iterator[tuple[bytes, int]]:
    """The chunks of the newest point of every source, source after source."""
    nodes = NodeCache(64)   # a sequential walk needs about one node per level
    for rec in newest_points(safe, points):
        yield from point_chunks(safe, rec, nodes)


def with_entries(safe: Safe, pairs: Iterator[tuple[bytes, int]], batch: int = 65536):
    """(key, length, ObjectEntry or None) for each (key, length), in the same order, looked up
    ``batch`` at a time in key order: the index is keyed by hash, so lookups in walk order hit
    random pages, sorted ones sweep the index once (much faster from a cold cache).
    Entries are read just before their batch is handed out."""
    idx = safe.index
    buf: list[tuple[bytes, int]] = []

    def flush():
        found = {}
        with idx.read() as txn:
            for k in sorted({k for k, _ in buf}):
                found[k] = idx.get_object(txn, k)
        for k, n in buf:
            yield k, n, found[k]
        buf.clear()

    for pair in pairs:
        buf.append(pair)
        if len(buf) >= batch:
            yield from flush()
    if buf:
        yield from flush()
