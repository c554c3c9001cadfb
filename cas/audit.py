"""Reference-count audit: recompute every object's count from the points and the live nodes,
and report every difference with the stored counts.

By definition (cas/store.py) an object's count is the number of live (not dead) nodes that
list it as a child plus one when it is a point that the ``points`` table names, plus the drops
still waiting in the release queue (cas/release.py). The audit

1. walks the ``objects`` table once, reads every live node from its pack and adds one to each
   child's expected count; expected counts are summed in a bounded dict and merged, in key
   order, into a temporary LMDB database (so memory stays bounded whatever the number of
   objects);
2. merges the ``objects`` table with that database, both in key order, and compares.

Findings that are errors: a stored count that differs from the expected one; a live node
naming an object that is missing or dead; a dead object that is still counted. Objects at
count 0 that are not dead are a crashed backup's orphans (gc buries them): a note, not an
error. Run it under the writer lock, as ``verify`` does, so that packs do not move meanwhile.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from dataclasses import dataclass, field

import lmdb

from .errors import IntegrityError
from .index import FLAG_DEAD, FLAG_PINNED, ObjectEntry
from .keys import Kind
from .nodes import node_children
from .pack import decode_record
from .release import QUEUE

_U32 = struct.Struct("<I")
FLUSH_ENTRIES = 200_000     # expected counts kept in memory before a merge into the temp db
MAX_FINDINGS = 100          # reported in full; the rest are counted


@dataclass
class AuditReport:
    objects: int = 0
    nodes_read: int = 0
    orphans: int = 0
    dead: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def problem(self, message: str) -> None:
        self.mismatches += 1
        if len(self.errors) < MAX_FINDINGS:
            self.errors.append(message)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "objects": self.objects, "nodes_read": self.nodes_read,
                "orphans": self.orphans, "dead": self.dead, "problems": self.mismatches,
                "errors": self.errors}


class _Counts:
    """Expected counts: an in-memory dict merged into a temp LMDB db when it grows."""

    def __init__(self, tmpdir: str):
        self.env = lmdb.open(tmpdir, map_size=1 << 40, sync=False, metasync=False,
                             writemap=True, lock=False, max_dbs=0)
        self.pending: dict[bytes, int] = {}

    def add(self, key: bytes, n: int = 1) -> None:
        p = self.pending
        p[key] = p.get(key, 0) + n
        if len(p) >= FLUSH_ENTRIES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with self.env.begin(write=True) as txn:
            for k in sorted(self.pending):
                old = txn.get(k)
                n = self.pending[k] + (_U32.unpack(old)[0] if old is not None else 0)
                txn.put(k, _U32.pack(n))
        self.pending.clear()

    def close(self) -> None:
        self.env.close()


def audit(safe) -> AuditReport:
    """Recompute every reference count (see the module docstring); read-only."""
    r = AuditReport()
    idx = safe.index
    tmp = tempfile.mkdtemp(prefix="pointsafe-audit-")
    try:
        counts = _Counts(tmp)
        try:
            queue = idx.existing(QUEUE)   # never created here: verify must run on a full disk
            with idx.read() as txn:
                for k, _ in txn.cursor(db=idx.db["points"]):
                    counts.add(k)
                for k, v in (txn.cursor(db=queue) if queue is not None else ()):
                    counts.add(k, _U32.unpack(v)[0])   # drops a forget queued but not applied yet
                for key, val in txn.cursor(db=idx.db["objects"]):
                    e = ObjectEntry.decode(val)
                    if e.kind == Kind.CHUNK or e.flags & FLAG_DEAD:
                        continue
                    try:
                        buf = safe.store.read(e.pack, e.offset, e.record_len)
                        _, raw = decode_record(buf, e.pack, e.offset, rehash=False, expect_key=key)
                    except (IntegrityError, OSError) as err:
                        r.problem(f"node {key.hex()[:12]} cannot be read to count its children: {err}")
                        continue
                    r.nodes_read += 1
                    for c in node_children(raw):
                        counts.add(c)
                counts.flush()
                _compare(idx, txn, counts, r)
        finally:
            counts.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def _compare(idx, txn, counts: _Counts, r: AuditReport) -> None:
    """Merge-join the objects table with the expected counts, both in key order."""
    with counts.env.begin() as ctxn:
        exp = ctxn.cursor()
        have_exp = exp.first()
        for key, val in txn.cursor(db=idx.db["objects"]):
            # Expected counts for keys below this one name objects that are not in the index.
            while have_exp and exp.key() < key:
                r.problem(f"object {exp.key().hex()[:12]} is referenced {_U32.unpack(exp.value())[0]} "
                          "time(s) by live nodes or points but is missing from the index")
                have_exp = exp.next()
            want = 0
            if have_exp and exp.key() == key:
                want = _U32.unpack(exp.value())[0]
                have_exp = exp.next()
            e = ObjectEntry.decode(val)
            r.objects += 1
            short = key.hex()[:12]
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
