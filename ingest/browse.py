"""Navigating and comparing point trees: lookup by path, recursive walks, diffs.

Every function reads only the tree nodes it needs; a diff skips any subtree whose key is the
same in both points, so comparing two points costs what changed between them.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

from pointsafe.cas import (
    Entry,
    IntegrityError,
    Kind,
    ObjectMissing,
    Point,
    Safe,
    UsageError,
    find_entry,
    read_tree,
)
from pointsafe.cas.tree import DIR, TYPE_NAMES


def root_entry(point: Point) -> Entry:
    """The top directory of a tree point, as an Entry: ``Point.root_entry`` (what the mount shows)."""
    return point.root_entry()


def split_path(path: bytes | str) -> list[bytes]:
    """The components of a path inside a point (empty ones and '.' dropped; '..' refused)."""
    b = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    parts = [p for p in b.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UsageError(f"bad path {path!r}: '..' is not allowed")
    return parts


def lookup_chain(safe: Safe, point: Point, path: bytes | str) -> list[Entry]:
    """The entries along ``path`` inside a tree point, outermost first (empty for "" or "/");
    UsageError naming the path when it is not in the point."""
    e = root_entry(point)
    out: list[Entry] = []
    for part in split_path(path):
        if e.type != DIR or e.ref is None:
            raise UsageError(f"{_show(path)}: not found in point {point.id[:12]}")
        try:
            found = find_entry(safe.get, e.ref, part)
        except (ValueError, struct.error, IndexError) as err:
            raise IntegrityError(f"{_show(path)}: a tree node on the way is malformed ({err})") from None
        if found is None:
            raise UsageError(f"{_show(path)}: not found in point {point.id[:12]}")
        e = found
        out.append(e)
    return out


def lookup(safe: Safe, point: Point, path: bytes | str) -> Entry:
    """The entry at ``path`` inside a tree point (the root entry for "" or "/"); UsageError
    naming the path when it is not in the point, IntegrityError when a node on the way is
    malformed. Reads one tree node per component."""
    chain = lookup_chain(safe, point, path)
    return chain[-1] if chain else root_entry(point)


def children(safe: Safe, e: Entry) -> list[Entry]:
    """The entries of directory ``e``; ObjectMissing when its node is not in the safe and
    IntegrityError when it is not a tree node or does not decode (a damaged or hostile safe),
    each one line, never a traceback."""
    if e.type != DIR or e.ref is None:
        return []
    oe = safe.entry(e.ref)
    if oe is None:
        raise ObjectMissing(f"directory {display_name(e.name)!r}: its tree node {e.ref.hex()[:12]} "
                            "is missing from the safe")
    if oe.kind != Kind.TREE:
        raise IntegrityError(f"directory {display_name(e.name)!r}: object {e.ref.hex()[:12]} is not a tree node")
    try:
        return read_tree(safe.get, e.ref)
    except (ValueError, struct.error, IndexError) as err:
        raise IntegrityError(f"directory {display_name(e.name)!r}: tree node {e.ref.hex()[:12]} "
                             f"is malformed ({err})") from None


def _join(prefix: bytes, name: bytes) -> bytes:
    return prefix + b"/" + name if prefix else name


def walk(safe: Safe, e: Entry, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
    """Depth-first, pre-order (path, entry) for everything below directory entry ``e``, each
    directory's entries in stored (name) order, paths joined onto ``prefix``.

    Iterative (an explicit stack of listings), so any depth works; memory is one listing per
    level. A listing is read only when the walk reaches it; ObjectMissing / IntegrityError as
    for ``children`` when a node on the way is missing or damaged.
    """
    stack: list[tuple[Iterator[Entry], bytes]] = [(iter(children(safe, e)), prefix)]
    while stack:
        it, pre = stack[-1]
        c = next(it, None)
        if c is None:
            stack.pop()
            continue
        p = _join(pre, c.name)
        yield p, c
        if c.type == DIR:
            stack.append((iter(children(safe, c)), p))


def _meta(e: Entry) -> tuple[object, ...]:
    return (e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.target, e.rdev, e.xattrs)


Change = tuple[str, bytes, Entry | None, Entry | None]


class _Descend:
    """A marker one level of a diff hands its driver: compare directories ``a`` and ``b`` here."""

    __slots__ = ("a", "b", "prefix")

    def __init__(self, a: Entry, b: Entry, prefix: bytes) -> None:
        self.a, self.b, self.prefix = a, b, prefix


def _diff_level(safe: Safe, a: Entry, b: Entry, prefix: bytes) -> Iterator[Change | _Descend]:
    """The changes of one directory pair, in name order; a pair of subdirectories comes out as a
    ``_Descend`` at the place its changes belong."""
    if a.ref == b.ref and a.type == b.type == DIR:
        return
    ca = {e.name: e for e in children(safe, a)}
    cb = {e.name: e for e in children(safe, b)}
    for name in sorted(ca.keys() | cb.keys()):
        p = _join(prefix, name)
        x, y = ca.get(name), cb.get(name)
        if x is None:
            assert y is not None  # the name came from one of the two listings
            yield "+", p, None, y
            if y.type == DIR:
                for q, e in walk(safe, y, p):
                    yield "+", q, None, e
        elif y is None:
            yield "-", p, x, None
            if x.type == DIR:
                for q, e in walk(safe, x, p):
                    yield "-", q, e, None
        elif x.type != y.type:
            yield "T", p, x, y
        elif x.type == DIR:
            if _meta(x) != _meta(y):
                yield "m", p, x, y
            yield _Descend(x, y, p)
        elif x.ref != y.ref or x.size != y.size:
            yield "M", p, x, y
        elif _meta(x) != _meta(y):
            yield "m", p, x, y


def diff(safe: Safe, a: Entry, b: Entry, prefix: bytes = b"") -> Iterator[Change]:
    """Yield (change, path, old, new) with change in '+' (added), '-' (removed), 'M' (content
    changed), 'm' (metadata only), 'T' (type changed), depth first in name order (a directory's
    own line before the changes inside it). Identical subtrees (same key) are skipped unread, so
    the cost is what changed between the two trees.

    Iterative (an explicit stack, one pair of listings per level), so any depth works.
    ObjectMissing / IntegrityError as for ``children`` when a node that must be read is missing
    or damaged.
    """
    stack: list[Iterator[Change | _Descend]] = [_diff_level(safe, a, b, prefix)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, _Descend):
            stack.append(_diff_level(safe, item.a, item.b, item.prefix))
        else:
            yield item


def _show(path: bytes | str) -> str:
    return path.decode("utf-8", "backslashreplace") if isinstance(path, bytes) else path


def display_name(b: bytes) -> str:
    """A name for people: UTF-8 where it is, backslash escapes for other bytes and controls."""
    s = b.decode("utf-8", "backslashreplace")
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in s)


def entry_json(path: bytes, e: Entry) -> dict[str, Any]:
    """An entry as ``pointsafe ls --json`` prints it (and the web's JSON): ``path`` readable
    (bytes that are not UTF-8 as backslash escapes) and ``path_b64`` for a name that is not
    UTF-8, type, mode, owner, size, mtime, a symlink's target, a hard link's group."""
    d: dict[str, Any] = {"path": path.decode("utf-8", "backslashreplace"),
                         "type": TYPE_NAMES.get(e.type, "?"), "mode": e.mode, "uid": e.uid, "gid": e.gid,
                         "size": e.size, "mtime_ns": e.mtime_ns}
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        d["path_b64"] = base64.b64encode(path).decode()
    if e.target:
        d["target"] = e.target.decode("utf-8", "backslashreplace")
    if e.link_group:
        d["link_group"] = e.link_group
    return d
