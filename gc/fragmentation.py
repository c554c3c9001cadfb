"""The fragmentation figure: seeks per GiB when restoring the newest point of each source.

Definition (docs/BENCHMARKS.md, "Retention and GC"): walk the newest point of every source in
file order (gc/walk.py) and look at where each chunk's record lies. A read is *sequential* when
its record is in the same pack as the previous read's and starts at or after the previous
record's end, at most ``GAP`` (128 KiB, a typical read-ahead window) beyond it; any other read
is a *seek* (the first read is one too). The figure is

    seeks_per_gib = seeks / (logical bytes read / 2**30)

Its floor is one seek per pack the data fills (``minimum_per_gib``: stored bytes / pack size);
a freshly written safe sits near that floor, a safe whose newest point reuses blocks written
over months sits far above it. ``defrag`` brings it back down.

The figure costs a walk of the newest points (one index look-up per chunk), so
``fragmentation(safe)`` caches it in the index's ``meta`` table, keyed by the newest points'
ids and the layout generation that every relocation bumps.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import cast

import lmdb

from pointsafe.cas import Point, Safe
from pointsafe.cas.relocate import LAYOUT_GEN

from .walk import newest_chunks, newest_points, with_entries

GAP = 128 * 1024
GIB = float(1 << 30)
CACHE_KEY = b"gc.fragmentation"


@dataclass
class Cursor:
    """Tracks the reader's position; ``step`` says whether a read at (pack, offset) seeks."""

    pack: int = -1
    end: int = 0

    def step(self, pack: int, offset: int, record_len: int) -> bool:
        """Move the reader to a record of ``record_len`` bytes at (pack, offset); True when that is a
        seek (not within GAP after the previous record in the same pack).
        """
        seq = pack == self.pack and self.end <= offset <= self.end + GAP
        self.pack, self.end = pack, offset + record_len
        return not seq


def measure(safe: Safe, points: list[Point] | None = None) -> dict:
    """Walk the newest points now and compute the figure (no cache)."""
    pts = newest_points(safe, points)
    cur = Cursor()
    seeks = reads = logical = stored = 0
    packs: set[int] = set()
    for _key, length, e in with_entries(safe, newest_chunks(safe, pts)):
        if e is None:
            continue
        reads += 1
        logical += length
        stored += e.record_len
        packs.add(e.pack)
        if cur.step(e.pack, e.offset, e.record_len):
            seeks += 1
    pack_size = safe.config.pack_size
    minimum = max(1, math.ceil(stored / pack_size)) if reads else 0
    gib = logical / GIB
    return {
        "points": [p.id for p in pts],
        "reads": reads,
        "bytes": logical,
        "stored_bytes": stored,
        "seeks": seeks,
        "packs": len(packs),
        "minimum_seeks": minimum,
        "seeks_per_gib": round(seeks / gib, 1) if gib else 0.0,
        "minimum_per_gib": round(minimum / gib, 1) if gib else 0.0,
        "excess": round(seeks / minimum, 2) if minimum else 1.0,
    }


def _signature(safe: Safe, pts: list[Point]) -> str:
    with safe.index.read() as t:
        gen = safe.index.get_meta_int(t, LAYOUT_GEN, 0)
    h = hashlib.sha256(str(gen).encode())
    for p in pts:
        h.update(p.id.encode())
    return h.hexdigest()


def fragmentation(safe: Safe, use_cache: bool = True) -> dict:
    """The fragmentation figure of ``safe`` (see the module docstring), cached in the index.

    Returns a dict: seeks, seeks_per_gib, minimum_seeks, minimum_per_gib, excess (seeks over
    the minimum), reads, bytes, stored_bytes, packs, points (ids walked), cached (bool).
    """
    pts = newest_points(safe)
    sig = _signature(safe, pts)
    if use_cache:
        v = _cache_value(safe)
        if v is not None:
            try:
                c = json.loads(v)
                if c.get("sig") == sig:
                    return dict(c["value"], cached=True)
            except (ValueError, KeyError, TypeError):
                pass
    value = measure(safe, pts)
    try:
        with safe.index.write() as t:
            t.put(CACHE_KEY, json.dumps({"sig": sig, "value": value}).encode(), db=safe.index.db["meta"])
    except lmdb.Error:
        pass   # a read-only index: the figure is still right, just not cached
    return dict(value, cached=False)


def _cache_value(safe: Safe) -> bytes | None:
    """The cached figure's JSON as stored, or None."""
    with safe.index.read() as t:
        # the index's read transactions are made with buffers=False: values are bytes
        return cast("bytes | None", t.get(CACHE_KEY, db=safe.index.db["meta"]))


def last_fragmentation(safe: Safe) -> dict | None:
    """The figure last measured, without walking anything: ``stale`` is True when points or
    the layout changed since (``status`` shows it; gc, defrag and ``show --fragmentation``
    measure anew). None when it was never measured."""
    v = _cache_value(safe)
    if v is None:
        return None
    try:
        c = json.loads(v)
        return dict(c["value"], cached=True, stale=c.get("sig") != _signature(safe, newest_points(safe)))
    except (ValueError, KeyError, TypeError):
        return None


def cached_fragmentation(safe: Safe) -> dict | None:
    """The cached figure when it is still valid, else None (never walks)."""
    pts = newest_points(safe)
    v = _cache_value(safe)
    if v is None:
        return None
    try:
        c = json.loads(v)
        if c.get("sig") == _signature(safe, pts):
            return dict(c["value"], cached=True)
    except (ValueError, KeyError, TypeError):
        pass
    return None
