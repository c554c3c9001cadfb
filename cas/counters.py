"""Totals of the safe kept up to date by every commit, so that ``status`` costs O(1).

Monitoring calls ``pointsafe status --check`` every minute; summing 5 million index entries
each time costs seconds. Instead the transactions that change what the totals describe
adjust them in the ``meta`` table (key ``counters``, docs/FORMAT.md):

- object totals (objects that are not dead, their raw and stored bytes, the raw bytes of
  their data chunks) change only when an object is first indexed, dies or comes back to
  life — all in ``cas.refcount.RefChange`` and the writer's commit;
- pack totals (packs, committed bytes, live and dead record bytes) change only through
  ``Index.put_pack`` / ``Index.delete_pack``, which apply the difference to the old entry.

A safe whose index has no counters yet (written by an older pointsafe, or just rebuilt by
``repair``) gets them computed by one scan, by the next writer (``ensure``); until then
``read`` scans on demand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .keys import Kind

if TYPE_CHECKING:
    from .index import Index, PackEntry, Table, Txn

META_KEY = b"counters"
_LAYOUT = struct.Struct("<8q")


@dataclass(frozen=True, slots=True)
class SafeCounters:
    """Totals over the index. Object totals count objects that are not dead (live ones and
    orphans not yet buried); pack totals count the packs the index names."""

    objects: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunk_raw_bytes: int = 0    # unique data: the raw bytes of chunks
    packs: int = 0
    pack_bytes: int = 0         # committed bytes of every pack
    live_bytes: int = 0         # record bytes of objects that are not dead
    dead_bytes: int = 0         # record bytes gc can reclaim

    def encode(self) -> bytes:
        """The 64-byte ``meta`` value (eight i64 LE, in field order)."""
        return _LAYOUT.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def decode(cls, b: bytes) -> "SafeCounters":
        """The totals a 64-byte ``meta`` value holds; struct.error on any other length."""
        return cls(*_LAYOUT.unpack(b))


class CounterDelta:
    """Changes to the totals gathered during one transaction, applied once at its end."""

    __slots__ = ("d",)

    def __init__(self) -> None:
        self.d = [0] * 8

    def object(self, kind: int, raw_len: int, stored_len: int, sign: int) -> None:
        """An object became counted (+1: new or revived) or stopped being counted (-1: died)."""
        d = self.d
        d[0] += sign
        d[1] += sign * raw_len
        d[2] += sign * stored_len
        if kind == Kind.CHUNK:
            d[3] += sign * raw_len

    def pack(self, old: PackEntry | None, new: PackEntry | None) -> None:
        """A pack entry changed from ``old`` to ``new`` (either may be None)."""
        d = self.d
        for pe, sign in ((old, -1), (new, 1)):
            if pe is not None:
                d[4] += sign
                d[5] += sign * pe.committed_len
                d[6] += sign * pe.live_bytes
                d[7] += sign * pe.dead_bytes

    def apply(self, txn: Txn, meta_db: Table) -> None:
        """Add the gathered changes to the stored totals (nothing when they are missing: the
        next ``ensure`` computes them whole), then start again from zero. ``txn`` is the write
        transaction whose changes these are."""
        if not any(self.d):
            return
        v = txn.get(META_KEY, db=meta_db)
        if v is None:
            return
        cur = _LAYOUT.unpack(v)
        txn.put(META_KEY, _LAYOUT.pack(*(a + b for a, b in zip(cur, self.d))), db=meta_db)
        self.d = [0] * 8


def compute(index: Index, txn: Txn) -> SafeCounters:
    """The totals by one scan of the ``objects`` and ``packs`` tables (O(objects): seconds for
    millions of objects)."""
    from .index import FLAG_DEAD, OBJ, PackEntry
    d = CounterDelta()
    for _, v in txn.cursor(db=index.db["objects"]):
        _pack, _off, stored, raw, kind, _codec, flags, _rc = OBJ.unpack(v)
        if not flags & FLAG_DEAD:
            d.object(kind, raw, stored, 1)
    for _, v in txn.cursor(db=index.db["packs"]):
        d.pack(None, PackEntry.decode(v))
    return SafeCounters(*d.d)


def _stored(index: Index, txn: Txn) -> SafeCounters | None:
    """The stored totals, or None when there are none or they cannot be right.

    A version-2 safe stays writable by an older pointsafe, which changes objects and packs
    without keeping the totals. The O(1) table sizes catch that: the packs table must hold
    ``packs`` entries, and ``objects`` (the objects that are not dead) lies between the objects
    table's entries less the ``zero`` table's (dead ones and orphans) and its entries."""
    v = txn.get(META_KEY, db=index.db["meta"])
    if v is None:
        return None
    c = SafeCounters.decode(v)
    try:
        objects = txn.stat(index.db["objects"])["entries"]
        zero = txn.stat(index.db["zero"])["entries"]
        packs = txn.stat(index.db["packs"])["entries"]
    except KeyError:      # a read-only index without some table: nothing to compare with
        return c
    if c.packs != packs or not objects - zero <= c.objects <= objects:
        return None
    return c


def read(index: Index) -> SafeCounters:
    """The totals: stored ones in O(1), or a scan (``compute``) when the index has none yet
    (or an older pointsafe wrote to it since, see ``_stored``). Needs no lock; it reads one
    snapshot."""
    with index.read() as txn:
        c = _stored(index, txn)
        return c if c is not None else compute(index, txn)


def ensure(index: Index) -> None:
    """Store the totals if the index has none or has wrong ones (a writer calls this when it
    starts, holding the writer lock); SafeError on a read-only index that lacks them."""
    with index.read() as txn:
        if _stored(index, txn) is not None:
            return
    with index.write() as txn:
        if _stored(index, txn) is None:
            txn.put(META_KEY, compute(index, txn).encode(), db=index.db["meta"])
