"""One page of a directory, reading only the tree pages that hold it.

A large directory is stored paged (cas/tree.py: an index node naming leaf pages with their
entry counts), so entries ``offset .. offset+limit`` are found from the index's counts and
read from the one or two leaf pages that hold them: a page of a 100,000-entry directory costs
the index node and a page or two, never the whole directory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pointsafe.cas import Entry, IntegrityError, Kind, ObjectMissing, Safe, decode_tree, tree_pages
from pointsafe.cas.tree import DIR
from pointsafe.ingest.browse import display_name


@dataclass
class DirPage:
    """Entries ``offset ..`` of a directory (in name order), its total entry count, and the
    number of tree nodes read to find them."""

    entries: list[Entry]
    offset: int
    total: int
    nodes_read: int


def _node(safe: Safe, key: bytes, e: Entry) -> bytes:
    oe = safe.entry(key)
    if oe is None:
        raise ObjectMissing(f"directory {display_name(e.name)!r}: its tree node {key.hex()[:12]} is missing")
    if oe.kind != Kind.TREE:
        raise IntegrityError(f"directory {display_name(e.name)!r}: object {key.hex()[:12]} is not a tree node")
    return safe.get(key)


def read_page(safe: Safe, e: Entry, offset: int, limit: int) -> DirPage:
    """Entries ``offset .. offset+limit`` of directory ``e``, reading the index node and only
    the leaf pages that hold them. IntegrityError / ObjectMissing (one line) for a damaged
    or missing node."""
    offset, limit = max(0, offset), max(1, limit)
    if e.type != DIR or e.ref is None:
        return DirPage([], offset, 0, 0)
    try:
        raw = _node(safe, e.ref, e)
        pages = tree_pages(raw)
        if pages is None:
            entries = decode_tree(raw)
            return DirPage(entries[offset:offset + limit], offset, len(entries), 1)
        total = sum(count for _, count, _ in pages)
        out: list[Entry] = []
        read = 1
        start = 0
        for key, count, _first in pages:
            end = start + count
            if end > offset and start < offset + limit:
                leaf = decode_tree(_node(safe, key, e))
                read += 1
                out.extend(leaf[max(0, offset - start):offset + limit - start])
            if end >= offset + limit:
                break
            start = end
        return DirPage(out, offset, total, read)
    except (ValueError, struct.error, IndexError) as err:
        raise IntegrityError(f"directory {display_name(e.name)!r}: a tree node is malformed ({err})") from None
