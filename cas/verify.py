"""Verify a safe: pack framing and checksums, index <-> pack agreement, points.

Memory stays bounded: packs are scanned one at a time and the index is consulted per record,
so a safe of millions of objects verifies in the memory of one pack's bookkeeping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from .audit import audit
from .index import FLAG_DEAD, pack_from_dbkey, PackEntry
from .keys import Kind
from .pack import pack_id_from_name, pack_name, scan_pack
from .store import Safe, release_lock, take_lock


@dataclass
class VerifyReport:
    packs: int = 0
    objects: int = 0
    bytes_checked: int = 0
    points: int = 0
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refcounts: dict | None = None   # the refcount audit's summary (cas/audit.py)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str, pack: int | None = None, offset: int | None = None, **extra) -> None:
        d = {"message": message}
        if pack is not None:
            d["pack"] = pack_name(pack)
        if offset is not None:
            d["offset"] = offset
        d.update(extra)
        self.errors.append(d)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "packs": self.packs, "objects": self.objects, "points": self.points,
                "bytes_checked": self.bytes_checked, "errors": self.errors, "notes": self.notes,
                "refcounts": self.refcounts}


def verify(safe: Safe, data: bool = False, progress: Callable[[int], None] | None = None,
           lock: bool = True) -> VerifyReport:
    """Check every pack record's framing and checksum (``data``: also re-hash every object
    against its key) and that the index and the packs agree. Holds the writer lock so that a
    concurrent gc cannot delete packs mid-check."""
    lockf = take_lock(safe.path, "verify") if lock else None
    try:
        rep = _verify(safe, data, progress)
        _audit_into(safe, rep)
        return rep
    finally:
        if lockf is not None:
            release_lock(lockf)


def _verify(safe: Safe, data: bool, progress) -> VerifyReport:
    r = VerifyReport()
    idx = safe.index
    with idx.read() as txn:
        packs = {pack_from_dbkey(k): PackEntry.decode(v) for k, v in txn.cursor(db=idx.db["packs"])}
        on_disk = {pack_id_from_name(n) for n in os.listdir(safe.packs_dir)} - {None}
        for pid in sorted(on_disk - set(packs)):
            r.notes.append(f"pack {pack_name(pid)} is not in the index (left by a crashed writer or gc; "
                           "the next writer removes it)")
        indexed_total = 0
        for pid in sorted(packs):
            pe = packs[pid]
            r.packs += 1
            path = safe.pack_path(pid)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                r.error(f"pack {pack_name(pid)} is missing ({pe.objects} objects lost)", pid)
                indexed_total += pe.objects
                continue
            if size < pe.committed_len:
                r.error(f"pack {pack_name(pid)} is truncated: {size} bytes on disk, "
                        f"{pe.committed_len} committed", pid, size)
            elif size > pe.committed_len:
                r.notes.append(f"pack {pack_name(pid)} has {size - pe.committed_len} uncommitted bytes "
                               "at its end (a crashed writer's; the next writer truncates them)")
            found = 0
            for item in scan_pack(path, pid, limit=min(size, pe.committed_len), read_data=True, rehash=data):
                h = item.header
                if item.error is not None and h is None:
                    r.error(str(item.error), pid, item.offset)
                    break
                e = idx.get_object(txn, h.key)
                here = e is not None and e.pack == pid and e.offset == item.offset
                if item.error is not None:
                    if here or e is None:
                        r.error(str(item.error), pid, item.offset, object=h.key.hex())
                    if "past the end" in str(item.error):
                        break
                if here:
                    found += 1
                    if (e.kind, e.codec, e.stored_len, e.raw_len) != (h.kind, h.codec, h.stored_len, h.raw_len):
                        r.error(f"pack {pack_name(pid)} offset {item.offset}: index entry of object "
                                f"{h.key.hex()[:12]} disagrees with its record", pid, item.offset)
                r.objects += 1
                r.bytes_checked += h.total
                if progress:
                    progress(h.total)
            if found != pe.objects:
                r.error(f"pack {pack_name(pid)}: the index names {pe.objects} objects in it, "
                        f"{found} were found at their recorded offsets", pid)
            indexed_total += pe.objects
        n_index = txn.stat(idx.db["objects"])["entries"]
        if n_index != indexed_total:
            r.error(f"the index holds {n_index} objects but its packs account for {indexed_total}")
        for k, _ in txn.cursor(db=idx.db["points"]):
            r.points += 1
            e = idx.get_object(txn, k)
            if e is None or e.kind != Kind.POINT or e.flags & FLAG_DEAD:
                r.error(f"point {k.hex()[:12]}: its record object is missing from the index")
    return r


def _audit_into(safe: Safe, r: VerifyReport) -> None:
    """Add the reference-count audit (recomputed from the points) to the report."""
    a = audit(safe)
    r.refcounts = a.as_dict()
    for m in a.errors:
        r.error(f"refcount audit: {m}")
    if a.mismatches > len(a.errors):
        r.error(f"refcount audit: {a.mismatches - len(a.errors)} more problems not listed")
    if a.orphans:
        r.notes.append(f"{a.orphans} objects at count 0 left by an interrupted backup "
                       "('pointsafe gc' reclaims them)")
