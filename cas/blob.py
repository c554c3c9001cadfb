"""Blobs: the content of a file or a whole volume, as a Merkle list of chunks.

A blob is a CHUNK key (a one-chunk blob), a LIST key, or nothing (empty). A LIST node's
payload (after the node envelope, see ``nodes``) is::

    u8      level (0: entries are chunks; n > 0: entries are LIST nodes of level n-1)
    u32 LE  entry count m
    m × (u32 LE child index, u64 LE length)    child index 0xFFFFFFFF = a hole of zeros

Holes are recorded, never stored. A 1 KiB file and a 1 TiB image use the same structure; a
reader finds any offset in O(depth) node reads by binary search over cumulative lengths.
"""

from __future__ import annotations

import bisect
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .keys import Kind
from .nodes import ChildTable, decode_node

HOLE = 0xFFFFFFFF
_HEAD = struct.Struct("<BI")
_ENT = struct.Struct("<IQ")


def encode_list(level: int, entries: list[tuple[bytes | None, int]]) -> tuple[list[bytes], bytes]:
    """(children, payload) of a LIST node over ``entries`` of (key or None, length)."""
    table = ChildTable()
    parts = [_HEAD.pack(level, len(entries))]
    for key, length in entries:
        parts.append(_ENT.pack(HOLE if key is None else table.index(key), length))
    return table.keys, b"".join(parts)


@dataclass(frozen=True, slots=True)
class ListNode:
    """A decoded LIST node: its level and, per entry, the child key and cumulative end."""

    level: int
    keys: list[bytes | None]   # per entry: child key, or None for a hole
    ends: list[int]            # cumulative end offset of each entry

    @property
    def size(self) -> int:
        """Bytes the node covers (its last cumulative end; 0 when it has no entries)."""
        return self.ends[-1] if self.ends else 0


def decode_list(raw: bytes) -> ListNode:
    """The LIST node whose raw object bytes are ``raw`` (envelope included); ValueError,
    struct.error or IndexError on bytes that are not a LIST node."""
    children, payload = decode_node(raw)
    level, m = _HEAD.unpack_from(payload)
    keys: list[bytes | None] = []
    ends: list[int] = []
    total = 0
    for idx, length in _ENT.iter_unpack(payload[_HEAD.size:_HEAD.size + m * _ENT.size]):
        keys.append(None if idx == HOLE else children[idx])
        total += length
        ends.append(total)
    return ListNode(level, keys, ends)


class BlobBuilder:
    """Builds a blob bottom-up from a stream of (chunk key or None, length) entries.

    ``put_node(kind, children, payload) -> key`` stores a node (usually ``Writer.put_node``).
    Memory: one pending node per level, whatever the blob's size.
    """

    def __init__(self, put_node: Callable[[int, list[bytes], bytes], bytes], fanout: int = 256):
        self.put_node = put_node
        self.fanout = fanout
        # per level: entries [key | None, length], lists so that a run of holes grows in place
        self.levels: list[list[list[Any]]] = [[]]
        self.size = 0

    def add(self, key: bytes | None, length: int) -> None:
        """Append ``length`` bytes: the chunk ``key``, or a hole when ``key`` is None. Lengths
        of 0 or less are ignored; a full node (``fanout`` entries) is stored at once."""
        if length <= 0:
            return
        self.size += length
        self._add(0, key, length)

    def _add(self, level: int, key: bytes | None, length: int) -> None:
        entries = self.levels[level]
        if key is None and entries and entries[-1][0] is None:
            entries[-1][1] += length          # runs of holes merge into one entry
            return
        if len(entries) == self.fanout:
            # A full node that ends in a hole waits for the next entry (the hole could still
            # grow); this one does not merge, so the node is complete.
            self.levels[level] = []
            self._emit(level, entries)
            entries = self.levels[level]
        entries.append([key, length])
        if len(entries) == self.fanout and key is not None:
            # Complete: stored at once, so that a level with no pending entry is at a node
            # boundary (see add_from).
            self.levels[level] = []
            self._emit(level, entries)

    def add_from(self, blob: BlobReader, start: int, end: int) -> None:
        """Append bytes [start, end) of ``blob`` (clipped at its size) without reading them: its
        chunks and holes, as ``add`` of each would, which needs every chunk in the range whole
        (ValueError otherwise: a volume's blocks are).

        Cost: what the range holds that cannot be taken whole. A LIST node of ``blob`` that lies
        inside the range (and ends before it, so that what follows it comes from ``blob`` too)
        is added as one entry, without reading it, when this builder has no pending entry below
        its level: adding its chunks one by one would give back exactly that node, as long as
        ``blob`` was made by a BlobBuilder of the same fanout (all of its nodes but the last of
        each level are full, its leaves never hold two holes in a row). The result is the blob
        the one-by-one adds make, object for object."""
        end = min(end, blob.size)
        if start >= end:
            return
        if blob.root is None:
            self.add(None, end - start)
        elif blob.root_is_chunk:
            if (start, end) != (0, blob.size):
                raise ValueError(f"chunk {blob.root.hex()[:12]} is not whole in [{start}, {end})")
            self.add(blob.root, blob.size)
        else:
            self._add_from(blob, blob.root, 0, start, end)

    def _add_from(self, blob: BlobReader, key: bytes, base: int, start: int, end: int) -> None:
        # [start, end) is what is left of the range; the node at ``base`` may end before ``end``.
        node = blob.node(key)
        keys, ends, level = node.keys, node.ends, node.level
        n = len(ends)
        # Only a node of the expected shape hands its children over whole: full, or the last
        # of its level (it ends the blob) with no more than ``fanout`` entries.
        whole = level > 0 and (n == self.fanout or (n < self.fanout and base + ends[-1] == blob.size))
        i = bisect.bisect_right(ends, start - base)
        lo = base + (ends[i - 1] if i else 0)
        while i < n and lo < end:
            hi = base + ends[i]
            child = keys[i]
            if child is None:
                self.add(None, min(hi, end) - max(lo, start))
            elif level == 0:
                if lo < start or hi > end:
                    raise ValueError(f"chunk {child.hex()[:12]} at {lo} is not whole in [{start}, {end})")
                self.add(child, hi - lo)
            elif whole and start <= lo and hi < end and self._at_boundary(level):
                while len(self.levels) <= level:
                    self.levels.append([])
                self.size += hi - lo
                self._add(level, child, hi - lo)
            else:
                self._add_from(blob, child, lo, max(start, lo), end)
            lo = hi
            i += 1

    def _at_boundary(self, level: int) -> bool:
        """Whether no entry is pending below ``level``: the chunks of a full node of level
        ``level - 1`` added now would make that node and add it at ``level``."""
        return not any(self.levels[j] for j in range(min(level, len(self.levels))))

    def _emit(self, level: int, entries: list[list[Any]]) -> None:
        if all(k is None for k, _ in entries):
            key, length = None, sum(n for _, n in entries)
        else:
            children, payload = encode_list(level, [(k, n) for k, n in entries])
            key, length = self.put_node(Kind.LIST, children, payload), sum(n for _, n in entries)
        if len(self.levels) == level + 1:
            self.levels.append([])
        self._add(level + 1, key, length)

    def finish(self) -> bytes | None:
        """Store the remaining nodes; return the blob's root key, None when nothing was added.

        A blob made only of holes still gets a LIST root so that its size is recorded. Call it
        once, after the last ``add``.
        """
        if self.size == 0:
            return None
        level = 0
        while True:
            entries = self.levels[level]
            top = level == len(self.levels) - 1
            if top:
                only: bytes | None = entries[0][0] if len(entries) == 1 else None
                if only is not None:
                    # level 0: one chunk, the chunk is the blob; above: a single LIST node below
                    return only
                children, payload = encode_list(level, [(k, n) for k, n in entries])
                return self.put_node(Kind.LIST, children, payload)
            if entries:
                self.levels[level] = []
                self._emit(level, entries)
            level += 1


class NodeCache:
    """A bounded LRU of decoded LIST nodes, shared by readers of one safe (thread-safe)."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.items: OrderedDict[bytes, ListNode] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: bytes, load: Callable[[bytes], ListNode]) -> ListNode:
        """The node ``key``, from the cache or else ``load(key)`` (called without the lock, so two
        threads may load the same node once each); evicts the least recently used."""
        with self.lock:
            node = self.items.get(key)
            if node is not None:
                self.items.move_to_end(key)
                return node
        node = load(key)
        with self.lock:
            self.items[key] = node
            while len(self.items) > self.limit:
                self.items.popitem(last=False)
        return node


class BlobReader:
    """Random access to a blob.

    ``get(key) -> bytes`` fetches a raw object (chunk cache, integrity checks are the
    caller's); ``kind_of(key)`` tells a CHUNK root from a LIST root.
    """

    def __init__(self, root: bytes | None, size: int, get: Callable[[bytes], bytes],
                 kind_of: Callable[[bytes], int], nodes: NodeCache | None = None):
        self.root = root
        self.size = size
        self.get = get
        self.nodes = nodes or NodeCache(256)
        self.root_is_chunk = root is not None and kind_of(root) == Kind.CHUNK

    def node(self, key: bytes) -> ListNode:
        """The decoded LIST node ``key`` (through the node cache)."""
        return self.nodes.get(key, lambda k: decode_list(self.get(k)))

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bytes | None]]:
        """Yield (offset, length, chunk key or None for a hole) covering [start, end)."""
        end = self.size if end is None else min(end, self.size)
        if start >= end or self.root is None:
            if self.root is None and start < end:
                yield start, end - start, None
            return
        if self.root_is_chunk:
            yield 0, self.size, self.root
            return
        yield from self._walk(self.root, 0, start, end)

    def _walk(self, key: bytes, base: int, start: int, end: int) -> Iterator[tuple[int, int, bytes | None]]:
        node = self.node(key)
        i = bisect.bisect_right(node.ends, start - base)
        while i < len(node.ends):
            lo = base + (node.ends[i - 1] if i else 0)
            if lo >= end:
                return
            hi = base + node.ends[i]
            child = node.keys[i]
            if child is None or node.level == 0:
                yield lo, hi - lo, child
            else:
                yield from self._walk(child, lo, max(start, lo), min(end, hi))
            i += 1

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the blob, clipped at its end; holes read as zeros."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        parts = []
        for lo, length, key in self.extents(offset, end):
            a = max(offset, lo) - lo
            b = min(end, lo + length) - lo
            if key is None:
                parts.append(bytes(b - a))
            else:
                data = self.get(key)
                parts.append(data[a:b] if (a, b) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)
