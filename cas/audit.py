"""Reference-count audit: recompute every object's count from the points and the live nodes,
and report every difference with the stored counts.

By definition (docs/FORMAT.md, "Reference counts and the dead flag") an object's count is the
number of live (not dead) nodes that list it as a child plus one when it is a point that the
``points`` table names, plus the drops still waiting in the release queue (cas/release.py).
The audit

1. walks the ``objects`` table once, reads every live node from its pack and adds one to each
   child's expected count; expected counts are summed in a bounded dict and merged, in key
   order, into a temporary LMDB database (so memory stays bounded whatever the number of
   objects);
2. merges the ``objects`` table with that database, both in key order, and compares.

Findings that are errors: a stored count that differs from the expected one; a live node
naming an object that is missing or dead; a dead object that is still counted; a blob whose
length differs from the size its referrer declares (a tree entry's ``size``, a volume point's
``size``, a LIST entry's length), named by point and path. The declared
lengths ride along with the expected counts (same temporary database, same merge), so the
check costs one decode of each live TREE and LIST node, which the audit reads anyway. Objects at
count 0 that are not dead are a crashed backup's orphans (gc buries them): a note, not an
error. Run it under the writer lock, as ``verify`` does, so that packs do not move meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb

from .errors import IntegrityError
from .index import FLAG_DEAD, FLAG_PINNED, ObjectEntry
from .keys import Kind
from .nodes import decode_node
from .pack import decode_record
from .release import QUEUE

if TYPE_CHECKING:
    from .index import Index, Txn
    from .store import Safe

_U32 = struct.Struct("<I")
FLUSH_ENTRIES = 200_000     # expected counts kept in memory before a merge into the temp db
MAX_FINDINGS = 100          # reported in full; the rest are counted


@dataclass
class AuditReport:
    """What ``audit`` found: objects and nodes seen, orphans, dead objects and the problems."""

    objects: int = 0
    nodes_read: int = 0
    orphans: int = 0
    dead: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)   # size findings, by point and path
    size_errors: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found (orphans are not problems)."""
        return self.mismatches == 0

    def problem(self, message: str) -> None:
        """Record a finding (the first MAX_FINDINGS in full, the rest counted)."""
        self.mismatches += 1
        if len(self.errors) < MAX_FINDINGS:
            self.errors.append(message)

    def size_problem(self, message: str) -> None:
        """Record a blob whose length differs from what its referrer declares."""
        self.mismatches += 1
        self.size_errors += 1
        if len(self.sizes) < MAX_FINDINGS:
            self.sizes.append(message)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"ok": self.ok, "objects": self.objects, "nodes_read": self.nodes_read,
                "orphans": self.orphans, "dead": self.dead, "problems": self.mismatches,
                "errors": self.errors, "sizes": self.sizes}


NOLEN = (1 << 64) - 1       # no length declared for the object (or no span known)
CONFLICT = (1 << 64) - 2    # its referrers declare different lengths
_VAL = struct.Struct("<IQQ")  # expected count, declared length, span (LIST nodes)
_TREE_FIXED = struct.Struct("<HBHIIqqqQQQIQQIHH")
_XA = struct.Struct("<HI")
_LIST_HEAD = struct.Struct("<BI")
_LIST_ENT = struct.Struct("<IQ")
_NONE = 0xFFFFFFFF
_REG = 1

# A file entry without content that declares a size (name, size), or (None, None): a node
# that does not decode.
_Bad = list[tuple[bytes | None, int | None]]
# Per wrong length a node declares: (child or None, entry name or None, declared, actual).
_Finding = tuple[bytes | None, bytes | None, int | None, int | None]


class _Counts:
    """Expected counts, declared lengths and LIST spans: in-memory dicts merged into a temp
    LMDB db (key -> _VAL) when they grow, so that memory stays bounded."""

    def __init__(self, tmpdir: str):
        self.env = lmdb.open(tmpdir, map_size=1 << 40, sync=False, metasync=False,
                             writemap=True, lock=False, max_dbs=0)
        self.pending: dict[bytes, int] = {}
        self.declared: dict[bytes, int] = {}
        self.spans: dict[bytes, int] = {}

    def add(self, key: bytes, n: int = 1) -> None:
        """``n`` more expected references to ``key``."""
        p = self.pending
        p[key] = p.get(key, 0) + n
        if len(p) >= FLUSH_ENTRIES:
            self.flush()

    def declare(self, key: bytes, length: int) -> None:
        """A referrer says that ``key`` holds ``length`` bytes (a blob or part of one)."""
        d = self.declared
        old = d.get(key)
        d[key] = length if old is None or old == length else CONFLICT

    def span(self, key: bytes, length: int) -> None:
        """LIST node ``key`` covers ``length`` bytes (the sum of its entries' lengths)."""
        self.spans[key] = length
        if len(self.spans) >= FLUSH_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Merge what is in memory into the temporary database, in key order."""
        if not (self.pending or self.spans or self.declared):
            return
        keys = sorted(self.pending.keys() | self.spans.keys() | self.declared.keys())
        with self.env.begin(write=True) as txn:
            for k in keys:
                old = txn.get(k)
                n, d, sp = _VAL.unpack(old) if old is not None else (0, NOLEN, NOLEN)
                n += self.pending.get(k, 0)
                nd = self.declared.get(k, NOLEN)
                if nd != NOLEN:
                    d = nd if d in (NOLEN, nd) else CONFLICT
                sp = self.spans.get(k, sp)
                txn.put(k, _VAL.pack(n, d, sp))
        self.pending.clear()
        self.declared.clear()
        self.spans.clear()

    def close(self) -> None:
        self.env.close()


def _declare_tree(raw: bytes | memoryview, children: list[bytes], counts: _Counts, bad: _Bad) -> None:
    """Declared sizes of the regular files of a leaf TREE node (a paged index has none)."""
    p = bytes(raw)
    (count,) = _U32.unpack_from(p)
    if count == _NONE:
        return
    off = 4
    fixed = _TREE_FIXED
    for _ in range(count):
        f = fixed.unpack_from(p, off)
        nl, typ, size, ref, tl, nx = f[0], f[1], f[8], f[14], f[15], f[16]
        off += fixed.size
        if typ == _REG:
            if ref != _NONE:
                counts.declare(children[ref], size)
            elif size:
                bad.append((p[off:off + nl], size))
        off += nl + tl
        for _ in range(nx):
            xn, xv = _XA.unpack_from(p, off)
            off += _XA.size + xn + xv


def _declare_list(key: bytes, payload: memoryview, children: list[bytes], counts: _Counts) -> None:
    """Declared lengths of a LIST node's entries, and the node's own span."""
    _, m = _LIST_HEAD.unpack_from(payload)
    total = 0
    for idx, length in _LIST_ENT.iter_unpack(payload[_LIST_HEAD.size:_LIST_HEAD.size + m * _LIST_ENT.size]):
        total += length
        if idx != _NONE:
            counts.declare(children[idx], length)
    counts.span(key, total)


def _declare_point(payload: memoryview, children: list[bytes], counts: _Counts) -> None:
    """A volume point declares its blob's size."""
    try:
        rec = json.loads(bytes(payload))
    except ValueError:
        return
    if rec.get("kind") == "volume" and children and isinstance(rec.get("size"), int):
        counts.declare(children[0], rec["size"])


def _declare(key: bytes, kind: int, raw: bytes, counts: _Counts, bad: _Bad) -> list[bytes]:
    """Count a node's children and note the lengths it declares; return its children."""
    children, payload = decode_node(raw)
    for c in children:
        counts.add(c)
    try:
        if kind == Kind.TREE:
            _declare_tree(payload, children, counts, bad)
        elif kind == Kind.LIST:
            _declare_list(key, payload, children, counts)
        elif kind == Kind.POINT:
            _declare_point(payload, children, counts)
    except (struct.error, IndexError):
        bad.append((None, None))
    return children


def audit(safe: Safe) -> AuditReport:
    """Recompute every reference count and check every declared blob size (see the module
    docstring); read-only, and it never writes the index (it runs on a full disk).

    The caller holds the writer lock, so that packs do not move meanwhile. Cost: one pass over
    ``objects`` reading every live node from its pack, a temporary LMDB database (in a
    temporary directory) of one entry per referenced object, and a second pass over the
    nodes only when sizes are wrong."""
    r = AuditReport()
    idx = safe.index
    tmp = tempfile.mkdtemp(prefix="pointsafe-audit-")
    try:
        counts = _Counts(os.path.join(tmp, "counts"))
        try:
            queue = idx.existing(QUEUE)   # never created here: verify must run on a full disk
            with idx.read() as txn:
                for k, _ in txn.cursor(db=idx.db["points"]):
                    counts.add(k)
                for k, v in (txn.cursor(db=queue) if queue is not None else ()):
                    counts.add(k, _U32.unpack(v)[0])   # drops a forget queued but not applied yet
                bad_nodes: list[bytes] = []
                for key, val in txn.cursor(db=idx.db["objects"]):
                    e = ObjectEntry.decode(val)
                    if e.kind == Kind.CHUNK or e.flags & FLAG_DEAD:
                        continue
                    try:
                        buf = safe.store.read(e.pack, e.offset, e.record_len)
                        _, raw = decode_record(buf, e.pack, e.offset, rehash=False, expect_key=key, crypto=safe.crypto)
                        bad: _Bad = []
                        _declare(key, e.kind, raw, counts, bad)
                    except (IntegrityError, OSError, ValueError) as err:
                        r.problem(f"node {key.hex()[:12]} cannot be read to count its children: {err}")
                        continue
                    r.nodes_read += 1
                    if bad:
                        bad_nodes.append(key)
                counts.flush()
                bad_keys = _compare(idx, txn, counts, r)
                if bad_keys or bad_nodes:
                    _name_size_problems(safe, txn, bad_keys, bad_nodes, r, os.path.join(tmp, "parents"))
        finally:
            counts.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def _actual_length(e: ObjectEntry, span: int) -> int | None:
    """The bytes an object holds as a blob: a chunk's raw length, a LIST node's span."""
    if e.kind == Kind.CHUNK:
        return e.raw_len
    if e.kind == Kind.LIST and span != NOLEN:
        return span
    return None


def _compare(idx: Index, txn: Txn, counts: _Counts, r: AuditReport) -> dict[bytes, int | None]:
    """Merge-join the objects table with the expected counts, both in key order; return the
    objects whose declared length differs from what they hold (key -> actual length)."""
    bad_sizes: dict[bytes, int | None] = {}
    with counts.env.begin() as ctxn:
        exp = ctxn.cursor()
        have_exp = exp.first()
        for key, val in txn.cursor(db=idx.db["objects"]):
            # Expected counts for keys below this one name objects that are not in the index.
            while have_exp and exp.key() < key:
                r.problem(f"object {exp.key().hex()[:12]} is referenced {_VAL.unpack(exp.value())[0]} "
                          "time(s) by live nodes or points but is missing from the index")
                have_exp = exp.next()
            want, declared, span = 0, NOLEN, NOLEN
            if have_exp and exp.key() == key:
                want, declared, span = _VAL.unpack(exp.value())
                have_exp = exp.next()
            e = ObjectEntry.decode(val)
            r.objects += 1
            short = key.hex()[:12]
            if declared != NOLEN and not e.flags & FLAG_DEAD:
                actual = _actual_length(e, span)
                if declared == CONFLICT or (actual is None and e.kind not in (Kind.CHUNK, Kind.LIST)) \
                        or (actual is not None and actual != declared):
                    if len(bad_sizes) < MAX_FINDINGS:
                        bad_sizes[bytes(key)] = actual
                    else:
                        r.size_problem(f"object {short}: a referrer declares {declared} bytes, it holds {actual}")
            in_zero = txn.get(key, db=idx.db["zero"]) is not None
            if in_zero != (e.refcount == 0 and not e.flags & FLAG_PINNED):
                r.problem(f"object {short}: the zero table {'lists' if in_zero else 'misses'} it "
                          f"(stored count {e.refcount})")
            if e.flags & FLAG_DEAD:
                r.dead += 1
                if want:
                    r.problem(f"object {short} is marked dead but {want} live node(s) or point(s) reference it")
                elif e.refcount:
                    r.problem(f"object {short} is marked dead but its stored count is {e.refcount}")
                continue
            if e.refcount != want:
                r.problem(f"object {short}: stored count {e.refcount}, recomputed {want}")
            elif want == 0 and not e.flags & FLAG_PINNED:
                r.orphans += 1
        while have_exp:
            r.problem(f"object {exp.key().hex()[:12]} is referenced but missing from the index")
            have_exp = exp.next()
    return bad_sizes


# -- naming size problems (only when there are some) ----------------------------------------

_MAX_DEPTH = 100_000


def _referrer_findings(key: bytes, kind: int, raw: bytes, bad_keys: dict[bytes, int | None],
                       broken: bool) -> Iterator[_Finding]:
    """(child or None, name or None, declared, actual) for each wrong length ``key`` declares;
    ``broken``: the node itself had a file entry without content or did not decode."""
    children, payload = decode_node(raw)
    if kind == Kind.TREE:
        try:
            entries = list(_tree_files(payload, children))
        except (struct.error, IndexError):
            yield None, None, None, None
            return
        for name, child, size in entries:
            if child is None:
                if broken and size:
                    yield None, name, size, 0
            elif child in bad_keys and bad_keys[child] != size:
                yield child, name, size, bad_keys[child]
    elif kind == Kind.LIST:
        _, m = _LIST_HEAD.unpack_from(payload)
        for idx, length in _LIST_ENT.iter_unpack(payload[_LIST_HEAD.size:_LIST_HEAD.size + m * _LIST_ENT.size]):
            if idx != _NONE and children[idx] in bad_keys and bad_keys[children[idx]] != length:
                yield children[idx], None, length, bad_keys[children[idx]]
    elif kind == Kind.POINT and children and children[0] in bad_keys:
        try:
            rec = json.loads(bytes(payload))
        except ValueError:
            return
        if rec.get("kind") == "volume" and rec.get("size") != bad_keys[children[0]]:
            yield children[0], None, rec.get("size"), bad_keys[children[0]]


def _tree_files(payload: memoryview, children: list[bytes]) -> Iterator[tuple[bytes, bytes | None, int]]:
    """(name, blob key or None, size) of a leaf TREE node's regular files."""
    p = bytes(payload)
    (count,) = _U32.unpack_from(p)
    if count == _NONE:
        return
    off = 4
    for _ in range(count):
        f = _TREE_FIXED.unpack_from(p, off)
        nl, typ, size, ref, tl, nx = f[0], f[1], f[8], f[14], f[15], f[16]
        off += _TREE_FIXED.size
        if typ == _REG:
            yield p[off:off + nl], None if ref == _NONE else children[ref], size
        off += nl + tl
        for _ in range(nx):
            xn, xv = _XA.unpack_from(p, off)
            off += _XA.size + xn + xv


def _links(payload: memoryview, kind: int, children: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(child, name) for each child of a node: the entry name for a directory's entries,
    b"" for pages, LIST parts and a point's root."""
    named: dict[bytes, bytes] = {}
    if kind == Kind.TREE:
        p = bytes(payload)
        (count,) = _U32.unpack_from(p)
        if count != _NONE:
            off = 4
            for _ in range(count):
                f = _TREE_FIXED.unpack_from(p, off)
                nl, ref, tl, nx = f[0], f[14], f[15], f[16]
                off += _TREE_FIXED.size
                if ref != _NONE:
                    named.setdefault(children[ref], p[off:off + nl])
                off += nl + tl
                for _ in range(nx):
                    xn, xv = _XA.unpack_from(p, off)
                    off += _XA.size + xn + xv
    for c in children:
        yield c, named.get(c, b"")


def _name_size_problems(safe: Safe, txn: Txn, bad_keys: dict[bytes, int | None], bad_nodes: list[bytes],
                        r: AuditReport, tmpdir: str) -> None:
    """Report each wrong declared length, naming the point and the path that lead to it.

    A second pass over the live nodes records, in a temporary LMDB database, one parent of
    every object (with the entry name), then climbs from each referrer up to a point."""
    idx = safe.index
    env = lmdb.open(tmpdir, map_size=1 << 40, sync=False, metasync=False, writemap=True,
                    lock=False, max_dbs=0)
    broken = set(bad_nodes)
    findings: list[tuple[bytes, int, bytes | None, bytes | None, int | None, int | None]] = []
    try:
        with env.begin(write=True) as pt:
            for key, val in txn.cursor(db=idx.db["objects"]):
                e = ObjectEntry.decode(val)
                if e.kind == Kind.CHUNK or e.flags & FLAG_DEAD:
                    continue
                try:
                    raw = safe.read_entry(bytes(key), e)
                    children, payload = decode_node(raw)
                    for c, name in _links(payload, e.kind, children):
                        pt.put(c, bytes(key) + bytes([e.kind]) + name, overwrite=False)
                    for f in _referrer_findings(bytes(key), e.kind, raw, bad_keys, bytes(key) in broken):
                        if len(findings) < MAX_FINDINGS:
                            findings.append((bytes(key), e.kind) + f)
                except (IntegrityError, OSError, ValueError, struct.error, IndexError):
                    continue
        with env.begin() as pt:
            for found in findings:
                r.size_problem(_size_message(safe, txn, pt, *found))
    finally:
        env.close()


def _climb(pt: Txn, key: bytes) -> tuple[bytes | None, list[bytes]]:
    """(point key or None, names from the point's root down to ``key``)."""
    names: list[bytes] = []
    cur = key
    for _ in range(_MAX_DEPTH):
        v = pt.get(cur)
        if v is None:
            return None, names
        parent, kind, name = v[:32], v[32], v[33:]
        if kind == Kind.POINT:
            return parent, names
        if name:
            names.insert(0, name)
        cur = parent
    return None, names


def _size_message(safe: Safe, txn: Txn, pt: Txn, node: bytes, kind: int, child: bytes | None,
                  name: bytes | None, declared: int | None, actual: int | None) -> str:
    """The one-line finding for a wrong length ``node`` declares, naming point and path."""
    point: bytes | None
    names: list[bytes]
    if kind == Kind.POINT:
        point, names = node, []
    else:
        point, names = _climb(pt, node)
    if name:
        names.append(name)
    path = "/" + "/".join(n.decode(errors="backslashreplace") for n in names)
    label = "(not reachable from any point)"
    if point is not None:
        rec = txn.get(point, db=safe.index.db["points"])
        try:
            pname = json.loads(safe.open_value(b"points", point, rec)).get("name", "?") if rec is not None \
                else "(forgotten)"
        except (IntegrityError, ValueError):
            pname = "(unreadable record)"
        label = f"{pname} ({point.hex()[:12]})"
    if declared is None:
        return f"point {label}: {path}: directory node {node.hex()[:12]} does not decode"
    if kind == Kind.POINT:
        return (f"point {label}: the point says its volume holds {declared} bytes, its blob "
                f"holds {actual}")
    if kind == Kind.LIST:
        return (f"point {label}: {path}: list node {node.hex()[:12]} of its blob says {declared} bytes "
                f"for a part that holds {actual}")
    what = "no content" if child is None else f"a blob of {actual} bytes" if actual is not None else \
        "an object that is not a blob"
    return f"point {label}: {path}: the tree entry says {declared} bytes but it has {what}"
